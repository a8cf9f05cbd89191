//! The upstream budget: how many calls per second each IVS Chat operation may
//! take, spent on users first.
//!
//! AWS allows 5 calls per second per room operation and account, and will not
//! raise it. Each operation gets a token bucket (governor's GCRA) that spaces
//! calls `1 / rate` apart, plus a little headroom so that network jitter
//! cannot put one call too many into one of AWS's one-second windows. Every
//! attempt sent upstream, retries included, takes a token first.
//!
//! - Users queue for tokens in arrival order and wait at most until their
//!   deadline (or `max_wait`); a wait that cannot end in time is refused at
//!   once with RESOURCE_EXHAUSTED rather than after the deadline.
//! - Background work (the reconciler) takes a token only when no user is
//!   waiting for one: it spends what users leave.
//! - A ThrottlingException from IVS Chat (someone else spends the account's
//!   quota too) pauses the operation's bucket, for longer each time it
//!   repeats, until a call succeeds again.
//!
//! All waiting uses tokio's clock (governor is given it too), so tests can run
//! the budget under paused time.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use crate::telemetry;

pub use crate::domain::Operation;
use crate::domain::{Error, Result};

/// Who is asking for a call upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A client request, which waits for a token until its deadline (when
    /// unset, for at most the budget's `max_wait`).
    User { deadline: Option<Instant> },
    /// Work of the service's own (the reconciler): only when no user waits.
    Background,
}

impl Caller {
    /// A client request without a deadline.
    pub const USER: Caller = Caller::User { deadline: None };
}

#[derive(Debug, Clone)]
pub struct BudgetSettings {
    /// Calls per second allowed for each operation.
    pub rate: NonZeroU32,
    /// Per-operation rates instead of `rate`.
    pub rates: HashMap<Operation, NonZeroU32>,
    /// How long a request without a deadline may wait for a token.
    pub max_wait: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            rate: NonZeroU32::new(5).expect("5 is not zero"),
            rates: HashMap::new(),
            max_wait: Duration::from_secs(10),
        }
    }
}

/// How much wider than `1 / rate` calls are spaced: IVS Chat counts calls
/// when they arrive, and two calls sent 200 ms apart can arrive closer.
const HEADROOM: f64 = 1.02;

/// How long a bucket pauses after the first ThrottlingException; it doubles
/// with each one that follows, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// The shortest a background caller sleeps before looking for a token again.
const BACKGROUND_RECHECK: Duration = Duration::from_millis(5);

/// Governor's clock, made tokio's: paused time in tests pauses the budget.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// The token buckets, one per operation. Share it behind an `Arc`.
pub struct Budget {
    buckets: Vec<Bucket>,
    max_wait: Duration,
}

struct Bucket {
    op: Operation,
    limiter: Limiter,
    interval: Duration,
    /// Users take turns, in arrival order (tokio's mutex is fair).
    queue: tokio::sync::Mutex<()>,
    /// Users waiting for a token, the one taking it included.
    waiting: AtomicUsize,
    pause: Mutex<Pause>,
    /// When the last token was taken, to foresee the next one.
    last_taken: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Pause {
    until: Option<Instant>,
    next: Option<Duration>,
}

/// Counts a waiting user while it lives.
struct Waiting<'a>(&'a AtomicUsize, metrics::Gauge);

impl Waiting<'_> {
    fn new(count: &AtomicUsize, op: Operation) -> Waiting<'_> {
        count.fetch_add(1, Ordering::SeqCst);
        let gauge = metrics::gauge!(telemetry::BUDGET_WAITING, "operation" => op.to_string());
        gauge.increment(1);
        Waiting(count, gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.decrement(1);
    }
}

impl Budget {
    pub fn new(settings: &BudgetSettings) -> Budget {
        let buckets = Operation::ALL
            .into_iter()
            .map(|op| {
                let rate = settings.rates.get(&op).copied().unwrap_or(settings.rate);
                let interval = Duration::from_secs_f64(HEADROOM / f64::from(rate.get()))
                    .max(Duration::from_nanos(1));
                let quota = Quota::with_period(interval).expect("a positive period");
                Bucket {
                    op,
                    limiter: RateLimiter::direct_with_clock(quota, TokioClock),
                    interval,
                    queue: tokio::sync::Mutex::new(()),
                    waiting: AtomicUsize::new(0),
                    pause: Mutex::default(),
                    last_taken: Mutex::default(),
                }
            })
            .collect();
        Budget {
            buckets,
            max_wait: settings.max_wait,
        }
    }

    /// Waits for a token to call `op`, as `caller` may; RESOURCE_EXHAUSTED
    /// when a user's wait would outlast its deadline.
    pub async fn acquire(&self, op: Operation, caller: Caller) -> Result<()> {
        let bucket = &self.buckets[op.index()];
        match caller {
            Caller::User { deadline } => {
                let deadline = deadline.unwrap_or_else(|| Instant::now() + self.max_wait);
                bucket.acquire_for_user(deadline).await
            }
            Caller::Background => {
                bucket.acquire_in_background().await;
                Ok(())
            }
        }
    }

    /// IVS Chat answered `op` without throttling: a pause ends.
    pub fn succeeded(&self, op: Operation) {
        let mut pause = self.buckets[op.index()].pause.lock().expect("pause");
        pause.next = None;
    }

    /// IVS Chat throttled `op`: pause its bucket, longer each time in a row.
    pub fn throttled(&self, op: Operation) {
        let bucket = &self.buckets[op.index()];
        let mut pause = bucket.pause.lock().expect("pause");
        let length = pause.next.unwrap_or(FIRST_PAUSE);
        pause.until = Some(Instant::now() + length);
        pause.next = Some((length * 2).min(MAX_PAUSE));
        tracing::warn!(operation = %bucket.op, pause = ?length, "IVS Chat throttled a call: pausing its budget");
    }
}

impl Bucket {
    async fn acquire_for_user(&self, deadline: Instant) -> Result<()> {
        let waiting = Waiting::new(&self.waiting, self.op);
        // Those ahead each take one interval; refuse now what cannot be
        // served in time.
        let ahead = u32::try_from(waiting.0.load(Ordering::SeqCst) - 1).unwrap_or(u32::MAX);
        let next_token = self.paused_for().max(self.until_next_token());
        let expected = Instant::now() + next_token + self.interval.saturating_mul(ahead);
        if expected > deadline {
            return Err(self.exhausted(ahead));
        }
        let take = async {
            let _turn = self.queue.lock().await;
            self.take().await;
        };
        let taken = tokio::time::timeout_at(deadline, take).await;
        drop(waiting);
        taken.map_err(|_| self.exhausted(ahead))
    }

    async fn acquire_in_background(&self) {
        loop {
            if self.waiting.load(Ordering::SeqCst) == 0
                && self.paused_for().is_zero()
                && let Ok(_turn) = self.queue.try_lock()
                && self.limiter.check().is_ok()
            {
                self.taken();
                return;
            }
            // Look again a token later (never spinning on a fast bucket).
            let later = self.interval.max(self.paused_for()).max(BACKGROUND_RECHECK);
            tokio::time::sleep(later).await;
        }
    }

    /// Takes the next token, waiting out a pause and the bucket's spacing.
    async fn take(&self) {
        loop {
            let paused = self.paused_for();
            if !paused.is_zero() {
                tokio::time::sleep(paused).await;
                continue;
            }
            match self.limiter.check() {
                Ok(()) => {
                    self.taken();
                    return;
                }
                Err(not_until) => {
                    tokio::time::sleep(not_until.wait_time_from(TokioClock.now())).await;
                }
            }
        }
    }

    fn taken(&self) {
        metrics::counter!(telemetry::BUDGET_TOKENS, "operation" => self.op.to_string())
            .increment(1);
        *self.last_taken.lock().expect("last taken") = Some(Instant::now());
    }

    /// When the bucket will next have a token, as far as can be foreseen.
    fn until_next_token(&self) -> Duration {
        self.last_taken
            .lock()
            .expect("last taken")
            .map(|last| (last + self.interval).saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    fn paused_for(&self) -> Duration {
        let pause = self.pause.lock().expect("pause");
        pause
            .until
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    fn exhausted(&self, ahead: u32) -> Error {
        metrics::counter!(telemetry::BUDGET_REFUSED, "operation" => self.op.to_string())
            .increment(1);
        Error::ResourceExhausted(format!(
            "the budget for IVS Chat {} ({:.1} calls per second) cannot serve this request \
             before its deadline: {ahead} requests are ahead of it; retry later",
            self.op,
            1.0 / self.interval.as_secs_f64()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(rate: u32) -> Budget {
        Budget::new(&BudgetSettings {
            rate: NonZeroU32::new(rate).unwrap(),
            ..BudgetSettings::default()
        })
    }

    /// A wait that cannot end before the deadline is refused at once.
    #[tokio::test(start_paused = true)]
    async fn a_hopeless_wait_is_refused_at_once() {
        let budget = budget(5);
        budget
            .acquire(Operation::GetRoom, Caller::USER)
            .await
            .unwrap();
        let start = Instant::now();
        let deadline = Some(start + Duration::from_millis(50));
        let err = budget
            .acquire(Operation::GetRoom, Caller::User { deadline })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
        assert_eq!(Instant::now(), start, "refused without waiting");
        // Other operations have buckets of their own.
        budget
            .acquire(Operation::UpdateRoom, Caller::User { deadline })
            .await
            .unwrap();
    }
}
