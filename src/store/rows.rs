//! Rows decoded into domain types.

use super::*;

/// The `rooms` columns, in the order `room` reads them; a macro so statements
/// stay `&'static str` (sqlx refuses SQL built at run time).
macro_rules! columns {
    () => {
        "arn, id, name, create_time, update_time, \
         maximum_message_rate_per_second, maximum_message_length, review_handler_uri, \
         review_handler_fallback, tags, logging_configuration_identifiers, validated_at, deleted_at, \
         details_pending"
    };
}

/// The `room_events` columns, in the order `event` reads them.
macro_rules! event_columns {
    () => {
        "revision, arn, kind, source, observed_at, room, previous, changed_fields, validated_at"
    };
}

pub(super) fn revision_from(revision: i64) -> Result<u64> {
    Ok(u64::try_from(revision).context("negative revision in the change log")?)
}

pub(super) fn event(row: &AnyRow) -> Result<RoomEvent> {
    let kind: String = row.try_get("kind")?;
    let source: String = row.try_get("source")?;
    let room: String = row.try_get("room")?;
    let previous: Option<String> = row.try_get("previous")?;
    let changed_fields: String = row.try_get("changed_fields")?;
    Ok(RoomEvent {
        revision: revision_from(row.try_get("revision")?)?,
        kind: EventKind::parse(&kind)
            .with_context(|| format!("unknown event kind {kind:?} in the change log"))?,
        source: EventSource::parse(&source)
            .with_context(|| format!("unknown event source {source:?} in the change log"))?,
        observed_at: Timestamp::from_nanos(row.try_get("observed_at")?),
        validated_at: row
            .try_get::<Option<i64>, _>("validated_at")?
            .map(Timestamp::from_nanos),
        room: serde_json::from_str(&room).context("corrupt room in the change log")?,
        previous: previous
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .context("corrupt previous room in the change log")?,
        changed_fields: serde_json::from_str(&changed_fields)
            .context("corrupt changed fields in the change log")?,
    })
}

pub(super) fn cached_room(row: &AnyRow) -> Result<CachedRoom> {
    Ok(CachedRoom {
        room: room(row)?,
        validated_at: Timestamp::from_nanos(row.try_get("validated_at")?),
        deleted: row.try_get::<Option<i64>, _>("deleted_at")?.is_some(),
    })
}

pub(super) fn room(row: &AnyRow) -> Result<Room> {
    let uri: Option<String> = row.try_get("review_handler_uri")?;
    let fallback: Option<String> = row.try_get("review_handler_fallback")?;
    let message_review_handler = uri.map(|uri| MessageReviewHandler {
        uri,
        fallback_result: fallback
            .as_deref()
            .and_then(FallbackResult::parse)
            .unwrap_or_default(),
    });
    let tags: String = row.try_get("tags")?;
    let logging: String = row.try_get("logging_configuration_identifiers")?;
    Ok(Room {
        arn: row.try_get("arn")?,
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        create_time: Timestamp::from_nanos(row.try_get("create_time")?),
        update_time: Timestamp::from_nanos(row.try_get("update_time")?),
        maximum_message_rate_per_second: int(row.try_get("maximum_message_rate_per_second")?)?,
        maximum_message_length: int(row.try_get("maximum_message_length")?)?,
        message_review_handler,
        tags: serde_json::from_str(&tags).context("corrupt tags in cache")?,
        logging_configuration_identifiers: serde_json::from_str(&logging)
            .context("corrupt logging configuration identifiers in cache")?,
        details_pending: row.try_get::<i64, _>("details_pending")? != 0,
    })
}

pub(super) fn int(n: i64) -> Result<i32> {
    Ok(i32::try_from(n).context("integer out of range in cache")?)
}

pub(super) use {columns, event_columns};
