//! Conversions between protobuf messages and domain values.

use crate::domain::{
    Error, EventKind, EventSource, FallbackResult, ListQuery, MessageReviewHandler, NewRoom,
    Result, Room, RoomArn, RoomEvent, RoomPatch, Timestamp,
};
use crate::feed::{WatchItem, WatchRequest};
use crate::rooms::Consistency;

use super::proto;

pub(super) fn new_room(req: proto::CreateRoomRequest) -> Result<NewRoom> {
    Ok(NewRoom {
        name: req.name,
        maximum_message_rate_per_second: req.maximum_message_rate_per_second,
        maximum_message_length: req.maximum_message_length,
        // An empty uri on create is no handler.
        message_review_handler: req
            .message_review_handler
            .map(handler)
            .transpose()?
            .filter(|h| !h.uri.is_empty()),
        tags: req.tags.into_iter().collect(),
        logging_configuration_identifiers: req.logging_configuration_identifiers,
    })
}

pub(super) fn room_patch(req: proto::UpdateRoomRequest) -> Result<RoomPatch> {
    Ok(RoomPatch {
        name: req.name,
        maximum_message_rate_per_second: req.maximum_message_rate_per_second,
        maximum_message_length: req.maximum_message_length,
        message_review_handler: req.message_review_handler.map(handler).transpose()?,
        logging_configuration_identifiers: req
            .logging_configuration_identifiers
            .map(|ids| ids.identifiers),
    })
}

/// A conditional write's `expected_update_time`: any valid Timestamp
/// (0001-01-01 to 9999-12-31). One outside the years a room's update_time can
/// hold (1678-2262, nanoseconds in an i64) is kept at the nearest end, and so
/// matches no room.
pub(super) fn expected_update_time(
    value: Option<prost_types::Timestamp>,
) -> Result<Option<Timestamp>> {
    /// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, in Unix seconds.
    const SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;
    const FIELD: &str = "expected_update_time";
    let Some(t) = value else {
        return Ok(None);
    };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(
            FIELD,
            format!("nanos must be between 0 and 999999999, got {}", t.nanos),
        ));
    }
    if !SECONDS.contains(&t.seconds) {
        return Err(Error::invalid(
            FIELD,
            format!(
                "must be between 0001-01-01 and 9999-12-31, got {} seconds",
                t.seconds
            ),
        ));
    }
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    let nanos = nanos.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    Ok(Some(Timestamp::from_nanos(nanos)))
}

pub(super) fn list_query(req: proto::ListRoomsRequest) -> ListQuery {
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    ListQuery {
        name: non_empty(req.name),
        message_review_handler_uri: non_empty(req.message_review_handler_uri),
        logging_configuration_identifier: non_empty(req.logging_configuration_identifier),
        max_results: (req.max_results != 0).then_some(req.max_results),
        next_token: non_empty(req.next_token),
    }
}

/// The feed's request for a WatchRoomsRequest; the caller fills in what the
/// connection decides (`wake_group`, `end_at`).
pub(super) fn watch_request(req: proto::WatchRoomsRequest) -> Result<WatchRequest> {
    let mut arns = Vec::with_capacity(req.identifiers.len());
    let mut violations = Vec::new();
    for (i, identifier) in req.identifiers.iter().enumerate() {
        match RoomArn::parse(&format!("identifiers[{i}]"), identifier) {
            Ok(arn) => arns.push(arn),
            Err(Error::InvalidArgument(v)) => violations.extend(v),
            Err(e) => return Err(e),
        }
    }
    if !violations.is_empty() {
        return Err(Error::InvalidArgument(violations));
    }
    Ok(WatchRequest {
        arns,
        after_revision: req.after_revision,
        include_snapshot: req.include_snapshot,
        regions: req.regions,
        ..WatchRequest::default()
    })
}

pub(super) fn watch_item(item: WatchItem) -> proto::WatchRoomsResponse {
    use proto::watch_rooms_response::Kind;
    let kind = match item {
        WatchItem::Snapshot(r) => Kind::Event(proto::RoomEvent {
            r#type: proto::EventType::Snapshot as i32,
            room: Some(room(r)),
            ..proto::RoomEvent::default()
        }),
        WatchItem::Event(event) => Kind::Event(room_event(&event)),
        WatchItem::Progress {
            revision,
            snapshot_complete,
        } => Kind::Progress(proto::Progress {
            revision,
            snapshot_complete,
        }),
    };
    proto::WatchRoomsResponse { kind: Some(kind) }
}

/// A change event (not a snapshot: see [`watch_item`]) as a whole message.
pub(super) fn event_response(event: &RoomEvent) -> proto::WatchRoomsResponse {
    proto::WatchRoomsResponse {
        kind: Some(proto::watch_rooms_response::Kind::Event(room_event(event))),
    }
}

fn room_event(event: &RoomEvent) -> proto::RoomEvent {
    proto::RoomEvent {
        revision: event.revision,
        r#type: match event.kind {
            EventKind::Created => proto::EventType::Created,
            EventKind::Updated => proto::EventType::Updated,
            EventKind::Deleted => proto::EventType::Deleted,
        } as i32,
        room: Some(room(event.room.clone())),
        previous: event.previous.clone().map(room),
        changed_fields: event.changed_fields.clone(),
        source: match event.source {
            EventSource::Api => proto::EventSource::Api,
            EventSource::Reconciler => proto::EventSource::Reconciler,
        } as i32,
        observed_at: Some(timestamp(event.observed_at)),
    }
}

pub(super) fn consistency(value: i32) -> Result<Consistency> {
    match proto::ReadConsistency::try_from(value) {
        Ok(proto::ReadConsistency::Unspecified | proto::ReadConsistency::Cached) => {
            Ok(Consistency::Cached)
        }
        Ok(proto::ReadConsistency::Strong) => Ok(Consistency::Strong),
        Err(_) => Err(Error::invalid(
            "consistency",
            format!("unknown ReadConsistency value {value}"),
        )),
    }
}

fn handler(h: proto::MessageReviewHandler) -> Result<MessageReviewHandler> {
    let fallback_result = match proto::FallbackResult::try_from(h.fallback_result) {
        Ok(proto::FallbackResult::Unspecified | proto::FallbackResult::Allow) => {
            FallbackResult::Allow
        }
        Ok(proto::FallbackResult::Deny) => FallbackResult::Deny,
        Err(_) => {
            return Err(Error::invalid(
                "messageReviewHandler.fallbackResult",
                format!("unknown FallbackResult value {}", h.fallback_result),
            ));
        }
    };
    Ok(MessageReviewHandler {
        uri: h.uri,
        fallback_result,
    })
}

pub(super) fn room(room: Room) -> proto::Room {
    proto::Room {
        arn: room.arn,
        id: room.id,
        name: room.name,
        create_time: Some(timestamp(room.create_time)),
        update_time: Some(timestamp(room.update_time)),
        maximum_message_rate_per_second: room.maximum_message_rate_per_second,
        maximum_message_length: room.maximum_message_length,
        message_review_handler: room
            .message_review_handler
            .map(|h| proto::MessageReviewHandler {
                uri: h.uri,
                fallback_result: match h.fallback_result {
                    FallbackResult::Allow => proto::FallbackResult::Allow,
                    FallbackResult::Deny => proto::FallbackResult::Deny,
                } as i32,
            }),
        tags: room.tags.into_iter().collect(),
        logging_configuration_identifiers: room.logging_configuration_identifiers,
        details_pending: room.details_pending,
    }
}

pub(super) fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let nanos = t.as_nanos();
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}
