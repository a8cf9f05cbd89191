//! The in-process budget: a governor token bucket per IVS Chat operation,
//! for a cache that serves one process (SQLite).
//!
//! Users queue for tokens in arrival order (a fair mutex) and are refused at
//! once when the foreseeable wait passes their deadline; background callers
//! take a token only when no user waits. Governor is given tokio's clock, so
//! paused time in tests pauses the budget.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::{
    BACKGROUND_RECHECK, Budget, BudgetSettings, Caller, FIRST_PAUSE, LOCAL_HEADROOM, MAX_PAUSE,
    Operation, exhausted,
};
use crate::domain::{Error, Result};
use crate::telemetry;

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

/// The token buckets of one region, one per operation. Share it behind an
/// `Arc`.
pub struct LocalBudget {
    buckets: Vec<Bucket>,
    max_wait: Duration,
}

struct Bucket {
    region: String,
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
    fn new<'a>(count: &'a AtomicUsize, region: &str, op: Operation) -> Waiting<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        let gauge = metrics::gauge!(
            telemetry::BUDGET_WAITING,
            "operation" => op.to_string(),
            "region" => region.to_owned(),
        );
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

impl LocalBudget {
    /// The budget of `region`'s calls.
    pub fn new(region: &str, settings: &BudgetSettings) -> LocalBudget {
        let buckets = Operation::ALL
            .into_iter()
            .map(|op| {
                let interval = settings.interval_of(op, LOCAL_HEADROOM);
                let quota = Quota::with_period(interval).expect("a positive period");
                Bucket {
                    region: region.to_owned(),
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
        LocalBudget {
            buckets,
            max_wait: settings.max_wait,
        }
    }
}

#[async_trait::async_trait]
impl Budget for LocalBudget {
    async fn acquire(&self, op: Operation, caller: Caller) -> Result<()> {
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

    async fn ready_for_background(&self, op: Operation) {
        let bucket = &self.buckets[op.index()];
        loop {
            let later = bucket.paused_for().max(bucket.until_next_token());
            if later.is_zero() && bucket.waiting.load(Ordering::SeqCst) == 0 {
                return;
            }
            tokio::time::sleep(later.max(BACKGROUND_RECHECK)).await;
        }
    }

    async fn succeeded(&self, op: Operation) {
        let mut pause = self.buckets[op.index()].pause.lock().expect("pause");
        pause.next = None;
    }

    async fn throttled(&self, op: Operation) -> Duration {
        let bucket = &self.buckets[op.index()];
        let mut pause = bucket.pause.lock().expect("pause");
        let length = pause.next.unwrap_or(FIRST_PAUSE);
        pause.until = Some(Instant::now() + length);
        pause.next = Some((length * 2).min(MAX_PAUSE));
        tracing::warn!(
            operation = %bucket.op,
            region = bucket.region,
            pause = ?length,
            "IVS Chat throttled a call: pausing its budget"
        );
        length
    }
}

impl Bucket {
    async fn acquire_for_user(&self, deadline: Instant) -> Result<()> {
        let waiting = Waiting::new(&self.waiting, &self.region, self.op);
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
            // Look again when the next token comes (a user waiting takes it
            // first), never spinning on a fast bucket: sleeping a whole
            // interval instead would leave part of every slot unused.
            let mut later = self.paused_for().max(self.until_next_token());
            if self.waiting.load(Ordering::SeqCst) == 0
                && later.is_zero()
                && let Ok(_turn) = self.queue.try_lock()
            {
                match self.limiter.check() {
                    Ok(()) => {
                        self.taken();
                        return;
                    }
                    Err(not_until) => later = not_until.wait_time_from(TokioClock.now()),
                }
            }
            tokio::time::sleep(later.max(BACKGROUND_RECHECK)).await;
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
        metrics::counter!(
            telemetry::BUDGET_TOKENS,
            "operation" => self.op.to_string(),
            "region" => self.region.clone(),
        )
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

    /// The refusal of a user with `ahead` users before it; its retry hint
    /// is when the slot after theirs comes.
    fn exhausted(&self, ahead: u32) -> Error {
        let next_slot =
            self.paused_for().max(self.until_next_token()) + self.interval.saturating_mul(ahead);
        exhausted(
            &self.region,
            self.op,
            self.interval,
            false,
            &format!(": {ahead} requests are ahead of it"),
            Some(next_slot),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(rate: u32) -> LocalBudget {
        LocalBudget::new(
            "us-east-1",
            &BudgetSettings {
                rate: std::num::NonZeroU32::new(rate),
                ..BudgetSettings::default()
            },
        )
    }

    /// Background work takes each token when it comes, however long after
    /// the last it asks: no part of a slot goes unused (a sequence of
    /// background calls runs at the whole rate).
    #[tokio::test(start_paused = true)]
    async fn background_work_takes_the_next_token_when_it_comes() {
        let budget = budget(5);
        let interval = BudgetSettings::default().interval_of(Operation::GetRoom, LOCAL_HEADROOM);
        let start = Instant::now();
        budget
            .acquire(Operation::GetRoom, Caller::Background)
            .await
            .unwrap();
        assert_eq!(Instant::now(), start);
        // The call took 45 ms; the next token is `interval` after the first.
        tokio::time::advance(Duration::from_millis(45)).await;
        budget
            .acquire(Operation::GetRoom, Caller::Background)
            .await
            .unwrap();
        let took = Instant::now() - start;
        assert!(
            took >= interval && took < interval + BACKGROUND_RECHECK,
            "the second token taken {took:?} after the first, every {interval:?}"
        );
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
        assert!(matches!(err, Error::ResourceExhausted { .. }), "{err:?}");
        assert_eq!(Instant::now(), start, "refused without waiting");
        // Other operations have buckets of their own.
        budget
            .acquire(Operation::UpdateRoom, Caller::User { deadline })
            .await
            .unwrap();
    }
}
