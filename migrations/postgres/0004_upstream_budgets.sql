-- The fleet's shared upstream budget (Postgres only: a SQLite cache serves
-- one process, whose budget lives in memory). One row per IVS Chat region
-- and operation, a GCRA: `tat` is the theoretical arrival time, the instant
-- from which the next slot is free. A slot is taken by one conditional
-- upsert that moves `tat` on by the interval (1.06 / rate), so the slots
-- handed to every replica together are spaced at least that far apart.
-- Times are nanoseconds since the Unix epoch on the database's clock, so
-- replicas' clocks need not agree.
CREATE TABLE upstream_budgets (
    region TEXT NOT NULL,
    operation TEXT NOT NULL,
    tat BIGINT NOT NULL,
    -- After a ThrottlingException: no slot before this.
    paused_until BIGINT NOT NULL DEFAULT 0,
    -- The pause the next ThrottlingException starts (0: none in a row yet).
    next_pause BIGINT NOT NULL DEFAULT 0,
    -- Slots handed out so far, by every replica (the fleet's use).
    granted BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (region, operation)
);

-- CreateRoom calls in flight on any replica (Postgres only), so that the
-- replica that reconciles leaves a brand-new room it finds in IVS Chat for
-- its next pass while some replica may be about to cache it as its own
-- creation. A row lives from before the call until the room is cached;
-- one left by a crash runs out at `until` (the database's clock, ns).
CREATE TABLE creations_in_flight (
    id TEXT PRIMARY KEY,
    until BIGINT NOT NULL
);
