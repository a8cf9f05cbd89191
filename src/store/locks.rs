//! Turns among replicas sharing Postgres: the reconcilers' leadership (a
//! session advisory lock per region) and rooms' turns (transaction-scoped
//! advisory locks on connections of their own).

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

/// How long taking or checking the reconciler's turn may take.
pub(super) const LEADERSHIP_TIMEOUT: Duration = Duration::from_secs(10);

/// This replica's turn to reconcile; see [`Store::try_lead`]. Dropping it
/// gives the turn up.
pub struct Leadership {
    conn: Option<AnyConnection>,
}

impl Leadership {
    /// Whether the turn is still held: the connection holding it still works.
    pub async fn check(&mut self) -> Result<()> {
        if let Some(conn) = &mut self.conn {
            tokio::time::timeout(LEADERSHIP_TIMEOUT, sqlx::query("SELECT 1").execute(conn))
                .await
                .map_err(|_| {
                    error::count_error("unavailable");
                    Error::unavailable("the cache database did not answer")
                })??;
        }
        Ok(())
    }

    /// Gives the turn up at once.
    pub async fn resign(mut self) {
        if let Some(conn) = self.conn.take() {
            // A dead connection frees the lock as surely as a closed one.
            let _ = tokio::time::timeout(LEADERSHIP_TIMEOUT, conn.close()).await;
        }
    }
}

/// One room's turn to be written, among replicas: see [`Store::lock_room`].
/// End it with [`RoomLock::release`]; dropped, it ends when its connection
/// next rolls back.
pub struct RoomLock {
    tx: Option<Transaction<'static, Any>>,
}

impl RoomLock {
    pub async fn release(mut self) {
        if let Some(tx) = self.tx.take()
            && let Err(e) = tx.commit().await
        {
            // The lock ends with the transaction or its connection either way.
            tracing::warn!(error = %e, "could not end a room's write turn cleanly");
        }
    }
}

impl Store {
    /// Tries to become the one replica that reconciles `region`'s rooms with
    /// its IVS Chat. On Postgres this is a session advisory lock (one per
    /// region) on a connection of its own: it is held while that connection
    /// lives, so it passes to another replica when this one dies. SQLite
    /// serves one process: it always leads.
    pub async fn try_lead(&self, region: &str) -> Result<Option<Leadership>> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(Leadership { conn: None }));
        }
        let attempt = async {
            let mut conn = AnyConnection::connect(&self.url).await?;
            // Postgres notices a vanished replica (host down, network cut)
            // within about half a minute and frees the lock for another;
            // without these it takes the OS default, hours.
            sqlx::raw_sql(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                 SET tcp_keepalives_count = 3",
            )
            .execute(&mut conn)
            .await?;
            let led: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(leader_lock_key(region))
                .fetch_one(&mut conn)
                .await?;
            Ok::<_, sqlx::Error>((conn, led))
        };
        let (conn, led) = tokio::time::timeout(LEADERSHIP_TIMEOUT, attempt)
            .await
            .map_err(|_| {
                error::count_error("unavailable");
                Error::unavailable("the cache database did not answer")
            })??;
        if led {
            Ok(Some(Leadership { conn: Some(conn) }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Waits for `arn`'s turn to be written among replicas sharing the
    /// database: on Postgres a transaction-scoped advisory lock, held by a
    /// transaction (and connection) of its own until released, and freed by
    /// Postgres if this process dies. SQLite serves one process, whose own
    /// per-room turns suffice.
    #[tracing::instrument(target = SPANS, name = "cache.lock_room", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn lock_room(&self, arn: &RoomArn) -> Result<RoomLock> {
        let Some(turns) = &self.turns else {
            return Ok(RoomLock { tx: None });
        };
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
        Ok(RoomLock { tx: Some(tx) })
    }
}

/// The advisory-lock key of a room's write turn: 63 bits of its ARN's
/// SHA-256, kept apart from [`LEADER_LOCK`].
pub(super) fn room_lock_key(arn: &RoomArn) -> i64 {
    lock_key(arn.as_str())
}

/// The advisory-lock key of `region`'s reconciler: a hash of
/// `reconciler:REGION` (an ARN never starts so, so it is no room's key).
pub(super) fn leader_lock_key(region: &str) -> i64 {
    lock_key(&format!("reconciler:{region}"))
}

/// 63 bits of `name`'s SHA-256, never [`LEADER_LOCK`].
fn lock_key(name: &str) -> i64 {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) & i64::MAX;
    if key == LEADER_LOCK { key + 1 } else { key }
}
