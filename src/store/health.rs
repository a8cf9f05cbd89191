//! Bounds on the database: how long a statement may keep this process
//! waiting, how long a Postgres session cut off from it may hold a lock the
//! fleet needs, and whether the database answers this replica at all.
//!
//! Released sqlx has no TCP keepalive or timeout of its own: a connection
//! whose packets are dropped silently (a network partition, a proxy that
//! forwards nothing) hangs every statement on it until the kernel gives up,
//! about 15 minutes of retransmissions later. So the bounds are in two
//! places:
//!
//! - **the server** (every session this service opens sets them,
//!   [`SESSION_SETTINGS`]): a transaction that stays idle longer than
//!   [`HELD_LOCK_BOUND`] is ended by Postgres with its locks, which is what
//!   frees the change log's revision row, or a room's turn, from a writer
//!   cut off in the middle of its transaction, whether or not a proxy
//!   between them answers TCP keepalives; a statement waits for a lock at
//!   most `lock_timeout`; keepalives and `tcp_user_timeout` end the sessions
//!   of a peer whose host vanished, where no proxy hides it;
//! - **this process** ([`Store::bounded`]): every operation on Postgres gives
//!   up after [`DATABASE_DEADLINE`] with UNAVAILABLE, so nothing here (a
//!   room's local turn, a flight, an exchange) waits on a dead connection;
//!   a write whose COMMIT was sent but not answered says the change may have
//!   been recorded.
//!
//! When an operation fails so, the store suspects the database is away and
//! probes it; while the probe fails, [`Store::away`] says since when and
//! why, so cached reads answer from memory, or refuse, at once.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use sqlx::Connection as _;

use super::{Backend, Store, error};
use crate::domain::{Error, Result};

/// The longest a Postgres transaction may sit idle (its client silent)
/// before Postgres ends it and frees its locks: the bound on how long a
/// replica cut off in the middle of a write can hold up every other
/// replica's writes. Live transactions never idle that long: a write's
/// statements follow each other at once, and a room's turn, held while IVS
/// Chat answers, sends a statement every [`TURN_HEARTBEAT`].
pub const HELD_LOCK_BOUND: Duration = Duration::from_secs(4);

/// The longest a replica's write can be held up by another replica cut off
/// in the middle of its own: [`HELD_LOCK_BOUND`], then a second for the
/// write itself.
pub const WRITE_STALL_BOUND: Duration = Duration::from_secs(5);

/// How often a held room's turn tells Postgres it is still alive.
pub const TURN_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a statement on Postgres waits for a lock before it fails
/// (UNAVAILABLE, "busy"): longer than [`HELD_LOCK_BOUND`], so a writer that
/// waits behind a cut-off one gets through once Postgres ends it.
pub const LOCK_WAIT: Duration = Duration::from_secs(6);

/// The longest any operation on Postgres keeps this process waiting
/// (a connection from the pool included) before UNAVAILABLE.
pub const DATABASE_DEADLINE: Duration = Duration::from_secs(10);

/// How long the probe of a database suspected away waits for its answer,
/// and how long it rests between probes.
const PROBE_WAIT: Duration = Duration::from_secs(1);
const PROBE_REST: Duration = Duration::from_millis(500);

/// What every Postgres session of the service sets (cache, turns,
/// listener): see the module's doc.
pub(super) fn session_settings() -> String {
    format!(
        "SET idle_in_transaction_session_timeout = {idle}; SET lock_timeout = {lock}; \
         SET statement_timeout = 30000; SET tcp_keepalives_idle = 5; \
         SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3; \
         SET tcp_user_timeout = 10000",
        idle = HELD_LOCK_BOUND.as_millis(),
        lock = LOCK_WAIT.as_millis(),
    )
}

/// Whether the database answers this process.
#[derive(Default)]
pub(super) struct Health {
    /// A probe is running (the database is suspected away).
    probing: AtomicBool,
    /// The database did not answer a probe: since when, and the first
    /// failure that made it suspect.
    away: Mutex<Option<Away>>,
}

/// The database did not answer this replica.
#[derive(Debug, Clone)]
pub struct Away {
    pub since: Instant,
    pub cause: String,
}

impl Away {
    /// What a request refused meanwhile is told.
    pub fn describe(&self) -> String {
        format!(
            "the cache database has not answered this replica for {} s ({})",
            self.since.elapsed().as_secs(),
            self.cause
        )
    }
}

/// Tracks whether a write's COMMIT has been sent: past that, a failure
/// leaves its outcome unknown.
#[derive(Default)]
pub(super) struct Committing(AtomicBool);

impl Committing {
    pub(super) fn start(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn started(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The error of a write whose COMMIT was sent and not answered.
pub(super) fn uncertain(cause: &str) -> Error {
    Error::unavailable(format!(
        "the cache database did not answer a write's commit ({cause}): the change may or \
         may not have been recorded; the reconciler settles it"
    ))
}

impl Store {
    /// `work`, given at most [`DATABASE_DEADLINE`] on Postgres (SQLite is in
    /// this process: it cannot be cut off). A failure to reach the database
    /// makes it suspect; a success clears that.
    pub(super) async fn bounded<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        self.bounded_write(&Committing::default(), work).await
    }

    /// [`Store::bounded`] for a write transaction that calls
    /// `committing.start()` before its COMMIT: one that fails after that
    /// says its change may have been recorded.
    pub(super) async fn bounded_write<T>(
        &self,
        committing: &Committing,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if self.backend != Backend::Postgres {
            return work.await;
        }
        let result = match tokio::time::timeout(DATABASE_DEADLINE, work).await {
            Ok(result) => result,
            Err(_) => {
                error::count_error("unavailable");
                let cause = format!("no answer within {} s", DATABASE_DEADLINE.as_secs());
                self.suspect(&cause);
                return Err(if committing.started() {
                    uncertain(&cause)
                } else {
                    Error::unavailable(format!("the cache database did not answer ({cause})"))
                });
            }
        };
        match &result {
            Ok(_) => self.answered(),
            Err(Error::Unavailable { message, .. })
                if message.starts_with(error::CONNECTION_FAILED) =>
            {
                self.suspect(message);
                if committing.started() {
                    return Err(uncertain(message));
                }
            }
            Err(_) => {}
        }
        result
    }

    /// The database did not answer in time (or its connection failed):
    /// probe it until it does; meanwhile [`Store::away`] says so.
    pub fn suspect(&self, cause: &str) {
        if self.backend != Backend::Postgres || self.health.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = self.clone();
        let cause = cause.to_owned();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.health.probing.store(false, Ordering::SeqCst);
            return;
        };
        runtime.spawn(async move {
            let suspected = Instant::now();
            loop {
                // A connection of its own: the pool's may all be busy, or
                // dead, and neither says whether the database answers.
                let probe = tokio::time::timeout(PROBE_WAIT, async {
                    let mut conn = sqlx::AnyConnection::connect(&store.url).await?;
                    sqlx::query("SELECT 1").execute(&mut conn).await?;
                    conn.close().await
                })
                .await;
                if matches!(probe, Ok(Ok(()))) {
                    store.answered();
                    store.health.probing.store(false, Ordering::SeqCst);
                    return;
                }
                {
                    let mut away = store.health.away.lock().expect("store health");
                    if away.is_none() {
                        tracing::warn!(cause, "the cache database does not answer this replica");
                        *away = Some(Away {
                            since: suspected,
                            cause: cause.clone(),
                        });
                    }
                }
                if store.pool.is_closed() {
                    store.health.probing.store(false, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(PROBE_REST).await;
            }
        });
    }

    /// The database answered: it is not away.
    fn answered(&self) {
        let mut away = self.health.away.lock().expect("store health");
        if let Some(was) = away.take() {
            tracing::info!(
                away_for = ?was.since.elapsed(),
                "the cache database answers this replica again"
            );
        }
    }

    /// Since when, and why, the database has not answered this replica
    /// (`None`: it answers, as far as this process knows).
    pub fn away(&self) -> Option<Away> {
        self.health.away.lock().expect("store health").clone()
    }
}

/// Shared by a store's clones.
pub(super) type SharedHealth = Arc<Health>;
