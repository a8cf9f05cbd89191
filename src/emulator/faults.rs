//! Fault injection: latency, errors and AWS's per-operation TPS limit. All off by
//! default.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::Operation;

/// Which error an injected failure is: each error shape of the model, plus
/// one the model does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InjectedError {
    /// 500 InternalServerException.
    #[default]
    Internal,
    /// 429 ThrottlingException.
    Throttling,
    /// 402 ServiceQuotaExceededException.
    ServiceQuotaExceeded,
    /// 403 AccessDeniedException.
    AccessDenied,
    /// 403 PendingVerification.
    PendingVerification,
    /// 409 ConflictException.
    Conflict,
    /// 400 with an error type no model defines.
    Unmodeled,
}

/// What one request draws instead of a plain answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InjectedFault {
    /// Answered with this error; the operation does not happen.
    Error(InjectedError),
    /// The operation happens, and its answer is held back this much longer:
    /// past the client's timeout, a call that took effect but whose answer was
    /// lost.
    Slow(Duration),
}

/// Faults to inject. The default injects nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Added before every response is sent (the operation has already happened,
    /// as with a slow network on the way back).
    pub latency: Duration,
    /// Per-operation latency, instead of `latency` for those operations.
    pub latency_by_operation: HashMap<Operation, Duration>,
    /// Fraction of requests, 0.0 to 1.0, answered with `error` instead.
    pub error_rate: f64,
    pub error: InjectedError,
    /// More faults, each drawn by its own fraction of requests, besides
    /// `error_rate`'s (say 10 % 5xx, 10 % throttling and 10 % answers slower
    /// than the client waits). A request draws at most one; the fractions
    /// should add up to at most 1 (past it, the last ones are drawn less).
    pub mix: Vec<(InjectedFault, f64)>,
    /// Calls per second allowed for each operation (AWS allows 5); over it,
    /// ThrottlingException.
    pub tps_limit: Option<NonZeroU32>,
}

impl Faults {
    pub fn latency_for(&self, op: Operation) -> Duration {
        self.latency_by_operation
            .get(&op)
            .copied()
            .unwrap_or(self.latency)
    }
}

/// The faults in force with the rate limiter built for them.
pub(crate) struct ActiveFaults {
    pub(crate) faults: Faults,
    limiter: Option<Arc<DefaultKeyedRateLimiter<Operation>>>,
}

impl ActiveFaults {
    pub(crate) fn new(faults: Faults) -> ActiveFaults {
        let limiter = faults
            .tps_limit
            .map(|tps| Arc::new(RateLimiter::keyed(Quota::per_second(tps))));
        ActiveFaults { faults, limiter }
    }

    /// Whether `op` is over its TPS limit now (and so must be throttled).
    pub(crate) fn over_limit(&self, op: Operation) -> bool {
        self.limiter
            .as_ref()
            .is_some_and(|limiter| limiter.check_key(&op).is_err())
    }

    /// The fault this request draws, if any.
    pub(crate) fn draw(&self) -> Option<InjectedFault> {
        let error = (
            InjectedFault::Error(self.faults.error),
            self.faults.error_rate,
        );
        pick(
            std::iter::once(&error).chain(&self.faults.mix),
            rand::random::<f64>(),
        )
    }
}

/// The fault whose share of `[0, 1)`, laid end to end in order, holds `draw`.
fn pick<'a>(
    faults: impl IntoIterator<Item = &'a (InjectedFault, f64)>,
    draw: f64,
) -> Option<InjectedFault> {
    let mut below = 0.0;
    for &(fault, rate) in faults {
        below += rate;
        if draw < below {
            return Some(fault);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERNAL: InjectedFault = InjectedFault::Error(InjectedError::Internal);
    const THROTTLING: InjectedFault = InjectedFault::Error(InjectedError::Throttling);
    const SLOW: InjectedFault = InjectedFault::Slow(Duration::from_secs(1));

    #[test]
    fn each_fault_of_a_mix_takes_its_own_share() {
        let mix = [(INTERNAL, 0.1), (THROTTLING, 0.1), (SLOW, 0.1)];
        assert_eq!(pick(&mix, 0.0), Some(INTERNAL));
        assert_eq!(pick(&mix, 0.099), Some(INTERNAL));
        assert_eq!(pick(&mix, 0.15), Some(THROTTLING));
        assert_eq!(pick(&mix, 0.25), Some(SLOW));
        assert_eq!(pick(&mix, 0.31), None);
        assert_eq!(pick(&mix, 0.999), None);
        assert_eq!(pick(&[], 0.0), None);
        assert_eq!(pick(&[(INTERNAL, 1.0)], 0.999_999), Some(INTERNAL));
    }

    #[test]
    fn drawn_faults_follow_their_rates() {
        let active = ActiveFaults::new(Faults {
            error_rate: 0.1,
            error: InjectedError::Internal,
            mix: vec![(THROTTLING, 0.1), (SLOW, 0.1)],
            ..Faults::default()
        });
        const DRAWS: u32 = 100_000;
        let mut counts = [0_u32; 4];
        for _ in 0..DRAWS {
            let slot = match active.draw() {
                Some(INTERNAL) => 0,
                Some(THROTTLING) => 1,
                Some(SLOW) => 2,
                None => 3,
                Some(other) => panic!("drew {other:?}, which is not in the mix"),
            };
            counts[slot] += 1;
        }
        // Each share within 1.5 points of its rate: about 10 standard
        // deviations at 100,000 draws, so this does not flake.
        for (slot, rate) in [0.1, 0.1, 0.1, 0.7].into_iter().enumerate() {
            let share = f64::from(counts[slot]) / f64::from(DRAWS);
            assert!((share - rate).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn no_faults_by_default() {
        let active = ActiveFaults::new(Faults::default());
        assert!((0..10_000).all(|_| active.draw().is_none()));
    }
}
