//! The fleet's shared upstream budget (Postgres only): one GCRA row per
//! (region, operation) in `upstream_budgets`, see `budget::shared`.
//!
//! Each step is one statement on the database's clock (nanoseconds since the
//! epoch, from `clock_timestamp()`), so replicas' clocks need not agree and no
//! interleaving of replicas can hand out two slots closer than the interval.

use std::time::Duration;

use sqlx::Row as _;

use crate::domain::{Error, Result};

use super::{Backend, Store};

/// A slot of the shared budget, granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// How long from now until the slot: send then.
    pub delay: Duration,
    /// Whether a run of throttling pauses is on (a success should end it).
    pub pausing: bool,
    /// Slots of this budget granted so far, by every replica.
    pub granted: u64,
    /// How far ahead of now the budget is booked, after this slot.
    pub booked: Duration,
    /// How long from now a throttling pause still lasts (zero: none).
    pub paused_for: Duration,
}

/// A throttling pause of one budget, announced by the replica that was
/// throttled (Postgres NOTIFY): it lasts `lasts` from when it is heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetPause {
    pub region: String,
    pub operation: String,
    pub lasts: Duration,
}

impl BudgetPause {
    fn encode(&self) -> String {
        format!("{}\t{}\t{}", self.region, self.operation, nanos(self.lasts))
    }

    pub(super) fn decode(payload: &str) -> Option<BudgetPause> {
        let mut parts = payload.split('\t');
        let (region, operation, lasts) = (parts.next()?, parts.next()?, parts.next()?);
        Some(BudgetPause {
            region: region.to_owned(),
            operation: operation.to_owned(),
            lasts: duration(lasts.parse().ok()?),
        })
    }
}

/// The database's clock in nanoseconds since the epoch (microsecond
/// precision), a macro so statements stay `&'static str`.
macro_rules! db_now {
    () => {
        "((EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT * 1000)"
    };
}
pub(super) use db_now;

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn duration(nanos: i64) -> Duration {
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

impl Store {
    /// Whether replicas share this database, and so must share the upstream
    /// budget through it (Postgres); a SQLite cache serves one process.
    pub fn is_shared(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// Takes the next slot of `region`'s `operation` budget, `interval` after
    /// the one before it (and not before a throttling pause ends), if that
    /// slot lies at most `within` from now; otherwise takes nothing and
    /// answers `None`. One statement.
    pub async fn take_slot(
        &self,
        region: &str,
        operation: &str,
        interval: Duration,
        within: Duration,
    ) -> Result<Option<Slot>> {
        self.ensure_shared()?;
        let row = sqlx::query(concat!(
            "INSERT INTO upstream_budgets AS b (region, operation, tat, granted) \
             VALUES ($1, $2, ",
            db_now!(),
            " + $3, 1) \
             ON CONFLICT (region, operation) DO UPDATE SET \
               tat = GREATEST(b.tat, b.paused_until, excluded.tat - $3) + $3, \
               granted = b.granted + 1 \
             WHERE GREATEST(b.tat, b.paused_until, excluded.tat - $3) <= excluded.tat - $3 + $4 \
             RETURNING b.tat - ",
            db_now!(),
            " AS ahead, b.next_pause, b.granted, b.paused_until - ",
            db_now!(),
            " AS paused_for"
        ))
        .bind(region)
        .bind(operation)
        .bind(nanos(interval))
        .bind(nanos(within))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let ahead: i64 = row.try_get(0)?;
        let next_pause: i64 = row.try_get(1)?;
        let granted: i64 = row.try_get(2)?;
        let paused_for: i64 = row.try_get(3)?;
        Ok(Some(Slot {
            delay: duration(ahead.saturating_sub(nanos(interval))),
            pausing: next_pause > 0,
            granted: u64::try_from(granted).unwrap_or(0),
            booked: duration(ahead),
            paused_for: duration(paused_for),
        }))
    }

    /// How long from now until `region`'s `operation` has a free slot
    /// (zero: now), as the fleet's budget stands.
    pub async fn budget_free_in(&self, region: &str, operation: &str) -> Result<Duration> {
        self.ensure_shared()?;
        let ahead: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT GREATEST(tat, paused_until) - ",
            db_now!(),
            " FROM upstream_budgets WHERE region = $1 AND operation = $2"
        ))
        .bind(region)
        .bind(operation)
        .fetch_optional(&self.pool)
        .await?;
        Ok(duration(ahead.unwrap_or(0)))
    }

    /// Records a ThrottlingException for `region`'s `operation`: unless a
    /// pause is already in force, no slot is granted for the next pause
    /// (`first`, doubling with each one in a row, up to `max`). Returns the
    /// pause in force.
    pub async fn pause_budget(
        &self,
        region: &str,
        operation: &str,
        first: Duration,
        max: Duration,
    ) -> Result<Duration> {
        self.ensure_shared()?;
        let pause: Option<i64> = sqlx::query_scalar(concat!(
            "WITH now AS (SELECT ",
            db_now!(),
            " AS t) \
             UPDATE upstream_budgets AS b SET \
               paused_until = CASE WHEN b.paused_until > now.t THEN b.paused_until \
                                   ELSE now.t + GREATEST(b.next_pause, $3) END, \
               next_pause = CASE WHEN b.paused_until > now.t THEN b.next_pause \
                                 ELSE LEAST(GREATEST(b.next_pause, $3) * 2, $4) END \
             FROM now \
             WHERE b.region = $1 AND b.operation = $2 \
             RETURNING b.paused_until - now.t"
        ))
        .bind(region)
        .bind(operation)
        .bind(nanos(first))
        .bind(nanos(max))
        .fetch_optional(&self.pool)
        .await?;
        let pause = duration(pause.unwrap_or(0));
        // Replicas holding slots booked before it stop using them.
        let announced = BudgetPause {
            region: region.to_owned(),
            operation: operation.to_owned(),
            lasts: pause,
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::BUDGET_CHANNEL)
            .bind(announced.encode())
            .execute(&self.pool)
            .await?;
        Ok(pause)
    }

    /// Throttling pauses of the fleet's budget, as any replica (this one
    /// included) announces them, while [`Store::listen`] runs.
    pub fn budget_pauses(&self) -> tokio::sync::broadcast::Receiver<BudgetPause> {
        self.pauses.subscribe()
    }

    /// Ends a run of throttling pauses of `region`'s `operation` once no
    /// pause is in force: the next ThrottlingException pauses briefly again.
    pub async fn end_budget_pauses(&self, region: &str, operation: &str) -> Result<()> {
        self.ensure_shared()?;
        sqlx::query(concat!(
            "UPDATE upstream_budgets SET next_pause = 0 \
             WHERE region = $1 AND operation = $2 AND next_pause > 0 AND paused_until <= ",
            db_now!()
        ))
        .bind(region)
        .bind(operation)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn ensure_shared(&self) -> Result<()> {
        if self.is_shared() {
            Ok(())
        } else {
            Err(Error::Internal(anyhow::anyhow!(
                "the shared upstream budget needs a Postgres cache"
            )))
        }
    }
}
