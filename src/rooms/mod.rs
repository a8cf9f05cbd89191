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
//! - Within this process, calls that reach IVS Chat for the same room take turns
//!   (a per-room lock), so a read that started before a write cannot land after
//!   it, and concurrent misses of one room wait for the first to fill the cache.
//!   Writes also take the room's turn among replicas (`Store::lock_room`), in
//!   which a conditional write reads IVS Chat and compares update_time first.
//! - A CreateRoom with a request_id creates at most one room (`create`).
//! - ListRooms is answered from the cache once a full listing of IVS Chat has
//!   completed (the reconciler's first pass, on whichever replica leads;
//!   persisted across restarts).
//! - Every cache write names its source for the change log: API for calls
//!   through this service, RECONCILER for changes found in IVS Chat.
//! - An exchange with IVS Chat, and the cache step that follows it, run to
//!   completion in a task of their own, even if the client gives up: a write
//!   IVS Chat has made always reaches the cache. Shutdown waits for them.

mod create;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tokio::sync::{OwnedMutexGuard, watch};
use tokio_util::task::TaskTracker;

use crate::budget::Caller;

use crate::domain::{
    Error, EventSource, ListQuery, ListedPage, NewRoom, Result, Room, RoomArn, RoomPatch,
    RoomSummary, Timestamp, validate,
};
use crate::hot::HotRooms;
use crate::store::{CachedRoom, RoomLock, Store};
use crate::upstream::Upstream;

/// How often ListRooms, waiting for the first full listing, checks whether
/// another replica has completed it.
const LISTED_RECHECK: Duration = Duration::from_millis(250);

/// How long after its creation a room may still be on its way into the cache
/// from a CreateRoom of this process (more than an upstream call takes).
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
    /// How much later than its updateTime a change may first show in IVS
    /// Chat's listing: incremental passes look back this much further.
    pub listing_lag: Duration,
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
    pub answer: Result<Room>,
    pub cache: Option<CacheInfo>,
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

impl RoomsSettings {
    /// The default for `listing_lag`.
    pub const LISTING_LAG: Duration = Duration::from_secs(5);
}

/// The room service's policy, shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    hot: HotRooms,
    upstream: Upstream,
    settings: RoomsSettings,
    locks: RoomLocks,
    /// GetRoom calls to IVS Chat under way, which readers of the room join.
    flights: Mutex<HashMap<RoomArn, Flight>>,
    next_flight: AtomicU64,
    /// Whether a full listing has ever completed, so ListRooms can use the cache.
    listed: watch::Sender<bool>,
    /// Exchanges with IVS Chat under way, detached from their requests.
    exchanges: TaskTracker,
    /// The newest updateTime the last complete reconciling pass listed: rooms
    /// IVS Chat lists no newer than this have been examined since.
    reconciled_through: Mutex<Option<Timestamp>>,
    /// CreateRoom exchanges under way in this process.
    creating: AtomicUsize,
}

/// A GetRoom of one room under way, shared by every reader that joins it.
struct Flight {
    id: u64,
    /// Whether it asks IVS Chat whatever the cache holds.
    strong: bool,
    /// Whether it has (about to have) sent its call: a STRONG read that
    /// arrives later must not take its answer.
    sent: Arc<AtomicBool>,
    answer: Shared<BoxFuture<'static, Arc<Result<Room>>>>,
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

/// What one full listing found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListingReport {
    /// Rooms IVS Chat listed.
    pub listed: usize,
    /// Rooms read with GetRoom because the cache lacked them or held an older version.
    pub fetched: usize,
    /// Cached rooms IVS Chat no longer has.
    pub deleted: usize,
}

impl Rooms {
    /// The policy over `store` (read through `hot`) and IVS Chat.
    pub async fn new(
        store: Store,
        hot: HotRooms,
        upstream: Upstream,
        settings: RoomsSettings,
    ) -> Result<Rooms> {
        let listed = store.full_listing_at().await?.is_some();
        Ok(Rooms {
            inner: Arc::new(Inner {
                store,
                hot,
                upstream,
                settings,
                locks: RoomLocks::default(),
                flights: Mutex::default(),
                next_flight: AtomicU64::new(0),
                listed: watch::Sender::new(listed),
                exchanges: TaskTracker::new(),
                reconciled_through: Mutex::new(None),
                creating: AtomicUsize::new(0),
            }),
        })
    }

    /// The IVS Chat region this service fronts.
    pub fn region(&self) -> &str {
        self.inner.upstream.region()
    }

    /// Creates a room; with a `request_id`, at most once per request_id
    /// within the retention window (see `create`).
    pub async fn create(
        &self,
        new: NewRoom,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Room> {
        validate::new_room(&new)?;
        if let Some(request_id) = request_id {
            validate::request_id("request_id", &request_id, &new)?;
            return self.create_once(request_id, new, caller).await;
        }
        self.exchange(|rooms| async move {
            rooms
                .creating(async {
                    let asked_at = Timestamp::now();
                    let room = rooms.inner.upstream.create_room(&new, caller).await?;
                    Ok(rooms.keep(room, asked_at, EventSource::Api).await)
                })
                .await
        })
        .await
    }

    /// A room, from the cache when it is fresh enough for `consistency`,
    /// otherwise from IVS Chat (one call shared by concurrent readers).
    pub async fn get(&self, identifier: &str, consistency: Consistency, caller: Caller) -> Read {
        let arn = match RoomArn::parse("identifier", identifier) {
            Ok(arn) => arn,
            Err(e) => return Read::failed(e),
        };
        // A cached read with a deadline is answered by it: what the cache (or
        // memory) holds, when IVS Chat or the database cannot answer in time.
        let deadline = match (consistency, caller) {
            (Consistency::Cached, Caller::User { deadline }) => deadline,
            _ => None,
        };
        let answer_by = deadline.map(|d| {
            let now = tokio::time::Instant::now();
            let margin = (d.saturating_duration_since(now) / 10).max(ANSWER_MARGIN);
            d.checked_sub(margin).unwrap_or(now).max(now)
        });
        // Whether there is something to answer with if IVS Chat cannot be
        // asked in time; only then is waiting for it cut short.
        let mut fallback = false;
        if consistency == Consistency::Cached {
            match by(answer_by, self.cached(&arn)).await {
                Ok(Some(row)) if self.is_fresh(&row) => {
                    return Read {
                        cache: Some(CacheInfo::of(CacheStatus::Hit, &row)),
                        answer: answer(&row),
                    };
                }
                Ok(row) => fallback = row.is_some_and(|row| self.may_serve_stale(&row)),
                // The database is down: IVS Chat may answer, or memory.
                Err(Error::Unavailable(_)) => {
                    fallback = self
                        .inner
                        .hot
                        .get(&arn)
                        .is_some_and(|row| self.may_serve_stale(&row));
                }
                Err(e) => return Read::failed(e),
            }
        }
        let fetch = self.fetch(&arn, consistency, caller);
        let fetched = by(answer_by.filter(|_| fallback), fetch).await;
        match fetched {
            Err(e) if consistency == Consistency::Cached && unanswerable_upstream(&e) => {
                // Anything the cache still holds, within the hard limit, beats
                // no answer.
                if let Some(row) = self.last_known(&arn, deadline).await
                    && self.may_serve_stale(&row)
                {
                    let status = if self.is_fresh(&row) {
                        CacheStatus::Hit
                    } else {
                        CacheStatus::Stale
                    };
                    return Read {
                        cache: Some(CacheInfo::of(status, &row)),
                        answer: answer(&row),
                    };
                }
                Read {
                    answer: Err(e),
                    cache: Some(CacheInfo::MISS),
                }
            }
            answer => Read {
                answer,
                cache: Some(CacheInfo::MISS),
            },
        }
    }

    /// Reads the room from IVS Chat into the cache, or joins a read of it
    /// already under way: any, for a cached read; for a STRONG read, a STRONG
    /// one that has not sent its call yet (so the answer is IVS Chat's as of
    /// after this request arrived).
    async fn fetch(&self, arn: &RoomArn, consistency: Consistency, caller: Caller) -> Result<Room> {
        let strong = consistency == Consistency::Strong;
        let answer = {
            let mut flights = self.inner.flights.lock().expect("flights");
            match flights.get(arn) {
                Some(f) if !strong || (f.strong && !f.sent.load(Ordering::SeqCst)) => {
                    f.answer.clone()
                }
                _ => {
                    let id = self.inner.next_flight.fetch_add(1, Ordering::Relaxed);
                    let sent = Arc::new(AtomicBool::new(false));
                    let answer = self.fly(arn.clone(), id, strong, sent.clone(), caller);
                    flights.insert(
                        arn.clone(),
                        Flight {
                            id,
                            strong,
                            sent,
                            answer: answer.clone(),
                        },
                    );
                    answer
                }
            }
        };
        match &*answer.await {
            Ok(room) => Ok(room.clone()),
            Err(e) => Err(e.duplicate()),
        }
    }

    /// Starts flight `id`: a GetRoom of `arn` in an exchange of its own, with
    /// the room's turn; a non-strong flight first looks whether whoever had
    /// the turn before filled the cache.
    fn fly(
        &self,
        arn: RoomArn,
        id: u64,
        strong: bool,
        sent: Arc<AtomicBool>,
        caller: Caller,
    ) -> Shared<BoxFuture<'static, Arc<Result<Room>>>> {
        let rooms = self.clone();
        let task = self.inner.exchanges.spawn(async move {
            let answer = async {
                // Across replicas too: a flight of this room on another
                // replica (or a write) fills the cache before this one
                // looks at it, so concurrent cold reads of the room cost
                // one GetRoom for the whole fleet.
                let turn = rooms.turn(&arn).await?;
                let read = async {
                    if !strong
                        && let Some(row) = rooms.cached(&arn).await?
                        && rooms.is_fresh(&row)
                    {
                        return answer(&row);
                    }
                    sent.store(true, Ordering::SeqCst);
                    // A change found here was made behind this service's back.
                    rooms.refresh(&arn, EventSource::Reconciler, caller).await
                }
                .await;
                turn.release().await;
                read
            }
            .await;
            let mut flights = rooms.inner.flights.lock().expect("flights");
            if flights.get(&arn).is_some_and(|f| f.id == id) {
                flights.remove(&arn);
            }
            Arc::new(answer)
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Arc::new(Err(Error::Internal(anyhow::anyhow!(
                    "an exchange with IVS Chat failed: {e}"
                ))))
            })
        }
        .boxed()
        .shared()
    }

    /// Updates a room; with `expected`, only if its update_time in IVS Chat
    /// is that (else UpdateTimeMismatch, and nothing changes).
    pub async fn update(
        &self,
        identifier: &str,
        patch: RoomPatch,
        expected: Option<Timestamp>,
        caller: Caller,
    ) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        validate::room_patch(&patch)?;
        self.exchange(|rooms| async move {
            let write = async {
                let asked_at = Timestamp::now();
                let room = rooms
                    .gone_if_not_found(
                        &arn,
                        rooms.inner.upstream.update_room(&arn, &patch, caller).await,
                    )
                    .await?;
                Ok(rooms.keep(room, asked_at, EventSource::Api).await)
            };
            rooms.in_write_turn(&arn, expected, caller, write).await
        })
        .await
    }

    /// Deletes a room; with `expected`, only if its update_time in IVS Chat
    /// is that.
    pub async fn delete(
        &self,
        identifier: &str,
        expected: Option<Timestamp>,
        caller: Caller,
    ) -> Result<()> {
        let arn = RoomArn::parse("identifier", identifier)?;
        self.exchange(|rooms| async move {
            let write = async {
                rooms
                    .gone_if_not_found(&arn, rooms.inner.upstream.delete_room(&arn, caller).await)
                    .await?;
                rooms.forget(&arn, EventSource::Api).await;
                Ok(())
            };
            rooms.in_write_turn(&arn, expected, caller, write).await
        })
        .await
    }

    /// Runs `write` in the room's write turn: this process's turn for the
    /// room, then, on Postgres, the turn among replicas. With `expected`, the
    /// room is first read from IVS Chat (not the cache), and `write` runs only
    /// if its update_time is `expected`. The turn keeps writes through this
    /// service from coming between that read and `write`; a writer that
    /// bypasses the service can (IVS Chat has no conditional write).
    async fn in_write_turn<T>(
        &self,
        arn: &RoomArn,
        expected: Option<Timestamp>,
        caller: Caller,
        write: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let turn = self.turn(arn).await?;
        let result = async {
            if let Some(expected) = expected {
                // A change found here was made behind this service's back.
                let actual = self
                    .refresh(arn, EventSource::Reconciler, caller)
                    .await?
                    .update_time;
                if actual != expected {
                    return Err(Error::UpdateTimeMismatch { expected, actual });
                }
            }
            write.await
        }
        .await;
        turn.release().await;
        result
    }

    /// The room's turn: this process's, then (on Postgres) the turn among
    /// replicas. Every read of the room from IVS Chat that may change the
    /// cache, and every write, runs in it, so none lands between another's
    /// answer and its cache write, on any replica: a change is logged by
    /// whoever made it.
    async fn turn(&self, arn: &RoomArn) -> Result<RoomTurn<'_>> {
        let local = self.inner.locks.lock(arn).await;
        let replicas = self.inner.store.lock_room(arn).await?;
        Ok(RoomTurn {
            _local: local,
            replicas,
        })
    }

    pub async fn tag(
        &self,
        identifier: &str,
        tags: BTreeMap<String, String>,
        caller: Caller,
    ) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        validate::tags("tags", &tags)?;
        self.exchange(|rooms| async move {
            let write = async {
                rooms
                    .gone_if_not_found(
                        &arn,
                        rooms.inner.upstream.tag_room(&arn, &tags, caller).await,
                    )
                    .await?;
                rooms
                    .read_tags_back(&arn, caller, |cached| cached.extend(tags.clone()))
                    .await
            };
            rooms.in_write_turn(&arn, None, caller, write).await
        })
        .await
    }

    pub async fn untag(&self, identifier: &str, keys: Vec<String>, caller: Caller) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        validate::tag_keys("tagKeys", &keys)?;
        self.exchange(|rooms| async move {
            let write = async {
                rooms
                    .gone_if_not_found(
                        &arn,
                        rooms.inner.upstream.untag_room(&arn, &keys, caller).await,
                    )
                    .await?;
                rooms
                    .read_tags_back(&arn, caller, |cached| {
                        for key in &keys {
                            cached.remove(key);
                        }
                    })
                    .await
            };
            rooms.in_write_turn(&arn, None, caller, write).await
        })
        .await
    }

    /// After a tag change: reads the room's tags back with
    /// ListTagsForResource (a quota of its own, twice GetRoom's) and applies
    /// them to the cached room, logged as ours; a room the cache does not
    /// hold is read whole with GetRoom. Tagging does not move updateTime, so
    /// the tags are what changed. Call in the room's write turn.
    async fn read_tags_back(
        &self,
        arn: &RoomArn,
        caller: Caller,
        ours: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<Room> {
        let asked_at = Timestamp::now();
        let tags = match self.inner.upstream.list_tags(arn, caller).await {
            Err(Error::NotFound { .. }) => {
                return self
                    .gone_if_not_found(arn, Err(Error::room_not_found(arn.as_str())))
                    .await;
            }
            Ok(tags) => tags,
            // The change is made, but IVS Chat could not say what the tags
            // are now (its budget, a fault): the cached tags with our change.
            Err(e) => {
                tracing::warn!(error = %e, %arn, "could not read a room's tags back: caching the change made");
                let Some(cached) = self.inner.store.get(arn).await?.filter(|c| !c.deleted) else {
                    return Err(e);
                };
                let mut tags = cached.room.tags;
                ours(&mut tags);
                tags
            }
        };
        match self
            .inner
            .store
            .put_tags(arn, &tags, asked_at, EventSource::Api)
            .await
        {
            Ok(Some(cached)) => Ok(cached.room),
            Ok(None) => self.refresh(arn, EventSource::Api, caller).await,
            Err(e) => {
                // IVS Chat has tagged the room: say so, with the tags it has.
                tracing::error!(error = %e, %arn, "could not cache a room's tags");
                let mut room = self
                    .inner
                    .store
                    .get(arn)
                    .await
                    .ok()
                    .flatten()
                    .filter(|c| !c.deleted)
                    .map(|c| c.room)
                    .ok_or(e)?;
                room.tags = tags;
                Ok(room)
            }
        }
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
            .spawn(work(self.clone()))
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

    /// A page of cached rooms and the change-log revision it reflects; waits
    /// (boundedly) for the first full listing, which may be another replica's.
    /// Its age is the oldest confirmation on the page (of the last full
    /// listing, for an empty page).
    pub async fn list(&self, query: ListQuery) -> Result<Listing> {
        validate::list_query(&query)?;
        let wait = async {
            let mut listed = self.inner.listed.subscribe();
            let mut recheck = tokio::time::interval(LISTED_RECHECK);
            loop {
                if *listed.borrow_and_update() {
                    return Ok(());
                }
                tokio::select! {
                    _ = listed.changed() => {}
                    _ = recheck.tick() => {
                        // The reconciler may run on another replica.
                        if self.inner.store.full_listing_at().await?.is_some() {
                            self.inner.listed.send_replace(true);
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(self.inner.settings.listing_wait, wait).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Unavailable(
                    "the cache is still being filled by a first full listing of IVS Chat".into(),
                ));
            }
        }
        let (page, revision, validated_at) = self.inner.store.list(&query).await?;
        let validated_at = match validated_at {
            Some(at) => Some(at),
            None => self.inner.store.full_listing_at().await?,
        };
        Ok(Listing {
            page,
            revision,
            cache: CacheInfo {
                status: CacheStatus::Hit,
                age: validated_at.map(Timestamp::elapsed).unwrap_or_default(),
            },
        })
    }

    /// Lists every room in IVS Chat and brings the cache in line: new and newer
    /// rooms are read whole (a listing shows summaries), rooms IVS Chat no longer
    /// lists are checked one by one and forgotten if gone. Changes found are
    /// logged as RECONCILER. Tag-only changes are found too: a summary shows
    /// the tags.
    pub async fn full_listing(&self) -> Result<ListingReport> {
        let started = Timestamp::now();
        let mut report = ListingReport::default();
        let mut query = ListQuery {
            max_results: Some(validate::MAX_ROOM_RESULTS.max),
            ..ListQuery::default()
        };
        let mut top = None;
        let mut complete = true;
        loop {
            let page = self
                .inner
                .upstream
                .list_rooms(&query, Caller::Background)
                .await?;
            top = top.or(page.rooms.first().map(|r| r.update_time));
            for summary in &page.rooms {
                report.listed += 1;
                let arn = RoomArn::parse("arn", &summary.arn)?;
                let cached = self.inner.store.get(&arn).await?;
                let creating = cached.is_none() && self.may_be_creating(summary).await?;
                match cached {
                    Some(cached) if !cached.deleted && summary.shows(&cached.room) => {
                        self.inner
                            .store
                            .confirm(&arn, summary.update_time, started)
                            .await?;
                    }
                    // Perhaps being created through the service, which
                    // caches it; a later pass picks it up otherwise.
                    None if creating => complete = false,
                    _ => {
                        if self.fetch_listed(&arn, summary).await? {
                            report.fetched += 1;
                        }
                    }
                }
            }
            match page.next_token {
                Some(token) => query.next_token = Some(token),
                None => break,
            }
        }
        // Rooms updated while we paged move to the front of the listing and may
        // have been missed: ask for each before forgetting it.
        for arn in self
            .inner
            .store
            .live_rooms_unconfirmed_since(started)
            .await?
        {
            let turn = self.turn(&arn).await?;
            let refreshed = self
                .refresh(&arn, EventSource::Reconciler, Caller::Background)
                .await;
            turn.release().await;
            match refreshed {
                Ok(_) => {}
                Err(Error::NotFound { .. }) => report.deleted += 1,
                Err(e) => return Err(e),
            }
        }
        self.inner.store.set_full_listing_at(started).await?;
        self.inner.listed.send_replace(true);
        if complete {
            self.advance_watermark(top);
        }
        Ok(report)
    }

    /// Looks for rooms changed in IVS Chat since the cache last saw them,
    /// newest first. IVS Chat lists by updateTime descending, so paging stops
    /// at the first page that reaches down to the newest updateTime the last
    /// complete pass listed (everything older was examined then), or, before
    /// any pass completed, at the first page with nothing newer than the
    /// cache. Usually one upstream call. Changed rooms are read whole and
    /// logged as RECONCILER.
    pub async fn reconcile_recent(&self) -> Result<ListingReport> {
        let started = Timestamp::now();
        let covered = *self.inner.reconciled_through.lock().expect("watermark");
        let mut top = None;
        let mut complete = true;
        let mut report = ListingReport::default();
        let mut query = ListQuery {
            max_results: Some(validate::MAX_ROOM_RESULTS.max),
            ..ListQuery::default()
        };
        loop {
            let page = self
                .inner
                .upstream
                .list_rooms(&query, Caller::Background)
                .await?;
            top = top.or(page.rooms.first().map(|r| r.update_time));
            let mut newer_on_page = false;
            for summary in &page.rooms {
                report.listed += 1;
                let arn = RoomArn::parse("arn", &summary.arn)?;
                let cached = self.inner.store.get(&arn).await?;
                let creating = cached.is_none() && self.may_be_creating(summary).await?;
                let (newer, differs) = match &cached {
                    Some(c) if !c.deleted => (
                        summary.update_time > c.room.update_time,
                        // Same version, other content: a tag-only change.
                        summary.update_time == c.room.update_time && !summary.shows(&c.room),
                    ),
                    // Perhaps being created through the service: next pass.
                    None if creating => {
                        complete = false;
                        continue;
                    }
                    // New to the cache, or listed although we saw it deleted.
                    _ => (true, false),
                };
                newer_on_page |= newer;
                if newer || differs {
                    if self.fetch_listed(&arn, summary).await? {
                        report.fetched += 1;
                    }
                } else if cached.is_some() {
                    self.inner
                        .store
                        .confirm(&arn, summary.update_time, started)
                        .await?;
                }
            }
            let oldest_on_page = page.rooms.last().map(|r| r.update_time);
            let more = match covered {
                Some(covered) => oldest_on_page.is_some_and(|oldest| oldest > covered),
                None => newer_on_page,
            };
            match page.next_token {
                Some(token) if more => query.next_token = Some(token),
                _ => break,
            }
        }
        if complete {
            self.advance_watermark(top);
        }
        Ok(report)
    }

    /// Reads a room a listing showed as new or changed into the cache (as a
    /// RECONCILER change), unless by the time it has the room's turn the cache
    /// already holds that version or a newer one (a request of ours got there
    /// first). Returns whether it called GetRoom.
    async fn fetch_listed(&self, arn: &RoomArn, summary: &RoomSummary) -> Result<bool> {
        // A write of ours (on any replica) between IVS Chat's answer and its
        // cache write holds the turn: once it is ours, that write is cached.
        let turn = self.turn(arn).await?;
        let fetched = async {
            if let Some(c) = self.inner.store.get(arn).await?
                && !c.deleted
                && (c.room.update_time > summary.update_time || summary.shows(&c.room))
            {
                return Ok(false);
            }
            // Gone since it was listed: refresh has forgotten it.
            match self
                .refresh(arn, EventSource::Reconciler, Caller::Background)
                .await
            {
                Ok(_) | Err(Error::NotFound { .. }) => Ok(true),
                Err(e) => Err(e),
            }
        }
        .await;
        turn.release().await;
        fetched
    }

    /// Runs a CreateRoom exchange (the call and the cache write), counted
    /// as in flight meanwhile: in this process, and on Postgres for every
    /// replica. Nothing is sent if it cannot be counted.
    async fn creating<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        let _creating = Creating::start(&self.inner.creating);
        let mark = self.inner.store.begin_creation(CREATION_WINDOW).await?;
        let result = work.await;
        self.inner.store.end_creation(mark).await;
        result
    }

    /// Whether a room the cache has never seen may be one a CreateRoom
    /// (of any replica) is about to cache: one is in flight and the room is
    /// recent. Older rooms (created in IVS Chat directly) are never held back.
    async fn may_be_creating(&self, summary: &RoomSummary) -> Result<bool> {
        if summary.create_time.elapsed() >= CREATION_WINDOW {
            return Ok(false);
        }
        if self.inner.creating.load(Ordering::SeqCst) > 0 {
            return Ok(true);
        }
        self.inner.store.creations_in_flight().await
    }

    /// Records that every room IVS Chat listed with an updateTime up to `top`
    /// (less a margin, for a write IVS Chat lists a little late) has been
    /// examined.
    fn advance_watermark(&self, top: Option<Timestamp>) {
        let mut covered = self.inner.reconciled_through.lock().expect("watermark");
        if let Some(top) = top {
            let top = Timestamp::from_nanos(top.as_nanos().saturating_sub(
                i64::try_from(self.inner.settings.listing_lag.as_nanos()).unwrap_or(i64::MAX),
            ));
            *covered = Some(covered.map_or(top, |c| c.max(top)));
        }
    }

    /// The cached row for `arn`: from memory when it holds one fresh enough
    /// to serve, otherwise from SQL (which memory then holds).
    async fn cached(&self, arn: &RoomArn) -> Result<Option<Arc<CachedRoom>>> {
        let hot = &self.inner.hot;
        if let Some(row) = hot.get(arn)
            && self.is_fresh(&row)
        {
            return Ok(Some(row));
        }
        let (row, as_of) = self.inner.store.get_at_revision(arn).await?;
        Ok(row.map(|row| {
            hot.fill(arn, &row, as_of);
            Arc::new(row)
        }))
    }

    /// The newest row this process can find for `arn` by `deadline`: the
    /// cache's, or, while the database cannot answer in time, the one in
    /// memory (never older than a commit this process knows of).
    async fn last_known(
        &self,
        arn: &RoomArn,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<Arc<CachedRoom>> {
        match by(deadline, self.cached(arn)).await {
            Ok(row) => row,
            Err(_) => self.inner.hot.get(arn),
        }
    }

    /// Whether `row` may answer while IVS Chat cannot be asked.
    fn may_serve_stale(&self, row: &CachedRoom) -> bool {
        row.validated_at.elapsed() <= self.inner.settings.stale_if_error
    }

    fn is_fresh(&self, row: &CachedRoom) -> bool {
        row.validated_at.elapsed() <= self.inner.settings.max_staleness
    }

    /// Reads the room from IVS Chat and stores it; a change found is logged
    /// as made by `source`. Call with the room's turn.
    async fn refresh(&self, arn: &RoomArn, source: EventSource, caller: Caller) -> Result<Room> {
        let asked_at = Timestamp::now();
        let room = self
            .gone_if_not_found(arn, self.inner.upstream.get_room(arn, caller).await)
            .await?;
        Ok(self.keep(room, asked_at, source).await)
    }

    /// Stores a room IVS Chat returned and answers with what the cache holds
    /// after, which is newer if a newer version was already there. IVS Chat has
    /// answered, so a failing cache is logged, not returned.
    async fn keep(&self, room: Room, asked_at: Timestamp, source: EventSource) -> Room {
        match self.inner.store.put(&room, asked_at, source).await {
            Ok(cached) if !cached.deleted => cached.room,
            Ok(_) => room,
            Err(e) => {
                tracing::error!(error = %e, arn = %room.arn, "could not cache a room IVS Chat returned");
                room
            }
        }
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

fn answer(cached: &CachedRoom) -> Result<Room> {
    if cached.deleted {
        Err(Error::room_not_found(&cached.room.arn))
    } else {
        Ok(cached.room.clone())
    }
}

/// How long before its deadline, at least, a cached read gives up on IVS
/// Chat and the database, to answer from what it has.
const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// `work`, or UNAVAILABLE if it has not finished by `at` (if given); the
/// work itself goes on where it runs in an exchange.
async fn by<T>(
    at: Option<tokio::time::Instant>,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    match at {
        Some(at) => tokio::time::timeout_at(at, work).await.unwrap_or_else(|_| {
            Err(Error::Unavailable(
                "neither IVS Chat nor the cache database answered before the request's deadline"
                    .into(),
            ))
        }),
        None => work.await,
    }
}

/// IVS Chat could not be asked: down, throttling, or the budget could not
/// serve the call in time.
fn unanswerable_upstream(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_) | Error::ResourceExhausted(_))
}

/// One async lock per room, created on demand and dropped when unused.
#[derive(Default)]
struct RoomLocks {
    locks: Mutex<HashMap<RoomArn, Arc<tokio::sync::Mutex<()>>>>,
}

/// A room's turn in this process and among replicas; see [`Rooms::turn`].
struct RoomTurn<'a> {
    _local: Turn<'a>,
    replicas: RoomLock,
}

impl RoomTurn<'_> {
    /// Ends the turn among replicas, then this process's.
    async fn release(self) {
        self.replicas.release().await;
    }
}

struct Turn<'a> {
    locks: &'a RoomLocks,
    arn: RoomArn,
    guard: Option<OwnedMutexGuard<()>>,
}

impl RoomLocks {
    async fn lock(&self, arn: &RoomArn) -> Turn<'_> {
        let lock = self
            .locks
            .lock()
            .expect("room locks")
            .entry(arn.clone())
            .or_default()
            .clone();
        Turn {
            locks: self,
            arn: arn.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().expect("room locks");
        // Only the map holds it: nobody holds or awaits this room's turn.
        if locks
            .get(&self.arn)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.arn);
        }
    }
}
