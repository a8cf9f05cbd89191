//! Opening the cache: the pools (the cache's, and on Postgres the rooms'
//! turns'), their connections' settings, and the migrations.

use super::*;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// How long the startup check that the database keeps sessions waits for
/// its notification.
const SESSION_CHECK_WAIT: Duration = Duration::from_secs(10);

/// Connections of the cache's pool on Postgres.
const CACHE_CONNECTIONS: u32 = 12;

/// Rooms whose turn this process can hold or wait for at once on Postgres
/// (one connection each; AWS allows 5 calls per second and operation); more
/// wait for a connection, then UNAVAILABLE. With the cache's pool and the
/// listener (and, while the database is suspected away, a probe), a replica
/// holds at most 26 connections:
/// three fit a default Postgres (`max_connections` 100) with room to spare.
const ROOM_TURN_CONNECTIONS: u32 = 12;

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://...`) and runs the
    /// migrations. A SQLite file and its directory are created if missing.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        super::error::error_counters();
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
                    if backend == Backend::Postgres {
                        sqlx::raw_sql(sqlx::AssertSqlSafe(health::session_settings()))
                            .execute(&mut *conn)
                            .await?;
                    }
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
        // Before anything else runs on it (migrations included), so that a
        // pooler that loses sessions is named as the cause.
        if backend == Backend::Postgres {
            check_sessions_are_kept(&pool, &url).await?;
        }
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
                        // A replica cut off while it holds a turn frees it
                        // within HELD_LOCK_BOUND of its last heartbeat.
                        sqlx::raw_sql(sqlx::AssertSqlSafe(health::session_settings()))
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
            health: Default::default(),
        };
        let revision = store.revision().await?;
        store.committed.send_replace(revision);
        Ok(store)
    }

    /// A transaction whose reads all see one snapshot of the database.
    pub(super) async fn begin_read(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        // SQLite (WAL): a read transaction sees one snapshot from its first read.
        Ok(tx)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Makes a SQLite URL create its file (and directory) when missing.
pub(super) fn sqlite_url(url: &str) -> anyhow::Result<String> {
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
pub(super) fn redact(url: &str) -> String {
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

/// Refuses a database that does not keep a session to one client: a
/// pooler in transaction or statement mode (PgBouncer, RDS Proxy, ...)
/// would lose what the service keeps in its sessions (LISTEN for other
/// replicas' commits, the bounds of `health.rs`). Tested by what fails
/// there: a notification to a channel this process listens on must
/// arrive.
async fn check_sessions_are_kept(pool: &AnyPool, url: &str) -> anyhow::Result<()> {
    let channel = format!("ivschat_rooms_probe_{:016x}", rand::random::<u64>());
    let check = async {
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen(&channel).await?;
        match sqlx::query("SELECT pg_notify($1, 'probe')")
            .bind(&channel)
            .execute(pool)
            .await
        {
            // A pooler in transaction mode may hand the LISTEN's server
            // session to the connection that notifies: it then receives the
            // notification meant for the listener, which the driver reports
            // as an unexpected message.
            Err(sqlx::Error::Protocol(message)) if message.contains("NotificationResponse") => {
                return Ok(false);
            }
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let heard = listener.recv().await?;
        Ok::<_, sqlx::Error>(heard.channel() == channel)
    };
    match tokio::time::timeout(SESSION_CHECK_WAIT, check).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e)
            .context("could not check that the database keeps sessions (LISTEN/NOTIFY)")),
        Ok(Ok(false)) | Err(_) => anyhow::bail!(
            "the database at {} did not deliver a notification to this process's \
             LISTEN within {} s (or delivered it to another connection): a connection \
             pooler in transaction or statement mode (PgBouncer pool_mode=transaction, \
             ...) is in between? ivschat-rooms keeps state in its sessions (LISTEN, \
             session settings): connect to Postgres directly or through session pooling",
            redact(url),
            SESSION_CHECK_WAIT.as_secs()
        ),
    }
}
