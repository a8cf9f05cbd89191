//! The change feed: room events from the store's change log, delivered to
//! watchers in revision order.
//!
//! - One tailer per process reads new events from the log into a bounded ring
//!   in memory. It wakes on this process's commits and, on Postgres, on other
//!   replicas' notifications (LISTEN/NOTIFY); a slow safety tick covers a lost
//!   notification. The log is the source of truth, the ring only a cache of
//!   its tail.
//! - Each watcher is a stream with its own position. It reads from the ring,
//!   or from the log when it has fallen behind the ring, in batches, so its
//!   memory is bounded and a slow watcher holds up nobody: writers never wait
//!   for watchers, and the tailer never waits for a watcher either.
//! - Revisions are dense, so a watcher that finds a gap knows that part of
//!   the log was compacted and ends with OUT_OF_RANGE instead of skipping.
//! - An idle watcher gets a progress bookmark every `bookmark_interval`, on
//!   its own timer.
//! - Delivery is shared where it can be: watchers get the same
//!   [`SharedEvent`]s, on which the gRPC edge keeps each event's encoding, and
//!   they are woken group by group ([`WatchRequest::wake_group`]: the edge
//!   groups a connection's streams), so that what they send leaves together.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{Derived, Error, Limit, Result, Room, RoomArn, RoomEvent, Timestamp};
use crate::hot::HotRooms;
use crate::store::Store;
use crate::telemetry;

mod group;
mod watcher;

use group::{Group, Member};
pub use watcher::WatchStream;
use watcher::in_regions;

/// How many events a watcher takes at a time from the ring or the log.
const BATCH: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct FeedSettings {
    /// How many of the newest events the ring keeps in memory.
    pub ring_capacity: usize,
    /// How often an idle watch stream gets a progress bookmark.
    pub bookmark_interval: Duration,
    /// How often the tailer reads the log even without a notification.
    pub safety_interval: Duration,
    /// Events kept in the log, newest first (at least the newest one).
    pub retention_count: u64,
    /// Events older than this are compacted away (none when unset).
    pub retention_age: Option<Duration>,
    /// How often compaction runs.
    pub compaction_interval: Duration,
    /// Watch streams this process serves at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
}

impl Default for FeedSettings {
    fn default() -> Self {
        FeedSettings {
            ring_capacity: 4096,
            bookmark_interval: Duration::from_secs(10),
            safety_interval: Duration::from_secs(2),
            retention_count: 100_000,
            retention_age: Some(Duration::from_secs(24 * 3600)),
            compaction_interval: Duration::from_secs(60),
            max_watchers: 100_000,
        }
    }
}

/// What a watcher asks for.
#[derive(Debug, Clone, Default)]
pub struct WatchRequest {
    /// Only these rooms; all rooms when empty.
    pub arns: Vec<RoomArn>,
    /// Every event after this revision; from now when unset.
    pub after_revision: Option<u64>,
    /// Start with the matching rooms as they are, then their changes.
    pub include_snapshot: bool,
    /// Only rooms of these regions (by their ARNs); all regions when empty.
    pub regions: Vec<String>,
    /// Watchers of one group are woken one after the other when events
    /// arrive, before the next group's. The gRPC edge groups the streams of
    /// one connection, so that their messages are all ready when the
    /// connection next writes, and leave in one write.
    pub wake_group: u64,
    /// The stream ends at this instant (UNAVAILABLE, saying where to resume):
    /// the edge sets it half way through the grace period after its
    /// connection's maximum age, so the client resumes on a new connection.
    pub end_at: Option<Instant>,
}

/// One item of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// A room as it is at the snapshot's revision.
    Snapshot(Room),
    Event(Arc<SharedEvent>),
    /// The watcher has seen everything up to `revision`.
    Progress {
        revision: u64,
        snapshot_complete: bool,
    },
}

/// An event as the feed hands it to every watcher (it derefs to the
/// [`RoomEvent`]), with room for one value derived from it once for all of
/// them: the gRPC edge keeps the encoded message there, so that an event going
/// to 10,000 watchers is converted and encoded once, not 10,000 times.
pub type SharedEvent = Derived<RoomEvent>;

/// The process's change feed. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// Kept exact by the tailer, which applies every event to it.
    hot: HotRooms,
    settings: FeedSettings,
    ring: RwLock<VecDeque<Arc<SharedEvent>>>,
    /// The newest revision in the ring (every event up to it has been read).
    tailed: watch::Sender<u64>,
    /// The same, per wake group ([`WatchRequest::wake_group`]), published
    /// group by group after `tailed`; watchers wait on their group.
    groups: Mutex<HashMap<u64, Arc<Group>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Watch streams alive in this process.
    watchers: AtomicUsize,
}

impl Feed {
    /// Starts the tailer, the Postgres listener and the compactor. The feed
    /// starts after the revision `hot` was loaded at, and applies every later
    /// event to it.
    pub async fn start(store: Store, settings: FeedSettings, hot: HotRooms) -> Result<Feed> {
        metrics::gauge!(telemetry::MAX_WATCHERS).set(settings.max_watchers as f64);
        let revision = if hot.enabled() {
            hot.through()
        } else {
            store.revision().await?
        };
        let feed = Feed {
            inner: Arc::new(Inner {
                store,
                hot,
                settings,
                ring: RwLock::new(VecDeque::with_capacity(settings.ring_capacity.min(1024))),
                tailed: watch::Sender::new(revision),
                groups: Mutex::new(HashMap::new()),
                stop: CancellationToken::new(),
                tasks: TaskTracker::new(),
                watchers: AtomicUsize::new(0),
            }),
        };
        let inner = &feed.inner;
        let store = inner.store.clone();
        let stop = inner.stop.clone();
        inner.tasks.spawn(async move { store.listen(stop).await });
        inner.tasks.spawn(feed.clone().tail());
        inner.tasks.spawn(feed.clone().compact());
        Ok(feed)
    }

    /// Ends every watch stream (with UNAVAILABLE, so clients resume elsewhere)
    /// and stops the background tasks.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        // Watchers wait on their group alone: wake them all to see the stop.
        for group in self.inner.groups.lock().expect("groups").values() {
            group.stop();
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// How many watch streams are alive in this process.
    pub fn watchers(&self) -> usize {
        self.inner.watchers.load(Ordering::SeqCst)
    }

    /// Waits until the feed has taken in `revision`.
    pub async fn caught_up(&self, revision: u64) {
        let mut tailed = self.inner.tailed.subscribe();
        let _ = tailed.wait_for(|t| *t >= revision).await;
    }

    async fn tail(self) {
        let inner = &self.inner;
        let mut committed = inner.store.committed();
        let mut tick = tokio::time::interval(inner.settings.safety_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.read_new().await {
                tracing::warn!(error = %e, "could not read the change log");
            }
            let tailed = *inner.tailed.borrow();
            metrics::gauge!(telemetry::EVENT_REVISION).set(tailed as f64);
            let lag = committed.borrow().saturating_sub(tailed);
            metrics::gauge!(telemetry::EVENT_LAG).set(lag as f64);
            tokio::select! {
                () = inner.stop.cancelled() => return,
                changed = committed.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    }

    /// Moves every event after the ring's newest into the ring.
    async fn read_new(&self) -> Result<()> {
        let inner = &self.inner;
        loop {
            let after = *inner.tailed.borrow();
            let events = inner.store.events_after(after, BATCH).await?;
            let Some(last) = events.last().map(|e| e.revision) else {
                return Ok(());
            };
            // Before anyone learns the feed has these: a read that follows
            // an event must not be answered from an entry it outdated.
            inner.hot.apply(after, &events);
            {
                let mut ring = inner.ring.write().expect("ring");
                let mut expected = after + 1;
                for event in events {
                    // The ring holds consecutive revisions only: after a gap
                    // (compacted past the ring, a long outage) it starts afresh.
                    if event.revision != expected {
                        ring.clear();
                    }
                    expected = event.revision + 1;
                    if ring.len() == inner.settings.ring_capacity {
                        ring.pop_front();
                    }
                    ring.push_back(Arc::new(SharedEvent::new(event)));
                }
            }
            inner.tailed.send_replace(last);
            let mut groups = inner.groups.lock().expect("groups");
            // A group without watchers is held by the map alone.
            groups.retain(|_, group| Arc::strong_count(group) > 1);
            for group in groups.values() {
                group.publish(last);
            }
        }
    }

    async fn compact(self) {
        let inner = &self.inner;
        let settings = inner.settings;
        let mut tick = tokio::time::interval(settings.compaction_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let older_than = settings
                .retention_age
                .map(|age| Timestamp::from_system_time(std::time::SystemTime::now() - age));
            match inner
                .store
                .compact(settings.retention_count, older_than)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(compacted = n, "compacted the change log"),
                Err(e) => tracing::warn!(error = %e, "could not compact the change log"),
            }
        }
    }

    /// A watch stream: the snapshot if asked for, then every matching event
    /// after the starting revision, in order, with progress bookmarks when
    /// idle. Fails at once with OUT_OF_RANGE when the log no longer holds
    /// (or does not yet hold) the events after `after_revision`.
    pub async fn watch(&self, request: WatchRequest) -> Result<WatchStream> {
        let slot = self.take_slot()?;
        let store = &self.inner.store;
        let mut pending = VecDeque::new();
        let next = if request.include_snapshot && request.after_revision.is_none() {
            let snapshot = store.snapshot(&request.arns).await?;
            pending.extend(
                snapshot
                    .rooms
                    .into_iter()
                    .filter(|room| in_regions(&request.regions, &room.arn))
                    .map(WatchItem::Snapshot),
            );
            pending.push_back(WatchItem::Progress {
                revision: snapshot.revision,
                snapshot_complete: true,
            });
            snapshot.revision + 1
        } else {
            let after = match request.after_revision {
                Some(_) if request.include_snapshot => {
                    return Err(Error::invalid(
                        "includeSnapshot",
                        "cannot be combined with after_revision: a snapshot starts from now",
                    ));
                }
                Some(after) => {
                    self.check_available(after).await?;
                    after
                }
                None => store.revision().await?,
            };
            // Where the stream starts, at once: a client that loses the
            // stream before any event can resume from here.
            pending.push_back(WatchItem::Progress {
                revision: after,
                snapshot_complete: false,
            });
            after + 1
        };
        let member = self.join(request.wake_group);
        Ok(WatchStream::new(
            self.clone(),
            slot,
            request,
            next,
            pending,
            member,
        ))
    }

    /// A new member of the wake group `group`.
    fn join(&self, group: u64) -> Member {
        let mut groups = self.inner.groups.lock().expect("groups");
        // Read under the lock: the tailer publishes to the groups (under it)
        // after `tailed`, so a new group starts no older than its next
        // publish; and `stop` cancels before it stops the groups (under it),
        // so a new group knows of a stop that has begun.
        let (tailed, stopped) = (*self.inner.tailed.borrow(), self.inner.stop.is_cancelled());
        groups
            .entry(group)
            .or_insert_with(|| Group::new(tailed, stopped))
            .join()
    }

    /// Whether every event after `after` is still in the log.
    async fn check_available(&self, after: u64) -> Result<()> {
        let store = &self.inner.store;
        let newest = store.revision().await?;
        if after >= newest {
            if after > newest {
                return Err(Error::RevisionOutOfRange {
                    message: format!(
                        "revision {after} is in the future: the newest is {newest} \
                         (was the cache database replaced?); list the rooms again"
                    ),
                    oldest_available_revision: store.oldest_revision().await?.unwrap_or(newest),
                });
            }
            return Ok(());
        }
        match store.oldest_revision().await? {
            Some(oldest) if oldest <= after + 1 => Ok(()),
            oldest => Err(compacted(after, oldest.unwrap_or(newest + 1))),
        }
    }
}

impl Feed {
    /// A place for one more watch stream, if the process has one.
    fn take_slot(&self) -> Result<Slot> {
        let max = self.inner.settings.max_watchers;
        self.inner
            .watchers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| {
                Error::exhausted(
                    Limit::MaxWatchers,
                    format!(
                        "this process already serves {max} watch streams: retry later, or on \
                         another replica"
                    ),
                )
            })?;
        metrics::gauge!(telemetry::WATCHERS).increment(1);
        Ok(Slot(self.clone()))
    }
}

/// A watch stream's place among the process's watchers, given back when the
/// stream (or its setup) ends.
struct Slot(Feed);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inner.watchers.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(telemetry::WATCHERS).decrement(1);
    }
}

fn compacted(after: u64, oldest: u64) -> Error {
    Error::RevisionOutOfRange {
        message: format!(
            "events after revision {after} have been compacted; the oldest kept is \
             {oldest}: list the rooms again (or watch with include_snapshot)"
        ),
        oldest_available_revision: oldest,
    }
}
