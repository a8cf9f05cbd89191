use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time with nanosecond precision, as nanoseconds since the Unix epoch.
///
/// IVS Chat's `createTime`/`updateTime` are ISO 8601 timestamps; comparing them is
/// the whole of the cache's update-time rule, so they are kept as one integer that
/// orders the same way in Rust, SQLite and Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const EPOCH: Timestamp = Timestamp(0);

    pub fn now() -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }

    pub const fn from_nanos(nanos: i64) -> Timestamp {
        Timestamp(nanos)
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    pub fn from_system_time(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX)),
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_nanos(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(self.0.unsigned_abs())
        }
    }

    /// Whole microseconds, the precision the emulator hands out.
    pub fn truncate_to_micros(self) -> Timestamp {
        Timestamp(self.0 - self.0.rem_euclid(1_000))
    }

    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        )
    }

    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        )
    }

    /// How long ago this was, or zero if it is in the future.
    pub fn elapsed(self) -> Duration {
        Duration::from_nanos(Timestamp::now().0.saturating_sub(self.0).max(0) as u64)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_micros(self.to_system_time())
        )
    }
}

/// A room ARN, checked against the model's `RoomIdentifier` pattern:
/// `arn:aws:ivschat:REGION:ACCOUNT:room/ID`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomArn(String);

impl RoomArn {
    /// Parses an identifier; `field` names it in the error.
    pub fn parse(field: &str, s: &str) -> super::Result<RoomArn> {
        super::validate::room_identifier(field, s)?;
        Ok(RoomArn(s.to_owned()))
    }

    pub fn new(region: &str, account: &str, id: &str) -> RoomArn {
        RoomArn(format!("arn:aws:ivschat:{region}:{account}:room/{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after `room/`.
    pub fn id(&self) -> &str {
        self.0
            .rsplit_once('/')
            .map(|(_, id)| id)
            .unwrap_or_default()
    }

    /// The region the room lives in (`arn:aws:ivschat:REGION:...`).
    pub fn region(&self) -> &str {
        self.part(3)
    }

    /// The AWS account that owns the room (`...:ACCOUNT:room/ID`).
    pub fn account(&self) -> &str {
        self.part(4)
    }

    /// The `n`-th colon-separated part (a parsed ARN has all six).
    fn part(&self, n: usize) -> &str {
        self.0.split(':').nth(n).unwrap_or_default()
    }
}

impl fmt::Display for RoomArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FallbackResult {
    #[default]
    Allow,
    Deny,
}

impl FallbackResult {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackResult::Allow => "ALLOW",
            FallbackResult::Deny => "DENY",
        }
    }

    pub fn parse(s: &str) -> Option<FallbackResult> {
        match s {
            "ALLOW" => Some(FallbackResult::Allow),
            "DENY" => Some(FallbackResult::Deny),
            _ => None,
        }
    }
}

/// Message review by a Lambda function. In a request an empty `uri` means
/// "disassociate the handler"; a stored room has either a non-empty `uri` or no
/// handler at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageReviewHandler {
    pub uri: String,
    pub fallback_result: FallbackResult,
}

/// A room's whole configuration, as GetRoom returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    pub arn: String,
    pub id: String,
    pub name: String,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    pub maximum_message_rate_per_second: i32,
    pub maximum_message_length: i32,
    pub message_review_handler: Option<MessageReviewHandler>,
    pub tags: BTreeMap<String, String>,
    pub logging_configuration_identifiers: Vec<String>,
    /// The message limits have not been read yet: the room came from a
    /// listing (a summary lacks them), and they read 0 until a GetRoom
    /// completes it. Such a room is listed and watched, never answered by
    /// GetRoom (which reads it through).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub details_pending: bool,
}

impl Room {
    pub const DEFAULT_MAXIMUM_MESSAGE_RATE_PER_SECOND: i32 = 10;
    pub const DEFAULT_MAXIMUM_MESSAGE_LENGTH: i32 = 500;

    pub fn arn(&self) -> RoomArn {
        RoomArn(self.arn.clone())
    }
}

/// A room as ListRooms shows it: without its message limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    pub arn: String,
    pub id: String,
    pub name: String,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    pub message_review_handler: Option<MessageReviewHandler>,
    pub tags: BTreeMap<String, String>,
    pub logging_configuration_identifiers: Vec<String>,
}

impl RoomSummary {
    /// The room as far as this summary shows it: its message limits still
    /// to be read (`details_pending`).
    pub fn pending_room(&self) -> Room {
        Room {
            arn: self.arn.clone(),
            id: self.id.clone(),
            name: self.name.clone(),
            create_time: self.create_time,
            update_time: self.update_time,
            maximum_message_rate_per_second: 0,
            maximum_message_length: 0,
            message_review_handler: self.message_review_handler.clone(),
            tags: self.tags.clone(),
            logging_configuration_identifiers: self.logging_configuration_identifiers.clone(),
            details_pending: true,
        }
    }

    /// Whether `room` is the version this summary shows, as far as a summary
    /// can tell (the message limits cannot change without moving updateTime).
    pub fn shows(&self, room: &Room) -> bool {
        self.arn == room.arn
            && self.update_time == room.update_time
            && self.name == room.name
            && self.message_review_handler == room.message_review_handler
            && self.tags == room.tags
            && self.logging_configuration_identifiers == room.logging_configuration_identifiers
    }
}

/// What CreateRoom asks for; `None` takes the model's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRoom {
    pub name: String,
    pub maximum_message_rate_per_second: Option<i32>,
    pub maximum_message_length: Option<i32>,
    pub message_review_handler: Option<MessageReviewHandler>,
    pub tags: BTreeMap<String, String>,
    pub logging_configuration_identifiers: Vec<String>,
}

/// What UpdateRoom asks for: every `None` leaves that field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomPatch {
    pub name: Option<String>,
    pub maximum_message_rate_per_second: Option<i32>,
    pub maximum_message_length: Option<i32>,
    /// `Some` with an empty `uri` removes the handler.
    pub message_review_handler: Option<MessageReviewHandler>,
    /// `Some` replaces the whole list (`Some(vec![])` clears it).
    pub logging_configuration_identifiers: Option<Vec<String>>,
}

impl RoomPatch {
    /// Applies the patch, as IVS Chat does: omitted fields stay.
    pub fn apply_to(&self, room: &mut Room) {
        if let Some(name) = &self.name {
            room.name.clone_from(name);
        }
        if let Some(rate) = self.maximum_message_rate_per_second {
            room.maximum_message_rate_per_second = rate;
        }
        if let Some(length) = self.maximum_message_length {
            room.maximum_message_length = length;
        }
        if let Some(handler) = &self.message_review_handler {
            room.message_review_handler = (!handler.uri.is_empty()).then(|| handler.clone());
        }
        if let Some(ids) = &self.logging_configuration_identifiers {
            room.logging_configuration_identifiers.clone_from(ids);
        }
    }
}

/// ListRooms' filters and page position. `None` is no filter; `Some("")` matches
/// rooms whose field is empty (no name, no review handler).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub name: Option<String>,
    pub message_review_handler_uri: Option<String>,
    pub logging_configuration_identifier: Option<String>,
    pub max_results: Option<i32>,
    pub next_token: Option<String>,
}

impl ListQuery {
    pub const DEFAULT_MAX_RESULTS: i32 = 50;

    pub fn limit(&self) -> usize {
        self.max_results.unwrap_or(Self::DEFAULT_MAX_RESULTS).max(1) as usize
    }

    /// Whether `room` passes the filters (not the page position).
    pub fn matches(&self, room: &Room) -> bool {
        self.name.as_ref().is_none_or(|n| *n == room.name)
            && self.message_review_handler_uri.as_ref().is_none_or(|uri| {
                room.message_review_handler
                    .as_ref()
                    .map_or(uri.is_empty(), |h| h.uri == *uri)
            })
            && self
                .logging_configuration_identifier
                .as_ref()
                .is_none_or(|id| room.logging_configuration_identifiers.contains(id))
    }
}

/// One page of ListRooms, newest `updateTime` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPage<T> {
    pub rooms: Vec<T>,
    pub next_token: Option<String>,
}

/// Where a page of rooms (newest `updateTime` first, ties by `key`) ends: the
/// opaque `nextToken` of ListRooms, both the emulator's and the cache's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub update_time: Timestamp,
    pub key: String,
}

impl PageCursor {
    pub fn encode(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}:{}",
            self.update_time.as_nanos(),
            self.key
        ))
    }

    /// Decodes a `nextToken` from a request: INVALID_ARGUMENT if this service did
    /// not issue it.
    pub fn decode(token: &str) -> super::Result<PageCursor> {
        use base64::Engine as _;
        let invalid = || super::Error::invalid("nextToken", "is not a token this service issued");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let (nanos, key) = text.split_once(':').ok_or_else(invalid)?;
        Ok(PageCursor {
            update_time: Timestamp::from_nanos(nanos.parse().map_err(|_| invalid())?),
            key: key.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arn_names_its_region_account_and_id() {
        let arn = RoomArn::parse(
            "identifier",
            "arn:aws:ivschat:eu-west-1:123456789012:room/AbCdEfGh1234",
        )
        .unwrap();
        assert_eq!(arn.region(), "eu-west-1");
        assert_eq!(arn.account(), "123456789012");
        assert_eq!(arn.id(), "AbCdEfGh1234");
        let made = RoomArn::new("us-west-2", "210987654321", "x1");
        assert_eq!(
            (made.region(), made.account(), made.id()),
            ("us-west-2", "210987654321", "x1")
        );
    }
}
