use std::fmt;
use std::time::Duration;

use super::Timestamp;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One field that broke one of the model's constraints.
///
/// `field` is the path in IVS Chat's own (camelCase) naming, e.g.
/// `messageReviewHandler.uri` or `tags.mykey`: the emulator reports it as is in a
/// `ValidationException`'s `fieldList`, and the gRPC edge turns it into the proto's
/// snake_case for `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// Every way a room operation can fail, whoever detects it. The gRPC edge maps
/// each variant to one status code in one place (`grpc::status`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks the model's constraints; nothing was sent upstream.
    #[error("invalid request: {}", join(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// `resource_id` as IVS Chat's ResourceNotFoundException names it;
    /// `message` says what is missing.
    #[error("{message}")]
    NotFound {
        resource_id: String,
        message: String,
    },
    #[error("access denied: {0}")]
    PermissionDenied(String),
    /// IVS Chat's PendingVerification: the account cannot use the API yet.
    #[error("pending verification: {0}")]
    PendingVerification(String),
    /// A limit refused the request: `limit` says whose (AWS's quota, this
    /// service's budget of IVS Chat calls, `--max-watchers`), `retry_after`
    /// when it could be served, where known.
    #[error("{limit}: {message}")]
    ResourceExhausted {
        limit: Limit,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("conflict: {0}")]
    Conflict(String),
    /// Upstream unreachable, 5xx, timed out or throttling after retries; or
    /// the cache database is unavailable. `retry_after`: when a retry could
    /// succeed, where known (a throttling pause, a listing under way).
    #[error("unavailable: {message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// A watch asked to resume from a revision the change log no longer holds
    /// (compacted) or does not hold yet.
    #[error("{message}")]
    RevisionOutOfRange {
        message: String,
        /// The oldest revision the log still holds: a watch can resume with
        /// `after_revision` at least one less than this.
        oldest_available_revision: u64,
    },
    /// A conditional write's `expected_update_time` is not the room's
    /// update_time in IVS Chat.
    #[error("the room's update_time is {actual}, not the expected {expected}")]
    UpdateTimeMismatch {
        expected: Timestamp,
        actual: Timestamp,
    },
    /// Anything else. Its text is logged, never sent to clients.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Whose limit refused a request (`Error::ResourceExhausted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// An IVS Chat quota of the AWS account (ServiceQuotaExceeded).
    AwsQuota,
    /// This service's budget of IVS Chat calls (AWS's rates, kept by us).
    Budget,
    /// This process's `--max-watchers`.
    MaxWatchers,
}

impl Limit {
    /// A stable name for machines (`google.rpc.ErrorInfo` reason).
    pub fn reason(self) -> &'static str {
        match self {
            Limit::AwsQuota => "AWS_QUOTA_EXCEEDED",
            Limit::Budget => "UPSTREAM_BUDGET_EXHAUSTED",
            Limit::MaxWatchers => "MAX_WATCHERS",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::AwsQuota => "AWS's IVS Chat quota exceeded",
            Limit::Budget => "this service's budget of IVS Chat calls exhausted",
            Limit::MaxWatchers => "this server's watch limit (--max-watchers) reached",
        })
    }
}

impl Error {
    /// `limit` refused the request; `message` says what and what to do.
    pub fn exhausted(limit: Limit, message: impl Into<String>) -> Error {
        Error::ResourceExhausted {
            limit,
            message: message.into(),
            retry_after: None,
        }
    }

    /// UNAVAILABLE, for a reason `message` gives.
    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::Unavailable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error with a hint of when a retry could succeed (for
    /// RESOURCE_EXHAUSTED and UNAVAILABLE; others are returned as they are).
    pub fn retry_after(mut self, after: Duration) -> Error {
        match &mut self {
            Error::ResourceExhausted { retry_after, .. }
            | Error::Unavailable { retry_after, .. } => {
                *retry_after = Some(after);
            }
            _ => {}
        }
        self
    }

    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Error {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The same error, for a second caller (requests that shared one call
    /// upstream); an internal error keeps its text, not its chain.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidArgument(v) => Error::InvalidArgument(v.clone()),
            Error::NotFound {
                resource_id,
                message,
            } => Error::NotFound {
                resource_id: resource_id.clone(),
                message: message.clone(),
            },
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::PendingVerification(m) => Error::PendingVerification(m.clone()),
            Error::ResourceExhausted {
                limit,
                message,
                retry_after,
            } => Error::ResourceExhausted {
                limit: *limit,
                message: message.clone(),
                retry_after: *retry_after,
            },
            Error::Conflict(m) => Error::Conflict(m.clone()),
            Error::Unavailable {
                message,
                retry_after,
            } => Error::Unavailable {
                message: message.clone(),
                retry_after: *retry_after,
            },
            Error::RevisionOutOfRange {
                message,
                oldest_available_revision,
            } => Error::RevisionOutOfRange {
                message: message.clone(),
                oldest_available_revision: *oldest_available_revision,
            },
            Error::UpdateTimeMismatch { expected, actual } => Error::UpdateTimeMismatch {
                expected: *expected,
                actual: *actual,
            },
            Error::Internal(e) => Error::Internal(anyhow::anyhow!("{e:#}")),
        }
    }

    /// No room `room` (an id or an ARN).
    pub fn room_not_found(room: &str) -> Error {
        Error::NotFound {
            resource_id: room.to_owned(),
            message: format!("room {room} not found"),
        }
    }
}

fn join(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
