//! Fault injection: latency, errors and AWS's per-operation TPS limit. All off by
//! default.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

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
    /// Calls per second allowed for each operation; over it,
    /// ThrottlingException.
    pub tps_limit: Option<TpsLimit>,
}

/// The calls per second the emulator allows each operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpsLimit {
    /// AWS's published rates: 5 for the room calls, 10 for the tag calls.
    Aws,
    /// One rate for every operation.
    PerOperation(NonZeroU32),
}

impl TpsLimit {
    pub fn of(self, op: Operation) -> NonZeroU32 {
        match self {
            TpsLimit::Aws => op.aws_rate(),
            TpsLimit::PerOperation(rate) => rate,
        }
    }
}

impl From<NonZeroU32> for TpsLimit {
    fn from(rate: NonZeroU32) -> TpsLimit {
        TpsLimit::PerOperation(rate)
    }
}

impl std::str::FromStr for TpsLimit {
    type Err = String;

    /// `aws`, or a whole number of calls per second above 0.
    fn from_str(s: &str) -> Result<TpsLimit, String> {
        if s.eq_ignore_ascii_case("aws") {
            return Ok(TpsLimit::Aws);
        }
        s.parse().map(TpsLimit::PerOperation).map_err(|_| {
            format!("expected `aws` or a whole number of calls per second above 0, got {s}")
        })
    }
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
    /// One limiter per operation, in [`Operation::ALL`]'s order.
    limiters: Option<Arc<Vec<DefaultDirectRateLimiter>>>,
}

impl ActiveFaults {
    pub(crate) fn new(faults: Faults) -> ActiveFaults {
        let limiters = faults.tps_limit.map(|limit| {
            Arc::new(
                Operation::ALL
                    .into_iter()
                    .map(|op| RateLimiter::direct(Quota::per_second(limit.of(op))))
                    .collect(),
            )
        });
        ActiveFaults { faults, limiters }
    }

    /// Whether `op` is over its TPS limit now (and so must be throttled).
    pub(crate) fn over_limit(&self, op: Operation) -> bool {
        self.limiters
            .as_ref()
            .is_some_and(|limiters| limiters[op.index()].check().is_err())
    }

    /// The calls per second `op` is allowed (0: no limit).
    pub(crate) fn limit_of(&self, op: Operation) -> u32 {
        self.faults.tps_limit.map_or(0, |limit| limit.of(op).get())
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
    fn tps_limits_parse() {
        assert_eq!("aws".parse(), Ok(TpsLimit::Aws));
        assert_eq!("AWS".parse(), Ok(TpsLimit::Aws));
        let five = NonZeroU32::new(5).unwrap();
        assert_eq!("5".parse(), Ok(TpsLimit::PerOperation(five)));
        assert!("0".parse::<TpsLimit>().is_err());
        assert!("fast".parse::<TpsLimit>().is_err());
        assert_eq!(TpsLimit::Aws.of(Operation::GetRoom).get(), 5);
        assert_eq!(TpsLimit::Aws.of(Operation::TagResource).get(), 10);
        assert_eq!(
            TpsLimit::PerOperation(five).of(Operation::TagResource),
            five
        );
    }

    /// `aws` lets each operation through at its own published rate.
    #[test]
    fn aws_limits_are_per_operation() {
        let active = ActiveFaults::new(Faults {
            tps_limit: Some(TpsLimit::Aws),
            ..Faults::default()
        });
        let passed = |op| (0..30).filter(|_| !active.over_limit(op)).count();
        assert_eq!(passed(Operation::GetRoom), 5);
        assert_eq!(passed(Operation::TagResource), 10);
        assert_eq!(passed(Operation::ListTagsForResource), 10);
    }

    #[test]
    fn no_faults_by_default() {
        let active = ActiveFaults::new(Faults::default());
        assert!((0..10_000).all(|_| active.draw().is_none()));
    }
}
