-- The change log (an outbox): one row per change to `rooms`, written in the
-- same transaction as the change. Revisions are dense and in commit order,
-- because every writing transaction first takes the `revision` row of
-- cache_state (a write lock on SQLite, a row lock on Postgres) and holds it to
-- commit.
CREATE TABLE room_events (
    revision BIGINT PRIMARY KEY NOT NULL,
    arn TEXT NOT NULL,
    -- CREATED, UPDATED or DELETED.
    kind TEXT NOT NULL,
    -- API or RECONCILER.
    source TEXT NOT NULL,
    -- Nanoseconds since the Unix epoch.
    observed_at BIGINT NOT NULL,
    -- The room after the change (for DELETED, the last known room), as JSON.
    room TEXT NOT NULL,
    -- The room before, as JSON; NULL for CREATED.
    previous TEXT,
    -- JSON array of the Room field names that differ.
    changed_fields TEXT NOT NULL
);

CREATE INDEX room_events_observed_at ON room_events (observed_at);

-- The newest revision ever given out; survives compaction of the log.
INSERT INTO cache_state (key, value) VALUES ('revision', 0);
