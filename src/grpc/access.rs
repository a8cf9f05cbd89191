//! One span per gRPC request (target `ivschat_rooms::access`), with the
//! method, the room (recorded by the service once it knows it) and the
//! result code. The binary logs each such span when it closes: an access
//! log, which `RUST_LOG=info,ivschat_rooms::access=off` turns off.
//!
//! The layer also counts requests by method and code, and times them
//! (`telemetry::REQUESTS`, `telemetry::REQUEST_DURATION`). While traces are
//! exported, the span is the request's server span, continuing the caller's
//! trace (`telemetry::traces`); otherwise nothing of them is done here.
//!
//! The code is the one the response starts with: a streaming call (WatchRooms)
//! that starts and later fails is logged as OK when it starts.

use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::{BoxFuture, Service, http};
use tower::Layer;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::telemetry::{self, traces};

/// Wraps every service of the server in [`AccessLog`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for AccessLog<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let traced = traces::enabled();
        // No span at all unless the log wants access lines or traces are
        // exported: a disabled span still costs on every request (tracing's
        // fallback to the `log` crate, which sqlx turns on, checks each
        // record and enter).
        let span = if traced || tracing::enabled!(target: traces::ACCESS, tracing::Level::INFO) {
            tracing::info_span!(
                target: traces::ACCESS,
                "request",
                method = %request.uri().path(),
                room = Empty,
                code = Empty,
                // Traces only: the server span's name and kind.
                otel.name = Empty,
                otel.kind = Empty,
            )
        } else {
            tracing::Span::none()
        };
        if traced {
            traces::start_server_span(&span, request.uri().path(), request.headers());
        }
        let method = method_index(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = response.await?;
            // An error before any message is a trailers-only response: its
            // status is in the headers. Otherwise the call started fine.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from);
            span.record("code", tracing::field::debug(code));
            if traced {
                traces::end_server_span(&span, code);
            }
            let metrics = &request_metrics()[method];
            metrics.duration.record(started.elapsed());
            metrics.by_code[code as usize]
                .get_or_init(|| {
                    metrics::counter!(
                        telemetry::REQUESTS,
                        "method" => METHODS.get(method).copied().unwrap_or("other"),
                        "code" => format!("{code:?}"),
                    )
                })
                .increment(1);
            Ok(response)
        })
    }
}

/// The methods metrics name (others are `other`, so that no client can grow
/// the number of series).
const METHODS: &[&str] = &[
    "/ivschat.rooms.v1.RoomService/CreateRoom",
    "/ivschat.rooms.v1.RoomService/GetRoom",
    "/ivschat.rooms.v1.RoomService/UpdateRoom",
    "/ivschat.rooms.v1.RoomService/DeleteRoom",
    "/ivschat.rooms.v1.RoomService/ListRooms",
    "/ivschat.rooms.v1.RoomService/TagRoom",
    "/ivschat.rooms.v1.RoomService/UntagRoom",
    "/ivschat.rooms.v1.RoomService/WatchRooms",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The index of `path` in [`METHODS`], `METHODS.len()` for `other`.
fn method_index(path: &str) -> usize {
    METHODS
        .iter()
        .position(|method| *method == path)
        .unwrap_or(METHODS.len())
}

/// One method's metric handles, registered once: looking a series up by
/// its labels on every request costs more than the request's own work.
struct MethodMetrics {
    duration: metrics::Histogram,
    /// By code, registered on first use (so only codes seen are exported).
    by_code: [OnceLock<metrics::Counter>; 17],
}

/// Per method of [`METHODS`], then `other`. Made on the first request,
/// after the server installed the recorder.
fn request_metrics() -> &'static [MethodMetrics] {
    static METRICS: OnceLock<Vec<MethodMetrics>> = OnceLock::new();
    METRICS.get_or_init(|| {
        METHODS
            .iter()
            .copied()
            .chain(["other"])
            .map(|method| MethodMetrics {
                duration: metrics::histogram!(telemetry::REQUEST_DURATION, "method" => method),
                by_code: Default::default(),
            })
            .collect()
    })
}

/// Records the room a request is about on its access span.
pub(super) fn record_room(room: &str) {
    tracing::Span::current().record("room", tracing::field::display(room));
}
