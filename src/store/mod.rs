//! The persistent room cache: the only home of SQL.
//!
//! One set of statements serves SQLite and Postgres through sqlx's `Any`
//! driver: both understand `$N` parameters, `ON CONFLICT ... DO UPDATE ...
//! WHERE`, and BIGINT/TEXT columns. Each backend has its own migrations
//! (`migrations/sqlite`, `migrations/postgres`), run at startup.
//!
//! Architecture invariant: a stored room is only ever replaced by a version
//! whose `update_time` is newer, or equal and observed no earlier (a tag change
//! does not move `updateTime`); a room IVS Chat said is gone (a tombstone) only
//! comes back with an answer to a call that started after that. Each rule is
//! the `WHERE` of one SQL statement, so it holds whatever the interleaving of
//! writers, in one process or many.

mod budget;
mod requests;

pub use budget::{BudgetPause, Slot};
pub use requests::Claim;

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyConnection, AnyPool, Connection as _, Row as _, Transaction};
use tokio::sync::watch;

use crate::domain::{
    Error, EventKind, EventSource, FallbackResult, ListQuery, ListedPage, MessageReviewHandler,
    PageCursor, Result, Room, RoomArn, RoomEvent, Timestamp,
};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The Postgres channel a commit with events is announced on (payload: the
/// newest revision), so that replicas sharing the database learn of it.
const EVENTS_CHANNEL: &str = "ivschat_rooms_events";

/// The Postgres channel a throttling pause of the fleet's budget is
/// announced on (`store::budget`), so replicas stop using slots they booked.
const BUDGET_CHANNEL: &str = "ivschat_rooms_budget_pauses";

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A cached room and what the cache knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRoom {
    pub room: Room,
    /// When IVS Chat last confirmed this version.
    pub validated_at: Timestamp,
    /// IVS Chat said the room is gone (at `validated_at`).
    pub deleted: bool,
}

/// The cache and its change log. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Postgres: connections that hold rooms' write turns (see
    /// [`Store::lock_room`]), apart from `pool`, so that writes waiting for
    /// IVS Chat while holding a turn cannot starve the cache of connections.
    turns: Option<AnyPool>,
    backend: Backend,
    url: Arc<str>,
    /// The newest revision this process knows to be committed: raised by its
    /// own commits, and on Postgres by other replicas' notifications.
    committed: Arc<watch::Sender<u64>>,
    /// Throttling pauses of the fleet's budget, as replicas announce them.
    pauses: tokio::sync::broadcast::Sender<BudgetPause>,
}

/// The Postgres advisory lock held by the replica that reconciles ("ivsr").
const LEADER_LOCK: i64 = 0x6976_7372;

/// Connections of the cache's pool on Postgres.
const CACHE_CONNECTIONS: u32 = 12;

/// Rooms whose turn this process can hold or wait for at once on Postgres
/// (one connection each; AWS allows 5 calls per second and operation); more
/// wait for a connection, then UNAVAILABLE. With the cache's pool, the
/// reconciler's and the listener's, a replica holds at most 26 connections:
/// three fit a default Postgres (`max_connections` 100) with room to spare.
const ROOM_TURN_CONNECTIONS: u32 = 12;

/// How long a write waits for a connection to hold a room's turn, and then
/// for the turn itself, before UNAVAILABLE (a literal for `SET LOCAL`).
macro_rules! room_turn_timeout {
    () => {
        "10s"
    };
}
const ROOM_TURN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long taking or checking the reconciler's turn may take.
const LEADERSHIP_TIMEOUT: Duration = Duration::from_secs(10);

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
                .map_err(|_| Error::Unavailable("the cache database did not answer".into()))??;
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

/// Rooms as of one revision of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: u64,
    pub rooms: Vec<Room>,
}

/// The `rooms` columns, in the order `room` reads them; a macro so statements
/// stay `&'static str` (sqlx refuses SQL built at run time).
macro_rules! columns {
    () => {
        "arn, id, name, create_time, update_time, \
         maximum_message_rate_per_second, maximum_message_length, review_handler_uri, \
         review_handler_fallback, tags, logging_configuration_identifiers, validated_at, deleted_at"
    };
}

/// The `room_events` columns, in the order `event` reads them.
macro_rules! event_columns {
    () => {
        "revision, arn, kind, source, observed_at, room, previous, changed_fields"
    };
}

const FULL_LISTING_AT: &str = "full_listing_at";

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://...`) and runs the
    /// migrations. A SQLite file and its directory are created if missing.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            (Backend::Sqlite, sqlite_url(url)?)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (Backend::Postgres, url.to_owned())
        } else {
            anyhow::bail!("database URL must start with sqlite:// or postgres://, got {url}");
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => CACHE_CONNECTIONS,
            })
            .acquire_timeout(Duration::from_secs(10))
            // An embedded database's connections do not go stale: no ping
            // (a round trip to the connection's thread) before each use.
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers go on while one connection writes;
                        // writers wait up to busy_timeout rather than fail.
                        // FULL: a commit survives power loss too, so a
                        // revision a watcher has seen is never handed out again.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = FULL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| format!("could not connect to database {}", redact(&url)))?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await,
        }
        .context("could not run database migrations")?;
        let turns = (backend == Backend::Postgres).then(|| {
            AnyPoolOptions::new()
                .max_connections(ROOM_TURN_CONNECTIONS)
                .acquire_timeout(ROOM_TURN_TIMEOUT)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // A replica that vanishes (host down, network cut)
                        // frees its turns within about half a minute.
                        sqlx::raw_sql(
                            "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                             SET tcp_keepalives_count = 3",
                        )
                        .execute(conn)
                        .await?;
                        Ok(())
                    })
                })
                .connect_lazy(&url)
        });
        let store = Store {
            pool,
            turns: turns.transpose()?,
            backend,
            url: url.into(),
            committed: Arc::new(watch::Sender::new(0)),
            pauses: tokio::sync::broadcast::Sender::new(64),
        };
        let revision = store.revision().await?;
        store.committed.send_replace(revision);
        Ok(store)
    }

    /// The cached row for `arn`, tombstones included.
    pub async fn get(&self, arn: &RoomArn) -> Result<Option<CachedRoom>> {
        let mut conn = self.pool.acquire().await?;
        get_row(&mut conn, arn).await
    }

    /// The cached row for `arn` and the change-log revision it reflects, read
    /// in one transaction.
    pub async fn get_at_revision(&self, arn: &RoomArn) -> Result<(Option<CachedRoom>, u64)> {
        let mut tx = self.begin_read().await?;
        let revision = revision_in(&mut tx).await?;
        let row = get_row(&mut tx, arn).await?;
        tx.commit().await?;
        Ok((row, revision))
    }

    /// Up to `limit` cached rows (tombstones included), most recently
    /// confirmed first, and the revision they reflect, read in one transaction.
    pub async fn rows_at_revision(&self, limit: usize) -> Result<(Vec<CachedRoom>, u64)> {
        let mut tx = self.begin_read().await?;
        let revision = revision_in(&mut tx).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM rooms ORDER BY validated_at DESC LIMIT $1"
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let rows = rows.iter().map(cached_room).collect::<Result<_>>()?;
        Ok((rows, revision))
    }

    /// Stores `room` as IVS Chat returned it to a call that started at
    /// `validated_at`, unless the cache holds a newer version, the same version
    /// observed later, or a tombstone recorded after that call started. A
    /// visible change is logged, in the same transaction, as an event from
    /// `source`. Returns the row the cache holds afterwards.
    pub async fn put(
        &self,
        room: &Room,
        validated_at: Timestamp,
        source: EventSource,
    ) -> Result<CachedRoom> {
        let mut tx = self.begin_write().await?;
        let (before, after) = upsert(&mut tx, room, validated_at).await?;
        let revision = self
            .append_event(&mut tx, before.as_ref(), Some(&after), source)
            .await?;
        self.commit(tx, revision).await?;
        Ok(after)
    }

    /// [`Store::put`] for many rooms in one transaction (one commit, each
    /// change its own event): for bulk loads.
    pub async fn put_many(
        &self,
        rooms: &[Room],
        validated_at: Timestamp,
        source: EventSource,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let mut newest = None;
        for room in rooms {
            let (before, after) = upsert(&mut tx, room, validated_at).await?;
            newest = self
                .append_event(&mut tx, before.as_ref(), Some(&after), source)
                .await?
                .or(newest);
        }
        self.commit(tx, newest).await
    }

    /// Sets the tags of the cached room `arn` to `tags`, as IVS Chat listed
    /// them to a call that started at `asked_at`, unless the cache holds no
    /// live row for it (`None`: read the room whole) or a call that started
    /// later has observed the room since (its tags are newer: kept). The
    /// row's other fields, and when they were confirmed, stay as they are. A
    /// change is logged, in the same transaction, as an event from `source`.
    pub async fn put_tags(
        &self,
        arn: &RoomArn,
        tags: &std::collections::BTreeMap<String, String>,
        asked_at: Timestamp,
        source: EventSource,
    ) -> Result<Option<CachedRoom>> {
        let mut tx = self.begin_write().await?;
        let Some(before) = get_row(&mut tx, arn).await?.filter(|row| !row.deleted) else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE rooms SET tags = $1 \
             WHERE arn = $2 AND deleted_at IS NULL AND validated_at <= $3",
        )
        .bind(serde_json::to_string(tags).context("could not encode tags")?)
        .bind(arn.as_str())
        .bind(asked_at.as_nanos())
        .execute(&mut *tx)
        .await?;
        let after = get_row(&mut tx, arn).await?;
        let revision = self
            .append_event(&mut tx, Some(&before), after.as_ref(), source)
            .await?;
        self.commit(tx, revision).await?;
        Ok(after)
    }

    /// Records that IVS Chat said at `at` that the room is gone, unless a call
    /// that started after `at` has seen it since. A room the cache never held
    /// gets a tombstone too (with empty content), so that a slow answer from
    /// another replica cannot bring it in. Deleting a live room logs a DELETED
    /// event from `source`.
    pub async fn mark_deleted(
        &self,
        arn: &RoomArn,
        at: Timestamp,
        source: EventSource,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let before = get_row(&mut tx, arn).await?;
        sqlx::query(concat!(
            "INSERT INTO rooms (",
            columns!(),
            ") VALUES ($1, $2, '', 0, 0, 0, 0, NULL, NULL, '{}', '[]', $3, $3) \
             ON CONFLICT (arn) DO UPDATE SET \
               deleted_at = excluded.deleted_at, validated_at = excluded.validated_at \
             WHERE rooms.validated_at <= excluded.validated_at"
        ))
        .bind(arn.as_str())
        .bind(arn.id())
        .bind(at.as_nanos())
        .execute(&mut *tx)
        .await?;
        let after = get_row(&mut tx, arn).await?;
        let revision = self
            .append_event(&mut tx, before.as_ref(), after.as_ref(), source)
            .await?;
        self.commit(tx, revision).await
    }

    /// Starts a transaction that writes the cache. It takes the database's
    /// write lock at once (SQLite: BEGIN IMMEDIATE) or the `revision` row's
    /// lock (Postgres: its first statement) until commit, so writers, and the revisions they hand out,
    /// go one at a time in commit order, in this process or any other.
    async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        if self.backend == Backend::Sqlite {
            // The write lock at BEGIN: one round trip fewer, same effect.
            return Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE cache_state SET value = value WHERE key = 'revision'")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Appends the event for `before` → `after`, if anything visible changed,
    /// to the transaction, which must be [`Store::begin_write`]'s: the change
    /// and its event land together or not at all. Returns its revision.
    async fn append_event(
        &self,
        tx: &mut Transaction<'static, Any>,
        before: Option<&CachedRoom>,
        after: Option<&CachedRoom>,
        source: EventSource,
    ) -> Result<Option<u64>> {
        fn visible(c: Option<&CachedRoom>) -> Option<&Room> {
            c.filter(|c| !c.deleted).map(|c| &c.room)
        }
        let Some(event) =
            RoomEvent::between(visible(before), visible(after), source, Timestamp::now())
        else {
            return Ok(None);
        };
        let revision: i64 = sqlx::query_scalar(
            "UPDATE cache_state SET value = value + 1 WHERE key = 'revision' RETURNING value",
        )
        .fetch_one(&mut **tx)
        .await?;
        sqlx::query(concat!(
            "INSERT INTO room_events (",
            event_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(revision)
        .bind(event.room.arn.as_str())
        .bind(event.kind.as_str())
        .bind(event.source.as_str())
        .bind(event.observed_at.as_nanos())
        .bind(serde_json::to_string(&event.room).context("could not encode a room")?)
        .bind(
            event
                .previous
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .context("could not encode a room")?,
        )
        .bind(serde_json::to_string(&event.changed_fields).context("could not encode fields")?)
        .execute(&mut **tx)
        .await?;
        Ok(Some(revision_from(revision)?))
    }

    /// Commits a write transaction whose newest event (if any) is `revision`,
    /// and announces it: to this process at once, and on Postgres to other
    /// replicas (NOTIFY is delivered when, and only if, the commit happens).
    async fn commit(&self, mut tx: Transaction<'static, Any>, revision: Option<u64>) -> Result<()> {
        if let Some(revision) = revision
            && self.backend == Backend::Postgres
        {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(EVENTS_CHANNEL)
                .bind(revision.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if let Some(revision) = revision {
            self.saw_committed(revision);
        }
        Ok(())
    }

    /// Raises the newest revision known committed.
    fn saw_committed(&self, revision: u64) {
        self.committed.send_if_modified(|known| {
            let newer = revision > *known;
            if newer {
                *known = revision;
            }
            newer
        });
    }

    /// The newest revision known committed, updated by this process's commits
    /// and (after [`Store::listen`]) by other replicas'.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// On Postgres, listens for other replicas' commits until `stop`, raising
    /// [`Store::committed`]; SQLite has no other writers to hear from. A lost
    /// connection is retried; notifications missed meanwhile are found by
    /// readers of the log, which is the source of truth.
    pub async fn listen(&self, stop: tokio_util::sync::CancellationToken) {
        if self.backend != Backend::Postgres {
            return;
        }
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let listener = async {
                let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
                listener
                    .listen_all([EVENTS_CHANNEL, BUDGET_CHANNEL])
                    .await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = match tokio::select! {
                () = stop.cancelled() => return,
                listener = listener => listener,
            } {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "could not listen for change notifications");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Commits made before listening started.
            if let Ok(revision) = self.revision().await {
                self.saw_committed(revision);
            }
            loop {
                let notification = tokio::select! {
                    () = stop.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match notification {
                    Ok(Some(n)) if n.channel() == BUDGET_CHANNEL => {
                        if let Some(pause) = BudgetPause::decode(n.payload()) {
                            // Nobody listening (no shared budget): nothing to do.
                            let _ = self.pauses.send(pause);
                        }
                    }
                    Ok(Some(n)) => {
                        if let Ok(revision) = n.payload().parse() {
                            self.saw_committed(revision);
                        }
                    }
                    // The connection was lost: re-read, then listen again.
                    Ok(None) => {
                        if let Ok(revision) = self.revision().await {
                            self.saw_committed(revision);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change notifications interrupted");
                        break;
                    }
                }
            }
        }
    }

    /// Tries to become the one replica that reconciles with IVS Chat. On
    /// Postgres this is a session advisory lock on a connection of its own: it
    /// is held while that connection lives, so it passes to another replica
    /// when this one dies. SQLite serves one process: it always leads.
    pub async fn try_lead(&self) -> Result<Option<Leadership>> {
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
                .bind(LEADER_LOCK)
                .fetch_one(&mut conn)
                .await?;
            Ok::<_, sqlx::Error>((conn, led))
        };
        let (conn, led) = tokio::time::timeout(LEADERSHIP_TIMEOUT, attempt)
            .await
            .map_err(|_| Error::Unavailable("the cache database did not answer".into()))??;
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

    /// The newest revision handed out (0 before the first change).
    pub async fn revision(&self) -> Result<u64> {
        let revision: i64 =
            sqlx::query_scalar("SELECT value FROM cache_state WHERE key = 'revision'")
                .fetch_one(&self.pool)
                .await?;
        revision_from(revision)
    }

    /// Up to `limit` events with a revision greater than `after`, in order.
    pub async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<RoomEvent>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM room_events WHERE revision > $1 ORDER BY revision LIMIT $2"
        ))
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event).collect()
    }

    /// The oldest revision the log still holds, if any.
    pub async fn oldest_revision(&self) -> Result<Option<u64>> {
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(revision) FROM room_events")
            .fetch_one(&self.pool)
            .await?;
        oldest.map(revision_from).transpose()
    }

    /// Deletes events beyond the newest `keep`, and those up to the newest
    /// event observed before `older_than`, but never the newest event. Only
    /// ever a prefix of the log: clocks (of replicas, or stepped back) need not
    /// agree with revision order, and a hole in the middle would be skipped
    /// by watchers. Returns how many were deleted.
    pub async fn compact(&self, keep: u64, older_than: Option<Timestamp>) -> Result<u64> {
        let newest = self.revision().await?;
        let by_count = newest.saturating_sub(keep.max(1));
        let result = sqlx::query(
            "DELETE FROM room_events \
             WHERE revision < $1 \
               AND (revision <= $2 \
                    OR revision <= (SELECT COALESCE(MAX(revision), 0) FROM room_events \
                                    WHERE observed_at < $3))",
        )
        .bind(i64::try_from(newest).unwrap_or(i64::MAX))
        .bind(i64::try_from(by_count).unwrap_or(i64::MAX))
        .bind(older_than.map_or(i64::MIN, Timestamp::as_nanos))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// The live rooms among `arns` (all live rooms when empty) and the revision
    /// they reflect, read in one transaction.
    pub async fn snapshot(&self, arns: &[RoomArn]) -> Result<Snapshot> {
        let mut tx = self.begin_read().await?;
        let revision = revision_in(&mut tx).await?;
        let rooms = if arns.is_empty() {
            let rows = sqlx::query(concat!(
                "SELECT ",
                columns!(),
                " FROM rooms WHERE deleted_at IS NULL ORDER BY arn"
            ))
            .fetch_all(&mut *tx)
            .await?;
            rows.iter().map(room).collect::<Result<Vec<_>>>()?
        } else {
            let mut rooms = Vec::with_capacity(arns.len());
            for arn in arns {
                if let Some(cached) = get_row(&mut tx, arn).await?
                    && !cached.deleted
                {
                    rooms.push(cached.room);
                }
            }
            rooms
        };
        tx.commit().await?;
        Ok(Snapshot { revision, rooms })
    }

    /// A transaction whose reads all see one snapshot of the database.
    async fn begin_read(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        // SQLite (WAL): a read transaction sees one snapshot from its first read.
        Ok(tx)
    }

    /// One page of live rooms, newest `update_time` first, as ListRooms pages,
    /// the revision of the change log it reflects, and when IVS Chat last
    /// confirmed the least recently confirmed room on it.
    pub async fn list(
        &self,
        query: &ListQuery,
    ) -> Result<(ListedPage<Room>, u64, Option<Timestamp>)> {
        let after = match query.next_token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => Some(PageCursor::decode(token)?),
            None => None,
        };
        let limit = query.limit();
        let mut tx = self.begin_read().await?;
        let revision = revision_in(&mut tx).await?;
        // Filters left out bind NULL and match everything. The logging filter
        // looks for the quoted ARN in the JSON array (the quotes keep an ARN that
        // is a prefix of another from matching it). Not with LIKE: SQLite's LIKE
        // ignores ASCII case, and identifiers differing only in case are
        // distinct; REPLACE compares exactly on both backends.
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM rooms \
             WHERE deleted_at IS NULL \
               AND ($1 IS NULL OR name = $1) \
               AND ($2 IS NULL OR COALESCE(review_handler_uri, '') = $2) \
               AND ($3 IS NULL OR REPLACE(logging_configuration_identifiers, $3, '') \
                                  <> logging_configuration_identifiers) \
               AND ($4 IS NULL OR update_time < $4 OR (update_time = $4 AND arn > $5)) \
             ORDER BY update_time DESC, arn \
             LIMIT $6"
        ))
        .bind(query.name.as_deref())
        .bind(query.message_review_handler_uri.as_deref())
        .bind(
            query
                .logging_configuration_identifier
                .as_ref()
                // The identifier as a JSON string, exactly as the array holds it.
                .map(|id| serde_json::Value::from(id.as_str()).to_string()),
        )
        .bind(after.as_ref().map(|c| c.update_time.as_nanos()))
        .bind(after.as_ref().map(|c| c.key.clone()).unwrap_or_default())
        // One more than asked, to know whether there is a next page.
        .bind(i64::try_from(limit + 1).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut rows = rows.iter().map(cached_room).collect::<Result<Vec<_>>>()?;
        rows.truncate(limit + 1);
        let validated_at = rows.iter().take(limit).map(|c| c.validated_at).min();
        let mut rooms: Vec<Room> = rows.into_iter().map(|c| c.room).collect();
        let next_token = if rooms.len() > limit {
            rooms.truncate(limit);
            rooms.last().map(|last| {
                PageCursor {
                    update_time: last.update_time,
                    key: last.arn.clone(),
                }
                .encode()
            })
        } else {
            None
        };
        Ok((ListedPage { rooms, next_token }, revision, validated_at))
    }

    /// Live rooms not confirmed by IVS Chat since `before`: after a full listing
    /// that started at `before`, the rooms IVS Chat no longer has.
    pub async fn live_rooms_unconfirmed_since(&self, before: Timestamp) -> Result<Vec<RoomArn>> {
        let rows =
            sqlx::query("SELECT arn FROM rooms WHERE deleted_at IS NULL AND validated_at < $1")
                .bind(before.as_nanos())
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| RoomArn::parse("arn", row.try_get::<String, _>(0)?.as_str()))
            .collect()
    }

    /// Marks `arn` as confirmed at `at` without changing it (a listing showed
    /// the same version).
    pub async fn confirm(
        &self,
        arn: &RoomArn,
        update_time: Timestamp,
        at: Timestamp,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE rooms SET validated_at = $1 \
             WHERE arn = $2 AND update_time = $3 AND deleted_at IS NULL AND validated_at < $1",
        )
        .bind(at.as_nanos())
        .bind(arn.as_str())
        .bind(update_time.as_nanos())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When a full listing of IVS Chat last completed, if ever: until then the
    /// cache cannot answer ListRooms.
    pub async fn full_listing_at(&self) -> Result<Option<Timestamp>> {
        let value: Option<i64> = sqlx::query_scalar("SELECT value FROM cache_state WHERE key = $1")
            .bind(FULL_LISTING_AT)
            .fetch_optional(&self.pool)
            .await?;
        Ok(value.map(Timestamp::from_nanos))
    }

    pub async fn set_full_listing_at(&self, at: Timestamp) -> Result<()> {
        sqlx::query(
            "INSERT INTO cache_state (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(FULL_LISTING_AT)
        .bind(at.as_nanos())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The upsert of [`Store::put`], under its rules; returns the row before and after.
async fn upsert(
    tx: &mut Transaction<'static, Any>,
    room: &Room,
    validated_at: Timestamp,
) -> Result<(Option<CachedRoom>, CachedRoom)> {
    let (uri, fallback) = match &room.message_review_handler {
        Some(h) => (Some(h.uri.as_str()), Some(h.fallback_result.as_str())),
        None => (None, None),
    };
    let arn = room.arn();
    let before = get_row(tx, &arn).await?;
    // A live row: replace when newer; when equal (content may differ, e.g.
    // tags), when observed no earlier, so validated_at never moves back. A
    // tombstone: only an answer to a call that started after it.
    let stored = sqlx::query(concat!(
        "INSERT INTO rooms (",
        columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL) \
         ON CONFLICT (arn) DO UPDATE SET \
           name = excluded.name, create_time = excluded.create_time, \
           update_time = excluded.update_time, \
           maximum_message_rate_per_second = excluded.maximum_message_rate_per_second, \
           maximum_message_length = excluded.maximum_message_length, \
           review_handler_uri = excluded.review_handler_uri, \
           review_handler_fallback = excluded.review_handler_fallback, \
           tags = excluded.tags, \
           logging_configuration_identifiers = excluded.logging_configuration_identifiers, \
           validated_at = excluded.validated_at, deleted_at = NULL \
         WHERE (rooms.deleted_at IS NULL \
                AND (excluded.update_time > rooms.update_time \
                     OR (excluded.update_time = rooms.update_time \
                         AND excluded.validated_at >= rooms.validated_at))) \
            OR (rooms.deleted_at IS NOT NULL AND excluded.validated_at > rooms.deleted_at) \
         RETURNING ",
        columns!()
    ))
    .bind(room.arn.as_str())
    .bind(room.id.as_str())
    .bind(room.name.as_str())
    .bind(room.create_time.as_nanos())
    .bind(room.update_time.as_nanos())
    .bind(i64::from(room.maximum_message_rate_per_second))
    .bind(i64::from(room.maximum_message_length))
    .bind(uri)
    .bind(fallback)
    .bind(serde_json::to_string(&room.tags).context("could not encode tags")?)
    .bind(
        serde_json::to_string(&room.logging_configuration_identifiers)
            .context("could not encode logging configuration identifiers")?,
    )
    .bind(validated_at.as_nanos())
    .fetch_optional(&mut **tx)
    .await?;
    // No row returned: the rules kept what was there.
    let after = match stored {
        Some(row) => cached_room(&row)?,
        None => before
            .clone()
            .ok_or_else(|| anyhow::anyhow!("room {arn} was neither stored nor there"))?,
    };
    Ok((before, after))
}

async fn get_row(conn: &mut AnyConnection, arn: &RoomArn) -> Result<Option<CachedRoom>> {
    let row = sqlx::query(concat!("SELECT ", columns!(), " FROM rooms WHERE arn = $1"))
        .bind(arn.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|row| cached_room(&row)).transpose()
}

async fn revision_in(conn: &mut AnyConnection) -> Result<u64> {
    let revision: i64 = sqlx::query_scalar("SELECT value FROM cache_state WHERE key = 'revision'")
        .fetch_one(&mut *conn)
        .await?;
    revision_from(revision)
}

/// The advisory-lock key of a room's write turn: 63 bits of its ARN's
/// SHA-256, kept apart from [`LEADER_LOCK`].
fn room_lock_key(arn: &RoomArn) -> i64 {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(arn.as_str().as_bytes());
    let key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) & i64::MAX;
    if key == LEADER_LOCK { key + 1 } else { key }
}

fn revision_from(revision: i64) -> Result<u64> {
    Ok(u64::try_from(revision).context("negative revision in the change log")?)
}

fn event(row: &AnyRow) -> Result<RoomEvent> {
    let kind: String = row.try_get("kind")?;
    let source: String = row.try_get("source")?;
    let room: String = row.try_get("room")?;
    let previous: Option<String> = row.try_get("previous")?;
    let changed_fields: String = row.try_get("changed_fields")?;
    Ok(RoomEvent {
        revision: revision_from(row.try_get("revision")?)?,
        kind: EventKind::parse(&kind)
            .with_context(|| format!("unknown event kind {kind:?} in the change log"))?,
        source: EventSource::parse(&source)
            .with_context(|| format!("unknown event source {source:?} in the change log"))?,
        observed_at: Timestamp::from_nanos(row.try_get("observed_at")?),
        room: serde_json::from_str(&room).context("corrupt room in the change log")?,
        previous: previous
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .context("corrupt previous room in the change log")?,
        changed_fields: serde_json::from_str(&changed_fields)
            .context("corrupt changed fields in the change log")?,
    })
}

fn cached_room(row: &AnyRow) -> Result<CachedRoom> {
    Ok(CachedRoom {
        room: room(row)?,
        validated_at: Timestamp::from_nanos(row.try_get("validated_at")?),
        deleted: row.try_get::<Option<i64>, _>("deleted_at")?.is_some(),
    })
}

fn room(row: &AnyRow) -> Result<Room> {
    let uri: Option<String> = row.try_get("review_handler_uri")?;
    let fallback: Option<String> = row.try_get("review_handler_fallback")?;
    let message_review_handler = uri.map(|uri| MessageReviewHandler {
        uri,
        fallback_result: fallback
            .as_deref()
            .and_then(FallbackResult::parse)
            .unwrap_or_default(),
    });
    let tags: String = row.try_get("tags")?;
    let logging: String = row.try_get("logging_configuration_identifiers")?;
    Ok(Room {
        arn: row.try_get("arn")?,
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        create_time: Timestamp::from_nanos(row.try_get("create_time")?),
        update_time: Timestamp::from_nanos(row.try_get("update_time")?),
        maximum_message_rate_per_second: int(row.try_get("maximum_message_rate_per_second")?)?,
        maximum_message_length: int(row.try_get("maximum_message_length")?)?,
        message_review_handler,
        tags: serde_json::from_str(&tags).context("corrupt tags in cache")?,
        logging_configuration_identifiers: serde_json::from_str(&logging)
            .context("corrupt logging configuration identifiers in cache")?,
    })
}

fn int(n: i64) -> Result<i32> {
    Ok(i32::try_from(n).context("integer out of range in cache")?)
}

/// Makes a SQLite URL create its file (and directory) when missing.
fn sqlite_url(url: &str) -> anyhow::Result<String> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.is_empty()
        && path != ":memory:"
        && let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create directory {}", dir.display()))?;
    }
    let params = if params.split('&').any(|p| p.starts_with("mode=")) {
        params.to_owned()
    } else if params.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{params}&mode=rwc")
    };
    // Validate early, with the URL in the message.
    sqlx::sqlite::SqliteConnectOptions::from_str(&format!("sqlite://{path}?{params}"))
        .with_context(|| format!("invalid SQLite URL {url}"))?;
    Ok(format!("sqlite://{path}?{params}"))
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Database errors that say "not now" rather than "wrong": retrying helps.
fn transient(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let code = db.code().unwrap_or_default();
    // SQLite: 5 SQLITE_BUSY, 6 SQLITE_LOCKED (and their extended codes).
    // Postgres: serialization failure, deadlock, admin or crash shutdown,
    // cannot connect now, lock not available (lock_timeout), too many
    // connections.
    let sqlite_busy = code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
    sqlite_busy
        || matches!(
            code.as_ref(),
            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "55P03" | "53300"
        )
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                tracing::error!(error = %e, "cache database unavailable");
                Error::Unavailable("the cache database is unavailable".into())
            }
            e if transient(&e) => {
                tracing::warn!(error = %e, "cache database busy");
                Error::Unavailable("the cache database is busy; retry".into())
            }
            e => Error::Internal(anyhow::Error::new(e).context("cache database error")),
        }
    }
}
