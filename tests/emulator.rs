//! The IVS Chat emulator, seen through the real `aws-sdk-ivschat`: every
//! constraint of the model (botocore `ivschat/2020-07-14/service-2.json`, whose
//! facts are copied here, never read at run time) and every behaviour of the
//! room API that the service depends on. Raw HTTP (reqwest) checks the wire
//! itself (status, `x-amzn-ErrorType`, bodies) and sends what the SDK cannot:
//! malformed JSON, enum values it would not produce, missing tag members.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::num::NonZeroU32;

use aws_sdk_ivschat::Client;
use aws_sdk_ivschat::config::http::HttpResponse;
use aws_sdk_ivschat::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ivschat::operation::create_room::{CreateRoomError, CreateRoomOutput};
use aws_sdk_ivschat::operation::delete_room::DeleteRoomError;
use aws_sdk_ivschat::operation::get_room::{GetRoomError, GetRoomOutput};
use aws_sdk_ivschat::operation::list_rooms::ListRoomsError;
use aws_sdk_ivschat::operation::list_tags_for_resource::ListTagsForResourceError;
use aws_sdk_ivschat::operation::tag_resource::TagResourceError;
use aws_sdk_ivschat::operation::untag_resource::UntagResourceError;
use aws_sdk_ivschat::operation::update_room::UpdateRoomError;
use aws_sdk_ivschat::primitives::DateTime;
use aws_sdk_ivschat::types::error::{ResourceNotFoundException, ValidationException};
use aws_sdk_ivschat::types::{
    FallbackResult, MessageReviewHandler, ResourceType, RoomSummary, ValidationExceptionField,
    ValidationExceptionReason,
};
use ivschat_rooms::emulator::{Emulator, EmulatorConfig, Faults, InjectedError, Operation};
use serde_json::{Value, json};

// Facts from the model and the emulator's default account.
const REGION: &str = "us-east-1";
const ACCOUNT: &str = "123456789012";
/// `RoomIdentifier`-shaped, and no room of any test has this id.
const UNKNOWN_ROOM: &str = "arn:aws:ivschat:us-east-1:123456789012:room/abcdEFGH1234";
const UNKNOWN_ID: &str = "abcdEFGH1234";
/// `LambdaArn`: `$|^arn:aws:lambda:[a-z0-9-]+:[0-9]{12}:function:.+`, at most 170.
const LAMBDA: &str = "arn:aws:lambda:us-east-1:123456789012:function:f";
const LAMBDA_2: &str = "arn:aws:lambda:us-east-1:123456789012:function:g";
/// `LoggingConfigurationIdentifier`.
const LOG_1: &str = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/log1";
const LOG_2: &str = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/log2";
const LOG_3: &str = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/log3";
const LOG_4: &str = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/log4";

// ---------------------------------------------------------------------------
// Harness

/// An emulator on a free port and the clients that talk to it.
struct Harness {
    emulator: Emulator,
    url: String,
    client: Client,
    http: reqwest::Client,
}

async fn start() -> Harness {
    start_with(EmulatorConfig::default()).await
}

async fn start_with(config: EmulatorConfig) -> Harness {
    let emulator = Emulator::new(config).expect("emulator starts");
    let url = emulator
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator binds");
    Harness {
        client: sdk_client(&url),
        http: reqwest::Client::new(),
        emulator,
        url,
    }
}

fn sdk_client(url: &str) -> Client {
    sdk_client_in(url, REGION)
}

/// The SDK against the emulator at `url`, signing for `region`.
fn sdk_client_in(url: &str, region: &str) -> Client {
    use aws_sdk_ivschat::config::{BehaviorVersion, Credentials, Region, retry::RetryConfig};
    let config = aws_sdk_ivschat::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(url)
        .retry_config(RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

impl Harness {
    /// A room with nothing but a name.
    async fn room(&self, name: &str) -> CreateRoomOutput {
        self.client
            .create_room()
            .name(name)
            .send()
            .await
            .expect("CreateRoom")
    }

    async fn get(&self, arn: &str) -> GetRoomOutput {
        self.client
            .get_room()
            .identifier(arn)
            .send()
            .await
            .expect("GetRoom")
    }

    /// Sends raw rest-json: status, `x-amzn-ErrorType` and the body (null if empty).
    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Option<String>, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.expect("raw request");
        let status = response.status().as_u16();
        let error_type = response
            .headers()
            .get("x-amzn-ErrorType")
            .map(|v| v.to_str().expect("ascii header").to_owned());
        let bytes = response.bytes().await.expect("raw body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, error_type, body)
    }
}

/// The path of a tag operation, the ARN percent-encoded as the SDK's label is.
fn tags_path(arn: &str) -> String {
    format!("/tags/{}", arn.replace(':', "%3A").replace('/', "%2F"))
}

fn arn_of(id: &str) -> String {
    format!("arn:aws:ivschat:{REGION}:{ACCOUNT}:room/{id}")
}

fn handler(uri: &str, fallback: FallbackResult) -> MessageReviewHandler {
    MessageReviewHandler::builder()
        .uri(uri)
        .fallback_result(fallback)
        .build()
}

/// One tag.
fn tag(key: impl Into<String>, value: impl Into<String>) -> HashMap<String, String> {
    HashMap::from([(key.into(), value.into())])
}

fn tags(n: usize) -> HashMap<String, String> {
    (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect()
}

// ---------------------------------------------------------------------------
// The check helper: what a request should get, and the one place that asserts it.

/// What a request should get.
#[derive(Debug, Clone)]
enum Want {
    /// Success.
    Ok,
    /// 400 ValidationException, reason FIELD_VALIDATION_FAILED, whose fieldList
    /// names this field.
    Invalid(String),
    /// 404 ResourceNotFoundException for this room id, resourceType ROOM.
    NotFound(String),
}

fn ok() -> Want {
    Want::Ok
}

fn invalid(field: impl Into<String>) -> Want {
    Want::Invalid(field.into())
}

fn not_found(id: impl Into<String>) -> Want {
    Want::NotFound(id.into())
}

/// The modeled errors every operation's error enum may carry.
trait ServiceError: Debug + ProvideErrorMetadata {
    fn validation(&self) -> Option<&ValidationException>;
    fn not_found(&self) -> Option<&ResourceNotFoundException>;
}

macro_rules! service_errors {
    ($($error:ty),* $(,)?) => {$(
        impl ServiceError for $error {
            fn validation(&self) -> Option<&ValidationException> {
                match self {
                    Self::ValidationException(e) => Some(e),
                    _ => None,
                }
            }
            fn not_found(&self) -> Option<&ResourceNotFoundException> {
                match self {
                    Self::ResourceNotFoundException(e) => Some(e),
                    _ => None,
                }
            }
        }
    )*};
}

service_errors!(
    CreateRoomError,
    GetRoomError,
    UpdateRoomError,
    DeleteRoomError,
    ListRoomsError,
    TagResourceError,
    UntagResourceError,
    ListTagsForResourceError,
);

/// Asserts that `result` is what `want` says; returns the output on success.
fn check<T: Debug, E: ServiceError>(
    case: &str,
    result: Result<T, SdkError<E, HttpResponse>>,
    want: &Want,
) -> Option<T> {
    let err = match (result, want) {
        (Ok(output), Want::Ok) => return Some(output),
        (Ok(output), _) => panic!("{case}: wanted {want:?}, got success {output:?}"),
        (Err(err), _) => err,
    };
    let status = err.raw_response().map(|r| r.status().as_u16());
    let service = err
        .as_service_error()
        .unwrap_or_else(|| panic!("{case}: wanted {want:?}, got {err:?}"));
    match want {
        Want::Ok => panic!("{case}: wanted success, got {service:?}"),
        Want::Invalid(field) => {
            let e = service
                .validation()
                .unwrap_or_else(|| panic!("{case}: wanted ValidationException, got {service:?}"));
            assert_eq!(status, Some(400), "{case}: status");
            assert_eq!(err.code(), Some("ValidationException"), "{case}: code");
            assert_eq!(
                e.reason(),
                &ValidationExceptionReason::FieldValidationFailed,
                "{case}: reason"
            );
            assert!(!e.message().is_empty(), "{case}: a message");
            let names: Vec<&str> = e
                .field_list()
                .iter()
                .map(ValidationExceptionField::name)
                .collect();
            assert!(
                names.contains(&field.as_str()),
                "{case}: fieldList {names:?} should name {field}"
            );
            assert!(
                e.field_list().iter().all(|f| !f.message().is_empty()),
                "{case}: each field has a message"
            );
        }
        Want::NotFound(id) => {
            let e = service.not_found().unwrap_or_else(|| {
                panic!("{case}: wanted ResourceNotFoundException, got {service:?}")
            });
            assert_eq!(status, Some(404), "{case}: status");
            assert_eq!(
                err.code(),
                Some("ResourceNotFoundException"),
                "{case}: code"
            );
            assert_eq!(e.resource_id(), id, "{case}: resourceId");
            assert_eq!(
                e.resource_type(),
                &ResourceType::Room,
                "{case}: resourceType"
            );
        }
    }
    None
}

fn summary_ids(rooms: &[RoomSummary]) -> Vec<String> {
    rooms
        .iter()
        .map(|r| r.id().expect("summary id").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// CreateRoom

/// CreateRoom with nothing set: model defaults, a 12-alphanumeric id, the room ARN, equal times.
#[tokio::test]
async fn create_room_defaults() {
    let h = start().await;
    let room = h.client.create_room().send().await.expect("CreateRoom");

    let id = room.id().expect("id");
    assert_eq!(id.len(), 12, "RoomID is 12 characters: {id}");
    assert!(id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
    assert_eq!(room.arn(), Some(arn_of(id).as_str()));
    assert_eq!(room.name(), Some(""));
    assert_eq!(room.maximum_message_rate_per_second(), Some(10));
    assert_eq!(room.maximum_message_length(), Some(500));
    assert!(room.message_review_handler().is_none());
    assert!(room.tags().unwrap_or(&HashMap::new()).is_empty());
    assert!(room.logging_configuration_identifiers().is_empty());
    let created = room.create_time().expect("createTime");
    assert_eq!(
        room.update_time(),
        Some(created),
        "createTime == updateTime"
    );
    let age = DateTime::from(std::time::SystemTime::now()).secs() - created.secs();
    assert!((0..60).contains(&age), "createTime is now, not {created}");

    let got = h.get(room.arn().unwrap()).await;
    assert_eq!(got.create_time(), room.create_time());
    assert_eq!(got.update_time(), room.update_time());
    assert_eq!(got.maximum_message_rate_per_second(), Some(10));
    assert_eq!(got.maximum_message_length(), Some(500));
}

/// CreateRoom echoes every field it was given, and GetRoom returns the same.
#[tokio::test]
async fn create_room_echoes_fields() {
    let h = start().await;
    let room = h
        .client
        .create_room()
        .name("lobby-1_A")
        .maximum_message_rate_per_second(42)
        .maximum_message_length(123)
        .message_review_handler(handler(LAMBDA, FallbackResult::Deny))
        .tags("team", "chat")
        .tags("empty", "")
        .logging_configuration_identifiers(LOG_1)
        .logging_configuration_identifiers(LOG_2)
        .send()
        .await
        .expect("CreateRoom");
    let want_tags = HashMap::from([
        ("team".to_owned(), "chat".to_owned()),
        ("empty".to_owned(), String::new()),
    ]);
    let got = h.get(room.arn().unwrap()).await;
    for (what, r) in [
        (
            "CreateRoom",
            (
                room.name(),
                room.maximum_message_rate_per_second(),
                room.maximum_message_length(),
                room.message_review_handler(),
                room.tags(),
                room.logging_configuration_identifiers(),
            ),
        ),
        (
            "GetRoom",
            (
                got.name(),
                got.maximum_message_rate_per_second(),
                got.maximum_message_length(),
                got.message_review_handler(),
                got.tags(),
                got.logging_configuration_identifiers(),
            ),
        ),
    ] {
        let (name, rate, length, review, room_tags, logging) = r;
        assert_eq!(name, Some("lobby-1_A"), "{what}");
        assert_eq!(rate, Some(42), "{what}");
        assert_eq!(length, Some(123), "{what}");
        let review = review.expect("handler");
        assert_eq!(review.uri(), Some(LAMBDA), "{what}");
        assert_eq!(
            review.fallback_result(),
            Some(&FallbackResult::Deny),
            "{what}"
        );
        assert_eq!(room_tags, Some(&want_tags), "{what}");
        assert_eq!(logging, [LOG_1, LOG_2], "{what}");
    }
    assert_eq!(got.arn(), room.arn());
    assert_eq!(got.id(), room.id());
}

/// A handler given without fallbackResult gets the model's default, ALLOW.
#[tokio::test]
async fn review_handler_fallback_defaults_to_allow() {
    let h = start().await;
    let (status, _, body) = h
        .raw(
            reqwest::Method::POST,
            "/CreateRoom",
            Some(&json!({ "messageReviewHandler": { "uri": LAMBDA } }).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["messageReviewHandler"],
        json!({ "uri": LAMBDA, "fallbackResult": "ALLOW" })
    );
}

/// Every response carries an x-amzn-RequestId the SDK picks up.
#[tokio::test]
async fn responses_carry_request_ids() {
    use aws_sdk_ivschat::operation::RequestId as _;
    let h = start().await;
    let room = h.room("r").await;
    let first = room.request_id().expect("request id").to_owned();
    assert!(!first.is_empty());
    let err = h
        .client
        .get_room()
        .identifier(UNKNOWN_ROOM)
        .send()
        .await
        .unwrap_err();
    let second = err.request_id().expect("request id on errors too");
    assert_ne!(first, second, "request ids are unique");
}

// ---------------------------------------------------------------------------
// Constraints: ValidationException

/// RoomName: pattern `[a-zA-Z0-9-_]*`, length 0 to 128.
#[tokio::test]
async fn create_room_name_constraints() {
    let h = start().await;
    for (case, name, want) in [
        ("empty", String::new(), ok()),
        ("every allowed character", "azAZ09-_".to_owned(), ok()),
        ("128 characters", "n".repeat(128), ok()),
        ("129 characters", "n".repeat(129), invalid("name")),
        ("a space", "has space".to_owned(), invalid("name")),
        ("a dot", "a.b".to_owned(), invalid("name")),
        ("a slash", "a/b".to_owned(), invalid("name")),
        ("non-ASCII", "caf\u{e9}".to_owned(), invalid("name")),
    ] {
        let result = h.client.create_room().name(name.clone()).send().await;
        if let Some(room) = check(&format!("name {case}"), result, &want) {
            assert_eq!(room.name(), Some(name.as_str()), "{case}");
        }
    }
}

/// RoomMaxMessageRatePerSecond 1 to 100 and RoomMaxMessageLength 1 to 500.
#[tokio::test]
async fn create_room_integer_ranges() {
    let h = start().await;
    for (case, rate, want) in [
        ("rate 0", 0, invalid("maximumMessageRatePerSecond")),
        ("rate -1", -1, invalid("maximumMessageRatePerSecond")),
        ("rate 1", 1, ok()),
        ("rate 100", 100, ok()),
        ("rate 101", 101, invalid("maximumMessageRatePerSecond")),
        (
            "rate i32::MAX",
            i32::MAX,
            invalid("maximumMessageRatePerSecond"),
        ),
    ] {
        let result = h
            .client
            .create_room()
            .maximum_message_rate_per_second(rate)
            .send()
            .await;
        if let Some(room) = check(case, result, &want) {
            assert_eq!(room.maximum_message_rate_per_second(), Some(rate), "{case}");
        }
    }
    for (case, length, want) in [
        ("length 0", 0, invalid("maximumMessageLength")),
        ("length 1", 1, ok()),
        ("length 500", 500, ok()),
        ("length 501", 501, invalid("maximumMessageLength")),
    ] {
        let result = h
            .client
            .create_room()
            .maximum_message_length(length)
            .send()
            .await;
        if let Some(room) = check(case, result, &want) {
            assert_eq!(room.maximum_message_length(), Some(length), "{case}");
        }
    }
    assert_eq!(h.emulator.rooms().len(), 4, "only the accepted rooms exist");
}

/// LambdaArn: empty, or a Lambda function ARN with a 12-digit account, at most 170 characters.
#[tokio::test]
async fn create_room_review_handler_uri() {
    let h = start().await;
    let prefix = "arn:aws:lambda:us-east-1:123456789012:function:";
    let of_len = |n: usize| format!("{prefix}{}", "f".repeat(n - prefix.len()));
    let field = "messageReviewHandler.uri";
    for (case, uri, want) in [
        ("a Lambda ARN", LAMBDA.to_owned(), ok()),
        ("170 characters", of_len(170), ok()),
        ("171 characters", of_len(171), invalid(field)),
        (
            "an SNS ARN",
            "arn:aws:sns:us-east-1:123456789012:topic".to_owned(),
            invalid(field),
        ),
        ("not an ARN", "my-function".to_owned(), invalid(field)),
        (
            "an 11-digit account",
            "arn:aws:lambda:us-east-1:12345678901:function:f".to_owned(),
            invalid(field),
        ),
        ("no function name", prefix.to_owned(), invalid(field)),
        (
            "an upper-case region",
            "arn:aws:lambda:US-EAST-1:123456789012:function:f".to_owned(),
            invalid(field),
        ),
    ] {
        let result = h
            .client
            .create_room()
            .message_review_handler(handler(&uri, FallbackResult::Allow))
            .send()
            .await;
        if let Some(room) = check(case, result, &want) {
            let got = room.message_review_handler().expect(case);
            assert_eq!(got.uri(), Some(uri.as_str()), "{case}");
        }
    }
    // An empty uri is allowed, and means no handler.
    let room = check(
        "empty uri",
        h.client
            .create_room()
            .message_review_handler(handler("", FallbackResult::Deny))
            .send()
            .await,
        &ok(),
    )
    .unwrap();
    assert!(room.message_review_handler().is_none(), "{room:?}");
}

/// FallbackResult is ALLOW or DENY; anything else is refused (sent by the SDK and raw).
#[tokio::test]
async fn create_room_invalid_fallback_result() {
    let h = start().await;
    let field = "messageReviewHandler.fallbackResult";
    let result = h
        .client
        .create_room()
        .message_review_handler(handler(LAMBDA, FallbackResult::from("MAYBE")))
        .send()
        .await;
    check("SDK, fallbackResult MAYBE", result, &invalid(field));

    for fallback in ["MAYBE", "allow", ""] {
        let body = json!({ "messageReviewHandler": { "uri": LAMBDA, "fallbackResult": fallback } });
        let (status, error_type, body) = h
            .raw(
                reqwest::Method::POST,
                "/CreateRoom",
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(status, 400, "{fallback}: {body}");
        assert_eq!(
            error_type.as_deref(),
            Some("ValidationException"),
            "{fallback}"
        );
        assert_eq!(body["reason"], "FIELD_VALIDATION_FAILED", "{fallback}");
        assert_eq!(body["fieldList"][0]["name"], field, "{fallback}: {body}");
    }
    assert!(h.emulator.rooms().is_empty(), "nothing was created");
}

/// Tags: at most 50; TagKey 1 to 128 characters; TagValue 0 to 256 characters.
#[tokio::test]
async fn create_room_tag_constraints() {
    let h = start().await;
    let key = |n: usize| "k".repeat(n);
    for (case, room_tags, want) in [
        ("50 tags", tags(50), ok()),
        ("51 tags", tags(51), invalid("tags")),
        ("key of 128", tag(key(128), "v"), ok()),
        (
            "key of 129",
            tag(key(129), "v"),
            invalid(format!("tags.{}", key(129))),
        ),
        ("empty key", tag(String::new(), "v"), invalid("tags.")),
        ("value of 256", tag("k", "v".repeat(256)), ok()),
        ("value of 257", tag("k", "v".repeat(257)), invalid("tags.k")),
        (
            "256 two-byte characters",
            tag("k", "\u{e9}".repeat(256)),
            ok(),
        ),
    ] {
        let result = h
            .client
            .create_room()
            .set_tags(Some(room_tags.clone()))
            .send()
            .await;
        if let Some(room) = check(case, result, &want) {
            assert_eq!(room.tags(), Some(&room_tags), "{case}");
        }
    }
}

/// LoggingConfigurationIdentifierList: at most 3 identifiers, each a logging-configuration ARN.
#[tokio::test]
async fn create_room_logging_identifier_constraints() {
    let h = start().await;
    let field = "loggingConfigurationIdentifiers";
    let long = format!(
        "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/{}",
        "a".repeat(128)
    );
    for (case, ids, want) in [
        ("none", vec![], ok()),
        ("3", vec![LOG_1, LOG_2, LOG_3], ok()),
        ("4", vec![LOG_1, LOG_2, LOG_3, LOG_4], invalid(field)),
        (
            "a room ARN",
            vec![UNKNOWN_ROOM],
            invalid(format!("{field}[0]")),
        ),
        (
            "malformed second",
            vec![LOG_1, "log2"],
            invalid(format!("{field}[1]")),
        ),
        ("empty", vec![""], invalid(format!("{field}[0]"))),
        (
            "over 128 characters",
            vec![long.as_str()],
            invalid(format!("{field}[0]")),
        ),
        (
            "an underscore in the id",
            vec!["arn:aws:ivschat:us-east-1:123456789012:logging-configuration/a_b"],
            invalid(format!("{field}[0]")),
        ),
    ] {
        let ids: Vec<String> = ids.into_iter().map(str::to_owned).collect();
        let result = h
            .client
            .create_room()
            .set_logging_configuration_identifiers(Some(ids.clone()))
            .send()
            .await;
        if let Some(room) = check(case, result, &want) {
            assert_eq!(room.logging_configuration_identifiers(), ids, "{case}");
        }
    }
}

/// A request that breaks several constraints names every field that broke one.
#[tokio::test]
async fn validation_reports_every_field() {
    let h = start().await;
    let err = h
        .client
        .create_room()
        .name("bad name")
        .maximum_message_rate_per_second(0)
        .maximum_message_length(501)
        .send()
        .await
        .unwrap_err();
    let e = err
        .as_service_error()
        .and_then(ServiceError::validation)
        .expect("ValidationException");
    let names: BTreeSet<&str> = e
        .field_list()
        .iter()
        .map(ValidationExceptionField::name)
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "name",
            "maximumMessageRatePerSecond",
            "maximumMessageLength"
        ])
    );
}

/// RoomIdentifier must be a room ARN for GetRoom, UpdateRoom and DeleteRoom.
#[tokio::test]
async fn identifier_must_be_a_room_arn() {
    let h = start().await;
    let room = h.room("r").await;
    let id = room.id().unwrap();
    let bad = [
        id.to_owned(),
        format!("arn:aws:ivschat:us-east-1:123456789012:room/{id}/x"),
        format!("arn:aws:ivs:us-east-1:123456789012:room/{id}"),
        format!("arn:aws:ivschat:us-east-1:123456789012:logging-configuration/{id}"),
        format!(
            "arn:aws:ivschat:us-east-1:123456789012:room/{}",
            "a".repeat(90)
        ),
        String::new(),
    ];
    for identifier in &bad {
        let want = invalid("identifier");
        let case = format!("identifier {identifier:?}");
        check(
            &format!("GetRoom {case}"),
            h.client.get_room().identifier(identifier).send().await,
            &want,
        );
        check(
            &format!("UpdateRoom {case}"),
            h.client
                .update_room()
                .identifier(identifier)
                .name("x")
                .send()
                .await,
            &want,
        );
        check(
            &format!("DeleteRoom {case}"),
            h.client.delete_room().identifier(identifier).send().await,
            &want,
        );
    }
    // The room is untouched.
    assert_eq!(h.get(room.arn().unwrap()).await.name(), Some("r"));
}

/// A missing required identifier (which the SDK will not send) is a 400 ValidationException naming it.
#[tokio::test]
async fn missing_identifier_is_refused() {
    let h = start().await;
    // This SDK does not check required body members client-side: it sends the
    // request without `identifier`, and the emulator must refuse it as AWS does.
    let want = invalid("identifier");
    check(
        "SDK GetRoom without identifier",
        h.client.get_room().send().await,
        &want,
    );
    check(
        "SDK UpdateRoom without identifier",
        h.client.update_room().name("x").send().await,
        &want,
    );
    check(
        "SDK DeleteRoom without identifier",
        h.client.delete_room().send().await,
        &want,
    );
    assert_eq!(h.emulator.calls(Operation::GetRoom), 1, "the SDK sent it");
    assert!(h.emulator.rooms().is_empty());

    for (path, body) in [
        ("/GetRoom", "{}"),
        ("/UpdateRoom", r#"{"name":"x"}"#),
        ("/DeleteRoom", "{}"),
        ("/GetRoom", ""),
    ] {
        let (status, error_type, body) = h.raw(reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(error_type.as_deref(), Some("ValidationException"), "{path}");
        assert_eq!(body["reason"], "FIELD_VALIDATION_FAILED", "{path}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{path}"
        );
        assert_eq!(body["fieldList"][0]["name"], "identifier", "{path}: {body}");
    }
    assert_eq!(h.emulator.calls(Operation::GetRoom), 3);
}

/// A ValidationException on the wire: status 400, x-amzn-ErrorType header, and the model's body members.
#[tokio::test]
async fn validation_exception_on_the_wire() {
    let h = start().await;
    let (status, error_type, body) = h
        .raw(
            reqwest::Method::POST,
            "/CreateRoom",
            Some(r#"{"maximumMessageRatePerSecond":101}"#),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(error_type.as_deref(), Some("ValidationException"));
    assert_eq!(body["reason"], "FIELD_VALIDATION_FAILED");
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(body["fieldList"][0]["name"], "maximumMessageRatePerSecond");
    assert!(body["fieldList"][0]["message"].is_string(), "{body}");
}

/// A body that is not JSON is a 400 SerializationException, and creates nothing.
#[tokio::test]
async fn malformed_body_is_refused() {
    let h = start().await;
    let (status, error_type, _) = h
        .raw(reqwest::Method::POST, "/CreateRoom", Some("{not json"))
        .await;
    assert_eq!(status, 400);
    assert_eq!(error_type.as_deref(), Some("SerializationException"));
    let (status, _, _) = h
        .raw(
            reqwest::Method::POST,
            "/CreateRoom",
            Some(r#"{"maximumMessageLength":"ten"}"#),
        )
        .await;
    assert_eq!(status, 400, "a string where an integer belongs");
    assert!(h.emulator.rooms().is_empty());
}

/// UpdateRoom enforces the same constraints as CreateRoom, and a refused update changes nothing.
#[tokio::test]
async fn update_room_constraints() {
    let h = start().await;
    let room = h.room("before").await;
    let arn = room.arn().unwrap();
    let update = || h.client.update_room().identifier(arn);
    for (case, request, want) in [
        ("name 129", update().name("n".repeat(129)), invalid("name")),
        ("name pattern", update().name("a b"), invalid("name")),
        (
            "rate 0",
            update().maximum_message_rate_per_second(0),
            invalid("maximumMessageRatePerSecond"),
        ),
        (
            "rate 101",
            update().maximum_message_rate_per_second(101),
            invalid("maximumMessageRatePerSecond"),
        ),
        (
            "length 0",
            update().maximum_message_length(0),
            invalid("maximumMessageLength"),
        ),
        (
            "length 501",
            update().maximum_message_length(501),
            invalid("maximumMessageLength"),
        ),
        (
            "handler not Lambda",
            update().message_review_handler(handler(
                "arn:aws:sns:us-east-1:123456789012:t",
                FallbackResult::Allow,
            )),
            invalid("messageReviewHandler.uri"),
        ),
        (
            "4 logging ids",
            update().set_logging_configuration_identifiers(Some(vec![
                LOG_1.into(),
                LOG_2.into(),
                LOG_3.into(),
                LOG_4.into(),
            ])),
            invalid("loggingConfigurationIdentifiers"),
        ),
        (
            "malformed logging id",
            update().logging_configuration_identifiers("nope"),
            invalid("loggingConfigurationIdentifiers[0]"),
        ),
        (
            "valid name with bad rate",
            update().name("after").maximum_message_rate_per_second(101),
            invalid("maximumMessageRatePerSecond"),
        ),
    ] {
        check(case, request.send().await, &want);
    }
    let got = h.get(arn).await;
    assert_eq!(got.name(), Some("before"));
    assert_eq!(
        got.update_time(),
        room.update_time(),
        "no refused update moved updateTime"
    );

    // Boundaries are accepted.
    let updated = check(
        "boundaries",
        update()
            .name("n".repeat(128))
            .maximum_message_rate_per_second(100)
            .maximum_message_length(1)
            .send()
            .await,
        &ok(),
    )
    .unwrap();
    assert_eq!(updated.maximum_message_rate_per_second(), Some(100));
    assert_eq!(updated.maximum_message_length(), Some(1));
}

/// Validation comes before the lookup: an invalid update of an unknown room is a ValidationException.
#[tokio::test]
async fn validation_precedes_not_found() {
    let h = start().await;
    check(
        "UpdateRoom unknown room, rate 0",
        h.client
            .update_room()
            .identifier(UNKNOWN_ROOM)
            .maximum_message_rate_per_second(0)
            .send()
            .await,
        &invalid("maximumMessageRatePerSecond"),
    );
    check(
        "TagResource unknown room, 51 tags",
        h.client
            .tag_resource()
            .resource_arn(UNKNOWN_ROOM)
            .set_tags(Some(tags(51)))
            .send()
            .await,
        &invalid("tags"),
    );
}

/// ListRooms: maxResults 1 to 50, a nextToken it issued, and well-formed filters.
#[tokio::test]
async fn list_rooms_constraints() {
    let h = start().await;
    h.room("r").await;
    let list = || h.client.list_rooms();
    for (case, request, want) in [
        ("maxResults 0", list().max_results(0), invalid("maxResults")),
        (
            "maxResults -1",
            list().max_results(-1),
            invalid("maxResults"),
        ),
        (
            "maxResults 51",
            list().max_results(51),
            invalid("maxResults"),
        ),
        ("maxResults 1", list().max_results(1), ok()),
        ("maxResults 50", list().max_results(50), ok()),
        (
            "nextToken not issued",
            list().next_token("not-a-token!"),
            invalid("nextToken"),
        ),
        (
            "nextToken base64 of junk",
            list().next_token("aGVsbG8"),
            invalid("nextToken"),
        ),
        (
            "nextToken over 1024",
            list().next_token("a".repeat(1025)),
            invalid("nextToken"),
        ),
        ("name filter pattern", list().name("a b"), invalid("name")),
        (
            "name filter 129",
            list().name("n".repeat(129)),
            invalid("name"),
        ),
        (
            "uri filter not Lambda",
            list().message_review_handler_uri("arn:aws:sns:us-east-1:123456789012:t"),
            invalid("messageReviewHandlerUri"),
        ),
        (
            "uri filter valid",
            list().message_review_handler_uri(LAMBDA),
            ok(),
        ),
        (
            "logging filter malformed",
            list().logging_configuration_identifier("nope"),
            invalid("loggingConfigurationIdentifier"),
        ),
        (
            "logging filter valid",
            list().logging_configuration_identifier(LOG_1),
            ok(),
        ),
    ] {
        check(case, request.send().await, &want);
    }
}

/// TagResource, UntagResource and ListTagsForResource: ResourceArn pattern, tag and key-list limits.
#[tokio::test]
async fn tag_operation_constraints() {
    let h = start().await;
    let room = h.room("r").await;
    let arn = room.arn().unwrap();
    let bad_arns = [
        "not-an-arn",
        "arn:aws:ivschat:us-east-1:123456789012:room/a_b",
        "arn:aws:ivs:us-east-1:123456789012:channel/abc",
    ];

    check(
        "TagResource 51 tags",
        h.client
            .tag_resource()
            .resource_arn(arn)
            .set_tags(Some(tags(51)))
            .send()
            .await,
        &invalid("tags"),
    );
    check(
        "TagResource key 129",
        h.client
            .tag_resource()
            .resource_arn(arn)
            .tags("k".repeat(129), "v")
            .send()
            .await,
        &invalid(format!("tags.{}", "k".repeat(129))),
    );
    check(
        "TagResource value 257",
        h.client
            .tag_resource()
            .resource_arn(arn)
            .tags("k", "v".repeat(257))
            .send()
            .await,
        &invalid("tags.k"),
    );
    check(
        "UntagResource 51 keys",
        h.client
            .untag_resource()
            .resource_arn(arn)
            .set_tag_keys(Some(tags(51).into_keys().collect()))
            .send()
            .await,
        &invalid("tagKeys"),
    );
    check(
        "UntagResource key 129",
        h.client
            .untag_resource()
            .resource_arn(arn)
            .tag_keys("k".repeat(129))
            .send()
            .await,
        &invalid("tagKeys[0]"),
    );
    for bad in bad_arns {
        check(
            &format!("TagResource {bad}"),
            h.client
                .tag_resource()
                .resource_arn(bad)
                .tags("k", "v")
                .send()
                .await,
            &invalid("resourceArn"),
        );
        check(
            &format!("UntagResource {bad}"),
            h.client
                .untag_resource()
                .resource_arn(bad)
                .tag_keys("k")
                .send()
                .await,
            &invalid("resourceArn"),
        );
        check(
            &format!("ListTagsForResource {bad}"),
            h.client
                .list_tags_for_resource()
                .resource_arn(bad)
                .send()
                .await,
            &invalid("resourceArn"),
        );
    }
    assert!(
        h.get(arn)
            .await
            .tags()
            .unwrap_or(&HashMap::new())
            .is_empty(),
        "no refused call tagged the room"
    );
}

/// A resource holds at most 50 tags in all: tags that would take it over are refused.
#[tokio::test]
async fn tag_resource_limits_the_total() {
    let h = start().await;
    let room = h
        .client
        .create_room()
        .set_tags(Some(tags(30)))
        .send()
        .await
        .expect("CreateRoom");
    let arn = room.arn().unwrap();
    let more: HashMap<String, String> = (0..21)
        .map(|i| (format!("more{i}"), "v".to_owned()))
        .collect();
    check(
        "30 + 21 tags",
        h.client
            .tag_resource()
            .resource_arn(arn)
            .set_tags(Some(more))
            .send()
            .await,
        &invalid("tags"),
    );
    // Overwriting existing keys does not count twice.
    let mut again = tags(30);
    again.extend((0..20).map(|i| (format!("more{i}"), "v".to_owned())));
    check(
        "30 overwritten + 20 new",
        h.client
            .tag_resource()
            .resource_arn(arn)
            .set_tags(Some(again))
            .send()
            .await,
        &ok(),
    );
    let listed = h
        .client
        .list_tags_for_resource()
        .resource_arn(arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.tags().len(), 50);
}

/// Missing required members of the tag operations, sent raw: tags for TagResource, tagKeys for UntagResource.
#[tokio::test]
async fn tag_operations_missing_members() {
    let h = start().await;
    let room = h.room("r").await;
    let path = tags_path(room.arn().unwrap());
    for (method, body, field) in [
        (reqwest::Method::POST, Some("{}"), "tags"),
        (reqwest::Method::DELETE, None, "tagKeys"),
    ] {
        let (status, error_type, body) = h.raw(method.clone(), &path, body).await;
        assert_eq!(status, 400, "{method}: {body}");
        assert_eq!(
            error_type.as_deref(),
            Some("ValidationException"),
            "{method}"
        );
        assert_eq!(body["fieldList"][0]["name"], field, "{method}: {body}");
    }
}

// ---------------------------------------------------------------------------
// ResourceNotFoundException

/// Every operation on a well-formed but unknown room ARN is a 404 ResourceNotFoundException (ROOM, the id).
#[tokio::test]
async fn unknown_room_is_not_found() {
    let h = start().await;
    h.room("someone-else").await;
    let want = not_found(UNKNOWN_ID);
    check(
        "GetRoom",
        h.client.get_room().identifier(UNKNOWN_ROOM).send().await,
        &want,
    );
    check(
        "UpdateRoom",
        h.client
            .update_room()
            .identifier(UNKNOWN_ROOM)
            .name("x")
            .send()
            .await,
        &want,
    );
    check(
        "DeleteRoom",
        h.client.delete_room().identifier(UNKNOWN_ROOM).send().await,
        &want,
    );
    check(
        "TagResource",
        h.client
            .tag_resource()
            .resource_arn(UNKNOWN_ROOM)
            .tags("k", "v")
            .send()
            .await,
        &want,
    );
    check(
        "UntagResource",
        h.client
            .untag_resource()
            .resource_arn(UNKNOWN_ROOM)
            .tag_keys("k")
            .send()
            .await,
        &want,
    );
    check(
        "ListTagsForResource",
        h.client
            .list_tags_for_resource()
            .resource_arn(UNKNOWN_ROOM)
            .send()
            .await,
        &want,
    );

    let (status, error_type, body) = h
        .raw(
            reqwest::Method::POST,
            "/GetRoom",
            Some(&json!({ "identifier": UNKNOWN_ROOM }).to_string()),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(error_type.as_deref(), Some("ResourceNotFoundException"));
    assert_eq!(body["resourceId"], UNKNOWN_ID);
    assert_eq!(body["resourceType"], "ROOM");
    assert!(body["message"].is_string(), "{body}");
}

/// Tag operations on a well-formed ARN of another resource type are 404, resourceId the model's `[a-zA-Z0-9]+`.
#[tokio::test]
async fn tag_operations_on_other_resource_types_are_not_found() {
    let h = start().await;
    let arn = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/abcd1234";
    let want = not_found("abcd1234");
    check(
        "TagResource",
        h.client
            .tag_resource()
            .resource_arn(arn)
            .tags("k", "v")
            .send()
            .await,
        &want,
    );
    check(
        "UntagResource",
        h.client
            .untag_resource()
            .resource_arn(arn)
            .tag_keys("k")
            .send()
            .await,
        &want,
    );
    check(
        "ListTagsForResource",
        h.client
            .list_tags_for_resource()
            .resource_arn(arn)
            .send()
            .await,
        &want,
    );
}

/// A room's id under another region or account is a different ARN, so not found.
#[tokio::test]
async fn room_arn_must_match_region_and_account() {
    let h = start().await;
    let room = h.room("r").await;
    let id = room.id().unwrap();
    for arn in [
        format!("arn:aws:ivschat:us-west-2:{ACCOUNT}:room/{id}"),
        format!("arn:aws:ivschat:{REGION}:210987654321:room/{id}"),
    ] {
        check(
            &arn,
            h.client.get_room().identifier(&arn).send().await,
            &not_found(id),
        );
    }
}

/// The region a request is signed for and the configured account shape the
/// ARNs the emulator hands out; each region sees only its own rooms, and a
/// request signed for none is the configured region's.
#[tokio::test]
async fn regions_are_the_signature_s_and_the_account_configurable() {
    let h = start_with(EmulatorConfig {
        region: "eu-west-1".into(),
        account_id: "999988887777".into(),
        ..EmulatorConfig::default()
    })
    .await;
    let room = h.room("r").await;
    let id = room.id().unwrap();
    assert_eq!(
        room.arn(),
        Some(format!("arn:aws:ivschat:{REGION}:999988887777:room/{id}").as_str())
    );
    check(
        "the default account's ARN",
        h.client.get_room().identifier(arn_of(id)).send().await,
        &not_found(id),
    );
    // Another region's endpoint knows nothing of it.
    let elsewhere = sdk_client_in(&h.url, "ap-south-1");
    let arn = room.arn().unwrap();
    check(
        "a room of another region",
        elsewhere.get_room().identifier(arn).send().await,
        &not_found(id),
    );
    let listed = elsewhere.list_rooms().send().await.unwrap();
    assert!(listed.rooms().is_empty(), "{listed:?}");
    let theirs = elsewhere.create_room().name("theirs").send().await.unwrap();
    assert!(
        theirs
            .arn()
            .unwrap()
            .starts_with("arn:aws:ivschat:ap-south-1:999988887777:room/"),
        "{theirs:?}"
    );
    let ours = h.client.list_rooms().send().await.unwrap();
    assert_eq!(ours.rooms().len(), 1, "{ours:?}");
    assert_eq!(h.emulator.rooms_in("ap-south-1").len(), 1);
    assert_eq!(h.emulator.calls_in("ap-south-1", Operation::ListRooms), 1);
    assert_eq!(h.emulator.calls_in(REGION, Operation::ListRooms), 1);
    // Unsigned: the configured region's.
    let unsigned: serde_json::Value = h
        .http
        .post(format!("{}/CreateRoom", h.url))
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        unsigned["arn"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:ivschat:eu-west-1:999988887777:room/"),
        "{unsigned}"
    );
}

// ---------------------------------------------------------------------------
// UpdateRoom

/// UpdateRoom changes only the fields it is given; createTime stays and updateTime moves.
#[tokio::test]
async fn update_room_is_partial() {
    let h = start().await;
    let room = h
        .client
        .create_room()
        .name("before")
        .maximum_message_rate_per_second(20)
        .maximum_message_length(200)
        .message_review_handler(handler(LAMBDA, FallbackResult::Deny))
        .tags("k", "v")
        .logging_configuration_identifiers(LOG_1)
        .logging_configuration_identifiers(LOG_2)
        .send()
        .await
        .unwrap();
    let arn = room.arn().unwrap();

    let renamed = h
        .client
        .update_room()
        .identifier(arn)
        .name("after")
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.name(), Some("after"));
    assert_eq!(renamed.arn(), room.arn());
    assert_eq!(renamed.id(), room.id());
    assert_eq!(renamed.maximum_message_rate_per_second(), Some(20));
    assert_eq!(renamed.maximum_message_length(), Some(200));
    assert_eq!(
        renamed.message_review_handler(),
        room.message_review_handler()
    );
    assert_eq!(renamed.tags(), room.tags());
    assert_eq!(renamed.logging_configuration_identifiers(), [LOG_1, LOG_2]);
    assert_eq!(renamed.create_time(), room.create_time());
    assert!(renamed.update_time() > room.update_time());

    let got = h.get(arn).await;
    assert_eq!(got.name(), Some("after"));
    assert_eq!(
        got.update_time(),
        renamed.update_time(),
        "GetRoom sees the update"
    );
    assert_eq!(got.maximum_message_rate_per_second(), Some(20));

    let limits = h
        .client
        .update_room()
        .identifier(arn)
        .maximum_message_rate_per_second(7)
        .maximum_message_length(77)
        .send()
        .await
        .unwrap();
    assert_eq!(limits.name(), Some("after"));
    assert_eq!(limits.maximum_message_rate_per_second(), Some(7));
    assert_eq!(limits.maximum_message_length(), Some(77));
    assert_eq!(
        limits.message_review_handler(),
        room.message_review_handler()
    );

    let new_handler = h
        .client
        .update_room()
        .identifier(arn)
        .message_review_handler(handler(LAMBDA_2, FallbackResult::Allow))
        .send()
        .await
        .unwrap();
    let got = new_handler.message_review_handler().expect("handler");
    assert_eq!(got.uri(), Some(LAMBDA_2));
    assert_eq!(got.fallback_result(), Some(&FallbackResult::Allow));
    assert_eq!(new_handler.create_time(), room.create_time());
}

/// UpdateRoom with an empty review-handler uri removes the handler.
#[tokio::test]
async fn update_room_empty_uri_removes_handler() {
    let h = start().await;
    let room = h
        .client
        .create_room()
        .message_review_handler(handler(LAMBDA, FallbackResult::Deny))
        .send()
        .await
        .unwrap();
    let arn = room.arn().unwrap();
    assert!(room.message_review_handler().is_some());
    let updated = h
        .client
        .update_room()
        .identifier(arn)
        .message_review_handler(handler("", FallbackResult::Allow))
        .send()
        .await
        .unwrap();
    assert!(updated.message_review_handler().is_none(), "{updated:?}");
    assert!(h.get(arn).await.message_review_handler().is_none());
    // And an update that does not mention the handler leaves a handler in place.
    h.client
        .update_room()
        .identifier(arn)
        .message_review_handler(handler(LAMBDA, FallbackResult::Deny))
        .send()
        .await
        .unwrap();
    h.client
        .update_room()
        .identifier(arn)
        .name("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        h.get(arn)
            .await
            .message_review_handler()
            .and_then(|h| h.uri()),
        Some(LAMBDA)
    );
}

/// UpdateRoom replaces the logging identifiers when given, clears them with an empty list, keeps them when omitted.
#[tokio::test]
async fn update_room_replaces_logging_ids() {
    let h = start().await;
    let room = h
        .client
        .create_room()
        .logging_configuration_identifiers(LOG_1)
        .logging_configuration_identifiers(LOG_2)
        .send()
        .await
        .unwrap();
    let arn = room.arn().unwrap();
    let replaced = h
        .client
        .update_room()
        .identifier(arn)
        .logging_configuration_identifiers(LOG_3)
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.logging_configuration_identifiers(), [LOG_3]);
    let kept = h
        .client
        .update_room()
        .identifier(arn)
        .name("n")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.logging_configuration_identifiers(), [LOG_3]);
    let cleared = h
        .client
        .update_room()
        .identifier(arn)
        .set_logging_configuration_identifiers(Some(vec![]))
        .send()
        .await
        .unwrap();
    assert!(
        cleared.logging_configuration_identifiers().is_empty(),
        "{cleared:?}"
    );
    assert!(
        h.get(arn)
            .await
            .logging_configuration_identifiers()
            .is_empty()
    );
}

/// updateTime is strictly greater after each of 20 back-to-back updates; createTime never changes.
#[tokio::test]
async fn update_time_strictly_increases() {
    let h = start().await;
    let room = h.room("r").await;
    let arn = room.arn().unwrap();
    let mut last = *room.update_time().unwrap();
    for i in 0..20 {
        let updated = h
            .client
            .update_room()
            .identifier(arn)
            .maximum_message_rate_per_second(1 + i % 2)
            .send()
            .await
            .unwrap();
        let now = *updated.update_time().unwrap();
        assert!(now > last, "update {i}: {now} should be after {last}");
        assert_eq!(updated.create_time(), room.create_time(), "update {i}");
        last = now;
    }
    assert_eq!(h.get(arn).await.update_time(), Some(&last));
}

// ---------------------------------------------------------------------------
// DeleteRoom

/// DeleteRoom answers 204, then the room is not found by any operation, nor listed.
#[tokio::test]
async fn delete_room_then_not_found() {
    let h = start().await;
    let room = h.room("doomed").await;
    let keep = h.room("kept").await;
    let arn = room.arn().unwrap();
    let id = room.id().unwrap();
    check(
        "DeleteRoom",
        h.client.delete_room().identifier(arn).send().await,
        &ok(),
    );
    check(
        "GetRoom after delete",
        h.client.get_room().identifier(arn).send().await,
        &not_found(id),
    );
    check(
        "DeleteRoom twice",
        h.client.delete_room().identifier(arn).send().await,
        &not_found(id),
    );
    check(
        "UpdateRoom after delete",
        h.client
            .update_room()
            .identifier(arn)
            .name("x")
            .send()
            .await,
        &not_found(id),
    );
    check(
        "ListTagsForResource after delete",
        h.client
            .list_tags_for_resource()
            .resource_arn(arn)
            .send()
            .await,
        &not_found(id),
    );
    let listed = h.client.list_rooms().send().await.unwrap();
    assert_eq!(summary_ids(listed.rooms()), [keep.id().unwrap()]);

    let other = h.room("raw").await;
    let (status, error_type, body) = h
        .raw(
            reqwest::Method::POST,
            "/DeleteRoom",
            Some(&json!({ "identifier": other.arn() }).to_string()),
        )
        .await;
    assert_eq!(
        (status, error_type, body),
        (204, None, Value::Null),
        "204, no body"
    );
}

// ---------------------------------------------------------------------------
// ListRooms

/// ListRooms returns rooms newest updateTime first; an update moves a room to the front.
#[tokio::test]
async fn list_rooms_sorted_by_update_time_descending() {
    let h = start().await;
    let mut arns = Vec::new();
    for i in 0..6 {
        arns.push(h.room(&format!("room{i}")).await.arn().unwrap().to_owned());
    }
    // Touch the oldest: it becomes the newest.
    let touched = h
        .client
        .update_room()
        .identifier(&arns[0])
        .name("touched")
        .send()
        .await
        .unwrap();

    let listed = h.client.list_rooms().send().await.unwrap();
    let rooms = listed.rooms();
    assert_eq!(rooms.len(), 6);
    assert!(listed.next_token().is_none());
    assert_eq!(rooms[0].arn(), touched.arn(), "the updated room is first");
    for pair in rooms.windows(2) {
        assert!(
            pair[0].update_time().unwrap() >= pair[1].update_time().unwrap(),
            "{:?} before {:?}",
            pair[0],
            pair[1]
        );
    }
    // Tagging is not an update: the order stays.
    h.client
        .tag_resource()
        .resource_arn(&arns[1])
        .tags("k", "v")
        .send()
        .await
        .unwrap();
    let again = h.client.list_rooms().send().await.unwrap();
    assert_eq!(summary_ids(again.rooms()), summary_ids(rooms));
}

/// ListRooms pages with maxResults cover every room exactly once, by hand and through the SDK's paginator.
#[tokio::test]
async fn list_rooms_pagination_covers_every_room_once() {
    let h = start().await;
    let mut want = BTreeSet::new();
    for i in 0..7 {
        want.insert(h.room(&format!("room{i}")).await.id().unwrap().to_owned());
    }

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = h
            .client
            .list_rooms()
            .max_results(3)
            .set_next_token(token.clone())
            .send()
            .await
            .unwrap();
        sizes.push(page.rooms().len());
        seen.extend(summary_ids(page.rooms()));
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
        assert!(sizes.len() < 10, "pagination does not end");
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen.len(), 7, "no room twice: {seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), want);

    // A page that ends exactly at the last room has no nextToken.
    let exact = h.client.list_rooms().max_results(7).send().await.unwrap();
    assert_eq!(exact.rooms().len(), 7);
    assert!(exact.next_token().is_none());

    let pages: Vec<_> = h
        .client
        .list_rooms()
        .into_paginator()
        .page_size(2)
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    assert_eq!(pages.len(), 4);
    let ids: Vec<String> = pages.iter().flat_map(|p| summary_ids(p.rooms())).collect();
    assert_eq!(ids, seen, "the paginator sees the same order");
}

/// ListRooms without maxResults returns at most 50 (the model's default) and a nextToken.
#[tokio::test]
async fn list_rooms_default_page_is_50() {
    let h = start().await;
    for i in 0..51 {
        h.room(&format!("room{i}")).await;
    }
    let first = h.client.list_rooms().send().await.unwrap();
    assert_eq!(first.rooms().len(), 50);
    let token = first.next_token().expect("a nextToken");
    let second = h
        .client
        .list_rooms()
        .next_token(token)
        .send()
        .await
        .unwrap();
    assert_eq!(second.rooms().len(), 1);
    assert!(second.next_token().is_none());
    assert!(!summary_ids(first.rooms()).contains(&summary_ids(second.rooms())[0]));
}

/// ListRooms filters by name, messageReviewHandlerUri and loggingConfigurationIdentifier; summaries carry tags.
#[tokio::test]
async fn list_rooms_filters_and_summaries() {
    let h = start().await;
    let a = h
        .client
        .create_room()
        .name("alpha")
        .message_review_handler(handler(LAMBDA, FallbackResult::Deny))
        .logging_configuration_identifiers(LOG_1)
        .tags("owner", "a")
        .send()
        .await
        .unwrap();
    let b = h
        .client
        .create_room()
        .name("beta")
        .logging_configuration_identifiers(LOG_1)
        .logging_configuration_identifiers(LOG_2)
        .send()
        .await
        .unwrap();
    let c = h
        .client
        .create_room()
        .name("alpha")
        .message_review_handler(handler(LAMBDA_2, FallbackResult::Allow))
        .send()
        .await
        .unwrap();
    let [a, b, c] = [&a, &b, &c].map(|r| r.id().unwrap().to_owned());

    let list = || h.client.list_rooms();
    for (case, request, want) in [
        ("no filter", list(), vec![&a, &b, &c]),
        ("name alpha", list().name("alpha"), vec![&a, &c]),
        ("name beta", list().name("beta"), vec![&b]),
        ("name gamma", list().name("gamma"), vec![]),
        (
            "uri LAMBDA",
            list().message_review_handler_uri(LAMBDA),
            vec![&a],
        ),
        (
            "uri LAMBDA_2",
            list().message_review_handler_uri(LAMBDA_2),
            vec![&c],
        ),
        (
            "logging LOG_1",
            list().logging_configuration_identifier(LOG_1),
            vec![&a, &b],
        ),
        (
            "logging LOG_2",
            list().logging_configuration_identifier(LOG_2),
            vec![&b],
        ),
        (
            "logging LOG_3",
            list().logging_configuration_identifier(LOG_3),
            vec![],
        ),
        (
            "name alpha and uri LAMBDA_2",
            list().name("alpha").message_review_handler_uri(LAMBDA_2),
            vec![&c],
        ),
        (
            "name beta and logging LOG_2",
            list().name("beta").logging_configuration_identifier(LOG_2),
            vec![&b],
        ),
        (
            "name alpha and logging LOG_2",
            list().name("alpha").logging_configuration_identifier(LOG_2),
            vec![],
        ),
    ] {
        let page = request.send().await.unwrap();
        let got: BTreeSet<String> = summary_ids(page.rooms()).into_iter().collect();
        let want: BTreeSet<String> = want.into_iter().cloned().collect();
        assert_eq!(got, want, "{case}");
    }

    let page = list()
        .name("alpha")
        .message_review_handler_uri(LAMBDA)
        .send()
        .await
        .unwrap();
    let summary = &page.rooms()[0];
    assert_eq!(summary.id(), Some(a.as_str()));
    assert_eq!(summary.arn(), Some(arn_of(&a).as_str()));
    assert_eq!(summary.name(), Some("alpha"));
    assert_eq!(summary.tags(), Some(&tag("owner", "a")));
    assert_eq!(summary.logging_configuration_identifiers(), [LOG_1]);
    let review = summary
        .message_review_handler()
        .expect("handler in summary");
    assert_eq!(review.uri(), Some(LAMBDA));
    assert_eq!(review.fallback_result(), Some(&FallbackResult::Deny));
    assert!(summary.create_time().is_some());
    assert_eq!(summary.create_time(), summary.update_time());

    // RoomSummary has no message limits on the wire.
    let (status, _, body) = h.raw(reqwest::Method::POST, "/ListRooms", Some("{}")).await;
    assert_eq!(status, 200);
    let first = &body["rooms"][0];
    assert!(
        first.get("maximumMessageRatePerSecond").is_none(),
        "{first}"
    );
    assert!(first.get("maximumMessageLength").is_none(), "{first}");
    assert!(body.get("nextToken").is_none(), "{body}");
}

// ---------------------------------------------------------------------------
// Tags

/// TagResource merges, UntagResource removes, ListTagsForResource and GetRoom agree; updateTime never moves.
#[tokio::test]
async fn tags_round_trip() {
    let h = start().await;
    let room = h.client.create_room().tags("a", "1").send().await.unwrap();
    let arn = room.arn().unwrap();
    let (client, arn_ref) = (&h.client, arn);
    let list_tags = move || async move {
        client
            .list_tags_for_resource()
            .resource_arn(arn_ref)
            .send()
            .await
            .unwrap()
            .tags()
            .clone()
    };
    let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(list_tags().await, map(&[("a", "1")]));

    h.client
        .tag_resource()
        .resource_arn(arn)
        .tags("b", "2")
        .tags("a", "one")
        .send()
        .await
        .unwrap();
    assert_eq!(
        list_tags().await,
        map(&[("a", "one"), ("b", "2")]),
        "merged, a overwritten"
    );

    h.client
        .tag_resource()
        .resource_arn(arn)
        .set_tags(Some(HashMap::new()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        list_tags().await,
        map(&[("a", "one"), ("b", "2")]),
        "no tags changes nothing"
    );

    h.client
        .untag_resource()
        .resource_arn(arn)
        .tag_keys("a")
        .tag_keys("absent")
        .send()
        .await
        .unwrap();
    assert_eq!(
        list_tags().await,
        map(&[("b", "2")]),
        "a removed, an absent key ignored"
    );

    let got = h.get(arn).await;
    assert_eq!(got.tags(), Some(&map(&[("b", "2")])));
    assert_eq!(
        got.update_time(),
        room.update_time(),
        "tagging does not change updateTime"
    );
    assert_eq!(got.create_time(), room.create_time());

    h.client
        .untag_resource()
        .resource_arn(arn)
        .tag_keys("b")
        .send()
        .await
        .unwrap();
    assert!(list_tags().await.is_empty());

    // The wire: ListTagsForResource always has `tags`, even empty.
    let (status, _, body) = h.raw(reqwest::Method::GET, &tags_path(arn), None).await;
    assert_eq!((status, body), (200, json!({ "tags": {} })));
}

/// Tag keys and values with characters that need URL encoding survive TagResource and UntagResource.
#[tokio::test]
async fn tags_with_special_characters() {
    let h = start().await;
    let room = h.room("r").await;
    let arn = room.arn().unwrap();
    let key = "team:a/b c&d=e+f%g";
    h.client
        .tag_resource()
        .resource_arn(arn)
        .tags(key, "x y/z")
        .tags("plain", "p")
        .send()
        .await
        .unwrap();
    let listed = h
        .client
        .list_tags_for_resource()
        .resource_arn(arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.tags().get(key).map(String::as_str), Some("x y/z"));
    h.client
        .untag_resource()
        .resource_arn(arn)
        .tag_keys(key)
        .send()
        .await
        .unwrap();
    let listed = h
        .client
        .list_tags_for_resource()
        .resource_arn(arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.tags(), &tag("plain", "p"));
}

// ---------------------------------------------------------------------------
// Faults

/// An injected Internal fault is a 500 InternalServerException, does nothing, and is counted.
#[tokio::test]
async fn injected_internal_error() {
    let h = start().await;
    let room = h.room("r").await;
    let arn = room.arn().unwrap();
    h.emulator.set_faults(Faults {
        error_rate: 1.0,
        error: InjectedError::Internal,
        ..Default::default()
    });

    let err = h
        .client
        .get_room()
        .identifier(arn)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("InternalServerException"), "{err:?}");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(500));

    // TagResource models InternalServerException, so the SDK parses it as such.
    let err = h
        .client
        .tag_resource()
        .resource_arn(arn)
        .tags("k", "v")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.as_service_error(),
            Some(TagResourceError::InternalServerException(_))
        ),
        "{err:?}"
    );

    let err = h.client.create_room().send().await.unwrap_err();
    assert_eq!(err.code(), Some("InternalServerException"));
    let (status, error_type, _) = h.raw(reqwest::Method::POST, "/ListRooms", Some("{}")).await;
    assert_eq!(
        (status, error_type.as_deref()),
        (500, Some("InternalServerException"))
    );

    assert_eq!(
        h.emulator.rooms().len(),
        1,
        "a failed CreateRoom creates nothing"
    );
    assert!(
        h.emulator.rooms()[0].tags.is_empty(),
        "a failed TagResource tags nothing"
    );
    assert_eq!(h.emulator.calls(Operation::GetRoom), 1);
    assert_eq!(h.emulator.calls(Operation::CreateRoom), 2);
    assert_eq!(h.emulator.calls(Operation::TagResource), 1);
    assert_eq!(h.emulator.calls(Operation::ListRooms), 1);

    h.emulator.set_faults(Faults::default());
    assert_eq!(h.emulator.faults(), Faults::default());
    assert_eq!(h.get(arn).await.name(), Some("r"), "faults cleared");
}

/// An injected Throttling fault is a 429 ThrottlingException.
#[tokio::test]
async fn injected_throttling_error() {
    let h = start().await;
    let room = h.room("r").await;
    h.emulator.set_faults(Faults {
        error_rate: 1.0,
        error: InjectedError::Throttling,
        ..Default::default()
    });
    let err = h
        .client
        .get_room()
        .identifier(room.arn().unwrap())
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("ThrottlingException"), "{err:?}");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(429));
    let err = h
        .client
        .update_room()
        .identifier(room.arn().unwrap())
        .name("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("ThrottlingException"));
    assert_eq!(h.emulator.calls(Operation::GetRoom), 1);
    assert_eq!(h.emulator.calls(Operation::UpdateRoom), 1);
    h.emulator.set_faults(Faults::default());
    assert_eq!(
        h.get(room.arn().unwrap()).await.name(),
        Some("r"),
        "the throttled update did nothing"
    );
}

/// An error rate of 0 injects nothing.
#[tokio::test]
async fn zero_error_rate_injects_nothing() {
    let h = start().await;
    let room = h.room("r").await;
    h.emulator.set_faults(Faults {
        error_rate: 0.0,
        error: InjectedError::Internal,
        ..Default::default()
    });
    for _ in 0..20 {
        h.get(room.arn().unwrap()).await;
    }
    assert_eq!(h.emulator.calls(Operation::GetRoom), 20);
}

/// A TPS limit of 5 lets 5 of 10 simultaneous GetRoom through and throttles the rest, per operation.
#[tokio::test]
async fn tps_limit_throttles_the_excess() {
    const SENT: u64 = 10;
    const LIMIT: u32 = 5;
    let h = start().await;
    let room = h.room("r").await;
    let arn = room.arn().unwrap().to_owned();
    h.emulator.set_faults(Faults {
        tps_limit: Some(NonZeroU32::new(LIMIT).unwrap().into()),
        ..Default::default()
    });

    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..SENT {
        let request = h.client.get_room().identifier(&arn);
        calls.spawn(async move { request.send().await });
    }
    let (mut passed, mut throttled) = (0u64, 0u64);
    while let Some(result) = calls.join_next().await {
        match result.expect("task") {
            Ok(_) => passed += 1,
            Err(err) => {
                assert_eq!(err.code(), Some("ThrottlingException"), "{err:?}");
                assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(429));
                throttled += 1;
            }
        }
    }
    // The bucket holds 5 and refills one every 200 ms: on a machine slow enough
    // to spread the burst over more than that, a refill may let one more through.
    let refills = (started.elapsed().as_millis() / (1000 / u128::from(LIMIT))) as u64;
    assert!(
        passed >= u64::from(LIMIT) && passed <= u64::from(LIMIT) + refills,
        "{passed} passed, {throttled} throttled, {refills} refills"
    );
    assert_eq!(passed + throttled, SENT);
    assert_eq!(h.emulator.calls(Operation::GetRoom), SENT);

    // Each operation has its own bucket.
    check(
        "ListRooms under its own limit",
        h.client.list_rooms().send().await,
        &ok(),
    );

    // Each region has its own buckets, as AWS's quotas are per region.
    let west = sdk_client_in(&h.url, "eu-west-1");
    let west_room = west.create_room().name("w").send().await.unwrap();
    let west_arn = west_room.arn().unwrap().to_owned();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..LIMIT {
        let request = west.get_room().identifier(&west_arn);
        calls.spawn(async move { request.send().await });
    }
    let west_passed = calls
        .join_all()
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    assert_eq!(
        west_passed, LIMIT as usize,
        "eu-west-1's GetRoom quota is its own, untouched by us-east-1's burst"
    );
    assert_eq!(
        h.emulator.calls_in("eu-west-1", Operation::GetRoom),
        u64::from(LIMIT)
    );
    assert_eq!(h.emulator.calls_in(REGION, Operation::GetRoom), SENT);
}

// ---------------------------------------------------------------------------
// Persistence

/// With a state file, rooms (times, tags, updates, deletes) survive a restart of the emulator.
#[tokio::test]
async fn state_file_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("state.json");
    let config = EmulatorConfig {
        state_file: Some(path.clone()),
        ..EmulatorConfig::default()
    };

    let (kept, updated, deleted) = {
        let emulator = Emulator::new(config.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(emulator.clone().serve(listener, async move {
            stopped.await.ok();
        }));
        let client = sdk_client(&url);
        let kept = client
            .create_room()
            .name("kept")
            .maximum_message_length(99)
            .tags("k", "v")
            .message_review_handler(handler(LAMBDA, FallbackResult::Deny))
            .logging_configuration_identifiers(LOG_1)
            .send()
            .await
            .unwrap();
        let updated = client.create_room().name("before").send().await.unwrap();
        let updated = client
            .update_room()
            .identifier(updated.arn().unwrap())
            .name("after")
            .send()
            .await
            .unwrap();
        let deleted = client.create_room().name("deleted").send().await.unwrap();
        client
            .delete_room()
            .identifier(deleted.arn().unwrap())
            .send()
            .await
            .unwrap();
        // Another region's room, in the same file.
        sdk_client_in(&url, "eu-west-1")
            .create_room()
            .name("west")
            .send()
            .await
            .unwrap();
        drop(client);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        drop(emulator);
        (kept, updated, deleted)
    };
    assert!(path.exists(), "the state file was written");

    let h = start_with(config).await;
    assert_eq!(h.emulator.rooms().len(), 3);
    assert_eq!(h.emulator.rooms_in(REGION).len(), 2);
    let west = sdk_client_in(&h.url, "eu-west-1")
        .list_rooms()
        .send()
        .await
        .unwrap();
    assert_eq!(
        west.rooms().len(),
        1,
        "eu-west-1's room came back in eu-west-1"
    );
    assert_eq!(west.rooms()[0].name(), Some("west"));
    let got = h.get(kept.arn().unwrap()).await;
    assert_eq!(got.name(), Some("kept"));
    assert_eq!(got.create_time(), kept.create_time(), "same createTime");
    assert_eq!(got.update_time(), kept.update_time(), "same updateTime");
    assert_eq!(got.maximum_message_length(), Some(99));
    assert_eq!(got.tags(), kept.tags());
    assert_eq!(got.message_review_handler(), kept.message_review_handler());
    assert_eq!(got.logging_configuration_identifiers(), [LOG_1]);
    let got = h.get(updated.arn().unwrap()).await;
    assert_eq!(got.name(), Some("after"));
    assert_eq!(got.update_time(), updated.update_time());
    assert_eq!(got.create_time(), updated.create_time());
    check(
        "deleted before the restart",
        h.client
            .get_room()
            .identifier(deleted.arn().unwrap())
            .send()
            .await,
        &not_found(deleted.id().unwrap()),
    );

    // Changes after the restart still reach the file.
    h.client
        .delete_room()
        .identifier(kept.arn().unwrap())
        .send()
        .await
        .unwrap();
    let reopened = Emulator::new(EmulatorConfig {
        state_file: Some(path),
        ..EmulatorConfig::default()
    })
    .unwrap();
    let ids: Vec<String> = reopened
        .rooms_in(REGION)
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, [updated.id().unwrap()]);
    assert_eq!(reopened.rooms_in("eu-west-1").len(), 1);
}

/// A state file that is not the emulator's is an error at start, not an empty account.
#[tokio::test]
async fn corrupt_state_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, "not json").unwrap();
    let result = Emulator::new(EmulatorConfig {
        state_file: Some(path.clone()),
        ..EmulatorConfig::default()
    });
    assert!(result.is_err());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "not json",
        "left as it was"
    );
}

/// Two emulators whose state files share a directory do not trip over each other's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_files_in_one_directory_are_independent() {
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| EmulatorConfig {
        state_file: Some(dir.path().join(name)),
        ..EmulatorConfig::default()
    };
    let a = start_with(config("a.json")).await;
    let b = start_with(config("b.json")).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..EACH {
        for h in [&a, &b] {
            let request = h.client.create_room().name(format!("room{i}"));
            calls.spawn(async move { request.send().await });
        }
    }
    while let Some(result) = calls.join_next().await {
        result.expect("task").expect("every CreateRoom succeeds");
    }
    for (name, h) in [("a.json", &a), ("b.json", &b)] {
        let reopened = Emulator::new(config(name)).expect("state file parses");
        let mut on_disk: Vec<String> = reopened.rooms().into_iter().map(|r| r.id).collect();
        let mut in_memory: Vec<String> = h.emulator.rooms().into_iter().map(|r| r.id).collect();
        on_disk.sort();
        in_memory.sort();
        assert_eq!(in_memory.len(), EACH, "{name}");
        assert_eq!(on_disk, in_memory, "{name} holds exactly its own rooms");
    }
}

/// Unknown paths and wrong methods get AWS's error shape, not a bare 404/405.
#[tokio::test]
async fn unknown_operations_have_aws_error_shape() {
    let h = start().await;
    for (method, path) in [
        (reqwest::Method::POST, "/NoSuchOperation"),
        (reqwest::Method::PUT, "/CreateRoom"),
        (reqwest::Method::GET, "/GetRoom"),
    ] {
        let (status, error_type, body) = h.raw(method.clone(), path, Some("{}")).await;
        assert_eq!(status, 404, "{method} {path}");
        assert_eq!(
            error_type.as_deref(),
            Some("UnknownOperationException"),
            "{method} {path}"
        );
        assert_eq!(
            body["__type"], "UnknownOperationException",
            "{method} {path}"
        );
    }
}
