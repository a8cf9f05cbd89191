//! The one mapping from errors to gRPC status codes.

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
            let message = format!(
                "invalid request: {}",
                violations
                    .iter()
                    .map(|v| format!("{}: {}", proto_field(&v.field), v.description))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let details = ErrorDetails::with_bad_request(
                violations
                    .iter()
                    .map(|v| FieldViolation::new(proto_field(&v.field), &v.description))
                    .collect::<Vec<_>>(),
            );
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        Error::NotFound { message, .. } => Status::not_found(message),
        Error::PermissionDenied(message) => {
            Status::permission_denied(format!("IVS Chat denied access: {message}"))
        }
        Error::PendingVerification(message) => Status::failed_precondition(format!(
            "the AWS account is pending verification: {message}"
        )),
        Error::ResourceExhausted(message) => {
            Status::resource_exhausted(format!("IVS Chat limit exceeded: {message}"))
        }
        Error::Conflict(message) => Status::aborted(format!("conflict: {message}")),
        Error::Unavailable(message) => Status::unavailable(message),
        Error::RevisionOutOfRange {
            message,
            oldest_available_revision,
        } => {
            let details = ErrorDetails::with_error_info(
                "REVISION_OUT_OF_RANGE",
                "ivschat-rooms",
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
                "ivschat-rooms",
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

/// `messageReviewHandler.uri` → `message_review_handler.uri`. Map keys (after
/// `tags.`) are left as they are.
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
        Some(key) => format!("{out}[{key:?}]"),
        None => out,
    }
}

#[cfg(test)]
mod tests {
    use super::proto_field;

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
}
