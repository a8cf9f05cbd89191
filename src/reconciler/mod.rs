//! The reconciler: finds changes made in IVS Chat behind this service's back.
//!
//! One reconciler runs per region served, each on its own: a region whose
//! IVS Chat is down or throttling does not hold the others up. One replica
//! at a time reconciles a region (the store's leadership: a lease per region
//! that its holder renews, taken over by another replica when it runs out, so
//! a fleet's regions may be led by different replicas; SQLite has one
//! process).
//! The leader starts with a full listing, then every `interval` looks at the
//! most recently updated rooms (usually one ListRooms call), and lists
//! everything again to find deletions, creations and tag-only changes further
//! down the list, and to confirm every room before it goes stale: every
//! `resync_interval`, or as often as `max_staleness` needs. Beside the
//! passes it reads whole, one GetRoom each, the rooms a listing put in
//! without their message limits (a cold cache's every room: ListRooms is
//! served once the first listing is in). Other replicas wait for their turn.
//!
//! IVS Chat allows 5 calls per second per operation, shared with users: an
//! incremental pass costs one ListRooms plus one GetRoom per changed room.

mod passes;

pub use passes::{ListingReport, Passes};

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::store::{Fence, Store, fenced};

/// How often a replica that does not lead asks for the lead: with the
/// lease's [`crate::store::LEASE_TTL`], the bound on a takeover after the
/// leader is cut off.
const CANDIDATE_INTERVAL: Duration = Duration::from_secs(2);

/// After a failed pass, the first and the longest wait before the next
/// (never longer than the interval).
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct ReconcileSettings {
    /// Between incremental passes, and between attempts to become leader.
    pub interval: Duration,
    /// Between full listings, at most.
    pub resync_interval: Duration,
    /// How long a room's confirmation serves cached reads
    /// (`--max-staleness`): full listings come often enough to confirm every
    /// room again before it goes stale, as long as IVS Chat's listing rate
    /// allows (see [`ReconcileSettings::next_full_listing`]).
    pub max_staleness: Duration,
}

impl ReconcileSettings {
    /// How much later than its updateTime a change may first show in IVS
    /// Chat's listing (incremental passes look back this much further).
    pub const LISTING_LAG: Duration = Duration::from_secs(5);

    /// When the next full listing starts, the last having started at
    /// `began` and taken `took`: after `resync_interval`, or sooner, so that
    /// it reaches every room before the confirmations of the last (each as
    /// of its start) are `max_staleness` old. One ListRooms call confirms 50
    /// rooms, one GetRoom one: while listings can keep up (about 250 rooms
    /// per second of `max_staleness` at 5 calls per second), no unchanged
    /// room is read again. A fifth of `max_staleness` is kept spare for a
    /// listing slower than the last; past that, listings run back to back.
    pub fn next_full_listing(&self, began: Instant, took: Duration) -> Instant {
        if self.max_staleness.is_zero() {
            // Nothing is served from the cache by age: confirming is moot.
            return began + self.resync_interval;
        }
        let spare = self.max_staleness / 5;
        let confirm_by = self.max_staleness.saturating_sub(took + spare);
        began + self.resync_interval.min(confirm_by)
    }
}

/// Reconciles whenever this replica leads, until `stop`.
pub async fn run(
    passes: Passes,
    store: Store,
    settings: ReconcileSettings,
    stop: CancellationToken,
) {
    let region = passes.region().to_owned();
    loop {
        let mut leadership = loop {
            match store.try_lead(&region).await {
                Ok(Some(leadership)) => break leadership,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, region, "could not ask for the reconciler's turn")
                }
            }
            // A lease that runs out unrenewed is taken within this.
            if pause(&stop, settings.interval.min(CANDIDATE_INTERVAL))
                .await
                .is_err()
            {
                return;
            }
        };
        // Every write of the passes is fenced by this lease (none on SQLite).
        let fence = leadership.fence();
        tracing::info!(region, "this replica reconciles the cache with IVS Chat");
        // Beside the passes, for as long as this replica leads: reading
        // listed rooms whole (GetRoom's budget, not ListRooms').
        let mut details = std::pin::pin!(under(fence.clone(), passes.complete_details()));
        let mut next_full = Instant::now();
        let mut backoff = FIRST_RETRY;
        loop {
            let full = Instant::now() >= next_full;
            let began = Instant::now();
            // A pass can be long (a first full listing reads every room at
            // 5 per second): it stops at once on shutdown or when the turn
            // is lost meanwhile. Every cache write is a transaction of its
            // own, so a pass cut short leaves nothing half done.
            let pass = tokio::select! {
                () = stop.cancelled() => {
                    leadership.resign().await;
                    return;
                }
                lost = leadership.hold() => {
                    tracing::warn!(error = %lost, region, "lost the reconciler's turn");
                    leadership.resign().await;
                    break;
                }
                pass = under(fence.clone(), one_pass(&passes, full)) => pass,
                never = &mut details => match never {},
            };
            let wait = match pass {
                Ok(()) => {
                    backoff = FIRST_RETRY;
                    if full {
                        next_full = settings.next_full_listing(began, began.elapsed());
                    }
                    settings
                        .interval
                        .min(next_full.saturating_duration_since(Instant::now()))
                }
                Err(e) => {
                    tracing::warn!(error = %e, region, retry_in = ?backoff, "reconciling with IVS Chat failed");
                    let wait = backoff.min(settings.interval);
                    backoff = (backoff * 2).min(LAST_RETRY);
                    wait
                }
            };
            let paused = tokio::select! {
                paused = pause(&stop, wait) => Ok(paused),
                lost = leadership.hold() => Err(lost),
                never = &mut details => match never {},
            };
            match paused {
                Ok(Ok(())) => {}
                Ok(Err(())) => {
                    leadership.resign().await;
                    return;
                }
                Err(lost) => {
                    tracing::warn!(error = %lost, region, "lost the reconciler's turn");
                    leadership.resign().await;
                    break;
                }
            }
        }
    }
}

/// One full listing or one incremental pass, logged; for traces, a span
/// that its calls to IVS Chat and cache transactions are children of.
async fn one_pass(passes: &Passes, full: bool) -> crate::domain::Result<()> {
    let span = tracing::info_span!(
        target: crate::telemetry::traces::SPANS,
        "reconcile.pass",
        region = passes.region(),
        kind = if full { "full" } else { "recent" },
    );
    let result = pass(passes, full).instrument(span).await;
    metrics::counter!(
        crate::telemetry::RECONCILE_RUNS,
        "region" => passes.region().to_owned(),
        "kind" => if full { "full" } else { "recent" },
        "result" => if result.is_ok() { "ok" } else { "error" },
    )
    .increment(1);
    result
}

async fn pass(passes: &Passes, full: bool) -> crate::domain::Result<()> {
    if full {
        let report = passes.full_listing().await?;
        tracing::info!(
            region = passes.region(),
            listed = report.listed,
            fetched = report.fetched,
            deleted = report.deleted,
            details_pending = report.pending,
            "full listing of IVS Chat complete"
        );
    } else {
        let report = passes.reconcile_recent().await?;
        if report.fetched > 0 {
            tracing::info!(
                region = passes.region(),
                listed = report.listed,
                fetched = report.fetched,
                "found rooms changed in IVS Chat"
            );
        }
    }
    Ok(())
}

/// `work` with its cache writes fenced by `fence`, when there is one.
async fn under<T>(fence: Option<Fence>, work: impl Future<Output = T>) -> T {
    match fence {
        Some(fence) => fenced(fence, work).await,
        None => work.await,
    }
}

/// Sleeps for `d`; `Err` when stopped meanwhile.
async fn pause(stop: &CancellationToken, d: Duration) -> Result<(), ()> {
    tokio::select! {
        () = stop.cancelled() => Err(()),
        () = tokio::time::sleep(d) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(resync: u64, staleness: u64) -> ReconcileSettings {
        ReconcileSettings {
            interval: Duration::from_secs(5),
            resync_interval: Duration::from_secs(resync),
            max_staleness: Duration::from_secs(staleness),
        }
    }

    #[test]
    fn full_listings_confirm_every_room_before_it_goes_stale() {
        let began = Instant::now();
        let secs = Duration::from_secs;
        // 60 s of staleness, a 2 s listing: the next starts 60 - 2 - 12 s on.
        assert_eq!(
            settings(300, 60).next_full_listing(began, secs(2)),
            began + secs(46)
        );
        // Staleness longer than the resync interval: the resync interval.
        assert_eq!(
            settings(300, 3600).next_full_listing(began, secs(2)),
            began + secs(300)
        );
        // Past the floor (the listing outlasts the staleness): back to back.
        assert_eq!(settings(300, 60).next_full_listing(began, secs(70)), began);
        // No staleness served: nothing to confirm for.
        assert_eq!(
            settings(300, 0).next_full_listing(began, secs(2)),
            began + secs(300)
        );
    }
}
