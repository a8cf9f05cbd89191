//! Prometheus metrics: the recorder, what each metric means, and the
//! `/metrics` endpoint (`--metrics-listen`, a port of its own).
//!
//! Metrics are recorded with the `metrics` macros where things happen (the
//! names are the constants below); this module installs the process-wide
//! recorder once and serves what it holds.

use std::net::SocketAddr;
use std::sync::OnceLock;

use anyhow::Context as _;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// gRPC requests by `method` (path) and `code`.
pub const REQUESTS: &str = "ivschat_rooms_requests_total";
/// Time to a request's response (for streams: to their start), by `method`.
pub const REQUEST_DURATION: &str = "ivschat_rooms_request_duration_seconds";
/// Cached reads by `result`: `hit`, `miss` or `stale`.
pub const CACHE: &str = "ivschat_rooms_cache_reads_total";
/// Calls sent to IVS Chat (each attempt) by `operation` and `region`.
pub const UPSTREAM_CALLS: &str = "ivschat_rooms_upstream_calls_total";
/// ThrottlingExceptions from IVS Chat by `operation` and `region`.
pub const UPSTREAM_THROTTLES: &str = "ivschat_rooms_upstream_throttles_total";
/// Budget tokens taken (calls allowed) by `operation` and `region`.
pub const BUDGET_TOKENS: &str = "ivschat_rooms_budget_tokens_taken_total";
/// Requests refused for want of a budget token in time, by `operation` and
/// `region`.
pub const BUDGET_REFUSED: &str = "ivschat_rooms_budget_refused_total";
/// Requests waiting for a budget token, by `operation` and `region`.
pub const BUDGET_WAITING: &str = "ivschat_rooms_budget_waiting";
/// With a shared (Postgres) budget: slots the whole fleet has taken of each
/// budget, by `operation` and `region`, as this replica last saw it (a
/// counter in all but type: take its `rate()`).
pub const BUDGET_FLEET_SLOTS: &str = "ivschat_rooms_budget_fleet_slots";
/// With a shared budget: slots this replica took but left unused, by
/// `operation`, `region` and `reason` (`paused`: a throttle came after it was booked;
/// `late`: the replica woke too late to send in it).
pub const BUDGET_UNUSED: &str = "ivschat_rooms_budget_slots_unused_total";
/// With a shared budget: how far ahead of now the fleet has booked each
/// budget, in seconds, as this replica last saw it.
pub const BUDGET_FLEET_BOOKED: &str = "ivschat_rooms_budget_fleet_booked_seconds";
/// Watch streams open in this process.
pub const WATCHERS: &str = "ivschat_rooms_watchers";
/// This process's `--max-watchers` (alerts compare the streams open with it).
pub const MAX_WATCHERS: &str = "ivschat_rooms_max_watchers";
/// Cache database errors by `kind`: `unavailable` (unreachable, no
/// connection in time) or `busy` (locked, deadlock, restarting): a rate
/// above zero for minutes means the database needs a person.
pub const STORE_ERRORS: &str = "ivschat_rooms_store_errors_total";
/// The newest event-log revision this process has taken in.
pub const EVENT_REVISION: &str = "ivschat_rooms_event_revision";
/// Revisions known committed but not yet taken in by this process's feed.
pub const EVENT_LAG: &str = "ivschat_rooms_event_lag";
/// Reconciler passes by `region`, `kind` (`recent`, `full`) and `result`
/// (`ok`, `error`).
pub const RECONCILE_RUNS: &str = "ivschat_rooms_reconcile_runs_total";

/// The process's recorder, installed on first use (a process serves once;
/// tests run several servers in one process, which then share it).
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION.into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ],
            )
            .expect("buckets are given")
            .install_recorder()
            .expect("no other metrics recorder in this process");
        describe();
        handle
    })
}

/// Counts a cached read (`hit`, `miss` or `stale`), with handles registered
/// once (a lookup by labels per read would cost more than the read).
pub fn cache_read(result: &'static str) {
    static COUNTERS: OnceLock<[(&str, metrics::Counter); 3]> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        ["hit", "miss", "stale"].map(|r| (r, metrics::counter!(CACHE, "result" => r)))
    });
    if let Some((_, counter)) = counters.iter().find(|(r, _)| *r == result) {
        counter.increment(1);
    }
}

fn describe() {
    describe_counter!(REQUESTS, "gRPC requests by method and code");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "time to a gRPC response (streams: to their start)"
    );
    describe_counter!(CACHE, "cached reads by result: hit, miss, stale");
    describe_counter!(
        UPSTREAM_CALLS,
        "calls sent to IVS Chat, by operation and region"
    );
    describe_counter!(
        UPSTREAM_THROTTLES,
        "ThrottlingExceptions from IVS Chat, by operation and region"
    );
    describe_counter!(
        BUDGET_TOKENS,
        "budget tokens taken, by operation and region"
    );
    describe_counter!(
        BUDGET_REFUSED,
        "requests refused for want of a budget token in time"
    );
    describe_gauge!(BUDGET_WAITING, "requests waiting for a budget token");
    describe_counter!(
        BUDGET_UNUSED,
        "slots of the shared budget left unused: a pause came, or the replica woke late"
    );
    describe_gauge!(
        BUDGET_FLEET_SLOTS,
        "slots of the shared budget taken by every replica so far, as last seen"
    );
    describe_gauge!(
        BUDGET_FLEET_BOOKED,
        Unit::Seconds,
        "how far ahead the fleet has booked the shared budget, as last seen"
    );
    describe_gauge!(WATCHERS, "watch streams open");
    describe_gauge!(MAX_WATCHERS, "watch streams this process serves at most");
    describe_counter!(STORE_ERRORS, "cache database errors by kind");
    describe_gauge!(EVENT_REVISION, "newest event-log revision taken in");
    describe_gauge!(
        EVENT_LAG,
        "revisions known committed, not yet taken in by the feed"
    );
    describe_counter!(
        RECONCILE_RUNS,
        "reconciler passes by region, kind and result"
    );
}

/// Binds `addr` for `/metrics`; the bound address is logged by the caller.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen for metrics on {addr}"))
}

/// How often the recorder folds what histograms recorded into their buckets
/// when nobody scrapes (the exporter's own default).
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `GET /metrics` (Prometheus text format) on `listener` until
/// `shutdown` completes, and keeps the recorder up meanwhile: a histogram
/// keeps every sample it is given until they are folded into its buckets,
/// which a scrape does, so without this a process nobody scrapes would grow
/// by eight bytes a request.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = recorder();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            handle.run_upkeep();
            handle.render()
        }),
    );
    let upkeep = async {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    };
    tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(shutdown) => served,
        never = upkeep => never,
    }
}
