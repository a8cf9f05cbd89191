//! The rest-json wire: routes, request and response bodies, error shapes.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Emulator;
use super::faults::{InjectedError, InjectedFault};
use super::state::State as Rooms;
use crate::domain::Operation;
use crate::domain::{
    Error, FallbackResult, Limit, ListQuery, MessageReviewHandler, NewRoom, Result, Room, RoomPatch,
};

pub(super) fn router(emulator: Emulator) -> Router {
    Router::new()
        .route("/CreateRoom", post(create_room))
        .route("/GetRoom", post(get_room))
        .route("/UpdateRoom", post(update_room))
        .route("/DeleteRoom", post(delete_room))
        .route("/ListRooms", post(list_rooms))
        .route(
            "/tags/{*resource_arn}",
            get(list_tags).post(tag_resource).delete(untag_resource),
        )
        .fallback(unknown_operation)
        .method_not_allowed_fallback(unknown_operation)
        .with_state(emulator)
}

async fn create_room(State(em): State<Emulator>, headers: HeaderMap, body: Bytes) -> Response {
    handle(
        &em,
        &headers,
        Operation::CreateRoom,
        move |rooms, region| {
            let input: CreateRoomIn = parse(&body)?;
            let new = NewRoom {
                name: input.name.unwrap_or_default(),
                maximum_message_rate_per_second: input.maximum_message_rate_per_second.map(int),
                maximum_message_length: input.maximum_message_length.map(int),
                message_review_handler: input
                    .message_review_handler
                    .map(HandlerIn::parse)
                    .transpose()?,
                tags: input.tags.unwrap_or_default(),
                logging_configuration_identifiers: input
                    .logging_configuration_identifiers
                    .unwrap_or_default(),
            };
            Ok(ok_json(WireRoom::from(&rooms.create(region, new)?)))
        },
    )
    .await
}

async fn get_room(State(em): State<Emulator>, headers: HeaderMap, body: Bytes) -> Response {
    handle(&em, &headers, Operation::GetRoom, move |rooms, region| {
        let input: IdentifierIn = parse(&body)?;
        Ok(ok_json(WireRoom::from(
            &rooms.get(region, &input.required()?)?,
        )))
    })
    .await
}

async fn update_room(State(em): State<Emulator>, headers: HeaderMap, body: Bytes) -> Response {
    handle(
        &em,
        &headers,
        Operation::UpdateRoom,
        move |rooms, region| {
            let input: UpdateRoomIn = parse(&body)?;
            let identifier = required("identifier", input.identifier)?;
            let patch = RoomPatch {
                name: input.name,
                maximum_message_rate_per_second: input.maximum_message_rate_per_second.map(int),
                maximum_message_length: input.maximum_message_length.map(int),
                message_review_handler: input
                    .message_review_handler
                    .map(HandlerIn::parse)
                    .transpose()?,
                logging_configuration_identifiers: input.logging_configuration_identifiers,
            };
            Ok(ok_json(WireRoom::from(&rooms.update(
                region,
                &identifier,
                &patch,
            )?)))
        },
    )
    .await
}

async fn delete_room(State(em): State<Emulator>, headers: HeaderMap, body: Bytes) -> Response {
    handle(
        &em,
        &headers,
        Operation::DeleteRoom,
        move |rooms, region| {
            let input: IdentifierIn = parse(&body)?;
            rooms.delete(region, &input.required()?)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

async fn list_rooms(State(em): State<Emulator>, headers: HeaderMap, body: Bytes) -> Response {
    handle(&em, &headers, Operation::ListRooms, move |rooms, region| {
        let input: ListRoomsIn = parse(&body)?;
        let page = rooms.list(
            region,
            &ListQuery {
                name: input.name,
                message_review_handler_uri: input.message_review_handler_uri,
                logging_configuration_identifier: input.logging_configuration_identifier,
                max_results: input.max_results.map(int),
                next_token: input.next_token,
            },
        )?;
        let summaries: Vec<WireSummary> = page.rooms.iter().map(WireSummary::from).collect();
        let mut out = json!({ "rooms": summaries });
        if let Some(token) = page.next_token {
            out["nextToken"] = json!(token);
        }
        Ok(ok_json(out))
    })
    .await
}

async fn tag_resource(
    State(em): State<Emulator>,
    headers: HeaderMap,
    Path(resource_arn): Path<String>,
    body: Bytes,
) -> Response {
    handle(
        &em,
        &headers,
        Operation::TagResource,
        move |rooms, region| {
            let input: TagIn = parse(&body)?;
            rooms.tag(region, &resource_arn, required("tags", input.tags)?)?;
            Ok(ok_json(json!({})))
        },
    )
    .await
}

async fn untag_resource(
    State(em): State<Emulator>,
    headers: HeaderMap,
    Path(resource_arn): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    handle(
        &em,
        &headers,
        Operation::UntagResource,
        move |rooms, region| {
            let keys: Vec<String> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .filter(|(k, _)| k == "tagKeys")
                .map(|(_, v)| v.into_owned())
                .collect();
            rooms.untag(region, &resource_arn, &keys)?;
            Ok(ok_json(json!({})))
        },
    )
    .await
}

async fn list_tags(
    State(em): State<Emulator>,
    headers: HeaderMap,
    Path(resource_arn): Path<String>,
) -> Response {
    handle(
        &em,
        &headers,
        Operation::ListTagsForResource,
        move |rooms, region| {
            Ok(ok_json(
                json!({ "tags": rooms.tags(region, &resource_arn)? }),
            ))
        },
    )
    .await
}

async fn unknown_operation() -> Response {
    aws_error(
        StatusCode::NOT_FOUND,
        "UnknownOperationException",
        json!({ "message": "unknown operation" }),
    )
}

/// Applies the faults in force in the region the request was signed for,
/// runs `op` against that region's rooms, then delays the response by the
/// configured latency and while a test holds it back.
async fn handle(
    em: &Emulator,
    headers: &HeaderMap,
    op: Operation,
    run: impl FnOnce(&mut Rooms, &str) -> Result<Response, Reply> + Send + 'static,
) -> Response {
    // When IVS Chat receives the call: what AWS's per-second limit counts.
    let arrived = std::time::Instant::now();
    let region = super::regions::signed_for(headers)
        .unwrap_or(em.default_region())
        .to_owned();
    let faults = em.active_faults(&region);
    let over_limit = faults.over_limit(op);
    let fault = if over_limit { None } else { faults.draw() };
    let response = match fault {
        _ if over_limit => throttled(faults.limit_of(op)),
        Some(InjectedFault::Error(injected)) => injected_error(injected),
        None | Some(InjectedFault::Slow(_)) => {
            // The state file is written (and synced) under the lock: off the
            // async workers.
            let state = em.clone();
            let region = region.clone();
            match tokio::task::spawn_blocking(move || run(&mut state.state(), &region)).await {
                Ok(result) => result.unwrap_or_else(|reply| *reply.0),
                Err(e) => error_response(Error::Internal(anyhow::anyhow!("handler panicked: {e}"))),
            }
        }
    };
    em.record_call(&region, op, arrived);
    let slow = match fault {
        Some(InjectedFault::Slow(by)) => by,
        _ => Duration::ZERO,
    };
    let latency = faults.faults.latency_for(op) + slow;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    em.wait_if_held(op).await;
    with_request_id(response)
}

fn injected_error(injected: InjectedError) -> Response {
    let message = "injected fault".to_owned();
    match injected {
        InjectedError::Internal => error_response(Error::Internal(anyhow::anyhow!(message))),
        InjectedError::Throttling => throttled(0),
        InjectedError::ServiceQuotaExceeded => {
            error_response(Error::exhausted(Limit::AwsQuota, message))
        }
        InjectedError::AccessDenied => error_response(Error::PermissionDenied(message)),
        InjectedError::PendingVerification => error_response(Error::PendingVerification(message)),
        InjectedError::Conflict => error_response(Error::Conflict(message)),
        InjectedError::Unmodeled => aws_error(
            StatusCode::BAD_REQUEST,
            "InjectedUnmodeledException",
            json!({ "message": "injected fault with internal detail 7f3a" }),
        ),
    }
}

/// An error already turned into its HTTP response.
struct Reply(Box<Response>);

impl From<Error> for Reply {
    fn from(e: Error) -> Self {
        Reply(Box::new(error_response(e)))
    }
}

fn error_response(e: Error) -> Response {
    match e {
        Error::InvalidArgument(violations) => {
            let message = violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let fields: Vec<_> = violations
                .iter()
                .map(|v| json!({ "name": v.field, "message": v.description }))
                .collect();
            aws_error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                json!({ "message": message, "reason": "FIELD_VALIDATION_FAILED", "fieldList": fields }),
            )
        }
        Error::NotFound {
            resource_id,
            message,
        } => aws_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            json!({ "message": message, "resourceId": resource_id, "resourceType": "ROOM" }),
        ),
        Error::PermissionDenied(message) => aws_error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            json!({ "message": message }),
        ),
        Error::PendingVerification(message) => aws_error(
            StatusCode::FORBIDDEN,
            "PendingVerification",
            json!({ "message": message }),
        ),
        Error::Conflict(message) => aws_error(
            StatusCode::CONFLICT,
            "ConflictException",
            json!({ "message": message, "resourceId": "", "resourceType": "ROOM" }),
        ),
        Error::ResourceExhausted { message, .. } => aws_error(
            StatusCode::PAYMENT_REQUIRED,
            "ServiceQuotaExceededException",
            json!({ "message": message, "resourceId": "", "resourceType": "ROOM", "limit": 0 }),
        ),
        e @ (Error::Unavailable { .. }
        | Error::UpdateTimeMismatch { .. }
        | Error::RevisionOutOfRange { .. }
        | Error::Internal(_)) => {
            tracing::debug!(error = %e, "emulator internal error");
            aws_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerException",
                json!({ "message": "internal error" }),
            )
        }
    }
}

fn throttled(limit: u32) -> Response {
    aws_error(
        StatusCode::TOO_MANY_REQUESTS,
        "ThrottlingException",
        json!({ "message": "rate exceeded", "resourceId": "", "resourceType": "ROOM", "limit": limit }),
    )
}

/// An AWS rest-json error: the type in `x-amzn-ErrorType` and in the body.
fn aws_error(
    status: StatusCode,
    error_type: &'static str,
    mut body: serde_json::Value,
) -> Response {
    body["__type"] = json!(error_type);
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        HeaderName::from_static("x-amzn-errortype"),
        HeaderValue::from_static(error_type),
    );
    response
}

fn with_request_id(mut response: Response) -> Response {
    let id = format!("{:032x}", rand::random::<u128>());
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-amzn-requestid"), value);
    }
    response
}

fn ok_json(body: impl Serialize) -> Response {
    axum::Json(body).into_response()
}

/// An empty body is an empty object, as the SDKs may send nothing for a request
/// with no members set.
fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Reply(Box::new(aws_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            json!({ "message": format!("could not parse request body: {e}") }),
        )))
    })
}

fn required<T>(field: &str, value: Option<T>) -> Result<T, Reply> {
    value.ok_or_else(|| Error::invalid(field, "is required").into())
}

/// JSON numbers arrive as i64; anything outside i32 is out of every range here.
fn int(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(if n < 0 { i32::MIN } else { i32::MAX })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CreateRoomIn {
    name: Option<String>,
    maximum_message_rate_per_second: Option<i64>,
    maximum_message_length: Option<i64>,
    message_review_handler: Option<HandlerIn>,
    tags: Option<BTreeMap<String, String>>,
    logging_configuration_identifiers: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UpdateRoomIn {
    identifier: Option<String>,
    name: Option<String>,
    maximum_message_rate_per_second: Option<i64>,
    maximum_message_length: Option<i64>,
    message_review_handler: Option<HandlerIn>,
    logging_configuration_identifiers: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct IdentifierIn {
    identifier: Option<String>,
}

impl IdentifierIn {
    fn required(self) -> Result<String, Reply> {
        required("identifier", self.identifier)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListRoomsIn {
    name: Option<String>,
    next_token: Option<String>,
    max_results: Option<i64>,
    message_review_handler_uri: Option<String>,
    logging_configuration_identifier: Option<String>,
}

#[derive(Deserialize, Default)]
struct TagIn {
    tags: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HandlerIn {
    uri: Option<String>,
    fallback_result: Option<String>,
}

impl HandlerIn {
    fn parse(self) -> Result<MessageReviewHandler, Reply> {
        let fallback_result = match self.fallback_result.as_deref() {
            None => FallbackResult::default(),
            Some(s) => FallbackResult::parse(s).ok_or_else(|| {
                Error::invalid(
                    "messageReviewHandler.fallbackResult",
                    "must be one of ALLOW, DENY",
                )
            })?,
        };
        Ok(MessageReviewHandler {
            uri: self.uri.unwrap_or_default(),
            fallback_result,
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireHandler {
    uri: String,
    fallback_result: &'static str,
}

impl From<&MessageReviewHandler> for WireHandler {
    fn from(h: &MessageReviewHandler) -> Self {
        WireHandler {
            uri: h.uri.clone(),
            fallback_result: h.fallback_result.as_str(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireRoom {
    #[serde(flatten)]
    summary: WireSummary,
    maximum_message_rate_per_second: i32,
    maximum_message_length: i32,
}

impl From<&Room> for WireRoom {
    fn from(room: &Room) -> Self {
        WireRoom {
            summary: WireSummary::from(room),
            maximum_message_rate_per_second: room.maximum_message_rate_per_second,
            maximum_message_length: room.maximum_message_length,
        }
    }
}

/// ListRooms' `RoomSummary`: a room without its message limits.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireSummary {
    arn: String,
    id: String,
    name: String,
    create_time: String,
    update_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_review_handler: Option<WireHandler>,
    tags: BTreeMap<String, String>,
    logging_configuration_identifiers: Vec<String>,
}

impl From<&Room> for WireSummary {
    fn from(room: &Room) -> Self {
        WireSummary {
            arn: room.arn.clone(),
            id: room.id.clone(),
            name: room.name.clone(),
            create_time: room.create_time.to_string(),
            update_time: room.update_time.to_string(),
            message_review_handler: room.message_review_handler.as_ref().map(WireHandler::from),
            tags: room.tags.clone(),
            logging_configuration_identifiers: room.logging_configuration_identifiers.clone(),
        }
    }
}
