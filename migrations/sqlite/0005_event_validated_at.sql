-- When IVS Chat last confirmed the room as the event leaves it (the cache
-- row's validated_at after the change): with it, a replica's memory layer
-- takes the new version from the event instead of dropping the room, so a
-- room changed recently stays readable while the database is away. NULL in
-- events logged before it was recorded (those drop the room, as before).
ALTER TABLE room_events ADD COLUMN validated_at BIGINT;
