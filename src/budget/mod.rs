//! The upstream budget: how many calls per second each IVS Chat operation may
//! take, spent on users first. One contract, two implementations, chosen in
//! the server's wiring:
//!
//! - [`LocalBudget`] (`local.rs`): governor token buckets in this process,
//!   for a SQLite cache (one process);
//! - [`SharedBudget`] (`shared.rs`): one GCRA row per (region, operation) in
//!   the Postgres cache, so replicas sharing it spend one budget together.
//!
//! AWS allows 5 calls per second per room operation (10 for the tag calls)
//! per account and region, and will not raise it. Calls of one operation are
//! spaced a little wider than `1 / rate` (the headroom: 1.04 in one process,
//! 1.06 for the fleet) so that late sends and network jitter cannot put one
//! call too many into one of AWS's one-second windows.
//! Every attempt sent upstream, retries included, takes a slot first.
//!
//! What both promise:
//! - a user waits at most until its deadline (or `max_wait`); a wait that
//!   cannot end in time is refused at once with RESOURCE_EXHAUSTED, and a
//!   refused request holds no slot;
//! - background work (the reconciler) takes a slot only when no user is
//!   waiting for one: it spends what users leave;
//! - a ThrottlingException from IVS Chat (someone else spends the account's
//!   quota too) pauses the operation, for longer each time it repeats, until
//!   a call succeeds again.
//!
//! All waiting uses tokio's clock, so tests can run the local budget under
//! paused time.

mod local;
mod shared;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

pub use crate::domain::Operation;
use crate::domain::Result;
pub use local::LocalBudget;
pub use shared::SharedBudget;

/// Who is asking for a call upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A client request, which waits for a slot until its deadline (when
    /// unset, for at most the budget's `max_wait`).
    User { deadline: Option<Instant> },
    /// Work of the service's own (the reconciler): only when no user waits.
    Background,
}

impl Caller {
    /// A client request without a deadline.
    pub const USER: Caller = Caller::User { deadline: None };
}

/// The budget's contract. Share it behind an `Arc`.
#[async_trait::async_trait]
pub trait Budget: Send + Sync {
    /// Waits for a slot to call `op`, as `caller` may; RESOURCE_EXHAUSTED
    /// when a user's wait would outlast its deadline (nothing is then held),
    /// UNAVAILABLE when the budget cannot be consulted.
    async fn acquire(&self, op: Operation, caller: Caller) -> Result<()>;

    /// Waits until background work could take a slot of `op` now (no user
    /// waits for one, none is paused): background work that must hold
    /// something users may need for its call (a room's turn) waits here
    /// first, so it holds it only briefly. Takes nothing: `acquire` still
    /// must. Returns at once when the budget cannot be consulted (`acquire`
    /// says why).
    async fn ready_for_background(&self, op: Operation);

    /// IVS Chat answered `op` without throttling: a run of pauses ends.
    async fn succeeded(&self, op: Operation);

    /// IVS Chat throttled `op`: pause it, longer each time in a row.
    /// Returns how long the pause in force lasts from now.
    async fn throttled(&self, op: Operation) -> Duration;
}

#[derive(Debug, Clone)]
pub struct BudgetSettings {
    /// Calls per second allowed for every operation, instead of AWS's
    /// published rate for each ([`Operation::aws_rate`]).
    pub rate: Option<NonZeroU32>,
    /// Per-operation rates, over `rate` and the published ones.
    pub rates: HashMap<Operation, NonZeroU32>,
    /// How long a request without a deadline may wait for a slot.
    pub max_wait: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            rate: None,
            rates: HashMap::new(),
            max_wait: Duration::from_secs(10),
        }
    }
}

impl BudgetSettings {
    /// The calls per second `op` may take.
    pub fn rate_of(&self, op: Operation) -> NonZeroU32 {
        self.rates
            .get(&op)
            .copied()
            .or(self.rate)
            .unwrap_or_else(|| op.aws_rate())
    }

    /// How far apart calls of `op` are spaced, `headroom` times `1 / rate`.
    pub fn interval_of(&self, op: Operation, headroom: f64) -> Duration {
        Duration::from_secs_f64(headroom / f64::from(self.rate_of(op).get()))
            .max(Duration::from_nanos(1))
    }
}

/// How much wider than `1 / rate` calls are spaced: IVS Chat counts calls
/// when they arrive, and calls sent 200 ms apart can arrive closer. At 5 per
/// second with a headroom of 1.04, six calls span at least 1.04 s: any one
/// call may arrive up to 40 ms later than its slot without a sixth in one of
/// AWS's seconds. One process ([`LocalBudget`]) sends a call as soon as its
/// token is taken, so 40 ms is left for a busy host and the network, and
/// 96 % of the rate is used.
const LOCAL_HEADROOM: f64 = 1.04;

/// The fleet's headroom ([`SharedBudget`]): a replica sleeps until its slot
/// after a database round trip and sends up to 30 ms after it (later, the
/// slot goes unused), so 60 ms are allowed, and 94 % of the rate is used.
const SHARED_HEADROOM: f64 = 1.06;

/// How long an operation pauses after the first ThrottlingException; it
/// doubles with each one that follows, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// The shortest a background caller sleeps before looking for a slot again.
const BACKGROUND_RECHECK: Duration = Duration::from_millis(5);

/// The refusal of a user whose wait would outlast its deadline: the budget's
/// own limit, not AWS's; `next_slot`: how long until a slot is free, where
/// known (the refusal's retry hint).
fn exhausted(
    region: &str,
    op: Operation,
    interval: Duration,
    fleet: bool,
    detail: &str,
    next_slot: Option<Duration>,
) -> crate::domain::Error {
    metrics::counter!(
        crate::telemetry::BUDGET_REFUSED,
        "operation" => op.to_string(),
        "region" => region.to_owned(),
    )
    .increment(1);
    let refused = crate::domain::Error::exhausted(
        crate::domain::Limit::Budget,
        format!(
            "the budget for IVS Chat {op} in {region} ({:.1} calls per second, AWS's rate \
             less a headroom{}) cannot serve this request before its deadline{detail}; retry \
             later",
            1.0 / interval.as_secs_f64(),
            if fleet {
                ", shared by every replica"
            } else {
                ""
            },
        ),
    );
    match next_slot {
        Some(next) => refused.retry_after(next),
        None => refused,
    }
}
