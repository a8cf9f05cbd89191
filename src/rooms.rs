//! Cache policy: what is read from the cache, what goes upstream, and in which
//! order.
//!
//! - Reads are served from the cache while the row was confirmed by IVS Chat
//!   within `max_staleness` (a tombstone answers NOT_FOUND the same way);
//!   otherwise they read IVS Chat and store what it says.
//! - Writes go to IVS Chat first; the cache then takes the result, under the
//!   store's update-time rule, so a slow answer never overwrites a newer one.
//! - Within this process, calls that reach IVS Chat for the same room take turns
//!   (a per-room lock), so a read that started before a write cannot land after
//!   it, and concurrent misses of one room wait for the first to fill the cache.
//! - ListRooms is answered from the cache once a full listing of IVS Chat has
//!   completed (the reconciler's first pass, on whichever replica leads;
//!   persisted across restarts).
//! - Every cache write names its source for the change log: API for calls
//!   through this service, RECONCILER for changes found in IVS Chat.
//! - An exchange with IVS Chat, and the cache step that follows it, run to
//!   completion in a task of their own, even if the client gives up: a write
//!   IVS Chat has made always reaches the cache. Shutdown waits for them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, watch};
use tokio_util::task::TaskTracker;

use crate::domain::{
    Error, EventSource, ListQuery, ListedPage, NewRoom, Result, Room, RoomArn, RoomPatch,
    RoomSummary, Timestamp, validate,
};
use crate::store::{CachedRoom, Store};
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
    upstream: Upstream,
    settings: RoomsSettings,
    locks: RoomLocks,
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
    pub async fn new(store: Store, upstream: Upstream, settings: RoomsSettings) -> Result<Rooms> {
        let listed = store.full_listing_at().await?.is_some();
        Ok(Rooms {
            inner: Arc::new(Inner {
                store,
                upstream,
                settings,
                locks: RoomLocks::default(),
                listed: watch::Sender::new(listed),
                exchanges: TaskTracker::new(),
                reconciled_through: Mutex::new(None),
                creating: AtomicUsize::new(0),
            }),
        })
    }

    pub async fn create(&self, new: NewRoom) -> Result<Room> {
        validate::new_room(&new)?;
        self.exchange(|rooms| async move {
            // Until the cache has the room, the reconciler leaves rooms it has
            // never seen alone, so that this creation is logged as ours.
            let _creating = Creating::start(&rooms.inner.creating);
            let asked_at = Timestamp::now();
            let room = rooms.inner.upstream.create_room(&new).await?;
            Ok(rooms.keep(room, asked_at, EventSource::Api).await)
        })
        .await
    }

    pub async fn get(&self, identifier: &str, consistency: Consistency) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        if consistency == Consistency::Cached
            && let Some(answer) = self.fresh(&arn).await?
        {
            return answer;
        }
        self.exchange(|rooms| async move {
            let _turn = rooms.inner.locks.lock(&arn).await;
            // Whoever held the turn before may just have filled the cache.
            if consistency == Consistency::Cached
                && let Some(answer) = rooms.fresh(&arn).await?
            {
                return answer;
            }
            // A change found here was made behind this service's back.
            rooms.refresh(&arn, EventSource::Reconciler).await
        })
        .await
    }

    pub async fn update(&self, identifier: &str, patch: RoomPatch) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        validate::room_patch(&patch)?;
        self.exchange(|rooms| async move {
            let _turn = rooms.inner.locks.lock(&arn).await;
            let asked_at = Timestamp::now();
            let room = rooms
                .gone_if_not_found(&arn, rooms.inner.upstream.update_room(&arn, &patch).await)
                .await?;
            Ok(rooms.keep(room, asked_at, EventSource::Api).await)
        })
        .await
    }

    pub async fn delete(&self, identifier: &str) -> Result<()> {
        let arn = RoomArn::parse("identifier", identifier)?;
        self.exchange(|rooms| async move {
            let _turn = rooms.inner.locks.lock(&arn).await;
            rooms
                .gone_if_not_found(&arn, rooms.inner.upstream.delete_room(&arn).await)
                .await?;
            rooms.forget(&arn, EventSource::Api).await;
            Ok(())
        })
        .await
    }

    pub async fn tag(&self, identifier: &str, tags: BTreeMap<String, String>) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        validate::tags("tags", &tags)?;
        self.exchange(|rooms| async move {
            let _turn = rooms.inner.locks.lock(&arn).await;
            rooms
                .gone_if_not_found(&arn, rooms.inner.upstream.tag_room(&arn, &tags).await)
                .await?;
            // Tagging need not move updateTime, so read the room back whole.
            rooms.refresh(&arn, EventSource::Api).await
        })
        .await
    }

    pub async fn untag(&self, identifier: &str, keys: Vec<String>) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        validate::tag_keys("tagKeys", &keys)?;
        self.exchange(|rooms| async move {
            let _turn = rooms.inner.locks.lock(&arn).await;
            rooms
                .gone_if_not_found(&arn, rooms.inner.upstream.untag_room(&arn, &keys).await)
                .await?;
            rooms.refresh(&arn, EventSource::Api).await
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
    pub async fn list(&self, query: ListQuery) -> Result<(ListedPage<Room>, u64)> {
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
        self.inner.store.list(&query).await
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
            let page = self.inner.upstream.list_rooms(&query).await?;
            top = top.or(page.rooms.first().map(|r| r.update_time));
            for summary in &page.rooms {
                report.listed += 1;
                let arn = RoomArn::parse("arn", &summary.arn)?;
                match self.inner.store.get(&arn).await? {
                    Some(cached) if !cached.deleted && summary.shows(&cached.room) => {
                        self.inner
                            .store
                            .confirm(&arn, summary.update_time, started)
                            .await?;
                    }
                    // Perhaps being created through this process, which
                    // caches it; a later pass picks it up otherwise.
                    None if self.may_be_creating(summary) => complete = false,
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
            let _turn = self.inner.locks.lock(&arn).await;
            match self.refresh(&arn, EventSource::Reconciler).await {
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
            let page = self.inner.upstream.list_rooms(&query).await?;
            top = top.or(page.rooms.first().map(|r| r.update_time));
            let mut newer_on_page = false;
            for summary in &page.rooms {
                report.listed += 1;
                let arn = RoomArn::parse("arn", &summary.arn)?;
                let cached = self.inner.store.get(&arn).await?;
                let (newer, differs) = match &cached {
                    Some(c) if !c.deleted => (
                        summary.update_time > c.room.update_time,
                        // Same version, other content: a tag-only change.
                        summary.update_time == c.room.update_time && !summary.shows(&c.room),
                    ),
                    // Perhaps being created through this process: next pass.
                    None if self.may_be_creating(summary) => {
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
        let _turn = self.inner.locks.lock(arn).await;
        if let Some(c) = self.inner.store.get(arn).await?
            && !c.deleted
            && (c.room.update_time > summary.update_time || summary.shows(&c.room))
        {
            return Ok(false);
        }
        // Gone since it was listed: refresh has forgotten it.
        match self.refresh(arn, EventSource::Reconciler).await {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Whether a room the cache has never seen may be one a CreateRoom of
    /// this process is about to cache: one is in flight and the room is
    /// recent. Older rooms (created in IVS Chat directly) are never held back.
    fn may_be_creating(&self, summary: &RoomSummary) -> bool {
        self.inner.creating.load(Ordering::SeqCst) > 0
            && summary.create_time.elapsed() < CREATION_WINDOW
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

    /// The cached answer for `arn` if it is fresh enough.
    async fn fresh(&self, arn: &RoomArn) -> Result<Option<Result<Room>>> {
        Ok(self
            .inner
            .store
            .get(arn)
            .await?
            .filter(|c| c.validated_at.elapsed() <= self.inner.settings.max_staleness)
            .map(answer))
    }

    /// Reads the room from IVS Chat and stores it; a change found is logged
    /// as made by `source`. Call with the room's turn.
    async fn refresh(&self, arn: &RoomArn, source: EventSource) -> Result<Room> {
        let asked_at = Timestamp::now();
        let room = self
            .gone_if_not_found(arn, self.inner.upstream.get_room(arn).await)
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

fn answer(cached: CachedRoom) -> Result<Room> {
    if cached.deleted {
        Err(Error::room_not_found(&cached.room.arn))
    } else {
        Ok(cached.room)
    }
}

/// One async lock per room, created on demand and dropped when unused.
#[derive(Default)]
struct RoomLocks {
    locks: Mutex<HashMap<RoomArn, Arc<tokio::sync::Mutex<()>>>>,
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
