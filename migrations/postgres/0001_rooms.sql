-- The room cache. Times are nanoseconds since the Unix epoch (BIGINT), so they
-- compare the same way in SQLite, Postgres and Rust.
CREATE TABLE rooms (
    -- Byte order, as in SQLite, so ties in update_time list in the same order.
    arn TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    -- IVS Chat's updateTime: a row is only ever replaced by a newer one.
    update_time BIGINT NOT NULL,
    maximum_message_rate_per_second BIGINT NOT NULL,
    maximum_message_length BIGINT NOT NULL,
    -- Both NULL when the room has no message review handler.
    review_handler_uri TEXT,
    review_handler_fallback TEXT,
    -- JSON object with sorted keys, so equal tags are equal text.
    tags TEXT NOT NULL,
    -- JSON array of logging-configuration ARNs.
    logging_configuration_identifiers TEXT NOT NULL,
    -- When this row was last confirmed by IVS Chat.
    validated_at BIGINT NOT NULL,
    -- Set when IVS Chat said the room is gone: a tombstone that keeps a slow,
    -- older response from bringing the room back.
    deleted_at BIGINT
);

CREATE INDEX rooms_newest_first ON rooms (update_time DESC, arn);

-- Facts about the cache as a whole, e.g. when a full listing last completed.
CREATE TABLE cache_state (
    key TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);
