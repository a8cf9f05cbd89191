//! One watch stream: its position in the feed, what it filters, what it has
//! read and not yet sent, and its timers.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::{Error, Result};

use super::{BATCH, Feed, SharedEvent, Slot, WatchItem, compacted};

/// One watch stream's state: everything it holds is bounded by [`BATCH`].
pub(super) struct Watcher {
    pub(super) _slot: Slot,
    pub(super) feed: Feed,
    /// Room ARNs to pass; all when empty.
    pub(super) arns: HashSet<String>,
    /// Regions whose rooms pass; all when empty.
    pub(super) regions: Vec<String>,
    /// The next revision this watcher needs.
    pub(super) next: u64,
    /// Items read but not yet sent.
    pub(super) pending: VecDeque<WatchItem>,
    pub(super) tailed: watch::Receiver<u64>,
    /// Fires when a bookmark may be due: `bookmark_interval` after the last
    /// item, which it then checks. Moved on only when it fires early (an item
    /// went out since it was set), not for every item; one timer for the
    /// stream's life (registering a new one takes the timer wheel's lock).
    pub(super) bookmark: Pin<Box<tokio::time::Sleep>>,
    /// When the last item went out.
    pub(super) last_item: Instant,
    /// When the stream ends by itself (`WatchRequest::end_at`).
    pub(super) end: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(super) done: bool,
}

impl Watcher {
    /// The watch stream: its items, one after the other.
    pub(super) fn stream(self) -> impl Stream<Item = Result<WatchItem>> + Send + 'static {
        futures::stream::unfold(self, |mut w| async move {
            let item = w.next_item().await?;
            Some((item, w))
        })
    }

    async fn next_item(&mut self) -> Option<Result<WatchItem>> {
        if self.done {
            return None;
        }
        let item = self.next_result().await;
        if item.is_err() {
            self.done = true;
        }
        self.last_item = Instant::now();
        Some(item)
    }

    async fn next_result(&mut self) -> Result<WatchItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            // Marked seen before the stop is checked: `Feed::stop` cancels,
            // then bumps `tailed`, so a stop that comes after this check
            // still ends the wait below.
            let tailed = *self.tailed.borrow_and_update();
            if self.feed.inner.stop.is_cancelled() {
                return Err(self.shutting_down());
            }
            if self.end.as_ref().is_some_and(|end| end.is_elapsed()) {
                return Err(self.moving_on());
            }
            if self.next <= tailed {
                self.read().await?;
                // Busy with events this watcher filters out: still bookmark.
                if self.pending.is_empty() && self.bookmark.is_elapsed() && self.bookmark_due() {
                    return Ok(WatchItem::Progress {
                        revision: self.next - 1,
                        snapshot_complete: false,
                    });
                }
                continue;
            }
            let end = self.end.as_mut();
            tokio::select! {
                biased;
                changed = self.tailed.changed() => if changed.is_err() {
                    return Err(self.shutting_down());
                },
                () = async {
                    match end {
                        Some(end) => end.as_mut().await,
                        None => std::future::pending().await,
                    }
                } => return Err(self.moving_on()),
                () = self.bookmark.as_mut() => if self.bookmark_due() {
                    return Ok(WatchItem::Progress {
                        revision: self.next - 1,
                        snapshot_complete: false,
                    });
                },
            }
        }
    }

    /// Whether a bookmark is due now that its timer fired; if not (an item
    /// went out since the timer was set), sets the timer for when it will be.
    fn bookmark_due(&mut self) -> bool {
        let due = self.last_item + self.feed.inner.settings.bookmark_interval;
        if due <= Instant::now() {
            return true;
        }
        self.bookmark.as_mut().reset(due);
        false
    }

    fn moving_on(&self) -> Error {
        Error::unavailable(format!(
            "this connection has reached its maximum age; resume with after_revision {} \
             (on a new connection)",
            self.next - 1
        ))
    }

    fn shutting_down(&self) -> Error {
        Error::unavailable(format!(
            "the server is shutting down; resume with after_revision {}",
            self.next - 1
        ))
    }

    /// Takes the next batch of events, from the ring when it still holds
    /// `next`, else from the log.
    async fn read(&mut self) -> Result<()> {
        let from_ring: Option<Vec<Arc<SharedEvent>>> = {
            let ring = self.feed.inner.ring.read().expect("ring");
            match ring.front() {
                Some(first) if first.revision <= self.next => {
                    let skip = usize::try_from(self.next - first.revision).unwrap_or(usize::MAX);
                    Some(ring.iter().skip(skip).take(BATCH).cloned().collect())
                }
                _ => None,
            }
        };
        let events = match from_ring {
            Some(events) if !events.is_empty() => events,
            _ => self
                .feed
                .inner
                .store
                .events_after(self.next - 1, BATCH)
                .await?
                .into_iter()
                .map(|event| Arc::new(SharedEvent::new(event)))
                .collect(),
        };
        if events.is_empty() {
            return Err(compacted(self.next - 1, self.next));
        }
        for event in events {
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
