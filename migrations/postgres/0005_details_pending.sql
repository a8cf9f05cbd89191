-- 1 while the room's message limits have not been read: a full listing put the
-- room in from its summary (which lacks them), and a GetRoom is still to read
-- it whole. Such a row serves ListRooms and watchers (marked details_pending),
-- never GetRoom.
ALTER TABLE rooms ADD COLUMN details_pending BIGINT NOT NULL DEFAULT 0;

-- The warm-up's queue: live rooms whose details are still to be read.
CREATE INDEX rooms_details_pending ON rooms (update_time DESC, arn) WHERE details_pending = 1 AND deleted_at IS NULL;
