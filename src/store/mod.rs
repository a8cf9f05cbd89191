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

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row as _};

use crate::domain::{
    Error, FallbackResult, ListQuery, ListedPage, MessageReviewHandler, PageCursor, Result, Room,
    RoomArn, Timestamp,
};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

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

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
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
                Backend::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers go on while one connection writes;
                        // writers wait up to busy_timeout rather than fail.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
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
        Ok(Store { pool })
    }

    /// The cached row for `arn`, tombstones included.
    pub async fn get(&self, arn: &RoomArn) -> Result<Option<CachedRoom>> {
        let row = sqlx::query(concat!("SELECT ", columns!(), " FROM rooms WHERE arn = $1"))
            .bind(arn.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| cached_room(&row)).transpose()
    }

    /// Stores `room` as IVS Chat returned it to a call that started at
    /// `validated_at`, unless the cache holds a newer version, the same version
    /// observed later, or a tombstone recorded after that call started. Returns
    /// the row the cache holds afterwards.
    pub async fn put(&self, room: &Room, validated_at: Timestamp) -> Result<CachedRoom> {
        let (uri, fallback) = match &room.message_review_handler {
            Some(h) => (Some(h.uri.as_str()), Some(h.fallback_result.as_str())),
            None => (None, None),
        };
        // A live row: replace when newer; when equal (content may differ, e.g.
        // tags), when observed no earlier, so validated_at never moves back. A
        // tombstone: only an answer to a call that started after it.
        sqlx::query(concat!(
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
                OR (rooms.deleted_at IS NOT NULL AND excluded.validated_at > rooms.deleted_at)"
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
        .execute(&self.pool)
        .await?;
        self.get(&room.arn()).await?.ok_or_else(|| {
            anyhow::anyhow!("room {} vanished right after it was stored", room.arn).into()
        })
    }

    /// Records that IVS Chat said at `at` that the room is gone, unless a call
    /// that started after `at` has seen it since. A room the cache never held
    /// gets a tombstone too (with empty content), so that a slow answer from
    /// another replica cannot bring it in.
    pub async fn mark_deleted(&self, arn: &RoomArn, at: Timestamp) -> Result<()> {
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One page of live rooms, newest `update_time` first, as ListRooms pages.
    pub async fn list(&self, query: &ListQuery) -> Result<ListedPage<Room>> {
        let after = match query.next_token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => Some(PageCursor::decode(token)?),
            None => None,
        };
        let limit = query.limit();
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
        .fetch_all(&self.pool)
        .await?;
        let mut rooms = rows.iter().map(room).collect::<Result<Vec<_>>>()?;
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
        Ok(ListedPage { rooms, next_token })
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

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                tracing::error!(error = %e, "cache database unavailable");
                Error::Unavailable("the cache database is unavailable".into())
            }
            e => Error::Internal(anyhow::Error::new(e).context("cache database error")),
        }
    }
}
