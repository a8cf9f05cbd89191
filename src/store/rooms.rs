//! The cached rooms: reads, the update-time rule's upserts, tombstones and
//! the full listing's state.

use super::*;

pub(super) const FULL_LISTING_AT: &str = "full_listing_at";

/// Moves a live row's `validated_at` on to $1 if it still is the version
/// ($2, $3) a listing showed.
const CONFIRM: &str = "UPDATE rooms SET validated_at = $1 \
     WHERE arn = $2 AND update_time = $3 AND deleted_at IS NULL AND validated_at < $1";

/// The `cache_state` key of when `region`'s last full listing completed.
fn full_listing_key(region: &str) -> String {
    format!("{FULL_LISTING_AT}:{region}")
}

/// A LIKE pattern matching the ARNs of `region`'s rooms
/// (`arn:PARTITION:ivschat:REGION:ACCOUNT:room/ID`). Region names hold no
/// LIKE wildcard (`%`, `_`): lowercase letters, digits and dashes.
fn arn_pattern(region: &str) -> String {
    format!("arn:%:ivschat:{region}:%")
}

impl Store {
    /// The cached row for `arn`, tombstones included.
    #[tracing::instrument(target = SPANS, name = "cache.get", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn get(&self, arn: &RoomArn) -> Result<Option<CachedRoom>> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await?;
            get_row(&mut conn, arn).await
        })
        .await
    }

    /// The cached row for `arn` and the change-log revision it reflects, read
    /// in one transaction.
    #[tracing::instrument(target = SPANS, name = "cache.get_at_revision", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn get_at_revision(&self, arn: &RoomArn) -> Result<(Option<CachedRoom>, u64)> {
        self.bounded(async {
            let mut tx = self.begin_read().await?;
            let revision = revision_in(&mut tx).await?;
            let row = get_row(&mut tx, arn).await?;
            tx.commit().await?;
            Ok((row, revision))
        })
        .await
    }

    /// Up to `limit` cached rows (tombstones included), most recently
    /// confirmed first, and the revision they reflect, read in one transaction.
    #[tracing::instrument(target = SPANS, name = "cache.rows_at_revision", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn rows_at_revision(&self, limit: usize) -> Result<(Vec<CachedRoom>, u64)> {
        self.bounded(async {
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
        })
        .await
    }

    /// Stores `room` as IVS Chat returned it to a call that started at
    /// `validated_at`, unless the cache holds a newer version, the same version
    /// observed later, or a tombstone recorded after that call started. A
    /// visible change is logged, in the same transaction, as an event from
    /// `source`. A room whose details are pending (from a listing) is stored
    /// only over no row, a tombstone or another pending row: never over a
    /// room read whole. Returns the row the cache holds afterwards.
    #[tracing::instrument(target = SPANS, name = "cache.put", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn put(
        &self,
        room: &Room,
        validated_at: Timestamp,
        source: EventSource,
    ) -> Result<CachedRoom> {
        let committing = health::Committing::default();
        self.bounded_write(&committing, async {
            let mut tx = self.begin_write().await?;
            let (before, after) = upsert(&mut tx, room, validated_at).await?;
            let revision = self
                .append_event(&mut tx, before.as_ref(), Some(&after), source)
                .await?;
            self.commit(tx, revision, &committing).await?;
            Ok(after)
        })
        .await
    }

    /// [`Store::put`] for many rooms in one transaction (one commit, each
    /// change its own event): for bulk loads.
    #[tracing::instrument(target = SPANS, name = "cache.put_many", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn put_many(
        &self,
        rooms: &[Room],
        validated_at: Timestamp,
        source: EventSource,
    ) -> Result<()> {
        let committing = health::Committing::default();
        self.bounded_write(&committing, async {
            let mut tx = self.begin_write().await?;
            let mut newest = None;
            for room in rooms {
                let (before, after) = upsert(&mut tx, room, validated_at).await?;
                newest = self
                    .append_event(&mut tx, before.as_ref(), Some(&after), source)
                    .await?
                    .or(newest);
            }
            self.commit(tx, newest, &committing).await
        })
        .await
    }

    /// Sets the tags of the cached room `arn` to `tags`, as IVS Chat listed
    /// them to a call that started at `asked_at`, unless the cache holds no
    /// live row for it (`None`: read the room whole) or a call that started
    /// later has observed the room since (its tags are newer: kept). The
    /// row's other fields, and when they were confirmed, stay as they are. A
    /// change is logged, in the same transaction, as an event from `source`.
    #[tracing::instrument(target = SPANS, name = "cache.put_tags", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn put_tags(
        &self,
        arn: &RoomArn,
        tags: &std::collections::BTreeMap<String, String>,
        asked_at: Timestamp,
        source: EventSource,
    ) -> Result<Option<CachedRoom>> {
        let committing = health::Committing::default();
        self.bounded_write(&committing, async {
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
            self.commit(tx, revision, &committing).await?;
            Ok(after)
        })
        .await
    }

    /// Records that IVS Chat said at `at` that the room is gone, unless a call
    /// that started after `at` has seen it since. A room the cache never held
    /// gets a tombstone too (with empty content), so that a slow answer from
    /// another replica cannot bring it in. Deleting a live room logs a DELETED
    /// event from `source`.
    #[tracing::instrument(target = SPANS, name = "cache.mark_deleted", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn mark_deleted(
        &self,
        arn: &RoomArn,
        at: Timestamp,
        source: EventSource,
    ) -> Result<()> {
        let committing = health::Committing::default();
        self.bounded_write(&committing, async {
            let mut tx = self.begin_write().await?;
            let before = get_row(&mut tx, arn).await?;
            sqlx::query(concat!(
                "INSERT INTO rooms (",
                columns!(),
                ") VALUES ($1, $2, '', 0, 0, 0, 0, NULL, NULL, '{}', '[]', $3, $3, 0) \
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
            self.commit(tx, revision, &committing).await
        })
        .await
    }

    /// One page of live rooms, newest `update_time` first, as ListRooms pages,
    /// the revision of the change log it reflects, and when IVS Chat last
    /// confirmed the least recently confirmed room on it.
    /// Only rooms of `regions` (by their ARNs); every room when empty.
    #[tracing::instrument(target = SPANS, name = "cache.list", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn list(
        &self,
        query: &ListQuery,
        regions: &[&str],
    ) -> Result<(ListedPage<Room>, u64, Option<Timestamp>)> {
        self.bounded(async {
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
            // The regions: one LIKE each ($7, $8, ...), a handful at most.
            let in_regions = if regions.is_empty() {
                String::new()
            } else {
                let likes: Vec<String> = (0..regions.len())
                    .map(|i| format!("arn LIKE ${}", 7 + i))
                    .collect();
                format!("AND ({})", likes.join(" OR "))
            };
            let statement = format!(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM rooms \
                 WHERE deleted_at IS NULL \
                   AND ($1 IS NULL OR name = $1) \
                   AND ($2 IS NULL OR COALESCE(review_handler_uri, '') = $2) \
                   AND ($3 IS NULL OR REPLACE(logging_configuration_identifiers, $3, '') \
                                      <> logging_configuration_identifiers) \
                   AND ($4 IS NULL OR update_time < $4 OR (update_time = $4 AND arn > $5)) \
                   {} \
                 ORDER BY update_time DESC, arn \
                 LIMIT $6"
                ),
                in_regions
            );
            let mut select = sqlx::query(sqlx::AssertSqlSafe(statement))
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
                .bind(i64::try_from(limit + 1).unwrap_or(i64::MAX));
            for region in regions {
                select = select.bind(arn_pattern(region));
            }
            let rows = select.fetch_all(&mut *tx).await?;
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
        })
        .await
    }

    /// Live rooms of `region` not confirmed by IVS Chat since `before`: after
    /// a full listing of the region that started at `before`, the rooms IVS
    /// Chat no longer has there.
    pub async fn live_rooms_unconfirmed_since(
        &self,
        region: &str,
        before: Timestamp,
    ) -> Result<Vec<RoomArn>> {
        self.bounded(async {
            let rows = sqlx::query(
                "SELECT arn FROM rooms \
             WHERE deleted_at IS NULL AND validated_at < $1 AND arn LIKE $2",
            )
            .bind(before.as_nanos())
            .bind(arn_pattern(region))
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| RoomArn::parse("arn", row.try_get::<String, _>(0)?.as_str()))
                .collect()
        })
        .await
    }

    /// Up to `limit` live rooms of `region` whose details (the message
    /// limits) are still to be read: rooms a full listing put in from their
    /// summaries, newest update first.
    pub async fn rooms_pending_details(&self, region: &str, limit: usize) -> Result<Vec<RoomArn>> {
        self.bounded(async {
            let rows = sqlx::query(
                "SELECT arn FROM rooms \
             WHERE details_pending = 1 AND deleted_at IS NULL AND arn LIKE $1 \
             ORDER BY update_time DESC, arn LIMIT $2",
            )
            .bind(arn_pattern(region))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| RoomArn::parse("arn", row.try_get::<String, _>(0)?.as_str()))
                .collect()
        })
        .await
    }

    /// Marks `arn` as confirmed at `at` without changing it (a listing showed
    /// the same version).
    pub async fn confirm(
        &self,
        arn: &RoomArn,
        update_time: Timestamp,
        at: Timestamp,
    ) -> Result<()> {
        self.bounded(async {
            sqlx::query(CONFIRM)
                .bind(at.as_nanos())
                .bind(arn.as_str())
                .bind(update_time.as_nanos())
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// [`Store::confirm`] for each of `listed` (a room and the updateTime a
    /// listing showed), in one transaction: a listing's page, one commit.
    #[tracing::instrument(target = SPANS, name = "cache.confirm_many", skip_all, err,
        fields(otel.kind = "client", db.system = self.backend.db_system()))]
    pub async fn confirm_many(&self, listed: &[(RoomArn, Timestamp)], at: Timestamp) -> Result<()> {
        self.bounded(async {
            if listed.is_empty() {
                return Ok(());
            }
            // A pass's confirmations are fenced by its lease like its writes.
            let mut tx = if super::locks::current_fence().is_some() {
                self.begin_write().await?
            } else {
                self.pool.begin().await?
            };
            for (arn, update_time) in listed {
                sqlx::query(CONFIRM)
                    .bind(at.as_nanos())
                    .bind(arn.as_str())
                    .bind(update_time.as_nanos())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// When a full listing of `region`'s IVS Chat last completed, if ever:
    /// until then the cache cannot answer ListRooms for it.
    pub async fn full_listing_at(&self, region: &str) -> Result<Option<Timestamp>> {
        self.bounded(async {
            let value: Option<i64> =
                sqlx::query_scalar("SELECT value FROM cache_state WHERE key = $1")
                    .bind(full_listing_key(region))
                    .fetch_optional(&self.pool)
                    .await?;
            Ok(value.map(Timestamp::from_nanos))
        })
        .await
    }

    pub async fn set_full_listing_at(&self, region: &str, at: Timestamp) -> Result<()> {
        self.bounded(async {
            // A pass's record is fenced by its lease like its writes.
            let mut tx = self.begin_write().await?;
            sqlx::query(
                "INSERT INTO cache_state (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(full_listing_key(region))
            .bind(at.as_nanos())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Carries a cache written when one region was served (its listing state
    /// under the key of no region) over to that region: the region of its
    /// rooms' ARNs, if served. Returns the region it was carried to. The old
    /// key stays, for replicas of the older release still running beside
    /// this one; a region that has a listing state of its own keeps it. A
    /// cache without rooms carries nothing over: its next full listing is
    /// one call.
    pub async fn adopt_one_region_state<'a>(
        &self,
        served: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<String>> {
        let Some(listed_at) =
            sqlx::query_scalar::<_, i64>("SELECT value FROM cache_state WHERE key = $1")
                .bind(FULL_LISTING_AT)
                .fetch_optional(&self.pool)
                .await?
        else {
            return Ok(None);
        };
        let Some(arn) = sqlx::query_scalar::<_, String>("SELECT arn FROM rooms LIMIT 1")
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let arn = RoomArn::parse("arn", &arn)?;
        let region = arn.region();
        if !served.into_iter().any(|r| r == region) {
            tracing::warn!(
                region,
                "the cache's listing state is of a region not served: left alone"
            );
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO cache_state (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(full_listing_key(region))
        .bind(listed_at)
        .execute(&self.pool)
        .await?;
        Ok(Some(region.to_owned()))
    }
}

/// The upsert of [`Store::put`], under its rules; returns the row before and after.
pub(super) async fn upsert(
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
    // tags), when observed no earlier, so validated_at never moves back; a
    // room whose details are pending (from a listing) never replaces one
    // read whole. A tombstone: only an answer to a call that started after it.
    let stored = sqlx::query(concat!(
        "INSERT INTO rooms (",
        columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL, $13) \
         ON CONFLICT (arn) DO UPDATE SET \
           name = excluded.name, create_time = excluded.create_time, \
           update_time = excluded.update_time, \
           maximum_message_rate_per_second = excluded.maximum_message_rate_per_second, \
           maximum_message_length = excluded.maximum_message_length, \
           review_handler_uri = excluded.review_handler_uri, \
           review_handler_fallback = excluded.review_handler_fallback, \
           tags = excluded.tags, \
           logging_configuration_identifiers = excluded.logging_configuration_identifiers, \
           validated_at = excluded.validated_at, deleted_at = NULL, \
           details_pending = excluded.details_pending \
         WHERE (rooms.deleted_at IS NULL \
                AND (excluded.update_time > rooms.update_time \
                     OR (excluded.update_time = rooms.update_time \
                         AND excluded.validated_at >= rooms.validated_at)) \
                AND (excluded.details_pending = 0 OR rooms.details_pending = 1)) \
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
    .bind(i64::from(room.details_pending))
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

pub(super) async fn get_row(conn: &mut AnyConnection, arn: &RoomArn) -> Result<Option<CachedRoom>> {
    let row = sqlx::query(concat!("SELECT ", columns!(), " FROM rooms WHERE arn = $1"))
        .bind(arn.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|row| cached_room(&row)).transpose()
}
