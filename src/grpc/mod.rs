//! The gRPC edge: the only home of protobuf types.
//!
//! Architecture invariant: nothing outside this module sees a prost type. The
//! service converts requests into domain values (`convert`), calls `rooms`, and
//! turns every error into a `Status` in one function (`status::to_status`).

mod access;
mod auth;
mod codec;
mod convert;
mod get;
mod io;
mod router;
mod routes;
mod service;
mod status;
mod watch;
mod watch_client;

/// The generated protobuf and tonic code for `ivschat.rooms.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ivschat.rooms.v1");

    /// The encoded descriptor set of our protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ivschat_rooms_descriptor.bin"));
}

pub use access::AccessLogLayer;
pub use auth::{Access, Authenticated, Tokens};
pub use io::Unvectored;
pub use router::Router;
pub use routes::{EdgeLimits, RoomServiceRoutes};
pub use service::RoomService;
pub use status::to_status;
pub use watch_client::watch;
