//! IVS Chat's failures as ours: the one mapping from SDK errors to
//! `domain::Error`, and which failures are worth another attempt.

use aws_sdk_ivschat::config::http::HttpResponse;
use aws_sdk_ivschat::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ivschat::types;

use crate::domain::{Error, FieldViolation, Limit};

/// The field list of a ValidationException, whichever operation raised it.
pub(super) trait ValidationFields {
    fn validation_fields(&self) -> Option<&[types::ValidationExceptionField]>;
}

macro_rules! validation_fields {
    ($($error:ty),* $(,)?) => {$(
        impl ValidationFields for $error {
            fn validation_fields(&self) -> Option<&[types::ValidationExceptionField]> {
                match self {
                    Self::ValidationException(e) => Some(e.field_list()),
                    _ => None,
                }
            }
        }
    )*};
}

validation_fields!(
    aws_sdk_ivschat::operation::create_room::CreateRoomError,
    aws_sdk_ivschat::operation::get_room::GetRoomError,
    aws_sdk_ivschat::operation::update_room::UpdateRoomError,
    aws_sdk_ivschat::operation::delete_room::DeleteRoomError,
    aws_sdk_ivschat::operation::list_rooms::ListRoomsError,
    aws_sdk_ivschat::operation::tag_resource::TagResourceError,
    aws_sdk_ivschat::operation::untag_resource::UntagResourceError,
    aws_sdk_ivschat::operation::list_tags_for_resource::ListTagsForResourceError,
);

/// IVS Chat refused the call for its rate (under whichever name).
pub(super) fn throttling<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(service) => {
            service.raw().status().as_u16() == 429
                || service.err().code() == Some("ThrottlingException")
        }
        _ => false,
    }
}

/// A failure that may not happen again: a 5xx, no answer in time, no
/// connection.
pub(super) fn transient<E>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(service) => service.raw().status().is_server_error(),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => false,
    }
}

/// The one mapping from SDK failures to our errors, after the SDK's retries:
/// upstream calls just use `?`.
impl<E> From<SdkError<E, HttpResponse>> for Error
where
    E: ProvideErrorMetadata + ValidationFields + std::error::Error + Send + Sync + 'static,
{
    fn from(err: SdkError<E, HttpResponse>) -> Error {
        from_sdk_error(err)
    }
}

fn from_sdk_error<E>(err: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + ValidationFields + std::error::Error + Send + Sync + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status();
            let e = service.into_err();
            let message = e.message().unwrap_or_default().to_owned();
            let code = e.code().unwrap_or_default().to_owned();
            match code.as_str() {
                "ResourceNotFoundException" => Error::NotFound {
                    resource_id: String::new(),
                    message,
                },
                "ValidationException" => {
                    let fields = e.validation_fields().unwrap_or_default();
                    let violations = if fields.is_empty() {
                        vec![FieldViolation::new("", message)]
                    } else {
                        fields
                            .iter()
                            .map(|f| FieldViolation::new(f.name(), f.message()))
                            .collect()
                    };
                    Error::InvalidArgument(violations)
                }
                "AccessDeniedException" => Error::PermissionDenied(message),
                "PendingVerification" => Error::PendingVerification(message),
                "ServiceQuotaExceededException" => Error::exhausted(Limit::AwsQuota, message),
                // Someone else spends the account's quota too: try later.
                _ if code == "ThrottlingException" || status.as_u16() == 429 => {
                    Error::unavailable(format!("IVS Chat is throttling calls: {message}"))
                }
                "ConflictException" => Error::Conflict(message),
                _ if status.is_server_error() => {
                    tracing::warn!(%code, %message, status = status.as_u16(), "IVS Chat failed");
                    Error::unavailable(format!("IVS Chat failed with HTTP {}", status.as_u16()))
                }
                code => {
                    Error::Internal(anyhow::Error::new(e).context(format!("IVS Chat error {code}")))
                }
            }
        }
        SdkError::TimeoutError(_) => Error::unavailable("IVS Chat did not answer in time"),
        SdkError::DispatchFailure(_) => Error::unavailable("IVS Chat is unreachable"),
        SdkError::ResponseError(e) => {
            tracing::warn!(error = ?e, "unreadable response from IVS Chat");
            Error::unavailable("IVS Chat sent an unreadable response")
        }
        other => Error::Internal(anyhow::Error::new(other).context("could not call IVS Chat")),
    }
}
