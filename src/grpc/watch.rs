//! WatchRooms served from framed messages: an event is converted, encoded
//! and framed for gRPC once, however many streams it goes out on
//! (`grpc::routes` sends it here), and each stream's body sends those bytes
//! as they are: no encoder and no buffer per stream. An event's framing is
//! kept on the feed's [`SharedEvent`](crate::feed::SharedEvent), made by the
//! first stream that sends it. The bytes on the wire are the same: clients
//! decode `proto::WatchRoomsResponse`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use http_body::Frame;
use prost::bytes::Bytes;
use tonic::codegen::{BoxFuture, http};
use tonic::server::ServerStreamingService;
use tonic::{Request, Response, Status};

use crate::domain::{Error, Result as DomainResult};
use crate::feed::{Feed, WatchItem, WatchRequest, WatchStream};
use crate::upstream::Upstreams;

use super::codec::{Encoded, Framed};
use super::io::{Connection, Writes};
use super::routes::EdgeLimits;
use super::{convert, proto, to_status};

/// The items of a WatchRooms stream, or why it cannot start. The streams of
/// one connection share a wake group (see `WatchRequest::wake_group`) and,
/// with a maximum connection age, end half way through its grace period
/// (`connection`: the one the request came on).
async fn watch_items(
    feed: &Feed,
    upstreams: &Upstreams,
    limits: EdgeLimits,
    connection: Option<&Connection>,
    request: Request<proto::WatchRoomsRequest>,
) -> Result<WatchStream, Status> {
    use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
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

/// The WatchRooms method. tonic decodes the request and answers a refusal;
/// a watch that starts leaves its items in `started`, and [`with_items`]
/// makes them the response's body.
pub(super) struct WatchRooms {
    pub(super) feed: Feed,
    pub(super) upstreams: Upstreams,
    pub(super) limits: EdgeLimits,
    pub(super) started: Started,
}

/// Where [`WatchRooms`] leaves the body of a watch that started.
pub(super) type Started = Arc<Mutex<Option<WatchBody>>>;

impl ServerStreamingService<proto::WatchRoomsRequest> for WatchRooms {
    type Response = Encoded;
    type ResponseStream = futures::stream::Empty<Result<Encoded, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<proto::WatchRoomsRequest>) -> Self::Future {
        let (feed, limits) = (self.feed.clone(), self.limits);
        let upstreams = self.upstreams.clone();
        let started = self.started.clone();
        let connection = Connection::of(&request).cloned();
        Box::pin(async move {
            let items =
                watch_items(&feed, &upstreams, limits, connection.as_ref(), request).await?;
            *started.lock().expect("no watch start panics") = Some(WatchBody {
                items,
                writes: connection.map(|c| c.writes),
                sent: false,
                ended: false,
            });
            Ok(Response::new(futures::stream::empty()))
        })
    }
}

/// tonic's answer to a WatchRooms request, with the body of the watch that
/// started in its place: each message framed once for every stream that
/// sends it ([`WatchBody`]), instead of tonic encoding it into each
/// stream's buffer. A refusal is tonic's answer as it is.
pub(super) fn with_items(
    response: http::Response<tonic::body::Body>,
    started: &Started,
) -> http::Response<tonic::body::Body> {
    match started.lock().expect("no watch start panics").take() {
        Some(body) => response.map(|_| tonic::body::Body::new(body)),
        None => response,
    }
}

pin_project_lite::pin_project! {
    /// A watch stream's HTTP body: one DATA frame per item (a shared event's
    /// framing is made by the first stream that sends it), then the trailers
    /// with the stream's status.
    ///
    /// It also lets the connection write what many of its streams sent in one
    /// go. A stream's task hands each message to its connection's task and
    /// wakes it, and tokio runs a task woken that way right after the task that
    /// woke it (its LIFO slot): when one event goes out on many streams of a
    /// connection, the connection would write each message on its own, a system
    /// call and a TCP segment per message for the sender and for the receiver.
    /// So when a stream has sent and has nothing more, and it is the first of its
    /// connection's streams to get there since the connection last wrote, it
    /// spends what is left of its task's cooperative budget: tokio then queues
    /// the connection behind the stream tasks already woken instead, and it
    /// writes their messages together (h2 copies small DATA frames into one
    /// buffer on connections that are not vectored: see `grpc::Unvectored`).
    /// The streams after it find the connection queued already. The items are
    /// polled unconstrained once the budget is spent, so it never makes them
    /// yield.
    pub(super) struct WatchBody {
        #[pin]
        items: WatchStream,
        // The connection's writes (none for a connection the server did not
        // accept itself: every stream then spends its budget).
        writes: Option<Writes>,
        // Whether an item went out since the stream last had nothing to send.
        sent: bool,
        ended: bool,
    }
}

impl WatchBody {
    fn poll_item(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<DomainResult<WatchItem>>> {
        let mut this = self.project();
        let polled = if tokio::task::coop::has_budget_remaining() {
            this.items.as_mut().poll_next(cx)
        } else {
            let items = &mut this.items;
            let next = std::future::poll_fn(|cx| items.as_mut().poll_next(cx));
            Pin::new(&mut tokio::task::coop::unconstrained(next)).poll(cx)
        };
        match polled {
            Poll::Ready(item) => {
                *this.sent = true;
                Poll::Ready(item)
            }
            Poll::Pending => {
                if std::mem::take(this.sent)
                    && this
                        .writes
                        .as_ref()
                        .is_none_or(Writes::first_ask_since_write)
                {
                    spend_budget(cx);
                }
                Poll::Pending
            }
        }
    }
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.as_mut().poll_item(cx)) {
            Some(Ok(item)) => return Poll::Ready(Some(Ok(Frame::data(framed(item))))),
            Some(Err(e)) => to_status(e),
            None => Status::ok(""),
        };
        *self.as_mut().project().ended = true;
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(match status.add_header(&mut trailers) {
            Ok(()) => Ok(Frame::trailers(trailers)),
            Err(unsendable) => Err(unsendable),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

fn framed(item: WatchItem) -> Bytes {
    if let WatchItem::Event(event) = &item
        && let Some(framed) = event.derived(|e| Framed::of(&convert::event_response(e)))
    {
        return framed.bytes().clone();
    }
    Framed::of(&convert::watch_item(item)).bytes().clone()
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message as _;

    use super::*;
    use crate::domain::{EventSource, RoomEvent, Timestamp};
    use crate::feed::SharedEvent;
    use crate::grpc::get::tests::room;

    /// The message `framed` carries, once its gRPC framing is checked.
    fn unframed(framed: &Bytes) -> proto::WatchRoomsResponse {
        assert_eq!(framed[0], 0, "the compressed flag");
        let len = u32::from_be_bytes(framed[1..5].try_into().expect("4 bytes"));
        assert_eq!(len as usize, framed.len() - 5, "the length prefix");
        proto::WatchRoomsResponse::decode(&framed[5..]).expect("a WatchRoomsResponse")
    }

    #[test]
    fn an_event_is_framed_once_for_every_stream_that_sends_it() {
        let mut event =
            RoomEvent::between(None, Some(&room("v1")), EventSource::Api, Timestamp::now())
                .expect("a creation");
        event.revision = 7;
        let shared = Arc::new(SharedEvent::new(event.clone()));
        let first = framed(WatchItem::Event(shared.clone()));
        let again = framed(WatchItem::Event(shared));
        assert_eq!(unframed(&first), convert::event_response(&event));
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "the second stream sends the bytes the first one made"
        );

        let progress = || WatchItem::Progress {
            revision: 7,
            snapshot_complete: true,
        };
        assert_eq!(
            unframed(&framed(progress())),
            convert::watch_item(progress())
        );
    }
}
