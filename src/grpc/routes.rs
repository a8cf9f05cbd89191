//! RoomService as served: the generated server, except for the methods
//! answered from encoded messages (`grpc::watch`: WatchRooms; `grpc::get`:
//! GetRoom), and the limits the edge applies to every call.
//!
//! The generated server converts and encodes every message it sends. Where
//! one message goes out many times (an event to every watcher, a cached room
//! to every read of it), its encoding is made once and kept
//! (`domain::Derived`), and these routes send it as it is. The bytes on the
//! wire are the same: clients decode the same messages.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codec::Codec;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService};

use crate::feed::Feed;
use crate::rooms::Rooms;

use super::codec::EncodedCodec;
use super::proto::room_service_server::{self as server, RoomServiceServer};
use super::service::RoomService;
use super::{get, status, watch};

const WATCH_ROOMS: &str = "/ivschat.rooms.v1.RoomService/WatchRooms";
const GET_ROOM: &str = "/ivschat.rooms.v1.RoomService/GetRoom";

/// Limits the gRPC edge applies.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// Request messages larger than this are refused before decoding.
    pub max_request_size: usize,
    /// The server's maximum connection age, if any, and its grace period.
    /// Watch streams end (UNAVAILABLE, saying where to resume) half way
    /// through the grace period: after the GOAWAY, so that the client resumes
    /// on a new connection, and before the connection is cut.
    pub max_connection_age: Option<Duration>,
    pub max_connection_age_grace: Duration,
}

/// RoomService as served: WatchRooms and GetRoom from encoded messages, the
/// rest by the generated server.
#[derive(Clone)]
pub struct RoomServiceRoutes {
    generated: RoomServiceServer<RoomService>,
    rooms: Rooms,
    feed: Feed,
    limits: EdgeLimits,
}

impl RoomServiceRoutes {
    /// RoomService over `rooms`, its watch streams from `feed`.
    pub fn new(rooms: Rooms, feed: Feed, limits: EdgeLimits) -> RoomServiceRoutes {
        RoomServiceRoutes {
            generated: RoomServiceServer::new(RoomService::new(rooms.clone()))
                .max_decoding_message_size(limits.max_request_size),
            rooms,
            feed,
            limits,
        }
    }
}

impl NamedService for RoomServiceRoutes {
    const NAME: &'static str = server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for RoomServiceRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = NamedSizeLimit;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<B>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limits = self.limits;
        let limit = limits.max_request_size;
        let answer: BoxFuture<_, Infallible> = match request.uri().path() {
            GET_ROOM => {
                let get = get::GetRoom {
                    rooms: self.rooms.clone(),
                };
                Box::pin(async move { Ok(encoded(limits).unary(get, request).await) })
            }
            WATCH_ROOMS => {
                let started = watch::Started::default();
                let watch = watch::WatchRooms {
                    feed: self.feed.clone(),
                    upstreams: self.rooms.upstreams().clone(),
                    limits,
                    started: started.clone(),
                };
                Box::pin(async move {
                    let response = encoded(limits).server_streaming(watch, request).await;
                    Ok(watch::with_items(response, &started))
                })
            }
            _ => self.generated.call(request),
        };
        NamedSizeLimit { answer, limit }
    }
}

/// The gRPC handling of a method answered with encoded messages, its
/// requests decoded as `U`.
fn encoded<U>(limits: EdgeLimits) -> Grpc<EncodedCodec<U>>
where
    EncodedCodec<U>: Codec,
{
    Grpc::new(EncodedCodec::default()).max_decoding_message_size(limits.max_request_size)
}

/// A route's answer, with a refusal for size naming `--max-request-size`
/// (`status::name_request_size_limit`); without a box of its own, as every
/// call goes through it.
pub struct NamedSizeLimit {
    answer: BoxFuture<http::Response<tonic::body::Body>, Infallible>,
    limit: usize,
}

impl Future for NamedSizeLimit {
    type Output = Result<http::Response<tonic::body::Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let limit = self.limit;
        self.answer.as_mut().poll(cx).map(|answered| {
            answered.map(|mut response| {
                status::name_request_size_limit(&mut response, limit);
                response
            })
        })
    }
}
