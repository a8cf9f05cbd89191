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

    /// Whether this request draws an injected error.
    pub(crate) fn draw_error(&self) -> Option<InjectedError> {
        (self.faults.error_rate > 0.0 && rand::random::<f64>() < self.faults.error_rate)
            .then_some(self.faults.error)
    }
}
