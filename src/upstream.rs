//! IVS Chat, through the real `aws-sdk-ivschat`: the only home of SDK types.
//!
//! Whether it talks to AWS or to the embedded emulator, this is the same client
//! and the same code path; only the endpoint and credentials differ.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ivschat::Client;
use aws_sdk_ivschat::config::http::HttpResponse;
use aws_sdk_ivschat::config::{Credentials, Region};
use aws_sdk_ivschat::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ivschat::types;
use aws_smithy_types::DateTime;

use crate::domain::{
    Error, FallbackResult, FieldViolation, ListQuery, ListedPage, MessageReviewHandler, NewRoom,
    Result, Room, RoomArn, RoomPatch, RoomSummary, Timestamp,
};

/// Retries and timeouts for every call upstream.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    /// The whole call, retries included.
    pub timeout: Duration,
    /// Attempts per call, the first included (1 disables retries).
    pub max_attempts: u32,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client,
}

impl Upstream {
    /// AWS, configured by aws-config's standard chain: environment, profile,
    /// IMDS; `AWS_ENDPOINT_URL_IVSCHAT` / `AWS_ENDPOINT_URL` override the endpoint.
    pub async fn aws(settings: UpstreamSettings) -> anyhow::Result<Upstream> {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(retry_config(settings))
            .timeout_config(timeout_config(settings))
            .load()
            .await;
        // Without a region every call would fail; say so now.
        anyhow::ensure!(
            shared.region().is_some(),
            "no AWS region configured: set AWS_REGION or a region in the AWS profile"
        );
        Ok(Upstream {
            client: Client::new(&shared),
        })
    }

    /// An IVS Chat at `endpoint_url` that takes any credentials (the emulator).
    pub fn at_endpoint(endpoint_url: &str, region: &str, settings: UpstreamSettings) -> Upstream {
        let config = aws_sdk_ivschat::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .credentials_provider(Credentials::new(
                "emulator", "emulator", None, None, "emulator",
            ))
            .endpoint_url(endpoint_url)
            .retry_config(retry_config(settings))
            .timeout_config(timeout_config(settings))
            .build();
        Upstream {
            client: Client::from_conf(config),
        }
    }

    pub async fn create_room(&self, new: &NewRoom) -> Result<Room> {
        let out = self
            .client
            .create_room()
            .name(&new.name)
            .set_maximum_message_rate_per_second(new.maximum_message_rate_per_second)
            .set_maximum_message_length(new.maximum_message_length)
            .set_message_review_handler(new.message_review_handler.as_ref().map(to_sdk_handler))
            .set_tags(Some(new.tags.clone().into_iter().collect()))
            .set_logging_configuration_identifiers(Some(
                new.logging_configuration_identifiers.clone(),
            ))
            .send()
            .await?;
        room_from_output!(out)
    }

    pub async fn get_room(&self, arn: &RoomArn) -> Result<Room> {
        let out = self
            .client
            .get_room()
            .identifier(arn.as_str())
            .send()
            .await?;
        room_from_output!(out)
    }

    pub async fn update_room(&self, arn: &RoomArn, patch: &RoomPatch) -> Result<Room> {
        let out = self
            .client
            .update_room()
            .identifier(arn.as_str())
            .set_name(patch.name.clone())
            .set_maximum_message_rate_per_second(patch.maximum_message_rate_per_second)
            .set_maximum_message_length(patch.maximum_message_length)
            .set_message_review_handler(patch.message_review_handler.as_ref().map(to_sdk_handler))
            .set_logging_configuration_identifiers(patch.logging_configuration_identifiers.clone())
            .send()
            .await?;
        room_from_output!(out)
    }

    pub async fn delete_room(&self, arn: &RoomArn) -> Result<()> {
        self.client
            .delete_room()
            .identifier(arn.as_str())
            .send()
            .await?;
        Ok(())
    }

    pub async fn list_rooms(&self, query: &ListQuery) -> Result<ListedPage<RoomSummary>> {
        let out = self
            .client
            .list_rooms()
            .set_name(query.name.clone())
            .set_message_review_handler_uri(query.message_review_handler_uri.clone())
            .set_logging_configuration_identifier(query.logging_configuration_identifier.clone())
            .set_max_results(query.max_results)
            .set_next_token(query.next_token.clone())
            .send()
            .await?;
        let rooms = out
            .rooms()
            .iter()
            .map(|s| {
                Ok(RoomSummary {
                    arn: required("arn", s.arn())?.to_owned(),
                    id: required("id", s.id())?.to_owned(),
                    name: s.name().unwrap_or_default().to_owned(),
                    create_time: timestamp(required("createTime", s.create_time())?),
                    update_time: timestamp(required("updateTime", s.update_time())?),
                    message_review_handler: from_sdk_handler(s.message_review_handler()),
                    tags: s
                        .tags()
                        .map(|t| t.clone().into_iter().collect())
                        .unwrap_or_default(),
                    logging_configuration_identifiers: s
                        .logging_configuration_identifiers()
                        .to_vec(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(ListedPage {
            rooms,
            next_token: out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }

    pub async fn tag_room(&self, arn: &RoomArn, tags: &BTreeMap<String, String>) -> Result<()> {
        self.client
            .tag_resource()
            .resource_arn(arn.as_str())
            .set_tags(Some(tags.clone().into_iter().collect()))
            .send()
            .await?;
        Ok(())
    }

    pub async fn untag_room(&self, arn: &RoomArn, keys: &[String]) -> Result<()> {
        self.client
            .untag_resource()
            .resource_arn(arn.as_str())
            .set_tag_keys(Some(keys.to_vec()))
            .send()
            .await?;
        Ok(())
    }
}

fn retry_config(settings: UpstreamSettings) -> RetryConfig {
    RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1))
}

fn timeout_config(settings: UpstreamSettings) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
        .operation_timeout(settings.timeout)
        .build()
}

/// GetRoom, CreateRoom and UpdateRoom answer with the same members.
macro_rules! room_from_output {
    ($out:expr) => {{
        let out = $out;
        Ok::<Room, Error>(Room {
            arn: required("arn", out.arn)?,
            id: required("id", out.id)?,
            name: out.name.unwrap_or_default(),
            create_time: timestamp(&required("createTime", out.create_time)?),
            update_time: timestamp(&required("updateTime", out.update_time)?),
            maximum_message_rate_per_second: out
                .maximum_message_rate_per_second
                .unwrap_or(Room::DEFAULT_MAXIMUM_MESSAGE_RATE_PER_SECOND),
            maximum_message_length: out
                .maximum_message_length
                .unwrap_or(Room::DEFAULT_MAXIMUM_MESSAGE_LENGTH),
            message_review_handler: from_sdk_handler(out.message_review_handler.as_ref()),
            tags: out.tags.unwrap_or_default().into_iter().collect(),
            logging_configuration_identifiers: out
                .logging_configuration_identifiers
                .unwrap_or_default(),
        })
    }};
}
use room_from_output;

fn required<T>(member: &str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| {
        Error::Internal(anyhow::anyhow!(
            "IVS Chat answered without the required member {member}"
        ))
    })
}

fn timestamp(t: &DateTime) -> Timestamp {
    Timestamp::from_nanos(i64::try_from(t.as_nanos()).unwrap_or(i64::MAX))
}

fn to_sdk_handler(h: &MessageReviewHandler) -> types::MessageReviewHandler {
    types::MessageReviewHandler::builder()
        .uri(&h.uri)
        .fallback_result(match h.fallback_result {
            FallbackResult::Allow => types::FallbackResult::Allow,
            FallbackResult::Deny => types::FallbackResult::Deny,
        })
        .build()
}

/// A handler with an empty uri is no handler.
fn from_sdk_handler(h: Option<&types::MessageReviewHandler>) -> Option<MessageReviewHandler> {
    let h = h?;
    let uri = h.uri().filter(|u| !u.is_empty())?;
    Some(MessageReviewHandler {
        uri: uri.to_owned(),
        fallback_result: match h.fallback_result() {
            Some(types::FallbackResult::Deny) => FallbackResult::Deny,
            _ => FallbackResult::Allow,
        },
    })
}

/// The field list of a ValidationException, whichever operation raised it.
trait ValidationFields {
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
);

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
                "ServiceQuotaExceededException" | "ThrottlingException" => {
                    Error::ResourceExhausted(message)
                }
                // Throttled under another name (e.g. TooManyRequestsException).
                _ if status.as_u16() == 429 => Error::ResourceExhausted(message),
                "ConflictException" => Error::Conflict(message),
                _ if status.is_server_error() => {
                    tracing::warn!(%code, %message, status = status.as_u16(), "IVS Chat failed");
                    Error::Unavailable(format!("IVS Chat failed with HTTP {}", status.as_u16()))
                }
                code => {
                    Error::Internal(anyhow::Error::new(e).context(format!("IVS Chat error {code}")))
                }
            }
        }
        SdkError::TimeoutError(_) => Error::Unavailable("IVS Chat did not answer in time".into()),
        SdkError::DispatchFailure(_) => Error::Unavailable("IVS Chat is unreachable".into()),
        SdkError::ResponseError(e) => {
            tracing::warn!(error = ?e, "unreadable response from IVS Chat");
            Error::Unavailable("IVS Chat sent an unreadable response".into())
        }
        other => Error::Internal(anyhow::Error::new(other).context("could not call IVS Chat")),
    }
}
