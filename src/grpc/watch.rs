//! WatchRooms served from encoded messages: an event is converted and encoded
//! once, however many streams it goes out on (`grpc::routes` sends it here).
//! An event's encoding is kept on the feed's
//! [`SharedEvent`](crate::feed::SharedEvent), made by the first stream that
//! sends it. The bytes on the wire are the same: clients decode
//! `proto::WatchRoomsResponse`.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt as _};
use tonic::codegen::BoxFuture;
use tonic::server::ServerStreamingService;
use tonic::{Request, Response, Status};

use crate::domain::{Error, Result as DomainResult};
use crate::feed::{Feed, WatchItem, WatchRequest};
use crate::upstream::Upstreams;

use super::codec::Encoded;
use super::io::Connection;
use super::routes::EdgeLimits;
use super::{convert, proto, to_status};

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
pub(super) struct WatchRooms {
    pub(super) feed: Feed,
    pub(super) upstreams: Upstreams,
    pub(super) limits: EdgeLimits,
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

fn encode(item: WatchItem) -> Encoded {
    if let WatchItem::Event(event) = &item
        && let Some(encoded) = event.derived(|e| Encoded::of(&convert::event_response(e)))
    {
        return encoded.clone();
    }
    Encoded::of(&convert::watch_item(item))
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
