use serde::{Deserialize, Serialize};

use super::{Room, Timestamp};

/// What happened to a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventKind {
    Created,
    Updated,
    Deleted,
}

/// Who made a change the cache took in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventSource {
    /// A call through this service.
    Api,
    /// Found upstream: made in IVS Chat behind this service's back.
    Reconciler,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "CREATED",
            EventKind::Updated => "UPDATED",
            EventKind::Deleted => "DELETED",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        [EventKind::Created, EventKind::Updated, EventKind::Deleted]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Api => "API",
            EventSource::Reconciler => "RECONCILER",
        }
    }

    pub fn parse(s: &str) -> Option<EventSource> {
        [EventSource::Api, EventSource::Reconciler]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One change to the cache, as the change log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEvent {
    /// Store-wide, dense, in commit order: 1, 2, 3, ...
    pub revision: u64,
    pub kind: EventKind,
    /// The room after the change; for DELETED, the last version known.
    pub room: Room,
    /// The room before the change; none for CREATED.
    pub previous: Option<Room>,
    /// The names of the Room fields that differ (snake_case, as in the proto).
    pub changed_fields: Vec<String>,
    pub source: EventSource,
    pub observed_at: Timestamp,
    /// When IVS Chat last confirmed the room as the event leaves it (the
    /// cache row's, after the change); unknown for events logged before
    /// the log recorded it.
    pub validated_at: Option<Timestamp>,
}

impl RoomEvent {
    /// The event for a cache row going from `before` to `after` (`None`: absent
    /// or deleted), or `None` when nothing a watcher can see changed.
    pub fn between(
        before: Option<&Room>,
        after: Option<&Room>,
        source: EventSource,
        observed_at: Timestamp,
    ) -> Option<RoomEvent> {
        let (kind, room, previous, changed_fields) = match (before, after) {
            (None, None) => return None,
            (None, Some(after)) => (EventKind::Created, after, None, Vec::new()),
            (Some(before), None) => (EventKind::Deleted, before, Some(before), Vec::new()),
            (Some(before), Some(after)) => {
                let changed = before.changed_fields(after);
                if changed.is_empty() {
                    return None;
                }
                (EventKind::Updated, after, Some(before), changed)
            }
        };
        Some(RoomEvent {
            revision: 0,
            kind,
            room: room.clone(),
            previous: previous.cloned(),
            changed_fields: changed_fields.into_iter().map(str::to_owned).collect(),
            source,
            observed_at,
            validated_at: None,
        })
    }
}

impl Room {
    /// The names of the fields (snake_case, as in the proto) in which `other`
    /// differs from `self`.
    pub fn changed_fields(&self, other: &Room) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("arn", self.arn != other.arn);
        check("id", self.id != other.id);
        check("name", self.name != other.name);
        check("create_time", self.create_time != other.create_time);
        check("update_time", self.update_time != other.update_time);
        check(
            "maximum_message_rate_per_second",
            self.maximum_message_rate_per_second != other.maximum_message_rate_per_second,
        );
        check(
            "maximum_message_length",
            self.maximum_message_length != other.maximum_message_length,
        );
        check(
            "message_review_handler",
            self.message_review_handler != other.message_review_handler,
        );
        check("tags", self.tags != other.tags);
        check(
            "logging_configuration_identifiers",
            self.logging_configuration_identifiers != other.logging_configuration_identifiers,
        );
        check(
            "details_pending",
            self.details_pending != other.details_pending,
        );
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn room() -> Room {
        Room {
            arn: "arn:aws:ivschat:us-east-1:123456789012:room/abcdefghijkl".into(),
            id: "abcdefghijkl".into(),
            name: "lobby".into(),
            create_time: Timestamp::from_nanos(1),
            update_time: Timestamp::from_nanos(1),
            maximum_message_rate_per_second: 10,
            maximum_message_length: 500,
            message_review_handler: None,
            tags: BTreeMap::new(),
            logging_configuration_identifiers: Vec::new(),
            details_pending: false,
        }
    }

    #[test]
    fn an_update_names_exactly_the_fields_that_differ() {
        let before = room();
        let mut after = room();
        after.update_time = Timestamp::from_nanos(2);
        after.tags.insert("team".into(), "a".into());
        let event = RoomEvent::between(
            Some(&before),
            Some(&after),
            EventSource::Api,
            Timestamp::EPOCH,
        )
        .expect("a change");
        assert_eq!(event.kind, EventKind::Updated);
        assert_eq!(event.changed_fields, ["update_time", "tags"]);
        assert_eq!(event.previous.as_ref(), Some(&before));
        assert_eq!(event.room, after);
    }

    #[test]
    fn no_visible_change_is_no_event() {
        assert_eq!(
            RoomEvent::between(
                Some(&room()),
                Some(&room()),
                EventSource::Api,
                Timestamp::EPOCH
            ),
            None
        );
        assert_eq!(
            RoomEvent::between(None, None, EventSource::Api, Timestamp::EPOCH),
            None
        );
    }

    #[test]
    fn a_delete_carries_the_last_known_room() {
        let event = RoomEvent::between(
            Some(&room()),
            None,
            EventSource::Reconciler,
            Timestamp::EPOCH,
        )
        .expect("a change");
        assert_eq!(event.kind, EventKind::Deleted);
        assert_eq!(event.room, room());
        assert_eq!(event.previous, Some(room()));
        assert_eq!(event.source, EventSource::Reconciler);
    }
}
