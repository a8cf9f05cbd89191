//! The constraints of IVS Chat's model (botocore `ivschat/2020-07-14/service-2.json`),
//! in one table, shared by the service (which refuses before calling upstream) and
//! the emulator (which refuses as AWS does).
//!
//! Field paths are in the model's camelCase (`messageReviewHandler.uri`); every
//! check reports all violations it finds, not just the first.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use super::{Error, FieldViolation, ListQuery, MessageReviewHandler, NewRoom, Result, RoomPatch};

/// The model's string shapes this service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    RoomName,
    RoomIdentifier,
    ResourceArn,
    LambdaArn,
    LoggingConfigurationIdentifier,
    TagKey,
    TagValue,
    PaginationToken,
}

/// A string shape's constraints: length in characters, and a pattern that the
/// whole value must match.
#[derive(Debug, Clone, Copy)]
pub struct StringRule {
    pub min: usize,
    pub max: usize,
    pub pattern: Option<&'static str>,
}

impl Shape {
    const ALL: [Shape; 8] = [
        Shape::RoomName,
        Shape::RoomIdentifier,
        Shape::ResourceArn,
        Shape::LambdaArn,
        Shape::LoggingConfigurationIdentifier,
        Shape::TagKey,
        Shape::TagValue,
        Shape::PaginationToken,
    ];

    /// The table: each row copied from the model's shape of the same name.
    pub const fn rule(self) -> StringRule {
        let (min, max, pattern) = match self {
            Shape::RoomName => (0, 128, Some("[a-zA-Z0-9-_]*")),
            Shape::RoomIdentifier => (
                1,
                128,
                Some("arn:aws:ivschat:[a-z0-9-]+:[0-9]+:room/[a-zA-Z0-9-]+"),
            ),
            // The model says `...:[0-9]+:[a-z-]/[a-zA-Z0-9-]+`, one character
            // before the slash, which no room ARN matches; AWS accepts room ARNs,
            // so the resource type is read as `[a-z-]+`.
            Shape::ResourceArn => (
                1,
                128,
                Some("arn:aws:ivschat:[a-z0-9-]+:[0-9]+:[a-z-]+/[a-zA-Z0-9-]+"),
            ),
            Shape::LambdaArn => (
                0,
                170,
                Some("|arn:aws:lambda:[a-z0-9-]+:[0-9]{12}:function:.+"),
            ),
            Shape::LoggingConfigurationIdentifier => (
                1,
                128,
                Some("arn:aws:ivschat:[a-z0-9-]+:[0-9]+:logging-configuration/[a-zA-Z0-9-]+"),
            ),
            Shape::TagKey => (1, 128, None),
            Shape::TagValue => (0, 256, None),
            Shape::PaginationToken => (0, 1024, None),
        };
        StringRule { min, max, pattern }
    }

    fn regex(self) -> Option<&'static Regex> {
        static REGEXES: LazyLock<Vec<Option<Regex>>> = LazyLock::new(|| {
            Shape::ALL
                .iter()
                .map(|shape| {
                    shape
                        .rule()
                        .pattern
                        .map(|p| Regex::new(&format!("^(?:{p})$")).expect("model patterns compile"))
                })
                .collect()
        });
        let index = Shape::ALL.iter().position(|s| *s == self)?;
        REGEXES[index].as_ref()
    }
}

/// An integer shape's inclusive range.
#[derive(Debug, Clone, Copy)]
pub struct IntRange {
    pub min: i32,
    pub max: i32,
}

pub const MAXIMUM_MESSAGE_RATE_PER_SECOND: IntRange = IntRange { min: 1, max: 100 };
pub const MAXIMUM_MESSAGE_LENGTH: IntRange = IntRange { min: 1, max: 500 };
pub const MAX_ROOM_RESULTS: IntRange = IntRange { min: 1, max: 50 };
/// `Tags` and `TagKeyList`: at most 50 entries.
pub const MAX_TAGS: usize = 50;
/// `LoggingConfigurationIdentifierList`: at most 3 entries.
pub const MAX_LOGGING_CONFIGURATION_IDENTIFIERS: usize = 3;

/// Collects violations; `finish` turns them into the one error.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn string(&mut self, field: &str, shape: Shape, value: &str) {
        let rule = shape.rule();
        let len = value.chars().count();
        if len < rule.min || len > rule.max {
            self.0.push(FieldViolation::new(
                field,
                format!(
                    "length must be between {} and {} characters, got {len}",
                    rule.min, rule.max
                ),
            ));
        } else if let (Some(re), Some(pattern)) = (shape.regex(), rule.pattern)
            && !re.is_match(value)
        {
            self.0.push(FieldViolation::new(
                field,
                format!("must match the pattern {pattern}"),
            ));
        }
    }

    fn int(&mut self, field: &str, range: IntRange, value: i32) {
        if value < range.min || value > range.max {
            self.0.push(FieldViolation::new(
                field,
                format!(
                    "must be between {} and {}, got {value}",
                    range.min, range.max
                ),
            ));
        }
    }

    fn count(&mut self, field: &str, max: usize, len: usize) {
        if len > max {
            self.0.push(FieldViolation::new(
                field,
                format!("must have at most {max} entries, got {len}"),
            ));
        }
    }

    fn handler(&mut self, field: &str, handler: &MessageReviewHandler) {
        self.string(&format!("{field}.uri"), Shape::LambdaArn, &handler.uri);
    }

    fn logging_ids(&mut self, field: &str, ids: &[String]) {
        self.count(field, MAX_LOGGING_CONFIGURATION_IDENTIFIERS, ids.len());
        for (i, id) in ids.iter().enumerate() {
            self.string(
                &format!("{field}[{i}]"),
                Shape::LoggingConfigurationIdentifier,
                id,
            );
        }
    }

    fn tags(&mut self, field: &str, tags: &BTreeMap<String, String>) {
        self.count(field, MAX_TAGS, tags.len());
        for (key, value) in tags {
            self.string(&format!("{field}.{key}"), Shape::TagKey, key);
            self.string(&format!("{field}.{key}"), Shape::TagValue, value);
        }
    }

    fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

/// `RoomIdentifier`: a room ARN.
pub fn room_identifier(field: &str, value: &str) -> Result<()> {
    let mut v = Violations::default();
    v.string(field, Shape::RoomIdentifier, value);
    v.finish()
}

/// `ResourceArn`: the path parameter of the tag operations.
pub fn resource_arn(field: &str, value: &str) -> Result<()> {
    let mut v = Violations::default();
    v.string(field, Shape::ResourceArn, value);
    v.finish()
}

pub fn new_room(room: &NewRoom) -> Result<()> {
    let mut v = Violations::default();
    v.string("name", Shape::RoomName, &room.name);
    if let Some(rate) = room.maximum_message_rate_per_second {
        v.int(
            "maximumMessageRatePerSecond",
            MAXIMUM_MESSAGE_RATE_PER_SECOND,
            rate,
        );
    }
    if let Some(length) = room.maximum_message_length {
        v.int("maximumMessageLength", MAXIMUM_MESSAGE_LENGTH, length);
    }
    if let Some(handler) = &room.message_review_handler {
        v.handler("messageReviewHandler", handler);
    }
    v.tags("tags", &room.tags);
    v.logging_ids(
        "loggingConfigurationIdentifiers",
        &room.logging_configuration_identifiers,
    );
    v.finish()
}

/// The tag a CreateRoom with a request_id puts on the room it creates (value:
/// the request_id), so that a creation cut short by a crash can be found in
/// IVS Chat.
pub const REQUEST_ID_TAG: &str = "ivschat-rooms:request-id";

/// A request_id: 1-128 characters from `[a-zA-Z0-9._:-]` (a UUID fits).
pub const REQUEST_ID: StringRule = StringRule {
    min: 1,
    max: 128,
    pattern: Some("[a-zA-Z0-9._:-]+"),
};

/// A CreateRoom with an idempotency key: the key's own rule, and room for the
/// tag that carries it (`REQUEST_ID_TAG`, which the caller may not set).
/// Call after [`new_room`].
pub fn request_id(field: &str, request_id: &str, room: &NewRoom) -> Result<()> {
    static PATTERN: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(&format!("^(?:{})$", REQUEST_ID.pattern.unwrap_or_default()))
            .expect("the request_id pattern compiles")
    });
    let mut v = Violations::default();
    let len = request_id.chars().count();
    if !(REQUEST_ID.min..=REQUEST_ID.max).contains(&len) {
        v.0.push(FieldViolation::new(
            field,
            format!(
                "length must be between {} and {} characters, got {len}",
                REQUEST_ID.min, REQUEST_ID.max
            ),
        ));
    } else if !PATTERN.is_match(request_id) {
        v.0.push(FieldViolation::new(
            field,
            format!(
                "must match the pattern {}",
                REQUEST_ID.pattern.unwrap_or_default()
            ),
        ));
    }
    if room.tags.contains_key(REQUEST_ID_TAG) {
        v.0.push(FieldViolation::new(
            format!("tags.{REQUEST_ID_TAG}"),
            "is set by the service when request_id is",
        ));
    } else if room.tags.len() >= MAX_TAGS {
        v.0.push(FieldViolation::new(
            "tags",
            format!(
                "must have at most {} entries with a request_id (which takes a tag), got {}",
                MAX_TAGS - 1,
                room.tags.len()
            ),
        ));
    }
    v.finish()
}

pub fn room_patch(patch: &RoomPatch) -> Result<()> {
    let mut v = Violations::default();
    if let Some(name) = &patch.name {
        v.string("name", Shape::RoomName, name);
    }
    if let Some(rate) = patch.maximum_message_rate_per_second {
        v.int(
            "maximumMessageRatePerSecond",
            MAXIMUM_MESSAGE_RATE_PER_SECOND,
            rate,
        );
    }
    if let Some(length) = patch.maximum_message_length {
        v.int("maximumMessageLength", MAXIMUM_MESSAGE_LENGTH, length);
    }
    if let Some(handler) = &patch.message_review_handler {
        v.handler("messageReviewHandler", handler);
    }
    if let Some(ids) = &patch.logging_configuration_identifiers {
        v.logging_ids("loggingConfigurationIdentifiers", ids);
    }
    v.finish()
}

/// TagResource's `tags` (required, but may be empty).
pub fn tags(field: &str, tags: &BTreeMap<String, String>) -> Result<()> {
    let mut v = Violations::default();
    v.tags(field, tags);
    v.finish()
}

/// UntagResource's `tagKeys`: required, and as a query-string list an empty
/// one is a missing one.
pub fn tag_keys(field: &str, keys: &[String]) -> Result<()> {
    let mut v = Violations::default();
    if keys.is_empty() {
        v.0.push(FieldViolation::new(field, "is required"));
    }
    v.count(field, MAX_TAGS, keys.len());
    for (i, key) in keys.iter().enumerate() {
        v.string(&format!("{field}[{i}]"), Shape::TagKey, key);
    }
    v.finish()
}

pub fn list_query(query: &ListQuery) -> Result<()> {
    let mut v = Violations::default();
    if let Some(name) = &query.name {
        v.string("name", Shape::RoomName, name);
    }
    if let Some(uri) = &query.message_review_handler_uri {
        v.string("messageReviewHandlerUri", Shape::LambdaArn, uri);
    }
    if let Some(id) = &query.logging_configuration_identifier {
        v.string(
            "loggingConfigurationIdentifier",
            Shape::LoggingConfigurationIdentifier,
            id,
        );
    }
    if let Some(max) = query.max_results {
        v.int("maxResults", MAX_ROOM_RESULTS, max);
    }
    if let Some(token) = &query.next_token {
        v.string("nextToken", Shape::PaginationToken, token);
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(r: Result<()>) -> Vec<String> {
        match r {
            Ok(()) => vec![],
            Err(Error::InvalidArgument(v)) => v.into_iter().map(|v| v.field).collect(),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn patterns_match_whole_values() {
        let ok = "arn:aws:ivschat:us-west-2:123456789012:room/abcdEFGH1234";
        assert!(room_identifier("identifier", ok).is_ok());
        for bad in [
            "",
            "abcdEFGH1234",
            "xarn:aws:ivschat:us-west-2:123456789012:room/abcdEFGH1234",
            "arn:aws:ivschat:us-west-2:123456789012:room/abc_def",
            "arn:aws:ivschat:us-west-2:123456789012:logging-configuration/abc",
        ] {
            assert_eq!(
                fields(room_identifier("identifier", bad)),
                ["identifier"],
                "{bad}"
            );
        }
        assert!(resource_arn("resourceArn", ok).is_ok());
    }

    #[test]
    fn lambda_arn_may_be_empty() {
        let mut room = NewRoom {
            message_review_handler: Some(MessageReviewHandler {
                uri: String::new(),
                fallback_result: Default::default(),
            }),
            ..Default::default()
        };
        assert!(new_room(&room).is_ok());
        room.message_review_handler.as_mut().unwrap().uri =
            "arn:aws:lambda:us-west-2:12345678901:function:f".into();
        assert_eq!(fields(new_room(&room)), ["messageReviewHandler.uri"]);
    }

    #[test]
    fn reports_every_violation() {
        let room = NewRoom {
            name: "has space".into(),
            maximum_message_rate_per_second: Some(0),
            maximum_message_length: Some(501),
            logging_configuration_identifiers: vec!["x".into(); 4],
            ..Default::default()
        };
        assert_eq!(
            fields(new_room(&room)),
            [
                "name",
                "maximumMessageRatePerSecond",
                "maximumMessageLength",
                "loggingConfigurationIdentifiers",
                "loggingConfigurationIdentifiers[0]",
                "loggingConfigurationIdentifiers[1]",
                "loggingConfigurationIdentifiers[2]",
                "loggingConfigurationIdentifiers[3]",
            ]
        );
    }

    #[test]
    fn request_ids_leave_room_for_their_tag() {
        let room = NewRoom::default();
        assert!(request_id("request_id", &"a".repeat(128), &room).is_ok());
        assert!(request_id("request_id", "4b0f-9c.x:y_z", &room).is_ok());
        for bad in ["", &"a".repeat(129), "has space", "é", "a/b"] {
            assert_eq!(
                fields(request_id("request_id", bad, &room)),
                ["request_id"],
                "{bad}"
            );
        }
        let tags_of = |n: usize| (0..n).map(|i| (format!("k{i}"), String::new())).collect();
        let room = NewRoom {
            tags: tags_of(49),
            ..NewRoom::default()
        };
        assert!(request_id("request_id", "r", &room).is_ok());
        let room = NewRoom {
            tags: tags_of(50),
            ..NewRoom::default()
        };
        assert_eq!(fields(request_id("request_id", "r", &room)), ["tags"]);
        let room = NewRoom {
            tags: BTreeMap::from([(REQUEST_ID_TAG.to_owned(), "r".to_owned())]),
            ..NewRoom::default()
        };
        assert_eq!(
            fields(request_id("request_id", "r", &room)),
            [format!("tags.{REQUEST_ID_TAG}")]
        );
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        let name_of = |n: usize| "é".repeat(n);
        let tags = BTreeMap::from([("k".to_string(), name_of(256))]);
        assert!(super::tags("tags", &tags).is_ok());
        let tags = BTreeMap::from([("k".to_string(), name_of(257))]);
        assert_eq!(fields(super::tags("tags", &tags)), ["tags.k"]);
    }
}
