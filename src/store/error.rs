//! sqlx errors as ours: what is worth a retry is UNAVAILABLE.

use super::*;

/// Database errors that say "not now" rather than "wrong": retrying helps.
pub(super) fn transient(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let code = db.code().unwrap_or_default();
    // SQLite: 5 SQLITE_BUSY, 6 SQLITE_LOCKED (and their extended codes).
    // Postgres: serialization failure, deadlock, admin or crash shutdown,
    // cannot connect now, lock not available (lock_timeout), too many
    // connections; a session ended by a bound of ours; a lost connection.
    let sqlite_busy = code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
    sqlite_busy
        || matches!(
            code.as_ref(),
            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "55P03" | "53300"
            // A session ended for idling in a transaction, a statement
            // cancelled by its timeout: the bounds of `health.rs`.
            | "25P03" | "57014"
        )
        // Connection exceptions.
        || code.starts_with("08")
}

/// The cache database error counters, `unavailable` and `busy`, registered
/// on first use (the store does at open, so both series are there, at 0,
/// before any error and `rate()` sees the first).
pub(super) fn error_counters() -> &'static [metrics::Counter; 2] {
    static COUNTERS: std::sync::OnceLock<[metrics::Counter; 2]> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        ["unavailable", "busy"]
            .map(|kind| metrics::counter!(crate::telemetry::STORE_ERRORS, "kind" => kind))
    })
}

/// Counts a cache database error of `kind` (`unavailable`, `busy`).
pub(super) fn count_error(kind: &'static str) {
    let [unavailable, busy] = error_counters();
    match kind {
        "busy" => busy.increment(1),
        _ => unavailable.increment(1),
    }
}

/// The first words of the UNAVAILABLE of a connection that failed (or of a
/// statement that got no answer): the database may be away.
pub(super) const CONNECTION_FAILED: &str = "the cache database is unavailable";

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
                tracing::error!(error = %e, "cache database unavailable");
                count_error("unavailable");
                Error::unavailable(format!("{CONNECTION_FAILED}: {e}"))
            }
            // Every connection busy (a loaded replica), or shutting down:
            // the database itself may be fine.
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                tracing::error!(error = %e, "cache database unavailable");
                count_error("unavailable");
                Error::unavailable("no connection to the cache database is free (pool timed out)")
            }
            e if transient(&e) => {
                tracing::warn!(error = %e, "cache database busy");
                count_error("busy");
                Error::unavailable("the cache database is busy; retry")
            }
            e => Error::Internal(anyhow::Error::new(e).context("cache database error")),
        }
    }
}
