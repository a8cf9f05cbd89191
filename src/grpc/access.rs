//! One span per gRPC request (target `ivschat_rooms::access`), with the
//! method, the room (recorded by the service once it knows it) and the
//! result code. The binary logs each such span when it closes: an access
//! log, which `RUST_LOG=info,ivschat_rooms::access=off` turns off.
//!
//! The layer also counts requests by method and code, and times them
//! (`telemetry::REQUESTS`, `telemetry::REQUEST_DURATION`).
//!
//! The code is the one the response starts with: a streaming call (WatchRooms)
//! that starts and later fails is logged as OK when it starts.

use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::{BoxFuture, Service, http};
use tower::Layer;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::telemetry;

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
        let span = tracing::info_span!(
            target: "ivschat_rooms::access",
            "request",
            method = %request.uri().path(),
            room = Empty,
            code = Empty,
        );
        let method = request.uri().path().to_owned();
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
            metrics::histogram!(telemetry::REQUEST_DURATION, "method" => method.clone())
                .record(started.elapsed());
            metrics::counter!(telemetry::REQUESTS, "method" => method, "code" => format!("{code:?}"))
                .increment(1);
            Ok(response)
        })
    }
}

/// Records the room a request is about on its access span.
pub(super) fn record_room(room: &str) {
    tracing::Span::current().record("room", tracing::field::display(room));
}
