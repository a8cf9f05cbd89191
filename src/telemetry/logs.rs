//! The log: to stderr, filtered by `RUST_LOG` (default `info`), as text or
//! one JSON object per line. Spans are logged when they close: that is the
//! access log (`grpc::AccessLogLayer`). While traces are exported, a JSON
//! line logged inside a traced span also carries its `trace_id` and
//! `span_id` (hex), to find the line's request in the traces.

use std::io::IsTerminal as _;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt as _;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FmtSpan, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::{EnvFilter, Layer};

use super::traces::SPANS;
use crate::config::LogFormat;

/// Where a JSON line finds the trace of the span it is logged in: the
/// process's subscriber, known once it is made (and only while traces are
/// exported).
pub(super) type TraceLookup = Arc<OnceLock<WeakDispatch>>;

/// The log layer: `format` lines to `writer`, filtered by `RUST_LOG`.
/// Spans for traces only ([`SPANS`]) are left out. JSON lines look up their
/// trace ids in `traces` once it is set.
pub(super) fn layer<W>(
    format: LogFormat,
    writer: W,
    traces: TraceLookup,
) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info".into())
        .add_directive(format!("{SPANS}=off").parse().expect("a valid directive"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_span_events(FmtSpan::CLOSE);
    match format {
        LogFormat::Text => layer
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => layer
            .json()
            .event_format(WithTraceIds {
                inner: format::format().json(),
                traces,
            })
            .with_filter(filter)
            .boxed(),
    }
}

/// A JSON event format that adds `trace_id` and `span_id` to the line when
/// it is logged inside a span that traces know.
struct WithTraceIds<F> {
    inner: F,
    traces: TraceLookup,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = self.ids(event) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // One object and a newline: the ids go in before its closing brace.
        match line.trim_end().strip_suffix('}') {
            Some(object) => {
                let comma = if object.ends_with('{') { "" } else { "," };
                writeln!(
                    writer,
                    r#"{object}{comma}"trace_id":"{trace_id}","span_id":"{span_id}"}}"#
                )
            }
            None => writer.write_str(&line),
        }
    }
}

impl<F> WithTraceIds<F> {
    /// The trace and span ids (hex) of the innermost span around `event`
    /// that traces know, when traces are exported.
    fn ids(&self, event: &Event<'_>) -> Option<(String, String)> {
        let dispatch: Dispatch = self.traces.get()?.upgrade()?;
        let registry = dispatch.downcast_ref::<Registry>()?;
        // The event's own parent, or the current span: all of them, not
        // only those the log shows (an IVS Chat attempt, a transaction).
        let id = match event.parent() {
            Some(id) => id.clone(),
            None if event.is_contextual() => dispatch.current_span().id()?.clone(),
            None => return None,
        };
        let span = registry.span(&id)?;
        span.scope().find_map(|span| {
            let context = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let span = context.span();
            let ids = span.span_context();
            ids.is_valid()
                .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
        })
    }
}
