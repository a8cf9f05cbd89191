//! The reconciler: finds changes made in IVS Chat behind this service's back.
//!
//! One replica at a time reconciles (the store's leadership: a Postgres
//! advisory lock, passed on when its holder dies; SQLite has one process).
//! The leader starts with a full listing, then every `interval` looks at the
//! most recently updated rooms (usually one ListRooms call), and every
//! `resync_interval` lists everything again to find deletions, creations and
//! tag-only changes further down the list. Other replicas wait for their turn.
//!
//! IVS Chat allows 5 calls per second per operation, shared with users: an
//! incremental pass costs one ListRooms plus one GetRoom per changed room.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::rooms::Rooms;
use crate::store::Store;

/// After a failed pass, the first and the longest wait before the next
/// (never longer than the interval).
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct ReconcileSettings {
    /// Between incremental passes, and between attempts to become leader.
    pub interval: Duration,
    /// Between full listings.
    pub resync_interval: Duration,
}

/// Reconciles whenever this replica leads, until `stop`.
pub async fn run(rooms: Rooms, store: Store, settings: ReconcileSettings, stop: CancellationToken) {
    loop {
        let mut leadership = loop {
            match store.try_lead().await {
                Ok(Some(leadership)) => break leadership,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "could not ask for the reconciler's turn"),
            }
            if pause(&stop, settings.interval).await.is_err() {
                return;
            }
        };
        tracing::info!("this replica reconciles the cache with IVS Chat");
        let mut next_full = Instant::now();
        let mut backoff = FIRST_RETRY;
        loop {
            let pass = if Instant::now() >= next_full {
                rooms.full_listing().await.map(|report| {
                    next_full = Instant::now() + settings.resync_interval;
                    tracing::info!(
                        listed = report.listed,
                        fetched = report.fetched,
                        deleted = report.deleted,
                        "full listing of IVS Chat complete"
                    );
                })
            } else {
                rooms.reconcile_recent().await.map(|report| {
                    if report.fetched > 0 {
                        tracing::info!(
                            listed = report.listed,
                            fetched = report.fetched,
                            "found rooms changed in IVS Chat"
                        );
                    }
                })
            };
            let wait = match pass {
                Ok(()) => {
                    backoff = FIRST_RETRY;
                    settings.interval
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "reconciling with IVS Chat failed");
                    let wait = backoff.min(settings.interval);
                    backoff = (backoff * 2).min(LAST_RETRY);
                    wait
                }
            };
            if pause(&stop, wait).await.is_err() {
                leadership.resign().await;
                return;
            }
            if let Err(e) = leadership.check().await {
                tracing::warn!(error = %e, "lost the reconciler's turn");
                leadership.resign().await;
                break;
            }
        }
    }
}

/// Sleeps for `d`; `Err` when stopped meanwhile.
async fn pause(stop: &CancellationToken, d: Duration) -> Result<(), ()> {
    tokio::select! {
        () = stop.cancelled() => Err(()),
        () = tokio::time::sleep(d) => Ok(()),
    }
}
