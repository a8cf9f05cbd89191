-- The reconcilers' leadership (Postgres only: a SQLite cache serves one
-- process, which always leads). One row per region: the replica whose
-- `holder` it names leads until `expires_at` (nanoseconds since the epoch on
-- the database's clock) and renews it well before. Another replica takes the
-- lead only once the lease has run out, moving `generation` on: every cache
-- write of a reconciler's pass checks, in its transaction and under the
-- change log's revision lock, that its generation still holds, so a leader
-- that lost its lease (cut off, paused) cannot write after its successor.
-- A lease rather than a session advisory lock: a session lock is freed only
-- when Postgres notices the session is gone, which behind a proxy that
-- answers keepalives is never.
CREATE TABLE leader_leases (
    scope TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    generation BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
