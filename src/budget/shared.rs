//! The fleet's budget: replicas sharing a Postgres cache spend one budget per
//! (region, operation) together, through the database.
//!
//! Each budget is a GCRA row (`store::budget`): its theoretical arrival time
//! is the instant from which the next slot is free. A user takes a slot by
//! one conditional statement that moves it on by the interval only if the
//! slot lies before the user's deadline; then it sleeps until the slot and
//! sends. So, summed over every replica, slots are spaced at least
//! `1.06 / rate` apart, a replica alone gets the whole rate, and a refused
//! request holds nothing. A background caller takes a slot only if it is free
//! now: any user waiting on any replica holds a slot ahead of now, so
//! background work never takes a slot a user could have had. A
//! ThrottlingException moves the row's pause on, so no replica gets a slot
//! before it ends, and announces it (Postgres NOTIFY): a replica that hears
//! of a pause, or its own throttle, leaves the slots it booked before it
//! unused and takes new ones after it.
//!
//! Faults: a replica killed while holding slots wastes those slots, nothing
//! more. While the database cannot be reached, no slot is given at all
//! (UNAVAILABLE: fail closed): another replica may still reach it and spend
//! the whole rate, so any local share would add to it. Cached reads are still
//! answered then (stale-if-error), and the next call that reaches the
//! database takes slots again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    BACKGROUND_RECHECK, Budget, BudgetSettings, Caller, FIRST_PAUSE, MAX_PAUSE, Operation,
    SHARED_HEADROOM, exhausted,
};
use crate::domain::{Error, Result};
use crate::store::Store;
use crate::telemetry;

/// The longest taking a slot may wait for the database.
const DATABASE_WAIT: Duration = Duration::from_secs(5);

pub struct SharedBudget {
    store: Store,
    region: String,
    ops: Arc<Vec<Shared>>,
    max_wait: Duration,
}

struct Shared {
    op: Operation,
    name: String,
    region: String,
    interval: Duration,
    /// A run of throttling pauses is on, as far as this replica last saw: a
    /// success ends it (one more statement, only then).
    pausing: AtomicBool,
    /// The end of the newest pause this replica knows of (its own throttles,
    /// and what its slots said): a slot of its own that falls inside is not
    /// used.
    paused_until: std::sync::Mutex<Option<Instant>>,
}

/// What one try at a slot came to.
enum Taken {
    /// The slot has come: send.
    Slot,
    /// None in time.
    None,
    /// The slot came inside a pause learnt of meanwhile, or this replica
    /// woke too late for it: unused.
    Unused,
}

/// How late after its slot a replica may still send: a call sent later
/// could arrive closer than the interval to the next slot's (another
/// replica's, on time), so the slot goes unused and another is taken.
const LATE_WAKE: Duration = Duration::from_millis(30);

impl SharedBudget {
    /// The budgets of `region` in `store`, which must be shared (Postgres).
    /// Call within a tokio runtime: it hears other replicas' pauses.
    pub fn new(store: Store, region: &str, settings: &BudgetSettings) -> SharedBudget {
        let ops: Arc<Vec<Shared>> = Arc::new(
            Operation::ALL
                .into_iter()
                .map(|op| Shared {
                    op,
                    name: op.to_string(),
                    region: region.to_owned(),
                    interval: settings.interval_of(op, SHARED_HEADROOM),
                    pausing: AtomicBool::new(false),
                    paused_until: std::sync::Mutex::new(None),
                })
                .collect(),
        );
        // Pauses other replicas were throttled into: slots booked here
        // before it are not used. Ends with the store.
        let mut pauses = store.budget_pauses();
        let heard = Arc::downgrade(&ops);
        let region_heard = region.to_owned();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let pause = match pauses.recv().await {
                    Ok(pause) => pause,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                };
                let Some(ops) = heard.upgrade() else { return };
                if pause.region == region_heard
                    && let Some(shared) = ops.iter().find(|s| s.name == pause.operation)
                {
                    shared.pause_until(Instant::now() + pause.lasts);
                    shared.pausing.store(true, Ordering::Relaxed);
                }
            }
        });
        SharedBudget {
            store,
            region: region.to_owned(),
            ops,
            max_wait: settings.max_wait,
        }
    }

    /// One try at a slot at most `within` from now; sleeps until it.
    async fn try_take(&self, shared: &Shared, within: Duration) -> Result<Taken> {
        let asked = Instant::now();
        let taken = tokio::time::timeout(
            DATABASE_WAIT,
            self.store
                .take_slot(&self.region, &shared.name, shared.interval, within),
        )
        .await;
        let slot = match taken {
            Ok(Ok(slot)) => slot,
            Ok(Err(e)) => return Err(unreachable(shared.op, &e.to_string())),
            Err(_) => return Err(unreachable(shared.op, "it did not answer in time")),
        };
        let Some(slot) = slot else {
            return Ok(Taken::None);
        };
        shared.pausing.store(slot.pausing, Ordering::Relaxed);
        shared.pause_until(Instant::now() + slot.paused_for);
        let labels = [
            ("operation", shared.name.clone()),
            ("region", self.region.clone()),
        ];
        metrics::counter!(telemetry::BUDGET_TOKENS, &labels).increment(1);
        metrics::gauge!(telemetry::BUDGET_FLEET_SLOTS, &labels).set(slot.granted as f64);
        metrics::gauge!(telemetry::BUDGET_FLEET_BOOKED, &labels).set(slot.booked.as_secs_f64());
        // The slot is `delay` after the database answered, which was between
        // asking and now: sleep until the latest it can be (never early), and
        // judge lateness from the earliest (a busy process reads the answer
        // late too).
        let at = Instant::now() + slot.delay;
        let earliest = asked + slot.delay;
        tokio::time::sleep_until(at).await;
        // Booked before a throttle this replica has heard of since: IVS Chat
        // asked for a pause, so the slot goes unused.
        if shared.paused_for() > Duration::ZERO {
            return Ok(shared.unused("paused"));
        }
        // A busy host woke this replica late: sent now, the call could come
        // too close to the next slot's.
        if Instant::now().saturating_duration_since(earliest) > LATE_WAKE {
            return Ok(shared.unused("late"));
        }
        Ok(Taken::Slot)
    }
}

impl Shared {
    /// A slot given up, counted (`reason`: `paused` or `late`).
    fn unused(&self, reason: &'static str) -> Taken {
        metrics::counter!(
            telemetry::BUDGET_UNUSED,
            "operation" => self.name.clone(),
            "region" => self.region.clone(),
            "reason" => reason,
        )
        .increment(1);
        Taken::Unused
    }

    fn pause_until(&self, until: Instant) {
        let mut paused = self.paused_until.lock().expect("pause");
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    fn paused_for(&self) -> Duration {
        self.paused_until
            .lock()
            .expect("pause")
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }
}

/// The database could not be asked for a slot: nothing is sent (the fleet's
/// rate cannot be kept otherwise).
fn unreachable(op: Operation, why: &str) -> Error {
    tracing::warn!(operation = %op, error = why, "could not take a slot of the fleet's budget");
    Error::unavailable(format!(
        "the cache database, which holds the fleet's budget of IVS Chat calls, cannot be \
         reached ({why}), so this replica sends no {op}; retry"
    ))
}

#[async_trait::async_trait]
impl Budget for SharedBudget {
    async fn acquire(&self, op: Operation, caller: Caller) -> Result<()> {
        let shared = &self.ops[op.index()];
        match caller {
            Caller::User { deadline } => {
                let deadline = deadline.unwrap_or(Instant::now() + self.max_wait);
                let waiting = metrics::gauge!(
                    telemetry::BUDGET_WAITING,
                    "operation" => shared.name.clone(),
                    "region" => self.region.clone(),
                );
                waiting.increment(1);
                let taken = loop {
                    let within = deadline.saturating_duration_since(Instant::now());
                    // Past its deadline already: no slot can serve it.
                    if within.is_zero() {
                        break Ok(Taken::None);
                    }
                    match self.try_take(shared, within).await {
                        Ok(Taken::Unused) => continue,
                        other => break other,
                    }
                };
                waiting.decrement(1);
                match taken? {
                    Taken::Slot => Ok(()),
                    Taken::None | Taken::Unused => {
                        // The retry hint: when the fleet's next free slot comes.
                        let next_slot = self
                            .store
                            .budget_free_in(&self.region, &shared.name)
                            .await
                            .ok();
                        Err(exhausted(
                            &self.region,
                            op,
                            shared.interval,
                            true,
                            ": every slot until then is taken or paused",
                            next_slot,
                        ))
                    }
                }
            }
            // Only a slot free now: a user waiting anywhere holds one ahead.
            Caller::Background => loop {
                if let Taken::Slot = self.try_take(shared, Duration::ZERO).await? {
                    return Ok(());
                }
                tokio::time::sleep(shared.interval.max(BACKGROUND_RECHECK)).await;
            },
        }
    }

    async fn ready_for_background(&self, op: Operation) {
        let shared = &self.ops[op.index()];
        loop {
            // A user waiting on any replica has booked a slot ahead of now.
            let free_in = match self.store.budget_free_in(&self.region, &shared.name).await {
                Ok(free_in) => free_in.max(shared.paused_for()),
                Err(_) => return,
            };
            if free_in.is_zero() {
                return;
            }
            tokio::time::sleep(free_in.max(BACKGROUND_RECHECK)).await;
        }
    }

    async fn succeeded(&self, op: Operation) {
        let shared = &self.ops[op.index()];
        if shared.pausing.swap(false, Ordering::Relaxed)
            && let Err(e) = self
                .store
                .end_budget_pauses(&self.region, &shared.name)
                .await
        {
            shared.pausing.store(true, Ordering::Relaxed);
            tracing::warn!(operation = %op, error = %e, "could not end the fleet's throttling pauses");
        }
    }

    async fn throttled(&self, op: Operation) -> Duration {
        let shared = &self.ops[op.index()];
        match self
            .store
            .pause_budget(&self.region, &shared.name, FIRST_PAUSE, MAX_PAUSE)
            .await
        {
            Ok(pause) => {
                shared.pausing.store(true, Ordering::Relaxed);
                shared.pause_until(Instant::now() + pause);
                tracing::warn!(operation = %op, ?pause, "IVS Chat throttled a call: pausing the fleet's budget");
                pause
            }
            // The retry's slot will wait for the database too.
            Err(e) => {
                tracing::warn!(operation = %op, error = %e, "IVS Chat throttled a call; could not pause the fleet's budget");
                FIRST_PAUSE
            }
        }
    }
}
