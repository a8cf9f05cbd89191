//! OpenTelemetry traces, exported over OTLP/gRPC when the standard variables
//! ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and nothing at all otherwise.
//!
//! The spans are `tracing` spans, turned into OpenTelemetry spans by
//! tracing-opentelemetry's layer:
//!
//! - each request's access span (`grpc::access`, target
//!   `ivschat_rooms::access`) is the server span: named for the method
//!   (`ivschat.rooms.v1.RoomService/GetRoom`), with `rpc.*` attributes, and
//!   continuing the caller's trace (W3C `traceparent` / `tracestate`
//!   metadata);
//! - spans of target [`SPANS`] exist for traces only (the log never shows
//!   them): one per attempt of an IVS Chat call (`upstream`), one per cache
//!   transaction (`store`), and one per reconciler pass (`reconciler`), which
//!   the pass's calls and transactions are children of.
//!
//! A request's exchanges with IVS Chat run in tasks of their own
//! (`rooms`); while tracing is on they run in the request's span
//! ([`task_span`]), so their spans are the request's.
//!
//! **Invariant:** when tracing is off, nothing of it is on the request path:
//! no layer sees the [`SPANS`] spans (they are disabled at their call sites,
//! a cached check), and the request path asks [`enabled`], one atomic load,
//! before any other work (propagation, attributes).
//!
//! The variables the opentelemetry crates read themselves apply too:
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*` (batching), `OTEL_EXPORTER_OTLP_*`
//! (headers, timeout, compression).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{Status, TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tracing::{Metadata, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::registry::LookupSpan;

/// The target of the spans that only traces show (the log leaves them out):
/// IVS Chat attempts and cache transactions.
pub const SPANS: &str = "ivschat_rooms::spans";

/// The target of the access log's span per request (`grpc::access`), which
/// traces show as the server span.
pub const ACCESS: &str = "ivschat_rooms::access";

/// Whether this process exports traces: set once, when [`Traces`] is made.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces. The request path asks this before
/// doing anything for them.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracer provider exporting spans over OTLP/gRPC.
pub(super) struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// An OTLP/gRPC exporter configured from the standard variables, when
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// is set; `None` otherwise. Call within the tokio runtime (the exporter's
    /// channel lives on it).
    pub(super) fn from_env() -> anyhow::Result<Option<Traces>> {
        let set = |var: &str| std::env::var_os(var).is_some_and(|value| !value.is_empty());
        if !set(opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
            && !set(opentelemetry_otlp::OTEL_EXPORTER_OTLP_ENDPOINT)
        {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .context("could not set up the OTLP trace exporter (OTEL_EXPORTER_OTLP_*)")?;
        // Sampler and resource (service name, attributes) from the
        // environment, as the SDK's defaults read them; batches on a thread
        // of the SDK's own.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .build();
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Some(Traces { provider }))
    }

    /// The layer that turns our spans into OpenTelemetry spans: the access
    /// spans and [`SPANS`]; events of WARN and above become span events.
    pub(super) fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("ivschat-rooms"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            // Our spans are INFO: no DEBUG or TRACE call site (nor `log`
            // record) need be looked at for this layer.
            .with_filter(FilterFn::new(exported).with_max_level_hint(tracing::Level::INFO))
    }

    /// Exports what is left and stops the exporter. The SDK blocks on it, so
    /// it runs on a blocking thread.
    pub(super) async fn shutdown(self) {
        let provider = self.provider;
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not export the last spans"),
            Err(e) => tracing::warn!(error = %e, "could not export the last spans"),
        }
    }
}

/// What the OpenTelemetry layer sees: our spans (the access log's and
/// [`SPANS`]) and events of WARN and above, as events of the span they
/// happen in.
fn exported(metadata: &Metadata<'_>) -> bool {
    if metadata.is_span() {
        metadata.target() == ACCESS || metadata.target() == SPANS
    } else {
        *metadata.level() <= tracing::Level::WARN
    }
}

/// Makes `span`, a request's access span, its server span: named for the
/// method at `path` (`/package.Service/Method`), kind server, `rpc.*`
/// attributes, and the child of the caller's span when the request carries
/// W3C trace context (`traceparent`, `tracestate`). Call before the span is
/// first entered, and only when [`enabled`].
pub fn start_server_span(span: &Span, path: &str, headers: &http::HeaderMap) {
    let name = path.strip_prefix('/').unwrap_or(path);
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    span.record("otel.name", name);
    span.record("otel.kind", "server");
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", service.to_owned());
    span.set_attribute("rpc.method", method.to_owned());
    let parent = TraceContextPropagator::new().extract(&GrpcMetadata(headers));
    if parent.span().span_context().is_valid() {
        // Fails only if the span has started already or is disabled: it
        // then stays a root.
        let _ = span.set_parent(parent);
    }
}

/// Records the gRPC code a request's response started with on its server
/// span; the codes OpenTelemetry counts as server errors mark it failed.
/// Only when [`enabled`].
pub fn end_server_span(span: &Span, code: tonic::Code) {
    span.set_attribute("rpc.grpc.status_code", code as i64);
    if matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    ) {
        span.set_status(Status::error(format!("{code:?}")));
    }
}

/// The span a task started for a request runs in: the current one while
/// tracing is on, so its spans join the request's trace; none otherwise
/// (the task is then free of it, and the request's log line is not held
/// open by it).
pub fn task_span() -> Span {
    if enabled() {
        Span::current()
    } else {
        Span::none()
    }
}

/// gRPC metadata (HTTP/2 headers) as OpenTelemetry's propagators read them.
struct GrpcMetadata<'a>(&'a http::HeaderMap);

impl Extractor for GrpcMetadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
