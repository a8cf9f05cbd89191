//! WatchRooms served from encoded messages: an event is converted and encoded
//! once, however many streams it goes out on.
//!
//! The generated server converts and encodes every message of every stream:
//! for WatchRooms, the same event once per watcher. [`RoomServiceRoutes`]
//! answers WatchRooms with a codec whose messages come encoded (an event's
//! encoding is kept on the feed's [`SharedEvent`](crate::feed::SharedEvent),
//! made by the first stream that sends it) and hands every other method to the
//! generated server. The bytes on the wire are the same: clients decode
//! `proto::WatchRoomsResponse`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use prost::Message as _;
use prost::bytes::{BufMut as _, Bytes};
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::domain::{Error, Result as DomainResult};
use crate::feed::{Feed, WatchItem, WatchRequest};
use crate::rooms::Rooms;
use crate::upstream::Upstreams;

use super::codec::MessageDecoder;
use super::io::Connection;
use super::proto::room_service_server::{self as server, RoomServiceServer};
use super::service::RoomService;
use super::{convert, proto, to_status};

const WATCH_ROOMS: &str = "/ivschat.rooms.v1.RoomService/WatchRooms";

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

/// RoomService as served: WatchRooms from encoded messages, the rest by the
/// generated server.
#[derive(Clone)]
pub struct RoomServiceRoutes {
    generated: RoomServiceServer<RoomService>,
    feed: Feed,
    upstreams: Upstreams,
    limits: EdgeLimits,
}

impl RoomServiceRoutes {
    /// RoomService over `rooms`, its watch streams from `feed`.
    pub fn new(rooms: Rooms, feed: Feed, limits: EdgeLimits) -> RoomServiceRoutes {
        RoomServiceRoutes {
            upstreams: rooms.upstreams().clone(),
            generated: RoomServiceServer::new(RoomService::new(rooms))
                .max_decoding_message_size(limits.max_request_size),
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
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<B>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != WATCH_ROOMS {
            return self.generated.call(request);
        }
        let (feed, limits) = (self.feed.clone(), self.limits);
        let upstreams = self.upstreams.clone();
        Box::pin(async move {
            let mut grpc = Grpc::new(WatchCodec).max_decoding_message_size(limits.max_request_size);
            Ok(grpc
                .server_streaming(
                    WatchRooms {
                        feed,
                        upstreams,
                        limits,
                    },
                    request,
                )
                .await)
        })
    }
}

/// The items of a WatchRooms stream, or why it cannot start. The streams of
/// one connection share a wake group (see `WatchRequest::wake_group`) and,
/// with a maximum connection age, end half way through its grace period.
async fn watch_items(
    feed: &Feed,
    upstreams: &Upstreams,
    limits: EdgeLimits,
    request: Request<proto::WatchRoomsRequest>,
) -> Result<impl Stream<Item = DomainResult<WatchItem>> + Send + 'static, Status> {
    use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
    let connection = Connection::of(&request).cloned();
    let result = async {
        let mut watch = convert::watch_request(request.into_inner())?;
        served(&watch, upstreams)?;
        if let Some(connection) = connection {
            watch.wake_group = connection.remote.map_or(0, |addr| {
                BuildHasherDefault::<DefaultHasher>::default().hash_one(addr)
            });
            watch.end_at = limits
                .max_connection_age
                .map(|age| connection.accepted_at + age + limits.max_connection_age_grace / 2);
        }
        feed.watch(watch).await
    };
    result.await.map_err(to_status)
}

/// Refuses a watch of rooms or regions this service does not serve: nothing
/// would ever arrive.
fn served(watch: &WatchRequest, upstreams: &Upstreams) -> DomainResult<()> {
    let mut violations = Vec::new();
    for (i, arn) in watch.arns.iter().enumerate() {
        if let Err(Error::InvalidArgument(v)) = upstreams.of_arn(&format!("identifiers[{i}]"), arn)
        {
            violations.extend(v);
        }
    }
    for (i, region) in watch.regions.iter().enumerate() {
        let field = format!("regions[{i}]");
        let checked = if region.is_empty() {
            Err(Error::invalid(
                field,
                "is empty: name a region, or send none for all",
            ))
        } else {
            upstreams.of_region(&field, region).map(drop)
        };
        if let Err(Error::InvalidArgument(v)) = checked {
            violations.extend(v);
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(violations))
    }
}

/// The WatchRooms method, answering with encoded messages.
struct WatchRooms {
    feed: Feed,
    upstreams: Upstreams,
    limits: EdgeLimits,
}

type EncodedStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

impl ServerStreamingService<proto::WatchRoomsRequest> for WatchRooms {
    type Response = Encoded;
    type ResponseStream = EncodedStream;
    type Future = BoxFuture<Response<EncodedStream>, Status>;

    fn call(&mut self, request: Request<proto::WatchRoomsRequest>) -> Self::Future {
        let (feed, limits) = (self.feed.clone(), self.limits);
        let upstreams = self.upstreams.clone();
        Box::pin(async move {
            let items = watch_items(&feed, &upstreams, limits, request).await?;
            let messages = items.map(|item| item.map(encode).map_err(to_status));
            let stream: EncodedStream = Box::pin(QueueConnection::new(Box::pin(messages)));
            Ok(Response::new(stream))
        })
    }
}

/// One WatchRoomsResponse, encoded (without gRPC's length prefix).
#[derive(Clone)]
pub(super) struct Encoded(Bytes);

impl Encoded {
    fn of(message: &proto::WatchRoomsResponse) -> Encoded {
        Encoded(message.encode_to_vec().into())
    }
}

fn encode(item: WatchItem) -> Encoded {
    if let WatchItem::Event(event) = &item
        && let Some(encoded) = event.derived(|e| Encoded::of(&convert::event_response(e)))
    {
        return encoded.clone();
    }
    Encoded::of(&convert::watch_item(item))
}

/// Encodes [`Encoded`] messages (by copying them) and decodes the request
/// (a request that does not decode is INVALID_ARGUMENT: `grpc::codec`).
#[derive(Debug, Clone, Copy, Default)]
struct WatchCodec;

struct EncodedEncoder;

impl Codec for WatchCodec {
    type Encode = Encoded;
    type Decode = proto::WatchRoomsRequest;
    type Encoder = EncodedEncoder;
    type Decoder = MessageDecoder<proto::WatchRoomsRequest>;

    fn encoder(&mut self) -> EncodedEncoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder::default()
    }
}

impl Encoder for EncodedEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Lets a connection write what many of its streams sent in one go.
///
/// A stream's task hands each message to its connection's task and wakes it,
/// and tokio runs a task woken that way right after the task that woke it
/// (its LIFO slot): when one event goes out on many streams of a connection,
/// the connection would write each message on its own, a system call and a
/// TCP segment per message for the sender and for the receiver. So when a
/// stream has sent and has nothing more, this spends what is left of its
/// task's cooperative budget: tokio then queues the connection behind the
/// stream tasks already woken instead, and it writes their messages together
/// (h2 copies small DATA frames into one buffer on connections that are not
/// vectored: see `grpc::Unvectored`). The stream's own futures are polled
/// unconstrained once the budget is spent, so it never makes them yield.
struct QueueConnection<S> {
    inner: S,
    sent: bool,
}

impl<S> QueueConnection<S> {
    fn new(inner: S) -> QueueConnection<S> {
        QueueConnection { inner, sent: false }
    }
}

impl<S: Stream + Unpin> Stream for QueueConnection<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        let polled = if tokio::task::coop::has_budget_remaining() {
            this.inner.poll_next_unpin(cx)
        } else {
            Pin::new(&mut tokio::task::coop::unconstrained(this.inner.next())).poll(cx)
        };
        match polled {
            Poll::Ready(item) => {
                this.sent = true;
                Poll::Ready(item)
            }
            Poll::Pending => {
                if std::mem::take(&mut this.sent) {
                    spend_budget(cx);
                }
                Poll::Pending
            }
        }
    }
}

/// Spends what is left of the task's cooperative budget (tokio gives a task
/// 128 units a poll; an unconstrained one has no end, hence the bound).
fn spend_budget(cx: &mut Context<'_>) {
    for _ in 0..128 {
        if !tokio::task::coop::has_budget_remaining() {
            return;
        }
        match tokio::task::coop::poll_proceed(cx) {
            Poll::Ready(progress) => progress.made_progress(),
            Poll::Pending => return,
        }
    }
}
