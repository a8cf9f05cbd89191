//! What the service tells its operators, one concern per file:
//!
//! - `metrics.rs`: Prometheus metrics, their names and the `/metrics`
//!   endpoint (re-exported here: `telemetry::REQUESTS`, `telemetry::recorder`).
//! - `logs.rs`: the log (text or JSON lines, `RUST_LOG`), the access log
//!   among it; JSON lines carry trace ids while traces are exported.
//! - [`traces`]: OpenTelemetry traces over OTLP/gRPC, on only when the
//!   standard `OTEL_EXPORTER_OTLP_*` variables ask for them: the spans, W3C
//!   trace context from the request's metadata, the exporter.
//!
//! [`init`] installs the log and the traces for the process; the binary calls
//! it first thing, and a test may too.

mod logs;
mod metrics;
pub mod traces;

use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use self::metrics::*;
use crate::config::LogFormat;

/// The log and traces of the process, as [`init`] installed them. Shut it
/// down when the process is done, so the last spans are exported.
pub struct Telemetry {
    traces: Option<traces::Traces>,
}

/// Installs the process's log (to stderr, in `format`, filtered by
/// `RUST_LOG`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, the export of its traces;
/// with neither, no OpenTelemetry layer is installed at all. Call once,
/// within the tokio runtime. The log is installed even when the traces'
/// configuration is wrong (the error), so that the error can be logged.
pub fn init(format: LogFormat) -> anyhow::Result<Telemetry> {
    let lookup = logs::TraceLookup::default();
    let log = logs::layer(format, std::io::stderr, Arc::clone(&lookup));
    let (traces, error) = match traces::Traces::from_env() {
        Ok(traces) => (traces, None),
        Err(e) => (None, Some(e)),
    };
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(log)
            // Last: it ends a span after the log has written its line.
            .with(traces.as_ref().map(|traces| traces.layer())),
    );
    if traces.is_some() {
        let _ = lookup.set(dispatch.downgrade());
    }
    dispatch.try_init()?;
    match error {
        Some(e) => Err(e),
        None => Ok(Telemetry { traces }),
    }
}

impl Telemetry {
    /// Exports the spans not exported yet and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(traces) = self.traces {
            traces.shutdown().await;
        }
    }
}
