//! The core vocabulary: rooms, the changes that can be asked of them, the
//! constraints of the IVS Chat model, and the one error type.
//!
//! Architecture invariant: this module knows nothing of gRPC, SQL, HTTP or the
//! AWS SDK. Every other module converts its own types into these at its edge.

mod derived;
mod error;
mod event;
mod operation;
mod room;
pub mod validate;

pub use derived::Derived;
pub use error::{Error, FieldViolation, Limit, Result};
pub use event::{EventKind, EventSource, RoomEvent};
pub use operation::Operation;
pub use room::{
    FallbackResult, ListQuery, ListedPage, MessageReviewHandler, NewRoom, PageCursor, Room,
    RoomArn, RoomPatch, RoomSummary, Timestamp,
};
