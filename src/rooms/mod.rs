//! Cache policy: what is read from the cache, what goes upstream, and in which
//! order.
//!
//! - Reads are served from the cache while the row was confirmed by IVS Chat
//!   within `max_staleness` (a tombstone answers NOT_FOUND the same way);
//!   otherwise they read IVS Chat and store what it says. The cache is read
//!   through the hot layer (`hot`), which is exact, then SQL.
//! - Concurrent reads of one room that need IVS Chat share one call (a
//!   flight); a STRONG read only joins a STRONG flight that has not sent its
//!   call yet, so it sees every write that completed before it arrived.
//! - When IVS Chat is down or throttling (or the budget cannot serve a read in
//!   time), a cached read is answered from a row past `max_staleness` but
//!   within `stale_if_error`, and says so; STRONG reads and writes fail.
//! - Writes go to IVS Chat first; the cache then takes the result, under the
//!   store's update-time rule, so a slow answer never overwrites a newer one.
//! - Calls that reach IVS Chat for the same room take turns (a per-room lock,
//!   then on Postgres `Store::lock_room` among replicas), so a read that
//!   started before a write cannot land after it, and concurrent misses of one
//!   room, on any replica, wait for the first to fill the cache. In its turn a
//!   conditional write reads IVS Chat and compares update_time first.
//! - A CreateRoom with a request_id creates at most one room (`create`).
//! - ListRooms is answered from the cache once a full listing of IVS Chat has
//!   completed (the reconciler's first pass, on whichever replica leads;
//!   persisted across restarts).
//! - Every cache write names its source for the change log: API for calls
//!   through this service, RECONCILER for changes found in IVS Chat.
//! - An exchange with IVS Chat, and the cache step that follows it, run to
//!   completion in a task of their own, even if the client gives up: a write
//!   IVS Chat has made always reaches the cache. Shutdown waits for them.
//!
//! `read.rs` holds the read paths (fresh, stale, flights, ListRooms),
//! `write.rs` the writes to a room, `create.rs` CreateRoom with a
//! request_id, `turns.rs` rooms' turns, `found.rs` what the reconciler may do to the
//! cache (its passes are `reconciler::passes`);
//! this file the types, the exchanges and the cache steps they share.

mod create;
mod found;
mod read;
mod turns;
mod write;

use read::Flight;
use turns::RoomLocks;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tokio::sync::{OwnedMutexGuard, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::budget::Caller;

use crate::domain::{
    Error, EventSource, ListQuery, ListedPage, NewRoom, Result, Room, RoomArn, RoomPatch,
    RoomSummary, Timestamp, validate,
};
use crate::hot::{HotRooms, HotRow};
use crate::store::{CachedRoom, RoomLock, Store};
use crate::telemetry;
use crate::upstream::{Upstream, Upstreams};

/// How often ListRooms, waiting for the first full listing, checks whether
/// another replica has completed it.
const LISTED_RECHECK: Duration = Duration::from_millis(250);

/// How long after its creation a room may still be on its way into the cache
/// from a CreateRoom of any replica (more than an upstream call takes); also
/// how long a replica's record of a creation in flight lasts after a crash.
const CREATION_WINDOW: Duration = Duration::from_secs(60);

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// A cached row confirmed within `max_staleness` will do.
    #[default]
    Cached,
    /// Always ask IVS Chat.
    Strong,
}

#[derive(Debug, Clone, Copy)]
pub struct RoomsSettings {
    /// How long a row confirmed by IVS Chat may be served without asking again.
    pub max_staleness: Duration,
    /// How long ListRooms waits for the first full listing before UNAVAILABLE.
    pub listing_wait: Duration,
    /// How long after IVS Chat last confirmed it a row may still be served,
    /// marked stale, while IVS Chat cannot be asked (zero: never).
    pub stale_if_error: Duration,
    /// How long a CreateRoom request_id is remembered.
    pub request_id_retention: Duration,
    /// How long a CreateRoom's claim on its request_id holds unless renewed
    /// (longer than one upstream call): after a crash, a retry waits this
    /// long, then as long again for IVS Chat's listing to show the room.
    pub request_id_lease: Duration,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// The cache, within `max_staleness`.
    Hit,
    /// IVS Chat.
    Miss,
    /// The cache, past `max_staleness`: IVS Chat could not be asked.
    Stale,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
        }
    }
}

/// How an answer was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheInfo {
    pub status: CacheStatus,
    /// Since IVS Chat last confirmed what the answer says (zero for a miss).
    pub age: Duration,
}

impl CacheInfo {
    const MISS: CacheInfo = CacheInfo {
        status: CacheStatus::Miss,
        age: Duration::ZERO,
    };

    fn of(status: CacheStatus, row: &CachedRoom) -> CacheInfo {
        CacheInfo {
            status,
            age: row.validated_at.elapsed(),
        }
    }
}

/// A GetRoom's answer, and how it was made (unknown when the request was
/// refused before the cache was looked at).
#[derive(Debug)]
pub struct Read {
    pub answer: Result<Answer>,
    pub cache: Option<CacheInfo>,
}

/// The room a read answers with.
#[derive(Debug)]
pub enum Answer {
    /// A cached row, as memory holds it (or as the database gave it): what
    /// the edge derives from it is kept with it for every read it answers.
    Cached(Arc<HotRow>),
    /// IVS Chat's answer, just read.
    Fetched(Room),
}

impl Answer {
    pub fn into_room(self) -> Room {
        match self {
            Answer::Cached(row) => row.room.clone(),
            Answer::Fetched(room) => room,
        }
    }
}

impl Read {
    /// Failed before the cache could say anything.
    fn failed(e: Error) -> Read {
        Read {
            answer: Err(e),
            cache: None,
        }
    }
}

/// One cached page of rooms.
#[derive(Debug)]
pub struct Listing {
    pub page: ListedPage<Room>,
    /// The change-log revision the page reflects.
    pub revision: u64,
    pub cache: CacheInfo,
}

/// The room service's policy, shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    hot: HotRooms,
    /// One IVS Chat per region served.
    upstreams: Upstreams,
    settings: RoomsSettings,
    locks: RoomLocks,
    /// GetRoom calls to IVS Chat under way, which readers of the room join.
    flights: Mutex<HashMap<RoomArn, Flight>>,
    next_flight: AtomicU64,
    /// The regions whose full listing has ever completed, so ListRooms can
    /// use the cache for them.
    listed: watch::Sender<BTreeSet<String>>,
    /// Exchanges with IVS Chat under way, detached from their requests.
    exchanges: TaskTracker,
    /// CreateRoom exchanges under way in this process.
    creating: AtomicUsize,
}

/// Counts one CreateRoom exchange while it lives.
struct Creating<'a>(&'a AtomicUsize);

impl<'a> Creating<'a> {
    fn start(count: &'a AtomicUsize) -> Creating<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Creating(count)
    }
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Rooms {
    /// The policy over `store` (read through `hot`) and the IVS Chat of
    /// each region served.
    pub async fn new(
        store: Store,
        hot: HotRooms,
        upstreams: Upstreams,
        settings: RoomsSettings,
    ) -> Result<Rooms> {
        let mut listed = BTreeSet::new();
        for region in upstreams.regions() {
            if store.full_listing_at(region).await?.is_some() {
                listed.insert(region.to_owned());
            }
        }
        Ok(Rooms {
            inner: Arc::new(Inner {
                store,
                hot,
                upstreams,
                settings,
                locks: RoomLocks::default(),
                flights: Mutex::default(),
                next_flight: AtomicU64::new(0),
                listed: watch::Sender::new(listed),
                exchanges: TaskTracker::new(),
                creating: AtomicUsize::new(0),
            }),
        })
    }

    /// The IVS Chat regions this service fronts, the default first.
    pub fn upstreams(&self) -> &Upstreams {
        &self.inner.upstreams
    }

    /// The IVS Chat of `arn`'s region; INVALID_ARGUMENT on `field` when it
    /// is not served.
    fn scope(&self, field: &str, arn: &RoomArn) -> Result<&Upstream> {
        self.inner.upstreams.of_arn(field, arn)
    }

    /// Creates a room in `region` (empty: the first served); with a
    /// `request_id`, at most once per request_id within the retention window
    /// (see `create`).
    pub async fn create(
        &self,
        new: NewRoom,
        region: &str,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Room> {
        let upstream = self.inner.upstreams.of_region("region", region)?.clone();
        validate::new_room(&new)?;
        if let Some(request_id) = request_id {
            validate::request_id("request_id", &request_id, &new)?;
            return self.create_once(request_id, new, upstream, caller).await;
        }
        self.exchange(|rooms| async move {
            rooms
                .creating(async {
                    let asked_at = Timestamp::now();
                    let room = upstream.create_room(&new, caller).await?;
                    rooms.keep_ours(room, asked_at).await
                })
                .await
        })
        .await
    }

    /// Runs an exchange with IVS Chat (and the cache step after it) in a task
    /// of its own, so that a client that gives up cannot cut it in half.
    async fn exchange<T, F, Fut>(&self, work: F) -> Result<T>
    where
        F: FnOnce(Rooms) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.inner
            .exchanges
            // In the request's trace, when traces are on.
            .spawn(work(self.clone()).instrument(telemetry::traces::task_span()))
            .await
            .map_err(|e| {
                Error::Internal(anyhow::anyhow!("an exchange with IVS Chat failed: {e}"))
            })?
    }

    /// Waits, at most `within`, for exchanges with IVS Chat under way to finish
    /// and reach the cache. New requests should have stopped coming.
    pub async fn drain(&self, within: Duration) {
        self.inner.exchanges.close();
        if tokio::time::timeout(within, self.inner.exchanges.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = self.inner.exchanges.len(),
                "exchanges with IVS Chat outlasted the shutdown grace period"
            );
        }
    }

    /// Runs a CreateRoom exchange (the call and the cache write), counted
    /// as in flight meanwhile: in this process, and on Postgres for every
    /// replica. Nothing is sent if it cannot be counted.
    async fn creating<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        let _creating = Creating::start(&self.inner.creating);
        let mark = self.inner.store.begin_creation(CREATION_WINDOW).await?;
        let result = work.await;
        // Off the request's path: the end is retried while the database is
        // away (an exchange, so shutdown waits for it within its grace).
        let store = self.inner.store.clone();
        self.inner
            .exchanges
            .spawn(async move { store.end_creation(mark).await });
        result
    }

    /// Reads the room from IVS Chat and stores it; a change found is logged
    /// as made by `source`. Call with the room's turn.
    async fn refresh(&self, arn: &RoomArn, source: EventSource, caller: Caller) -> Result<Room> {
        let asked_at = Timestamp::now();
        let room = self
            .gone_if_not_found(
                arn,
                self.scope("identifier", arn)?.get_room(arn, caller).await,
            )
            .await?;
        Ok(self.keep(room, asked_at, source).await)
    }

    /// Stores a room IVS Chat returned and answers with what the cache holds
    /// after, which is newer if a newer version was already there. IVS Chat has
    /// answered, so a failing cache is logged, not returned.
    async fn keep(&self, room: Room, asked_at: Timestamp, source: EventSource) -> Room {
        match self.inner.store.put(&room, asked_at, source).await {
            // A pending row kept (a listing that started later put it in)
            // is this version without its details: IVS Chat's answer is whole.
            Ok(cached) if !cached.deleted && !cached.room.details_pending => cached.room,
            Ok(_) => room,
            Err(e) => {
                tracing::error!(error = %e, arn = %room.arn, "could not cache a room IVS Chat returned");
                room
            }
        }
    }

    /// Stores a room IVS Chat returned to a write through this service, as
    /// an API change, and answers with what the cache holds after. A write
    /// is acknowledged only once it is in the change log: when the cache
    /// cannot record it (the database away, or a commit whose outcome is
    /// unknown), the client is told UNAVAILABLE, saying that IVS Chat made
    /// the change; the reconciler records IVS Chat's state later.
    async fn keep_ours(&self, room: Room, asked_at: Timestamp) -> Result<Room> {
        match self
            .inner
            .store
            .put(&room, asked_at, EventSource::Api)
            .await
        {
            Ok(cached) if !cached.deleted && !cached.room.details_pending => Ok(cached.room),
            Ok(_) => Ok(room),
            Err(e) => Err(unrecorded(&room.arn, &e)),
        }
    }

    /// Records a deletion made through this service (as [`Rooms::keep_ours`]).
    async fn forget_ours(&self, arn: &RoomArn) -> Result<()> {
        self.inner
            .store
            .mark_deleted(arn, Timestamp::now(), EventSource::Api)
            .await
            .map_err(|e| unrecorded(arn.as_str(), &e))
    }

    /// Passes `result` on; a NOT_FOUND from IVS Chat also forgets the room,
    /// which was deleted behind this service's back.
    async fn gone_if_not_found<T>(&self, arn: &RoomArn, result: Result<T>) -> Result<T> {
        if let Err(Error::NotFound { .. }) = &result {
            self.forget(arn, EventSource::Reconciler).await;
            return Err(Error::room_not_found(arn.as_str()));
        }
        result
    }

    /// Records that IVS Chat has just said the room is gone: any answer from
    /// an exchange that started before now cannot bring it back.
    async fn forget(&self, arn: &RoomArn, source: EventSource) {
        if let Err(e) = self
            .inner
            .store
            .mark_deleted(arn, Timestamp::now(), source)
            .await
        {
            tracing::error!(error = %e, %arn, "could not record a deleted room in the cache");
        }
    }
}

/// The error of a write IVS Chat carried out that the cache could not record
/// (`cause`).
fn unrecorded(arn: &str, cause: &Error) -> Error {
    tracing::error!(error = %cause, arn, "could not cache a change made in IVS Chat");
    Error::unavailable(format!(
        "IVS Chat made the change to {arn}, but the cache could not record it ({cause}); \
         the change may not be in the change log yet: the reconciler records IVS Chat's state. \
         Read the room before retrying"
    ))
}
