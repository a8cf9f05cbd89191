//! Turns among replicas sharing Postgres: the reconcilers' leadership (a
//! lease per region, renewed by its holder, fencing its passes' writes) and
//! rooms' turns (transaction-scoped advisory locks on connections of their
//! own, kept alive by a heartbeat).

use super::budget::db_now;
use super::health::{HELD_LOCK_BOUND, TURN_HEARTBEAT};
use super::*;

/// The Postgres advisory lock held by the replica that reconciled when one
/// region was served ("ivsr"); kept apart from every other key.
pub(super) const LEADER_LOCK: i64 = 0x6976_7372;

/// How long a write waits for a connection to hold a room's turn, and then
/// for the turn itself, before UNAVAILABLE (a literal for `SET LOCAL`).
macro_rules! room_turn_timeout {
    () => {
        "10s"
    };
}

pub(super) const ROOM_TURN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a reconciler's lease lasts from each renewal, on the database's
/// clock.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// How often a leader renews its lease: three tries before it runs out.
pub const LEASE_RENEWAL: Duration = Duration::from_secs(3);

/// How soon a leader tries again after a renewal failed.
const RENEWAL_RETRY: Duration = Duration::from_millis(500);

/// How long before its lease runs out (as this replica's clock judges it,
/// from when the renewal that set it was sent) a leader that could not renew
/// stops: its passes end before any other replica can take the lead.
const STEP_DOWN_MARGIN: Duration = Duration::from_secs(1);

/// What a reconciler's writes prove they may still make: the lease of
/// `scope` as of `generation`. Set for a pass with [`fenced`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub scope: String,
    pub generation: i64,
}

tokio::task_local! {
    /// The lease the writes of the task's current pass are made under.
    static FENCE: Fence;
}

/// Runs `work` (a reconciler's pass) with every cache write it makes
/// fenced by `fence`: a write refused once the lease has ended or passed to
/// another replica. A task-local rather than a parameter: the passes write
/// through the same `rooms` paths as users' reads (`refresh`, `keep`,
/// `forget`), which know nothing of leadership.
pub async fn fenced<T>(fence: Fence, work: impl Future<Output = T>) -> T {
    FENCE.scope(fence, work).await
}

/// The fence of the task's pass, if any.
pub(super) fn current_fence() -> Option<Fence> {
    FENCE.try_with(Fence::clone).ok()
}

/// The first words of the error of a write fenced by a lease that ended.
pub const DEPOSED: &str = "this replica no longer leads";

/// Checks, in a write transaction holding the revision row (so no takeover
/// commits between this check and the write's commit), that the task's
/// fence still holds.
pub(super) async fn check_fence(tx: &mut Transaction<'static, Any>) -> Result<()> {
    let Some(fence) = current_fence() else {
        return Ok(());
    };
    let holds: Option<i64> = sqlx::query_scalar(concat!(
        "SELECT generation FROM leader_leases WHERE scope = $1 AND generation = $2 \
           AND expires_at > ",
        db_now!()
    ))
    .bind(&fence.scope)
    .bind(fence.generation)
    .fetch_optional(&mut **tx)
    .await?;
    if holds.is_none() {
        return Err(Error::unavailable(format!(
            "{DEPOSED} the reconciler of {} (its lease, generation {}, has ended): \
             the pass stops writing",
            fence.scope, fence.generation
        )));
    }
    Ok(())
}

/// This replica's turn to reconcile a region; see [`Store::try_lead`].
pub struct Leadership {
    lease: Option<Lease>,
}

struct Lease {
    store: Store,
    fence: Fence,
    holder: String,
    ttl: Duration,
    /// Until when this replica may act as leader: the last renewal's send
    /// time plus the lease, less a margin.
    valid_until: tokio::time::Instant,
    /// When the renewal that set `valid_until` was sent.
    renewed_at: tokio::time::Instant,
}

impl Leadership {
    /// The fence of this lease (none on SQLite, where one process leads).
    pub fn fence(&self) -> Option<Fence> {
        self.lease.as_ref().map(|l| l.fence.clone())
    }

    /// Renews the lease once: `Err` when it has ended (taken over, or not
    /// renewed in time) or the database did not answer before it would.
    pub async fn check(&mut self) -> Result<()> {
        let Some(lease) = &mut self.lease else {
            return Ok(());
        };
        lease.renew().await
    }

    /// Keeps the lease, renewing it every [`LEASE_RENEWAL`]; completes only
    /// when it is lost, at the latest when it would run out unrenewed (less
    /// a margin), so that the caller stops leading before another replica
    /// can start.
    pub async fn hold(&mut self) -> Error {
        let Some(lease) = &mut self.lease else {
            return std::future::pending().await;
        };
        loop {
            // From the last renewal, not from this call: `hold` is polled
            // afresh beside each pass and each pause.
            tokio::time::sleep_until(lease.renewed_at + lease.renewal_interval()).await;
            match lease.renew().await {
                Ok(()) => {}
                // A passing failure (a busy database, a connection lost
                // and made again) is tried again while the lease holds.
                Err(e)
                    if !e.to_string().contains(DEPOSED)
                        && tokio::time::Instant::now() + RENEWAL_RETRY < lease.valid_until =>
                {
                    tracing::debug!(error = %e, "a lease renewal failed; trying again");
                    tokio::time::sleep(RENEWAL_RETRY).await;
                }
                Err(e) => return e,
            }
        }
    }

    /// Gives the turn up at once (another replica may take it without
    /// waiting for the lease to run out).
    pub async fn resign(mut self) {
        if let Some(lease) = self.lease.take() {
            let ended = tokio::time::timeout(
                LEASE_RENEWAL,
                sqlx::query(concat!(
                    "UPDATE leader_leases SET expires_at = ",
                    db_now!(),
                    " WHERE scope = $1 AND generation = $2 AND holder = $3"
                ))
                .bind(&lease.fence.scope)
                .bind(lease.fence.generation)
                .bind(&lease.holder)
                .execute(&lease.store.pool),
            )
            .await;
            if !matches!(ended, Ok(Ok(_))) {
                // It runs out by itself.
                tracing::debug!(scope = lease.fence.scope, "could not end a lease early");
            }
        }
    }
}

impl Lease {
    fn renewal_interval(&self) -> Duration {
        LEASE_RENEWAL.min(self.ttl / 3)
    }

    async fn renew(&mut self) -> Result<()> {
        let sent = tokio::time::Instant::now();
        // Only while valid: past that another replica may already lead.
        let left = self.valid_until.saturating_duration_since(sent);
        let renewed = tokio::time::timeout(
            left,
            sqlx::query(concat!(
                "UPDATE leader_leases SET expires_at = ",
                db_now!(),
                " + $4 WHERE scope = $1 AND generation = $2 AND holder = $3 AND expires_at > ",
                db_now!()
            ))
            .bind(&self.fence.scope)
            .bind(self.fence.generation)
            .bind(&self.holder)
            .bind(nanos(self.ttl))
            .execute(&self.store.pool),
        )
        .await;
        match renewed {
            Ok(Ok(done)) if done.rows_affected() == 1 => {
                self.valid_until = sent + self.ttl.saturating_sub(STEP_DOWN_MARGIN);
                self.renewed_at = sent;
                Ok(())
            }
            Ok(Ok(_)) => Err(Error::unavailable(format!(
                "{DEPOSED} the reconciler of {}: its lease (generation {}) ended or passed on",
                self.fence.scope, self.fence.generation
            ))),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                error::count_error("unavailable");
                self.store.suspect("a lease renewal got no answer");
                Err(Error::unavailable(format!(
                    "the cache database did not answer the renewal of the reconciler's lease \
                     on {} before it would run out",
                    self.fence.scope
                )))
            }
        }
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// One room's turn to be written, among replicas: see [`Store::lock_room`].
/// End it with [`RoomLock::release`]; dropped, it ends as soon as its
/// heartbeat notices.
pub struct RoomLock {
    held: Option<HeldTurn>,
}

struct HeldTurn {
    release: tokio::sync::oneshot::Sender<()>,
    ended: tokio::task::JoinHandle<()>,
}

impl RoomLock {
    pub async fn release(mut self) {
        if let Some(held) = self.held.take() {
            let _ = held.release.send(());
            // The commit is bounded by the session's own settings; waiting
            // for it keeps this process's next turn from queueing behind it.
            let _ = tokio::time::timeout(HELD_LOCK_BOUND, held.ended).await;
        }
    }
}

impl Store {
    /// Tries to become the one replica that reconciles `region`'s rooms with
    /// its IVS Chat, for [`LEASE_TTL`] at a time. SQLite serves one process:
    /// it always leads.
    pub async fn try_lead(&self, region: &str) -> Result<Option<Leadership>> {
        self.try_lead_for(region, LEASE_TTL).await
    }

    /// [`Store::try_lead`] with a lease of `ttl`. On Postgres a lease row
    /// per region, taken only once the last holder's lease has run out (on
    /// the database's clock), each taking a new generation; taken under
    /// the change log's revision lock, so that no write fenced by the old
    /// generation commits after it.
    pub async fn try_lead_for(&self, region: &str, ttl: Duration) -> Result<Option<Leadership>> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(Leadership { lease: None }));
        }
        let holder = format!(
            "{}-{}-{:016x}",
            hostname(),
            std::process::id(),
            rand::random::<u64>()
        );
        // Most asks find the lease held: one read, no revision lock.
        let free: Option<bool> = self
            .bounded(async {
                Ok(sqlx::query_scalar(concat!(
                    "SELECT expires_at <= ",
                    db_now!(),
                    " FROM leader_leases WHERE scope = $1"
                ))
                .bind(region)
                .fetch_optional(&self.pool)
                .await?)
            })
            .await?;
        if free == Some(false) {
            return Ok(None);
        }
        let sent = tokio::time::Instant::now();
        let committing = health::Committing::default();
        let generation = self
            .bounded_write(&committing, async {
                let mut tx = self.begin_write().await?;
                let generation: Option<i64> = sqlx::query_scalar(concat!(
                    "INSERT INTO leader_leases AS l (scope, holder, generation, expires_at) \
                     VALUES ($1, $2, 1, ",
                    db_now!(),
                    " + $3) \
                     ON CONFLICT (scope) DO UPDATE SET holder = excluded.holder, \
                       generation = l.generation + 1, expires_at = excluded.expires_at \
                     WHERE l.expires_at <= ",
                    db_now!(),
                    " RETURNING generation"
                ))
                .bind(region)
                .bind(&holder)
                .bind(nanos(ttl))
                .fetch_optional(&mut *tx)
                .await?;
                self.commit(tx, None, &committing).await?;
                Ok(generation)
            })
            .await?;
        Ok(generation.map(|generation| Leadership {
            lease: Some(Lease {
                store: self.clone(),
                fence: Fence {
                    scope: region.to_owned(),
                    generation,
                },
                holder,
                ttl,
                valid_until: sent + ttl.saturating_sub(STEP_DOWN_MARGIN),
                renewed_at: sent,
            }),
        }))
    }

    /// Waits for `arn`'s turn to be written among replicas sharing the
    /// database: on Postgres a transaction-scoped advisory lock, held by a
    /// transaction (and connection) of its own until released, which sends
    /// a heartbeat every [`TURN_HEARTBEAT`] meanwhile: a replica cut off
    /// while it holds a turn stops sending them, and Postgres ends its
    /// session, freeing the turn, within [`HELD_LOCK_BOUND`]. SQLite serves
    /// one process, whose own per-room turns suffice.
    #[tracing::instrument(target = SPANS, name = "cache.lock_room", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn lock_room(&self, arn: &RoomArn) -> Result<RoomLock> {
        let Some(turns) = &self.turns else {
            return Ok(RoomLock { held: None });
        };
        let tx = self
            .bounded(async {
                let mut tx = turns.begin().await?;
                // Waiting longer fails with 55P03: UNAVAILABLE, nothing sent upstream.
                sqlx::query(concat!(
                    "SET LOCAL lock_timeout = '",
                    room_turn_timeout!(),
                    "'"
                ))
                .execute(&mut *tx)
                .await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(room_lock_key(arn))
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            })
            .await?;
        let (release, released) = tokio::sync::oneshot::channel();
        let ended = tokio::spawn(hold_turn(tx, released));
        Ok(RoomLock {
            held: Some(HeldTurn { release, ended }),
        })
    }
}

/// Holds a room's turn (`tx`) until `released` (sent or dropped), with a
/// heartbeat so that Postgres does not end it as idle; a heartbeat that is
/// not answered in time gives the turn up (the session is ended by Postgres
/// meanwhile, or soon).
async fn hold_turn(
    mut tx: Transaction<'static, Any>,
    mut released: tokio::sync::oneshot::Receiver<()>,
) {
    let mut beat = tokio::time::interval(TURN_HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.reset();
    loop {
        tokio::select! {
            _ = &mut released => break,
            _ = beat.tick() => {
                let alive = tokio::time::timeout(
                    HELD_LOCK_BOUND,
                    sqlx::query("SELECT 1").execute(&mut *tx),
                )
                .await;
                if !matches!(alive, Ok(Ok(_))) {
                    tracing::warn!("a room's turn got no answer to its heartbeat: given up");
                    return;
                }
            }
        }
    }
    match tokio::time::timeout(HELD_LOCK_BOUND, tx.commit()).await {
        Ok(Ok(())) => {}
        // The lock ends with the transaction or its session either way.
        Ok(Err(e)) => tracing::warn!(error = %e, "could not end a room's write turn cleanly"),
        Err(_) => tracing::warn!("ending a room's write turn got no answer"),
    }
}

/// This host's name, for a lease's holder (operators read it).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".to_owned())
}

/// The advisory-lock key of a room's write turn: 63 bits of its ARN's
/// SHA-256, kept apart from [`LEADER_LOCK`].
pub(super) fn room_lock_key(arn: &RoomArn) -> i64 {
    lock_key(arn.as_str())
}

/// 63 bits of `name`'s SHA-256, never [`LEADER_LOCK`].
fn lock_key(name: &str) -> i64 {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) & i64::MAX;
    if key == LEADER_LOCK { key + 1 } else { key }
}
