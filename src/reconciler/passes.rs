//! The reconciling passes over one IVS Chat (one region; a reconciler runs
//! per region served): the full listing,
//! and the incremental pass over the most recently updated rooms, with the
//! watermark that lets the incremental pass stop early. They read IVS Chat's
//! listing through one pager (`Upstream::pages`) and change the cache only
//! through `Rooms`, in the rooms' turns.

use std::sync::Mutex;
use std::time::Duration;

use crate::budget::Caller;
use tokio::sync::Notify;

use crate::domain::{EventSource, ListQuery, Result, RoomArn, RoomSummary, Timestamp, validate};
use crate::rooms::Rooms;
use crate::store::{CachedRoom, Store};
use crate::upstream::Upstream;

/// What one pass found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListingReport {
    /// Rooms IVS Chat listed.
    pub listed: usize,
    /// Rooms read with GetRoom because the cache lacked them or held an older version.
    pub fetched: usize,
    /// Cached rooms IVS Chat no longer has.
    pub deleted: usize,
    /// Rooms new to the cache, put in as listed: their details (the message
    /// limits) are read after, by [`Passes::complete_details`].
    pub pending: usize,
}

/// The passes of one IVS Chat, and what they remember between them.
pub struct Passes {
    rooms: Rooms,
    store: Store,
    upstream: Upstream,
    /// How much later than its updateTime a change may first show in IVS
    /// Chat's listing: incremental passes look back this much further.
    listing_lag: Duration,
    /// The newest updateTime the last complete pass listed: rooms IVS Chat
    /// lists no newer than this have been examined since.
    reconciled_through: Mutex<Option<Timestamp>>,
    /// A listing put in rooms whose details are pending.
    pending: Notify,
}

/// How many rooms whose details are pending `complete_details` takes from
/// the store at a time.
const DETAILS_BATCH: usize = 256;
/// How often `complete_details` looks for pending rooms when no listing
/// has said there are any.
const DETAILS_RECHECK: Duration = Duration::from_secs(5);
/// After a failure, the first and longest wait of `complete_details`.
const DETAILS_FIRST_RETRY: Duration = Duration::from_millis(500);
const DETAILS_LAST_RETRY: Duration = Duration::from_secs(30);

/// The pages the passes ask for: the largest IVS Chat allows.
fn whole_pages() -> ListQuery {
    ListQuery {
        max_results: Some(validate::MAX_ROOM_RESULTS.max),
        ..ListQuery::default()
    }
}

impl Passes {
    /// Passes over `upstream` that bring `rooms` (cached in `store`) in line.
    pub fn new(rooms: Rooms, store: Store, upstream: Upstream, listing_lag: Duration) -> Passes {
        Passes {
            rooms,
            store,
            upstream,
            listing_lag,
            reconciled_through: Mutex::new(None),
            pending: Notify::new(),
        }
    }

    /// The region these passes reconcile.
    pub fn region(&self) -> &str {
        self.upstream.region()
    }

    /// Lists every room in IVS Chat and brings the cache in line: new and newer
    /// rooms are read whole (a listing shows summaries), rooms IVS Chat no longer
    /// lists are checked one by one and forgotten if gone. Changes found are
    /// logged as RECONCILER. Tag-only changes are found too: a summary shows
    /// the tags.
    pub async fn full_listing(&self) -> Result<ListingReport> {
        let started = Timestamp::now();
        let mut report = ListingReport::default();
        let mut top = None;
        let mut complete = true;
        let mut pages = self.upstream.pages(whole_pages(), Caller::Background);
        while let Some(page) = pages.next().await? {
            top = top.or(page.rooms.first().map(|r| r.update_time));
            // Unchanged rooms, confirmed together once the page is through;
            // rooms new to the cache, put in together as listed.
            let mut unchanged = Vec::new();
            let mut new = Vec::new();
            for summary in &page.rooms {
                report.listed += 1;
                let (arn, cached, creating) = self.look_up(summary).await?;
                match cached {
                    Some(cached) if !cached.deleted && summary.shows(&cached.room) => {
                        unchanged.push((arn, summary.update_time));
                    }
                    // Perhaps being created through the service, which
                    // caches it; a later pass picks it up otherwise.
                    None if creating => complete = false,
                    // Listed only, its details read after (`complete_details`):
                    // a cold cache serves ListRooms once the listing is in.
                    None => new.push(summary.pending_room()),
                    _ => {
                        if self.rooms.examine_listed(&arn, summary).await? {
                            report.fetched += 1;
                        }
                    }
                }
            }
            self.store.confirm_many(&unchanged, started).await?;
            if !new.is_empty() {
                self.store
                    .put_many(&new, started, EventSource::Reconciler)
                    .await?;
                report.pending += new.len();
                self.pending.notify_one();
            }
        }
        // Rooms updated while we paged move to the front of the listing and may
        // have been missed: ask for each before forgetting it.
        let region = self.upstream.region();
        for arn in self
            .store
            .live_rooms_unconfirmed_since(region, started)
            .await?
        {
            if self.rooms.recheck_unlisted(&arn).await? {
                report.deleted += 1;
            }
        }
        self.rooms.full_listing_completed(region, started).await?;
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
        let covered = *self.reconciled_through.lock().expect("watermark");
        let mut top = None;
        let mut complete = true;
        let mut report = ListingReport::default();
        let mut pages = self.upstream.pages(whole_pages(), Caller::Background);
        while let Some(page) = pages.next().await? {
            top = top.or(page.rooms.first().map(|r| r.update_time));
            let mut newer_on_page = false;
            let mut unchanged = Vec::new();
            for summary in &page.rooms {
                report.listed += 1;
                let (arn, cached, creating) = self.look_up(summary).await?;
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
                    if self.rooms.examine_listed(&arn, summary).await? {
                        report.fetched += 1;
                    }
                } else if cached.is_some() {
                    unchanged.push((arn, summary.update_time));
                }
            }
            self.store.confirm_many(&unchanged, started).await?;
            let oldest_on_page = page.rooms.last().map(|r| r.update_time);
            let more = match covered {
                Some(covered) => oldest_on_page.is_some_and(|oldest| oldest > covered),
                None => newer_on_page,
            };
            if !more {
                break;
            }
        }
        if complete {
            self.advance_watermark(top);
        }
        Ok(report)
    }

    /// Reads whole, one GetRoom each (background: users first), the rooms
    /// of this region a listing put in without their details, newest
    /// update first, for as long as there are any; then waits for a listing
    /// to put in more. Runs beside the passes while this replica leads: a
    /// cold cache serves ListRooms once its first listing is in, and its
    /// rooms become whole at GetRoom's rate after. Never returns; a failure
    /// is logged and retried.
    pub async fn complete_details(&self) -> std::convert::Infallible {
        let region = self.upstream.region();
        let mut backoff = DETAILS_FIRST_RETRY;
        loop {
            let batch = self
                .store
                .rooms_pending_details(region, DETAILS_BATCH)
                .await;
            let failed = match batch {
                Ok(arns) if arns.is_empty() => {
                    // Listings notify; the tick covers rows put in by
                    // another replica's listing before this one led.
                    let _ = tokio::time::timeout(DETAILS_RECHECK, self.pending.notified()).await;
                    None
                }
                Ok(arns) => {
                    let mut failed = None;
                    for arn in arns {
                        if let Err(e) = self.rooms.complete_details(&arn).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    failed
                }
                Err(e) => Some(e),
            };
            match failed {
                None => backoff = DETAILS_FIRST_RETRY,
                Some(e) => {
                    tracing::warn!(error = %e, region, retry_in = ?backoff, "could not read listed rooms whole");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(DETAILS_LAST_RETRY);
                }
            }
        }
    }

    /// A listed room's ARN, its cached row, and, when it has none, whether
    /// it may be one a CreateRoom is about to cache.
    async fn look_up(&self, summary: &RoomSummary) -> Result<(RoomArn, Option<CachedRoom>, bool)> {
        let arn = RoomArn::parse("arn", &summary.arn)?;
        let cached = self.store.get(&arn).await?;
        let creating = cached.is_none() && self.rooms.may_be_creating(summary).await?;
        Ok((arn, cached, creating))
    }

    /// Records that every room IVS Chat listed with an updateTime up to `top`
    /// (less a margin, for a write IVS Chat lists a little late) has been
    /// examined.
    fn advance_watermark(&self, top: Option<Timestamp>) {
        let mut covered = self.reconciled_through.lock().expect("watermark");
        if let Some(top) = top {
            let top = Timestamp::from_nanos(
                top.as_nanos()
                    .saturating_sub(i64::try_from(self.listing_lag.as_nanos()).unwrap_or(i64::MAX)),
            );
            *covered = Some(covered.map_or(top, |c| c.max(top)));
        }
    }
}
