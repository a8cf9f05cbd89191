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
