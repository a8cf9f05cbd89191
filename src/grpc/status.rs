//! The one mapping from errors to gRPC status codes.

use tonic::codegen::http;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

use crate::domain::Error;

/// Maps an error to the status a client sees. Validation errors carry a
/// `google.rpc.BadRequest` naming each offending field (in the proto's
/// snake_case); internal errors are logged in full and reach the client as a
/// generic message.
pub fn to_status(error: Error) -> Status {
    match error {
        Error::InvalidArgument(violations) => {
            // The message and details travel in HTTP/2 trailers, which
            // clients bound (hyper 16 KiB, gRPC core 8 KiB), and one request
            // can break thousands of constraints (every key of a huge tag
            // map): name them while they fit, then count the rest.
            let mut reported = Vec::new();
            let mut size = 0;
            for v in &violations {
                let field = proto_field(&v.field);
                size += field.len() + v.description.len();
                if !reported.is_empty() && size > MAX_VIOLATION_BYTES {
                    break;
                }
                reported.push(FieldViolation::new(field, &v.description));
            }
            let mut message = format!(
                "invalid request: {}",
                reported
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let omitted = violations.len() - reported.len();
            if omitted > 0 {
                message.push_str(&format!("; and {omitted} more violations"));
            }
            let details = ErrorDetails::with_bad_request(reported);
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        Error::NotFound { message, .. } => Status::not_found(message),
        Error::PermissionDenied(message) => {
            Status::permission_denied(format!("IVS Chat denied access: {message}"))
        }
        Error::PendingVerification(message) => Status::failed_precondition(format!(
            "the AWS account is pending verification: {message}"
        )),
        Error::ResourceExhausted {
            limit,
            message,
            retry_after,
        } => {
            let mut details = ErrorDetails::with_error_info(
                limit.reason(),
                DOMAIN,
                std::collections::HashMap::new(),
            );
            if let Some(after) = retry_after {
                details.set_retry_info(Some(after));
            }
            Status::with_error_details(
                Code::ResourceExhausted,
                format!("{limit}: {message}"),
                details,
            )
        }
        Error::Conflict(message) => Status::aborted(format!("conflict: {message}")),
        Error::Unavailable {
            message,
            retry_after: Some(after),
        } => Status::with_error_details(
            Code::Unavailable,
            message,
            ErrorDetails::with_retry_info(Some(after)),
        ),
        Error::Unavailable {
            message,
            retry_after: None,
        } => Status::unavailable(message),
        Error::RevisionOutOfRange {
            message,
            oldest_available_revision,
        } => {
            let details = ErrorDetails::with_error_info(
                "REVISION_OUT_OF_RANGE",
                DOMAIN,
                [(
                    "oldest_available_revision".to_owned(),
                    oldest_available_revision.to_string(),
                )],
            );
            Status::with_error_details(Code::OutOfRange, message, details)
        }
        e @ Error::UpdateTimeMismatch { actual, .. } => {
            let details = ErrorDetails::with_error_info(
                "UPDATE_TIME_MISMATCH",
                DOMAIN,
                [("update_time".to_owned(), actual.to_string())],
            );
            Status::with_error_details(Code::Aborted, e.to_string(), details)
        }
        Error::Internal(e) => {
            tracing::error!(error = format!("{e:#}"), "internal error");
            Status::internal("internal error; the server log has the details")
        }
    }
}

/// tonic's words for a request message past its decoding limit, which the
/// edge sets to `--max-request-size` (`grpc::watch::EdgeLimits`).
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// A refusal of a request message past `--max-request-size` that says whose
/// limit it is. tonic refuses such a message before reading it (OUT_OF_RANGE,
/// in the response's headers: nothing was decoded, nothing is sent) in words
/// that name no flag; this rewrites that refusal, and leaves every other
/// response alone. `google.rpc.ErrorInfo` reason `REQUEST_TOO_LARGE` carries
/// both sizes.
pub(super) fn name_request_size_limit<B>(response: &mut http::Response<B>, limit: usize) {
    let headers = response.headers_mut();
    if headers.get("grpc-status").map(|code| code.as_bytes()) != Some(b"11") {
        return;
    }
    let Some(refused) = Status::from_header_map(headers) else {
        return;
    };
    let Some(found) = refused
        .message()
        .strip_prefix(TONIC_TOO_LARGE)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|size| size.parse::<usize>().ok())
    else {
        return;
    };
    let details = ErrorDetails::with_error_info(
        "REQUEST_TOO_LARGE",
        DOMAIN,
        [
            ("size".to_owned(), found.to_string()),
            ("limit".to_owned(), limit.to_string()),
        ],
    );
    let status = Status::with_error_details(
        Code::OutOfRange,
        format!(
            "the request message is {found} bytes, more than this server's limit \
             (--max-request-size {limit} bytes); it was not read"
        ),
        details,
    );
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if let Err(e) = status.add_header(headers) {
        tracing::error!(error = %e, "could not name the request size limit");
    }
}

/// The `google.rpc.ErrorInfo` domain of this service's reasons.
const DOMAIN: &str = "ivschat-rooms";

/// Field names and descriptions one refusal carries, at most (the first
/// violation always goes, whatever its size).
const MAX_VIOLATION_BYTES: usize = 1024;

/// Map keys longer than this (TagKey's maximum) are named by their first this
/// many characters and `…`: the key is refused for its length anyway.
const MAX_KEY_CHARS: usize = 128;

/// A request that does not decode (not protobuf, or a string that is not
/// UTF-8): the client's error, INVALID_ARGUMENT, naming the field where
/// decoding stopped when prost says (its message reads
/// `failed to decode Protobuf message: Inner.field: Outer.field: what`).
pub(super) fn decode_error(error: &prost::DecodeError) -> Status {
    let text = error.to_string();
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let mut path = Vec::new();
    while let Some((segment, tail)) = rest.split_once(": ")
        && let Some((message, field)) = segment.split_once('.')
        && ident(message)
        && ident(field)
    {
        path.push(field);
        rest = tail;
    }
    if path.is_empty() {
        return Status::invalid_argument(format!("invalid request: {rest}"));
    }
    path.reverse();
    to_status(Error::invalid(
        path.join("."),
        format!("does not decode: {rest}"),
    ))
}

/// `messageReviewHandler.uri` → `message_review_handler.uri`. Map keys (after
/// `tags.`) are left as they are (cut at [`MAX_KEY_CHARS`]).
fn proto_field(field: &str) -> String {
    let (path, key) = match field.split_once("tags.") {
        Some((before, key)) => (format!("{before}tags"), Some(key)),
        None => (field.to_owned(), None),
    };
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    match key {
        Some(key) if key.chars().count() > MAX_KEY_CHARS => {
            let cut: String = key.chars().take(MAX_KEY_CHARS).chain(['…']).collect();
            format!("{out}[{cut:?}]")
        }
        Some(key) => format!("{out}[{key:?}]"),
        None => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_as_proto_paths() {
        for (aws, proto) in [
            ("name", "name"),
            (
                "maximumMessageRatePerSecond",
                "maximum_message_rate_per_second",
            ),
            ("messageReviewHandler.uri", "message_review_handler.uri"),
            (
                "loggingConfigurationIdentifiers[2]",
                "logging_configuration_identifiers[2]",
            ),
            ("tags.myKey", "tags[\"myKey\"]"),
            ("tagKeys[0]", "tag_keys[0]"),
        ] {
            assert_eq!(proto_field(aws), proto, "{aws}");
        }
    }

    #[test]
    fn long_keys_are_cut() {
        let key = "é".repeat(200);
        let field = proto_field(&format!("tags.{key}"));
        assert_eq!(field, format!("tags[\"{}…\"]", "é".repeat(128)));
        assert_eq!(
            proto_field(&format!("tags.{}", "k".repeat(128))).len(),
            128 + 8
        );
    }

    #[test]
    fn refusals_stay_small() {
        let violations = (0..10_000)
            .map(|i| crate::domain::FieldViolation::new(format!("tagKeys[{i}]"), "is bad"))
            .collect();
        let status = to_status(Error::InvalidArgument(violations));
        assert!(
            status.message().ends_with("more violations"),
            "{}",
            status.message()
        );
        assert!(status.message().len() < 2 * MAX_VIOLATION_BYTES);
        let fields = status.get_details_bad_request().unwrap().field_violations;
        assert!(!fields.is_empty() && fields.len() < 100, "{}", fields.len());
        assert_eq!(fields[0].field, "tag_keys[0]");
    }

    #[test]
    fn decode_errors_name_the_field() {
        use prost::Message as _;
        // CreateRoomRequest.message_review_handler (4) { uri (1): 0xff }.
        let bytes = [0x22, 0x03, 0x0a, 0x01, 0xff];
        let error = crate::grpc::proto::CreateRoomRequest::decode(&bytes[..]).unwrap_err();
        let status = decode_error(&error);
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(fields[0].field, "message_review_handler.uri");
        // Wire type 7: no field to name.
        let error = crate::grpc::proto::GetRoomRequest::decode(&[0x0f, 0x01][..]).unwrap_err();
        let status = decode_error(&error);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.get_details_bad_request().is_none());
    }
}
