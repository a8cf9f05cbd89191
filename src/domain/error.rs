use std::fmt;

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
    /// This service's budget for IVS Chat calls cannot serve the request in
    /// time, or an IVS Chat quota (ServiceQuotaExceeded) is reached.
    #[error("upstream limit exceeded: {0}")]
    ResourceExhausted(String),
    #[error("conflict: {0}")]
    Conflict(String),
    /// Upstream unreachable, 5xx, timed out or throttling after retries; or
    /// the cache database is unavailable.
    #[error("unavailable: {0}")]
    Unavailable(String),
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

impl Error {
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
            Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
            Error::Conflict(m) => Error::Conflict(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
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
