//! The reconciling passes: the full listing, and the incremental pass over
//! the most recently updated rooms.

use super::*;

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
    pub(super) async fn fetch_listed(&self, arn: &RoomArn, summary: &RoomSummary) -> Result<bool> {
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

    /// Whether a room the cache has never seen may be one a CreateRoom
    /// (of any replica) is about to cache: one is in flight and the room is
    /// recent. Older rooms (created in IVS Chat directly) are never held back.
    pub(super) async fn may_be_creating(&self, summary: &RoomSummary) -> Result<bool> {
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
    pub(super) fn advance_watermark(&self, top: Option<Timestamp>) {
        let mut covered = self.inner.reconciled_through.lock().expect("watermark");
        if let Some(top) = top {
            let top = Timestamp::from_nanos(top.as_nanos().saturating_sub(
                i64::try_from(self.inner.settings.listing_lag.as_nanos()).unwrap_or(i64::MAX),
            ));
            *covered = Some(covered.map_or(top, |c| c.max(top)));
        }
    }
}
