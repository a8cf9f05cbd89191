//! The outbox and the change log: write transactions that bump the
//! revision and append the event with the change, commits and their
//! notifications, reading and compacting the log, snapshots.

use super::*;

impl Store {
    /// Starts a transaction that writes the cache (refused, in a
    /// reconciler's pass, once its lease has ended: `locks::fenced`). It takes the database's
    /// write lock at once (SQLite: BEGIN IMMEDIATE) or the `revision` row's
    /// lock (Postgres: its first statement) until commit, so writers, and the revisions they hand out,
    /// go one at a time in commit order, in this process or any other.
    pub(super) async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        if self.backend == Backend::Sqlite {
            // The write lock at BEGIN: one round trip fewer, same effect.
            return Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE cache_state SET value = value WHERE key = 'revision'")
            .execute(&mut *tx)
            .await?;
        // A reconciler's pass writes only while its lease holds: checked
        // under the revision lock, which a takeover takes too.
        super::locks::check_fence(&mut tx).await?;
        Ok(tx)
    }

    /// Appends the event for `before` → `after`, if anything visible changed,
    /// to the transaction, which must be [`Store::begin_write`]'s: the change
    /// and its event land together or not at all. Returns its revision.
    pub(super) async fn append_event(
        &self,
        tx: &mut Transaction<'static, Any>,
        before: Option<&CachedRoom>,
        after: Option<&CachedRoom>,
        source: EventSource,
    ) -> Result<Option<u64>> {
        fn visible(c: Option<&CachedRoom>) -> Option<&Room> {
            c.filter(|c| !c.deleted).map(|c| &c.room)
        }
        let Some(mut event) =
            RoomEvent::between(visible(before), visible(after), source, Timestamp::now())
        else {
            return Ok(None);
        };
        // A DELETED event leaves the tombstone, confirmed when IVS Chat said so.
        event.validated_at = after.map(|a| a.validated_at);
        let revision: i64 = sqlx::query_scalar(
            "UPDATE cache_state SET value = value + 1 WHERE key = 'revision' RETURNING value",
        )
        .fetch_one(&mut **tx)
        .await?;
        sqlx::query(concat!(
            "INSERT INTO room_events (",
            event_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
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
        .bind(event.validated_at.map(Timestamp::as_nanos))
        .execute(&mut **tx)
        .await?;
        Ok(Some(revision_from(revision)?))
    }

    /// Commits a write transaction whose newest event (if any) is `revision`,
    /// and announces it: to this process at once, and on Postgres to other
    /// replicas (NOTIFY is delivered when, and only if, the commit happens).
    /// `committing` is told before the COMMIT is sent: a failure after that
    /// leaves the write's outcome unknown, and says so.
    pub(super) async fn commit(
        &self,
        mut tx: Transaction<'static, Any>,
        revision: Option<u64>,
        committing: &health::Committing,
    ) -> Result<()> {
        if let Some(revision) = revision
            && self.backend == Backend::Postgres
        {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(EVENTS_CHANNEL)
                .bind(revision.to_string())
                .execute(&mut *tx)
                .await?;
        }
        committing.start();
        if let Err(e) = tx.commit().await {
            let e = Error::from(e);
            return Err(match &e {
                Error::Unavailable { message, .. } => health::uncertain(message),
                _ => e,
            });
        }
        if let Some(revision) = revision {
            self.saw_committed(revision);
            tracing::trace!(target: super::COMMITS, revision, "committed");
        }
        Ok(())
    }

    /// Raises the newest revision known committed.
    pub(super) fn saw_committed(&self, revision: u64) {
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
                // Keepalives: Postgres ends the session of a replica gone.
                sqlx::raw_sql(sqlx::AssertSqlSafe(health::session_settings()))
                    .execute(&mut listener)
                    .await?;
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

    /// The newest revision handed out (0 before the first change).
    pub async fn revision(&self) -> Result<u64> {
        self.bounded(async {
            let revision: i64 =
                sqlx::query_scalar("SELECT value FROM cache_state WHERE key = 'revision'")
                    .fetch_one(&self.pool)
                    .await?;
            revision_from(revision)
        })
        .await
    }

    /// Up to `limit` events with a revision greater than `after`, in order.
    pub async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<RoomEvent>> {
        self.bounded(async {
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
        })
        .await
    }

    /// The oldest revision the log still holds, if any.
    pub async fn oldest_revision(&self) -> Result<Option<u64>> {
        self.bounded(async {
            let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(revision) FROM room_events")
                .fetch_one(&self.pool)
                .await?;
            oldest.map(revision_from).transpose()
        })
        .await
    }

    /// Deletes events beyond the newest `keep`, and those up to the newest
    /// event observed before `older_than`, but never the newest event. Only
    /// ever a prefix of the log: clocks (of replicas, or stepped back) need not
    /// agree with revision order, and a hole in the middle would be skipped
    /// by watchers. Returns how many were deleted.
    pub async fn compact(&self, keep: u64, older_than: Option<Timestamp>) -> Result<u64> {
        self.bounded(async {
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
        })
        .await
    }

    /// The live rooms among `arns` (all live rooms when empty) and the revision
    /// they reflect, read in one transaction.
    #[tracing::instrument(target = SPANS, name = "cache.snapshot", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn snapshot(&self, arns: &[RoomArn]) -> Result<Snapshot> {
        self.bounded(async {
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
        })
        .await
    }
}

pub(super) async fn revision_in(conn: &mut AnyConnection) -> Result<u64> {
    let revision: i64 = sqlx::query_scalar("SELECT value FROM cache_state WHERE key = 'revision'")
        .fetch_one(&mut *conn)
        .await?;
    revision_from(revision)
}
