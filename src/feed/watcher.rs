//! One watch stream: its position in the feed, what it filters, what it has
//! read and not yet sent, and its timers.
//!
//! It is a hand-written `Stream`, polled by the stream's task for every
//! event: an event read from the ring goes out from the first poll that
//! finds it, and a stream that has sent everything registers nothing more
//! to wait (its waker stays in its wake group, its timers keep theirs), so
//! that the work per delivery stays small when one event goes to 10,000
//! streams.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::Stream;
use futures::future::BoxFuture;
use tokio::time::{Instant, Sleep};

use crate::domain::{Error, Result, RoomEvent};

use super::group::Member;
use super::{BATCH, Feed, SharedEvent, Slot, WatchItem, WatchRequest, compacted};

pin_project_lite::pin_project! {
    /// One watch stream ([`Feed::watch`]): the items it starts with, then
    /// every matching event after its starting revision, in order, with
    /// progress bookmarks when idle. Everything it holds is bounded by
    /// [`BATCH`].
    pub struct WatchStream {
        state: State,
        // Fires when a bookmark may be due: `bookmark_interval` after the
        // last item, which it then checks. Moved on only when it fires early
        // (an item went out since it was set), not for every item; one timer
        // for the stream's life (registering a new one takes the timer
        // wheel's lock).
        #[pin]
        bookmark: Sleep,
        // When the stream ends by itself (`WatchRequest::end_at`).
        #[pin]
        end: Option<Sleep>,
    }
}

struct State {
    _slot: Slot,
    feed: Feed,
    cursor: Cursor,
    /// Its place in its wake group.
    member: Member,
    /// A read from the log, when the ring no longer holds `next`.
    reading: Option<BoxFuture<'static, Result<Vec<RoomEvent>>>>,
    /// When the last item went out.
    last_item: Instant,
    /// Whether the timers hold the waker the group holds: they need not be
    /// polled again until one fires, is reset, or the waker changes.
    timers_armed: bool,
    done: bool,
}

/// Where a watcher is in the feed, and what it passes.
struct Cursor {
    /// Room ARNs to pass; all when empty.
    arns: HashSet<String>,
    /// Regions whose rooms pass; all when empty.
    regions: Vec<String>,
    /// The next revision this watcher needs.
    next: u64,
    /// Items read but not yet sent.
    pending: VecDeque<WatchItem>,
}

impl WatchStream {
    /// A stream that sends `pending` first, then the events from `next` on.
    pub(super) fn new(
        feed: Feed,
        slot: Slot,
        request: WatchRequest,
        next: u64,
        pending: VecDeque<WatchItem>,
        member: Member,
    ) -> WatchStream {
        let interval = feed.inner.settings.bookmark_interval;
        WatchStream {
            state: State {
                _slot: slot,
                feed,
                cursor: Cursor {
                    arns: request.arns.iter().map(|a| a.as_str().to_owned()).collect(),
                    regions: request.regions,
                    next,
                    pending,
                },
                member,
                reading: None,
                last_item: Instant::now(),
                timers_armed: false,
                done: false,
            },
            bookmark: tokio::time::sleep(interval),
            end: request.end_at.map(tokio::time::sleep_until),
        }
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchItem>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<WatchItem>>> {
        let this = self.project();
        let state = this.state;
        if state.done {
            return Poll::Ready(None);
        }
        let item = ready!(state.poll_item(cx, this.bookmark, this.end));
        if item.is_err() {
            state.done = true;
        }
        state.last_item = Instant::now();
        Poll::Ready(Some(item))
    }
}

impl State {
    fn poll_item(
        &mut self,
        cx: &mut Context<'_>,
        mut bookmark: Pin<&mut Sleep>,
        mut end: Pin<&mut Option<Sleep>>,
    ) -> Poll<Result<WatchItem>> {
        loop {
            if let Some(item) = self.cursor.pending.pop_front() {
                return Poll::Ready(Ok(item));
            }
            // Before reading what the group published: a publish after the
            // read wakes this waker.
            if self.member.register(cx.waker()) {
                self.timers_armed = false;
            }
            if let Some(reading) = &mut self.reading {
                let events = ready!(reading.as_mut().poll(cx));
                self.reading = None;
                self.cursor
                    .take(events?.into_iter().map(|e| Arc::new(SharedEvent::new(e))))?;
            } else if self.cursor.next <= self.member.tailed() {
                if !self.read_ring()? {
                    let (store, after) = (self.feed.inner.store.clone(), self.cursor.next - 1);
                    self.reading = Some(Box::pin(
                        async move { store.events_after(after, BATCH).await },
                    ));
                    continue;
                }
            } else if self.member.stopped() {
                return Poll::Ready(Err(self.shutting_down()));
            } else {
                // Nothing to send: wait for the group or a timer.
                if let Some(end) = end.as_mut().as_pin_mut() {
                    let ended = if self.timers_armed {
                        end.is_elapsed()
                    } else {
                        end.poll(cx).is_ready()
                    };
                    if ended {
                        return Poll::Ready(Err(self.moving_on()));
                    }
                }
                let fired = if self.timers_armed {
                    bookmark.is_elapsed()
                } else {
                    bookmark.as_mut().poll(cx).is_ready()
                };
                if !fired {
                    self.timers_armed = true;
                    return Poll::Pending;
                }
                if self.bookmark_due(bookmark.as_mut()) {
                    return Poll::Ready(Ok(self.progress()));
                }
                continue;
            }
            // Busy with events this watcher filters out: still bookmark (by
            // the clock: a timer never polled is never elapsed).
            if self.cursor.pending.is_empty()
                && bookmark.deadline() <= Instant::now()
                && self.bookmark_due(bookmark.as_mut())
            {
                return Poll::Ready(Ok(self.progress()));
            }
        }
    }

    fn progress(&self) -> WatchItem {
        WatchItem::Progress {
            revision: self.cursor.next - 1,
            snapshot_complete: false,
        }
    }

    /// Whether a bookmark is due now that its timer fired; if not (an item
    /// went out since the timer was set), sets the timer for when it will be.
    fn bookmark_due(&mut self, bookmark: Pin<&mut Sleep>) -> bool {
        let due = self.last_item + self.feed.inner.settings.bookmark_interval;
        if due <= Instant::now() {
            return true;
        }
        bookmark.reset(due);
        self.timers_armed = false;
        false
    }

    fn moving_on(&self) -> Error {
        Error::unavailable(format!(
            "this connection has reached its maximum age; resume with after_revision {} \
             (on a new connection)",
            self.cursor.next - 1
        ))
    }

    fn shutting_down(&self) -> Error {
        Error::unavailable(format!(
            "the server is shutting down; resume with after_revision {}",
            self.cursor.next - 1
        ))
    }

    /// Takes the next batch of events from the ring, if it still holds
    /// `next`.
    fn read_ring(&mut self) -> Result<bool> {
        let ring = self.feed.inner.ring.read().expect("ring");
        let skip = match ring.front() {
            Some(first) if first.revision <= self.cursor.next => {
                usize::try_from(self.cursor.next - first.revision).unwrap_or(usize::MAX)
            }
            _ => return Ok(false),
        };
        if skip >= ring.len() {
            return Ok(false);
        }
        self.cursor.take(ring.range(skip..).take(BATCH).cloned())?;
        Ok(true)
    }
}

impl Cursor {
    /// Takes a batch of events read from the ring or the log: the matching
    /// ones into `pending`.
    fn take(&mut self, events: impl Iterator<Item = Arc<SharedEvent>>) -> Result<()> {
        let mut any = false;
        for event in events {
            any = true;
            // Never skip a revision: a gap means the log was compacted.
            if event.revision != self.next {
                return Err(compacted(self.next - 1, event.revision));
            }
            self.next = event.revision + 1;
            if (self.arns.is_empty() || self.arns.contains(&event.room.arn))
                && in_regions(&self.regions, &event.room.arn)
            {
                self.pending.push_back(WatchItem::Event(event));
            }
        }
        if !any {
            return Err(compacted(self.next - 1, self.next));
        }
        Ok(())
    }
}

/// Whether the room `arn` is in one of `regions` (all when empty).
pub(super) fn in_regions(regions: &[String], arn: &str) -> bool {
    // arn:PARTITION:ivschat:REGION:ACCOUNT:room/ID
    regions.is_empty()
        || arn
            .split(':')
            .nth(3)
            .is_some_and(|r| regions.iter().any(|x| x == r))
}
