-- CreateRoom request_ids (AIP-155): which request created which room. A row is
-- claimed by one attempt (owner) until lease_until, which it renews while it
-- works; once the room exists, arn and room record it and answer every retry.
-- Rows first claimed more than the retention window ago are forgotten.
CREATE TABLE create_requests (
    request_id TEXT PRIMARY KEY NOT NULL,
    -- SHA-256 (hex) of the request's parameters: a retry must send the same.
    fingerprint TEXT NOT NULL,
    -- Nanoseconds since the Unix epoch, as in rooms.
    claimed_at BIGINT NOT NULL,
    owner TEXT,
    lease_until BIGINT,
    -- Set together once the room was created: its ARN and the room as the
    -- first CreateRoom returned it, as JSON.
    arn TEXT,
    room TEXT
);

CREATE INDEX create_requests_claimed_at ON create_requests (claimed_at);
