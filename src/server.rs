//! Wiring: builds the store, the upstream (or the embedded emulator), the room
//! policy and the gRPC server, and serves until shutdown.

use std::net::SocketAddr;

use anyhow::Context as _;
use futures::FutureExt as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::budget::{Budget, BudgetSettings, LocalBudget, SharedBudget};
use crate::config::{ServeConfig, UpstreamKind};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::feed::{Feed, FeedSettings};
use crate::grpc::{
    AccessLogLayer, Authenticated, EdgeLimits, RoomService, RoomServiceRoutes, Router, Tokens,
    Unvectored, proto,
};
use crate::hot::HotRooms;
use crate::reconciler::{self, Passes, ReconcileSettings};
use crate::rooms::{Rooms, RoomsSettings};
use crate::store::Store;
use crate::upstream::{UpstreamSettings, Upstreams};

/// Serves RoomService on `listener` until `shutdown` completes, then lets
/// in-flight requests, and the exchanges with IVS Chat they started, finish
/// for at most `config.shutdown_grace` each.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.request_id_lease > config.upstream_timeout,
        "--request-id-lease ({}) must be longer than --upstream-timeout ({}): a claim must outlast the call it covers",
        humantime::format_duration(config.request_id_lease),
        humantime::format_duration(config.upstream_timeout),
    );
    anyhow::ensure!(
        config.request_id_retention > config.request_id_lease * 3,
        "--request-id-retention ({}) must be longer than three --request-id-lease ({}): a request_id must outlive its claim",
        humantime::format_duration(config.request_id_retention),
        humantime::format_duration(config.request_id_lease),
    );
    let tokens = config
        .auth_tokens
        .as_deref()
        .map(Tokens::load)
        .transpose()?;
    let tls = tls(&config)?;
    // Before anything registers a metric (the store does at open).
    crate::telemetry::recorder();
    let store = Store::open(&config.database_url()).await?;
    let metrics_listener = crate::telemetry::bind(config.metrics_listen).await?;
    let metrics_address = metrics_listener.local_addr()?;
    let stop_metrics = CancellationToken::new();
    let metrics = tokio::spawn(crate::telemetry::serve(
        metrics_listener,
        stop_metrics.clone().cancelled_owned(),
    ));
    // Also when startup fails below.
    let _stop_metrics_on_return = stop_metrics.clone().drop_guard();
    let (upstreams, embedded) = upstreams(&config, &store).await?;
    if let Some(region) = store
        .adopt_one_region_state(upstreams.regions())
        .await
        .context("could not read the cache")?
    {
        tracing::debug!(region, "the cache's listing state is this region's");
    }
    let hot = HotRooms::load(&store, config.memory_cache_rooms)
        .await
        .context("could not read the cache")?;
    let rooms = Rooms::new(
        store.clone(),
        hot.clone(),
        upstreams.clone(),
        RoomsSettings {
            max_staleness: config.max_staleness,
            listing_wait: config.listing_wait,
            stale_if_error: config.stale_if_error,
            request_id_retention: config.request_id_retention,
            request_id_lease: config.request_id_lease,
        },
    )
    .await
    .context("could not read the cache")?;
    let feed = Feed::start(
        store.clone(),
        FeedSettings {
            bookmark_interval: config.bookmark_interval,
            retention_count: config.event_retention_count,
            retention_age: Some(config.event_retention_age).filter(|age| !age.is_zero()),
            compaction_interval: config.compaction_interval,
            max_watchers: config.max_watchers,
            ring_capacity: usize::try_from(config.event_ring_capacity).unwrap_or(usize::MAX),
            safety_interval: config.event_poll_interval,
        },
        hot,
    )
    .await
    .context("could not read the change log")?;
    // One reconciler per region: each leads, lists and fails on its own.
    let stop_reconciler = CancellationToken::new();
    let reconcilers: Vec<_> = upstreams
        .iter()
        .map(|upstream| {
            tokio::spawn(reconciler::run(
                Passes::new(
                    rooms.clone(),
                    store.clone(),
                    upstream.clone(),
                    ReconcileSettings::LISTING_LAG,
                ),
                store.clone(),
                ReconcileSettings {
                    interval: config.reconcile_interval,
                    resync_interval: config.resync_interval,
                    max_staleness: config.max_staleness,
                },
                stop_reconciler.clone(),
            ))
        })
        .collect();

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::room_service_server::RoomServiceServer<RoomService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.BadRequest, ErrorInfo, RetryInfo: what refusals carry.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("could not build reflection v1")?;
    // grpcurl 1.8 and grpcio only speak v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.BadRequest, ErrorInfo, RetryInfo: what refusals carry.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("could not build reflection v1alpha")?;

    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        metrics = %metrics_address,
        tls = tls.is_some(),
        client_certificates = config.tls_client_ca.is_some(),
        auth = tokens.is_some(),
        reflection = !config.no_reflection,
        regions = upstreams.served(),
        budget = if store.is_shared() { "shared by the fleet" } else { "this process's" },
        "serving ivschat.rooms.v1.RoomService"
    );
    if tokens.is_none() && config.tls_client_ca.is_none() && !address.ip().is_loopback() {
        tracing::warn!(
            %address,
            "no --auth-tokens: anyone who can reach this address may create, change and delete rooms"
        );
    }
    let reflection = (!config.no_reflection).then(|| {
        (
            Authenticated::new(reflection_v1, tokens.clone()),
            Authenticated::new(reflection_v1alpha, tokens.clone()),
        )
    });
    // Shutdown, step 1: health says NOT_SERVING (the server as a whole and
    // RoomService), then, after --shutdown-delay for load balancers to see
    // it, the server stops accepting and watch streams end.
    let shutdown = {
        let health = health.clone();
        let delay = config.shutdown_delay;
        async move {
            shutdown.await;
            tracing::info!(?delay, "shutting down: health is NOT_SERVING");
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_not_serving::<proto::room_service_server::RoomServiceServer<RoomService>>()
                .await;
            tokio::time::sleep(delay).await;
        }
    }
    .shared();
    let mut builder = tonic::transport::Server::builder()
        .layer(AccessLogLayer)
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout));
    if let Some(age) = config.max_connection_age {
        // No tonic grace: with one, tonic 0.14 cuts the connection at age +
        // grace without a GOAWAY first. Without, it sends the GOAWAY at the
        // age and lets calls finish; watch streams end themselves during our
        // grace period (`EdgeLimits`).
        builder = builder.max_connection_age(age);
    }
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("could not set up TLS")?;
    }
    let mut router = Router::new(Authenticated::new(
        RoomServiceRoutes::new(
            rooms.clone(),
            feed.clone(),
            EdgeLimits {
                max_request_size: config.max_request_size as usize,
                max_connection_age: config.max_connection_age,
                max_connection_age_grace: config.max_connection_age_grace,
            },
        ),
        tokens,
    ))
    .add_service(health_service);
    if let Some((v1, v1alpha)) = reflection {
        router = router.add_service(v1).add_service(v1alpha);
    }
    let serve = builder.serve_with_incoming_shutdown(router, incoming(listener), shutdown.clone());
    // Watch streams never end by themselves: end them (UNAVAILABLE, with the
    // revision to resume after) as soon as shutdown begins, so that the
    // server's wait for in-flight requests is not a wait for the grace period.
    let feed_stopped = tokio::spawn({
        let feed = feed.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.await;
            feed.stop().await;
        }
    });
    let grace = config.shutdown_grace;
    let result = tokio::select! {
        result = serve => result.context("gRPC server failed"),
        () = async { shutdown.await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight requests outlasted the shutdown grace period");
            Ok(())
        }
    };
    stop_reconciler.cancel();
    for reconciler in reconcilers {
        let _ = reconciler.await;
    }
    feed.stop().await;
    feed_stopped.abort();
    // Exchanges with IVS Chat outlive their requests; let them reach the cache
    // before the upstream and the cache go away.
    rooms.drain(grace).await;
    if let Some(embedded) = embedded {
        embedded.stop().await;
    }
    store.close().await;
    stop_metrics.cancel();
    let _ = metrics.await;
    result
}

/// The TLS configuration of `--tls-cert`, `--tls-key` and
/// `--tls-client-ca`, if any.
fn tls(config: &ServeConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .with_context(|| format!("could not read the TLS {what} {}", path.display()))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read(cert, "certificate")?,
        read(key, "key")?,
    ));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(Some(tls))
}

/// Accepted connections, with Nagle's algorithm off: small gRPC frames (a
/// unary reply, one watch event) go out at once instead of waiting for the
/// peer's delayed ACK. They are `Unvectored`, so that h2 gathers the small
/// frames that many streams send at once (one event, many watchers) into one
/// write.
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<Unvectored<tokio::net::TcpStream>>> {
    use futures::StreamExt as _;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        Ok(Unvectored::new(conn))
    })
}

/// The embedded emulator, stopped after the last exchange with it.
struct Embedded {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Embedded {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Binds `config.listen` and serves until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {}", config.listen))?;
    run(config, listener, shutdown_signal()).await
}

/// The upstream budget of `region`'s calls: shared by the fleet through a
/// Postgres cache, this process's own with SQLite (which serves one process).
fn budget(config: &ServeConfig, store: &Store, region: &str) -> Arc<dyn Budget> {
    let settings = BudgetSettings {
        rate: config.upstream_rate,
        rates: config.upstream_operation_rates.iter().copied().collect(),
        max_wait: config.upstream_max_wait,
    };
    if store.is_shared() {
        Arc::new(SharedBudget::new(store.clone(), region, &settings))
    } else {
        Arc::new(LocalBudget::new(region, &settings))
    }
}

/// The IVS Chat of every region served (`--regions`), each with its budget;
/// with `--upstream embedded`, one emulator playing every region.
async fn upstreams(
    config: &ServeConfig,
    store: &Store,
) -> anyhow::Result<(Upstreams, Option<Embedded>)> {
    let settings = UpstreamSettings {
        timeout: config.upstream_timeout,
        max_attempts: config.upstream_max_attempts,
    };
    let budget_for = |region: &str| budget(config, store, region);
    let regions = config.configured_regions()?;
    Ok(match config.upstream {
        UpstreamKind::Aws => (Upstreams::aws(settings, &regions, &budget_for).await?, None),
        UpstreamKind::Emulator => {
            let url = config
                .emulator_url
                .as_deref()
                .context("--upstream emulator needs --emulator-url")?;
            (
                Upstreams::at_endpoint(url, &regions, settings, &budget_for),
                None,
            )
        }
        UpstreamKind::Embedded => {
            let state_file = config.embedded_state_file();
            let emulator = Emulator::new(EmulatorConfig {
                region: regions[0].clone(),
                state_file: Some(state_file.clone()),
                ..EmulatorConfig::default()
            })?;
            let (stop, stopped) = oneshot::channel::<()>();
            let (url, task) = emulator
                .spawn_until(SocketAddr::from(([127, 0, 0, 1], 0)), async move {
                    let _ = stopped.await;
                })
                .await
                .context("could not start the embedded emulator")?;
            tracing::warn!(
                %url,
                state = %state_file.display(),
                "upstream is the embedded IVS Chat emulator: no AWS is being used (--upstream aws for AWS)"
            );
            (
                Upstreams::at_endpoint(&url, &regions, settings, &budget_for),
                Some(Embedded { stop, task }),
            )
        }
    })
}

/// Completes on SIGINT or SIGTERM.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    // The handlers are installed now, not when the future is first polled:
    // a SIGTERM that arrives while the server is still starting must start
    // a graceful shutdown, not kill the process.
    #[cfg(unix)]
    let wait = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
    };
    #[cfg(not(unix))]
    let wait = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    async move {
        wait.await;
        tracing::info!("shutting down");
    }
}

/// Runs the emulator alone until SIGINT or SIGTERM.
pub async fn run_emulator(args: crate::config::EmulatorArgs) -> anyhow::Result<()> {
    let emulator = Emulator::new(EmulatorConfig {
        region: args.region,
        account_id: args.account_id,
        state_file: args.state,
        faults: crate::emulator::Faults {
            latency: args.latency,
            error_rate: args.error_rate,
            error: args.error,
            mix: args.faults,
            tps_limit: args.tps_limit,
            ..Default::default()
        },
    })?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("could not listen on {}", args.listen))?;
    tracing::info!(address = %listener.local_addr()?, "IVS Chat emulator listening");
    emulator.serve(listener, shutdown_signal()).await?;
    Ok(())
}
