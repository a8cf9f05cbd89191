//! The performance measures P1-P9 and P11: `cargo bench --bench service [-- --quick] [P1 P4 ...]`.
//!
//! Everything runs in-process on loopback: an emulator, the real server
//! (`server::run` on port 0, a fresh SQLite database in a temporary
//! directory) and the clients. Each measure runs in a child process of its
//! own (this binary with `--measure ID`), so that one measure's memory,
//! tasks and connections cannot disturb the next.
//!
//! # Reading the output
//!
//! One line per measure on stdout, `ID name value...`, each value measured
//! in this run:
//!
//! | id | value | target |
//! |---|---|---|
//! | P1 | cached GetRoom throughput ÷ a bare tonic server's, same load, the service with the layers it ships with | ≥ 0.95 |
//! | P2 | upstream GetRoom calls for 1,000 concurrent cold GetRoom of one room | 1 |
//! | P3 | most upstream calls of one operation in any 1 s, clients pushing 10× the budget | ≤ 5 |
//! | P4 | one change to 10,000 watchers (100 connections) in a process of their own: p99 delivery latency of the service ÷ etcd's (a put, one watch per stream) and ÷ a bare tonic broadcast's; RSS KiB per idle watcher of the service's process | ≤ 0.5; ≤ 1.2; ≤ 8 |
//! | P5 | cached GetRoom throughput with 100,000 rooms ÷ with 100 | ≥ 0.9 |
//! | P6 | latency UpdateRoom through the service adds to the SDK's call (5 ms upstream) ÷ its floor measured alongside: a bare tonic hop + the durable SQLite commit of the same transaction (the room, its event, the revision) | ≤ 1.1 |
//! | P7 | three replicas on one Postgres, each offered 10× the rate: most UpdateRoom calls in any 1 s ÷ rate; calls per second ÷ rate | ≤ 1; ≥ 0.9 |
//! | P8 | a cold cache of 2,500 rooms, the emulator at 5 TPS: time until ListRooms is served ÷ (N / 250 s); until every room is whole ÷ (N / 5 s) | ≤ 1.1; ≤ 1.05 |
//! | P9 | 1,000 rooms read CACHED at `--max-staleness 10s`, the emulator at 5 TPS and 30 ms, for 3 × the staleness: share of hits; p99 ÷ p50 | ≥ 0.99; ≤ 3 |
//! | P11 | two replicas on one Postgres, the leader cut off silently (behind a proxy that answers keepalives) in the middle of a write: takeover ÷ 15 s; the healthy replica's longest write ÷ `store::WRITE_STALL_BOUND`; share of cached reads the cut-off replica answered within 2 s (`partition.rs`) | ≤ 1; ≤ 1; = 1 |
//!
//! P4 prints two more lines: `fanout_1000` (1,000 watchers over 10
//! connections; targets ≤ 0.7 beside etcd, ≤ 1.2 beside the bare broadcast)
//! and `one_watcher`. The service's latencies count from its cache commit
//! (the store's TRACE event as it commits, heard by a tracing layer in this
//! process), as etcd's count from its Put and the bare broadcast's from the
//! message handed to it; the `# ` lines also give them from the UpdateRoom
//! sent. `one_watcher` is that time with one watcher ÷ etcd's (≤ 1). The
//! `# ` lines also show a fourth server, the `writer`: the same broadcast
//! served with the h2 crate alone, one task per connection writing to all of
//! its streams, the floor of the per-connection writer BENCHMARKS.md names.
//! Without `etcd` on the PATH its ratios read `no-etcd`. P2 prints a second
//! line, the same cold reads spread over three replicas sharing Postgres
//! (target 1). P7 prints a second line,
//! `fleet_budget_two_regions`, with two regions served and each offered 10×
//! its rate: for us-east-1 then eu-west-1, the most in 1 s ÷ rate and calls
//! per second ÷ rate (targets ≤ 1 and ≥ 0.9 each: every region has its own
//! quota). P2's second line, P7 and P11 need a Postgres:
//! `IVSCHAT_ROOMS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), on which each makes a
//! database of its own and drops it after.
//!
//! Lines starting with `# ` are context: absolute rates, latencies, the
//! counts used. `--quick` uses smaller counts (P4: 2,000 and 500 watchers, P5:
//! 20,000 rooms) and shorter runs. Any non-flag argument selects the measures
//! whose id starts with it. The servers run with their defaults except for
//! the flags each measure names; every flag is also an `IVSCHAT_ROOMS_*`
//! variable, so e.g. `IVSCHAT_ROOMS_MEMORY_CACHE_ROOMS=200000 cargo bench
//! --bench service -- P5` tries another setting. `RUST_LOG` turns on the
//! servers' logs (stderr). `BENCH_P4_UPDATES` sets how many updates P4
//! measures with N watchers (a longer run to profile), and
//! `BENCH_P4_TARGETS=bare,writer` which servers beside the service it
//! measures (`BENCH_P4_TARGETS=service`: the service alone, to profile it).
//!
//! P4 runs the service, the emulator, the bare broadcast and the writer on a tokio
//! runtime of their own (threads named `bench-service`), and the watchers in
//! child processes (`fanout`), and prints the CPU per delivery of each server
//! and of the watchers.
//!
//! A measure that cannot be taken (a failed call, a missing message) panics:
//! the run then exits non-zero.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser as _;
use fanout::{BareBroadcast, Etcd, Target, WatcherProcess};
use futures::StreamExt as _;
use ivschat_rooms::config::{Cli, Command, ServeConfig};
use ivschat_rooms::domain::{EventSource, Room, Timestamp};
use ivschat_rooms::emulator::{Emulator, EmulatorConfig, Faults, Operation};
use ivschat_rooms::grpc::proto;
use ivschat_rooms::grpc::proto::room_service_client::RoomServiceClient;
use ivschat_rooms::grpc::proto::room_service_server::{self, RoomServiceServer};
use ivschat_rooms::store::Store;
use rand::{Rng as _, SeedableRng as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

mod fanout;
mod partition;

const MEASURES: [&str; 10] = ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P11"];

/// The upstream budget the service allows per operation by default (AWS's
/// 5 TPS): P3's target.
const BUDGET_PER_SECOND: usize = 5;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(at) = args.iter().position(|a| a == "--watchers") {
        return fanout::watchers_main(&args[at + 1..]);
    }
    if let Some(at) = args.iter().position(|a| a == "--measure") {
        let id = args.get(at + 1).expect("--measure needs an id").clone();
        run_measure(&id, Scale::new(quick));
        return ExitCode::SUCCESS;
    }
    // Flags we do not know (cargo passes --bench) are ignored; the rest filter.
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let selected: Vec<&str> = MEASURES
        .into_iter()
        .filter(|id| filters.is_empty() || filters.iter().any(|f| id.starts_with(f.as_str())))
        .collect();
    let exe = std::env::current_exe().expect("path of this bench binary");
    let started = Instant::now();
    let mut failed = Vec::new();
    for id in selected {
        let measure_started = Instant::now();
        let mut child = std::process::Command::new(&exe);
        child.args(["--measure", id]);
        if quick {
            child.arg("--quick");
        }
        let status = child.status().expect("run a measure in a child process");
        println!(
            "# {id} took {:.1} s",
            measure_started.elapsed().as_secs_f64()
        );
        if !status.success() {
            eprintln!("{id} FAILED ({status})");
            failed.push(id);
        }
    }
    println!(
        "# all took {:.1} s{}",
        started.elapsed().as_secs_f64(),
        if quick { " (--quick)" } else { "" }
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failed measures: {}", failed.join(" "));
        ExitCode::FAILURE
    }
}

fn run_measure(id: &str, scale: Scale) {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    } else if let Ok(filter) = std::env::var("BENCH_LOG_SINK") {
        tracing_subscriber::fmt()
            .json()
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .init();
    } else if id == "P4" {
        // When the service's cache commits, for the one-watcher latency.
        fanout::CommitClock::install();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(CLIENT_THREADS)
        .build()
        .expect("tokio runtime");
    // P4 runs the service (and the emulator) on a runtime of its own, so the
    // CPU its threads use can be told from the clients'.
    let service_runtime = (id == "P4").then(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name(SERVICE_THREADS)
            .build()
            .expect("tokio runtime for the service")
    });
    runtime.block_on(async {
        match id {
            "P1" => p1_cached_get_vs_bare(&scale).await,
            "P2" => p2_cold_gets_coalesce(&scale).await,
            "P3" => p3_upstream_budget(&scale).await,
            "P4" => {
                let service = service_runtime.as_ref().expect("P4's service runtime");
                p4_watchers(&scale, service.handle()).await;
            }
            "P5" => p5_many_rooms(&scale).await,
            "P6" => p6_update_overhead(&scale).await,
            "P7" => p7_fleet_budget(&scale).await,
            "P8" => p8_cold_start(&scale).await,
            "P9" => p9_working_set(&scale).await,
            "P11" => partition::p11_partition(&scale).await,
            other => panic!("unknown measure {other}"),
        }
    });
    // Servers still serving idle connections need not wind down.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Some(service_runtime) = service_runtime {
        service_runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

/// Thread names (at most 15 bytes: Linux keeps no more in `comm`): the
/// measures' clients, and P4's service and emulator.
const CLIENT_THREADS: &str = "bench-client";
const SERVICE_THREADS: &str = "bench-service";

/// Counts and durations: full, or `--quick`.
struct Scale {
    /// Throughput comparisons (P1, P5): rounds of A and B (even, so that
    /// each side goes first equally often).
    rounds: usize,
    /// How long each side is loaded per round.
    slice: Duration,
    /// Load before measuring, per side.
    warmup: Duration,
    /// P2: concurrent cold reads.
    cold_gets: usize,
    /// P3: how long clients push 10× the budget.
    overload: Duration,
    /// P4: watchers and the connections they share (the first sets the
    /// headline figures), and changes measured with them and with one
    /// watcher.
    fanouts: [(usize, usize); 2],
    many_watcher_updates: usize,
    one_watcher_updates: usize,
    /// P5: rooms in the big cache.
    rooms: usize,
    /// P6: pairs of updates.
    update_pairs: usize,
    /// P8: rooms of the account a cold cache starts on.
    cold_rooms: usize,
    /// P9: rooms read, and the staleness they are read at.
    working_set: usize,
    working_staleness: Duration,
    /// P11: rooms the cut-off replica is read for.
    partition_rooms: usize,
}

impl Scale {
    fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                rounds: 4,
                slice: Duration::from_secs(1),
                warmup: Duration::from_secs(1),
                cold_gets: 1000,
                overload: Duration::from_secs(4),
                fanouts: [(2000, 20), (500, 5)],
                many_watcher_updates: 3,
                one_watcher_updates: 11,
                rooms: 20_000,
                update_pairs: 10,
                cold_rooms: 250,
                working_set: 250,
                working_staleness: Duration::from_secs(4),
                partition_rooms: 10,
            }
        } else {
            Scale {
                rounds: 6,
                slice: Duration::from_millis(2500),
                warmup: Duration::from_secs(2),
                cold_gets: 1000,
                overload: Duration::from_secs(10),
                fanouts: [(10_000, 100), (1000, 10)],
                many_watcher_updates: 7,
                one_watcher_updates: 21,
                rooms: 100_000,
                update_pairs: 40,
                cold_rooms: 2500,
                working_set: 1000,
                working_staleness: Duration::from_secs(10),
                partition_rooms: 50,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The measures
// ---------------------------------------------------------------------------

/// P1: cached GetRoom through the service ÷ a bare tonic server answering a
/// constant Room (the same one), under the same load, interleaved.
async fn p1_cached_get_vs_bare(scale: &Scale) {
    let (_emulator, emulator_url) = emulator(Faults::default()).await;
    let db = TempDb::new();
    let config = serve_config(&db.url, &emulator_url, &["--max-staleness", "1h"]);
    let service = Service::start(config.clone()).await;
    let room = service
        .client()
        .await
        .create_room(create("p1"))
        .await
        .expect("CreateRoom through the service")
        .into_inner();
    let bare = BareServer::start(room.clone()).await;
    let layered = BareServer::start_layered(room.clone(), &config).await;

    let requests = Arc::new(vec![cached_get(&room.arn)]);
    let service_side = LoadTarget::connect(&service.uri(), requests.clone()).await;
    let bare_side = LoadTarget::connect(&bare.uri(), requests.clone()).await;
    let layered_side = LoadTarget::connect(&layered.uri(), requests).await;
    let (service_rate, bare_rate) =
        compare_throughput("P1", scale, &service_side, &bare_side).await;
    println!(
        "# P1 cached GetRoom: service {service_rate:.0}/s, bare tonic server {bare_rate:.0}/s"
    );
    // Where the rest goes: the same bare server inside the layers the
    // service ships with, against the bare server, in the same way.
    let (layered_rate, bare_again) =
        compare_throughput("P1 ablation", scale, &layered_side, &bare_side).await;
    println!(
        "# P1 ablation: the bare server inside the shipped layers (access log and request metrics, authentication) and with the service's connection settings (HTTP/2 keepalive, stream limit, unvectored writes) {layered_rate:.0}/s ÷ bare {bare_again:.0}/s = {:.3}: their share; the rest of the gap is the service's own work (routing, codec, the memory layer, conversion, cache headers)",
        layered_rate / bare_again
    );
    println!(
        "P1 cached_get_throughput_ratio {:.3}",
        service_rate / bare_rate
    );
    bar("≥ 0.95");
    layered.stop().await;
    bare.stop().await;
    service.stop().await;
}

/// P2: 1,000 concurrent GetRoom of a room the cache has never seen cost this
/// many upstream GetRoom calls.
async fn p2_cold_gets_coalesce(scale: &Scale) {
    // Slow enough that every request arrives while the first upstream call
    // is still under way: the reads really are concurrent with it.
    let upstream_latency = Duration::from_millis(200);
    let (emulator, emulator_url) = emulator(Faults {
        latency_by_operation: [(Operation::GetRoom, upstream_latency)].into(),
        ..Faults::default()
    })
    .await;
    let db = TempDb::new();
    let service = Service::start(serve_config(&db.url, &emulator_url, &[])).await;
    // Created behind the service's back, after its startup listing.
    let arn = sdk(&emulator_url)
        .create_room()
        .name("p2")
        .send()
        .await
        .expect("CreateRoom in the emulator")
        .arn
        .expect("a room ARN");
    let channels = connect_many(&service.uri(), 10).await;
    let before = emulator.calls(Operation::GetRoom);
    let started = Instant::now();
    let reads: Vec<_> = (0..scale.cold_gets)
        .map(|i| {
            let mut client = RoomServiceClient::new(channels[i % channels.len()].clone());
            let request = cached_get(&arn);
            tokio::spawn(async move { client.get_room(request).await })
        })
        .collect();
    let mut failures = BTreeMap::<String, usize>::new();
    for read in reads {
        if let Err(status) = read.await.expect("a GetRoom task") {
            *failures
                .entry(format!("{:?}: {}", status.code(), status.message()))
                .or_default() += 1;
        }
    }
    let elapsed = started.elapsed();
    let upstream = emulator.calls(Operation::GetRoom) - before;
    assert!(
        failures.is_empty(),
        "P2: every cold GetRoom must succeed, but: {failures:?}"
    );
    println!(
        "# P2 {} concurrent cold GetRoom (CACHED) over {} connections took {} ms; upstream GetRoom latency {} ms",
        scale.cold_gets,
        channels.len(),
        elapsed.as_millis(),
        upstream_latency.as_millis()
    );
    println!(
        "P2 upstream_get_calls_for_{}_cold_gets {upstream}",
        scale.cold_gets
    );
    bar("= 1");
    service.stop().await;

    // The same over three replicas sharing Postgres: a room's turn is taken
    // across replicas, so the second and third find the cache filled.
    let db = TempDb::postgres().await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Service::start(serve_config(&db.url, &emulator_url, &[])).await);
    }
    let arn = sdk(&emulator_url)
        .create_room()
        .name("p2-fleet")
        .send()
        .await
        .expect("CreateRoom in the emulator")
        .arn
        .expect("a room ARN");
    let mut channels = Vec::new();
    for replica in &replicas {
        channels.extend(connect_many(&replica.uri(), 4).await);
    }
    let before = emulator.calls(Operation::GetRoom);
    let started = Instant::now();
    let reads: Vec<_> = (0..scale.cold_gets)
        .map(|i| {
            let mut client = RoomServiceClient::new(channels[i % channels.len()].clone());
            let request = cached_get(&arn);
            tokio::spawn(async move { client.get_room(request).await })
        })
        .collect();
    for read in reads {
        read.await
            .expect("a GetRoom task")
            .expect("P2: every cold GetRoom over three replicas must succeed");
    }
    let upstream = emulator.calls(Operation::GetRoom) - before;
    println!(
        "# P2 {} cold GetRoom over 3 replicas sharing Postgres took {} ms",
        scale.cold_gets,
        started.elapsed().as_millis()
    );
    println!(
        "P2 upstream_get_calls_for_{}_cold_gets_3_replicas {upstream}",
        scale.cold_gets
    );
    bar("= 1");

    // Connections: the same number of cold reads, each of another room (the
    // worst case: every read a flight holding a room's turn), over the three
    // replicas, with the database's sessions counted meanwhile.
    let peak = Arc::new(AtomicUsize::new(0));
    let counting = tokio::spawn({
        let (admin, peak) = (db.admin_url(), peak.clone());
        let name = db.name();
        async move {
            use sqlx::Connection as _;
            let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect");
            loop {
                let sessions: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                        .bind(&name)
                        .fetch_one(&mut conn)
                        .await
                        .expect("pg_stat_activity");
                peak.fetch_max(usize::try_from(sessions).unwrap_or(0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let reads: Vec<_> = (0..scale.cold_gets)
        .map(|i| {
            let mut client = RoomServiceClient::new(channels[i % channels.len()].clone());
            let request = cached_get(&format!(
                "arn:aws:ivschat:us-east-1:123456789012:room/p2cold{i:07}"
            ));
            tokio::spawn(async move { client.get_room(request).await })
        })
        .collect();
    // Rooms IVS Chat does not have: NOT_FOUND is an answer from IVS Chat.
    let mut answered = 0;
    for read in reads {
        let read = read.await.expect("a GetRoom task");
        answered += usize::from(matches!(&read, Err(s) if s.code() == tonic::Code::NotFound));
    }
    counting.abort();
    println!(
        "# P2 {} cold GetRoom of as many rooms over 3 replicas: at most {} database sessions \
         (default pools: at most 26 per replica, 78 in all); IVS Chat answered {answered}, the budget refused the rest in time",
        scale.cold_gets,
        peak.load(Ordering::Relaxed)
    );
    for replica in replicas {
        replica.stop().await;
    }
}

/// P7: three replicas sharing Postgres, each offered 10× AWS's rate of
/// UpdateRoom with 1 s deadlines, the emulator at AWS's rates: the most
/// calls IVS Chat receives in any 1 s window ÷ the rate, and the calls per
/// second it receives ÷ the rate (after a second of ramp-up). Then the same
/// with two regions served, each offered 10× its rate: per region, the most
/// in any 1 s ÷ the rate and the calls per second ÷ the rate (each region
/// has its own quota).
async fn p7_fleet_budget(scale: &Scale) {
    let rate = Operation::UpdateRoom.aws_rate().get() as f64;
    let (most, steady) = fleet_budget(scale, &["us-east-1"]).await[0];
    println!("P7 fleet_budget {:.2} {:.2}", most / rate, steady / rate);
    bar("≤ 1, ≥ 0.9");
    let regions = fleet_budget(scale, &["us-east-1", "eu-west-1"]).await;
    println!(
        "P7 fleet_budget_two_regions {:.2} {:.2} {:.2} {:.2}",
        regions[0].0 / rate,
        regions[0].1 / rate,
        regions[1].0 / rate,
        regions[1].1 / rate
    );
    bar("≤ 1, ≥ 0.9, ≤ 1, ≥ 0.9");
}

/// Three replicas on one Postgres serving `regions`, each replica offered
/// 10× AWS's UpdateRoom rate per region: per region, the most calls its IVS
/// Chat received in any 1 s and the calls per second after a second of ramp.
async fn fleet_budget(scale: &Scale, regions: &[&str]) -> Vec<(f64, f64)> {
    let (emulator, emulator_url) = emulator(Faults::default()).await;
    let mut arns: Vec<Vec<String>> = Vec::new();
    for region in regions {
        let sdk = sdk_in(&emulator_url, region);
        let mut theirs = Vec::new();
        for i in 0..30 {
            let room = sdk
                .create_room()
                .name(format!("p7-{i}"))
                .send()
                .await
                .expect("CreateRoom in the emulator");
            theirs.push(room.arn.expect("a room ARN"));
        }
        arns.push(theirs);
    }
    let db = TempDb::postgres().await;
    let served = regions.join(",");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(
            Service::start(serve_config(
                &db.url,
                &emulator_url,
                &["--regions", &served],
            ))
            .await,
        );
    }
    emulator.set_faults(Faults {
        tps_limit: Some(ivschat_rooms::emulator::TpsLimit::Aws),
        ..Faults::default()
    });
    let offered = 10 * Operation::UpdateRoom.aws_rate().get();
    let load = scale.overload;
    let started = Instant::now();
    let mut generators = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        let channel = connect(&replica.uri()).await;
        for arns in arns.iter().cloned() {
            let channel = channel.clone();
            generators.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1) / offered);
                let end = tokio::time::Instant::now() + load;
                let mut calls = Vec::new();
                let mut ok = 0usize;
                for i in 0usize.. {
                    tick.tick().await;
                    if tokio::time::Instant::now() >= end {
                        break;
                    }
                    let mut client = RoomServiceClient::new(channel.clone());
                    let mut request = Request::new(proto::UpdateRoomRequest {
                        identifier: arns[(i * 3 + r) % arns.len()].clone(),
                        name: Some(format!("p7-{r}-{i}")),
                        ..Default::default()
                    });
                    request.set_timeout(Duration::from_secs(1));
                    calls.push(tokio::spawn(
                        async move { client.update_room(request).await },
                    ));
                }
                for call in calls {
                    ok += usize::from(call.await.expect("an UpdateRoom task").is_ok());
                }
                ok
            }));
        }
    }
    let mut ok = 0;
    for generator in generators {
        ok += generator.await.expect("a load generator");
    }
    let ramp = Duration::from_secs(1);
    let mut figures = Vec::new();
    for region in regions {
        let times: Vec<Instant> = emulator
            .call_times_in(region, Operation::UpdateRoom)
            .into_iter()
            .filter(|t| *t >= started)
            .collect();
        let steady = times
            .iter()
            .filter(|t| **t >= started + ramp && **t < started + load)
            .count() as f64
            / (load - ramp).as_secs_f64();
        let most = most_in_one_second(&times);
        println!(
            "# P7 3 replicas serving {served}, {offered}/s UpdateRoom offered to each per region for {} s: \
             {region}: {} reached IVS Chat, {steady:.2}/s, at most {most} in 1 s",
            load.as_secs(),
            times.len()
        );
        figures.push((most as f64, steady));
    }
    println!("# P7 {served}: {ok} answered OK");
    for replica in replicas {
        replica.stop().await;
    }
    figures
}

/// N rooms last updated a minute apart in an emulator at AWS's rates
/// (`--tps-limit aws`) with `latency` per call, made in a scratch emulator
/// and loaded from a state file; the emulator, its URL, the rooms and the
/// directory holding the state.
async fn account_of(
    n: usize,
    latency: Duration,
) -> (Emulator, String, Vec<Room>, tempfile::TempDir) {
    let (scratch, scratch_url) = emulator(Faults::default()).await;
    let client = sdk(&scratch_url);
    for i in 0..n {
        client
            .create_room()
            .name(format!("room-{i}"))
            .maximum_message_rate_per_second(1 + (i % 100) as i32)
            .send()
            .await
            .expect("CreateRoom in the emulator");
    }
    let mut rooms = scratch.rooms();
    let start = Timestamp::now()
        .saturating_sub(Duration::from_secs(60 * n as u64))
        .truncate_to_micros();
    for (i, room) in rooms.iter_mut().enumerate() {
        let at = start.saturating_add(Duration::from_secs(60 * i as u64));
        room.create_time = at;
        room.update_time = at;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let state = dir.path().join("emulator.json");
    std::fs::write(
        &state,
        serde_json::to_vec(&serde_json::json!({ "rooms": rooms })).expect("JSON"),
    )
    .expect("write the emulator's state");
    let emulator = Emulator::new(EmulatorConfig {
        state_file: Some(state),
        faults: Faults {
            latency,
            tps_limit: Some(ivschat_rooms::emulator::TpsLimit::Aws),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .expect("emulator");
    let url = emulator
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("emulator listens");
    (emulator, url, rooms, dir)
}

/// P8: a fresh cache in front of an account of N rooms, the emulator at
/// AWS's rates with 30 ms per call. ListRooms (one call, waiting for the
/// first listing) is served once the listing is in, its rooms marked
/// `details_pending`; the floor is the listing's, N / 250 s (50 rooms per
/// call, 5 calls per second). Then every room is read whole, one GetRoom
/// each: the floor is N / 5 s. Meanwhile a user reads a random room CACHED
/// twice a second (1 s deadlines), and must be answered in time: users come
/// before the warm-up. Prints both times ÷ their floors.
async fn p8_cold_start(scale: &Scale) {
    let n = scale.cold_rooms;
    let (emulator, emulator_url, rooms, _state) = account_of(n, Duration::from_millis(30)).await;
    let db = TempDb::new();
    let started = Instant::now();
    let service = Service::spawn(serve_config(
        &db.url,
        &emulator_url,
        &["--listing-wait", "1h"],
    ))
    .await;
    let mut client = service.client().await;
    // Every room read whole: the log's completions, from the first revision.
    let mut log = client
        .watch_rooms(proto::WatchRoomsRequest {
            after_revision: Some(0),
            ..Default::default()
        })
        .await
        .expect("WatchRooms")
        .into_inner();
    let completed = tokio::spawn(async move {
        let mut whole = std::collections::BTreeSet::new();
        while whole.len() < n {
            let message = log
                .message()
                .await
                .expect("the log streams")
                .expect("the log goes on");
            if let Some(proto::watch_rooms_response::Kind::Event(event)) = message.kind
                && let Some(room) = event.room
                && !room.details_pending
                && event.r#type != proto::EventType::Deleted as i32
            {
                whole.insert(room.arn);
            }
        }
        started.elapsed()
    });
    let page = client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .expect("ListRooms is served once the first listing is in")
        .into_inner();
    let listed = started.elapsed();
    let pending_on_first_page = page.rooms.iter().filter(|r| r.details_pending).count();
    // A user, twice a second, while the warm-up runs.
    let arns: Vec<String> = rooms.iter().map(|r| r.arn.clone()).collect();
    let user = {
        let mut client = service.client().await;
        let completed = completed.abort_handle();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(8);
            let mut samples = Vec::new();
            let (mut in_time, mut reads) = (0usize, 0usize);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while !completed.is_finished() {
                tick.tick().await;
                let mut request = Request::new(cached_get(&arns[rng.random_range(0..arns.len())]));
                request.set_timeout(Duration::from_secs(1));
                let asked = Instant::now();
                let answer = client.get_room(request).await;
                let took = asked.elapsed();
                reads += 1;
                if answer.is_ok_and(|r| !r.get_ref().details_pending)
                    && took < Duration::from_secs(1)
                {
                    in_time += 1;
                }
                samples.push(took);
            }
            (in_time, reads, samples)
        })
    };
    let whole = completed.await.expect("every room read whole");
    let (in_time, reads, samples) = user.await.expect("the user");
    let listing_floor = Duration::from_secs_f64(n as f64 / 250.0);
    let details_floor = Duration::from_secs_f64(n as f64 / 5.0);
    println!(
        "# P8 {n} rooms, emulator at AWS's rates, 30 ms: ListRooms served after {:.2} s \
         ({pending_on_first_page} of {} on its first page pending; floor {:.2} s), every room \
         whole after {:.1} s (floor {:.1} s); upstream ListRooms {}, GetRoom {}; a user's \
         cached reads meanwhile: {in_time} of {reads} answered whole within their 1 s \
         deadline, p50 {:.1} ms, p99 {:.1} ms",
        listed.as_secs_f64(),
        page.rooms.len(),
        listing_floor.as_secs_f64(),
        whole.as_secs_f64(),
        details_floor.as_secs_f64(),
        emulator.calls(Operation::ListRooms),
        emulator.calls(Operation::GetRoom),
        ms(median(&samples)),
        ms(p99(samples)),
    );
    println!(
        "P8 cold_start {:.3} {:.3}",
        listed.as_secs_f64() / listing_floor.as_secs_f64(),
        whole.as_secs_f64() / details_floor.as_secs_f64()
    );
    bar("≤ 1.1, ≤ 1.05");
    service.stop().await;
}

/// P9: a working set larger than GetRoom's budget could re-read within
/// `--max-staleness` (1,000 rooms at 10 s: 5 GetRoom per second re-read 50),
/// last updated a minute apart, the emulator at AWS's rates with 30 ms of
/// latency; 16 clients read random rooms CACHED (1 s deadlines) for three
/// staleness periods. The share of hits, and p99 ÷ p50 of the reads. The
/// listings alone should keep every room fresh (no GetRoom upstream).
async fn p9_working_set(scale: &Scale) {
    let n = scale.working_set;
    let staleness = scale.working_staleness;
    let (emulator, emulator_url, rooms, _state) = account_of(n, Duration::from_millis(30)).await;
    let db = TempDb::new();
    seed(&db.url, &rooms).await;
    let staleness_flag = humantime::format_duration(staleness).to_string();
    let service = Service::start(serve_config(
        &db.url,
        &emulator_url,
        &[
            "--max-staleness",
            &staleness_flag,
            "--reconcile-interval",
            "5s",
            "--resync-interval",
            "5m",
        ],
    ))
    .await;
    let arns: Arc<Vec<String>> = Arc::new(rooms.into_iter().map(|r| r.arn).collect());
    let channel = connect(&service.uri()).await;
    let load = staleness * 3;
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..16u64 {
        let arns = arns.clone();
        let mut client = RoomServiceClient::new(channel.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c);
            let mut samples = Vec::new();
            let (mut hits, mut reads) = (0usize, 0usize);
            while started.elapsed() < load {
                let arn = &arns[rng.random_range(0..arns.len())];
                let mut request = Request::new(proto::GetRoomRequest {
                    identifier: arn.clone(),
                    consistency: proto::ReadConsistency::Cached as i32,
                });
                request.set_timeout(Duration::from_secs(1));
                let asked = Instant::now();
                let answer = client.get_room(request).await;
                samples.push(asked.elapsed());
                reads += 1;
                if answer.is_ok_and(|r| {
                    r.metadata().get("x-cache").and_then(|v| v.to_str().ok()) == Some("hit")
                }) {
                    hits += 1;
                }
            }
            (samples, hits, reads)
        }));
    }
    let (mut samples, mut hits, mut reads) = (Vec::new(), 0, 0);
    for client in clients {
        let (s, h, r) = client.await.expect("a reading client");
        samples.extend(s);
        hits += h;
        reads += r;
    }
    let p50 = median(&samples);
    let p99 = p99(samples);
    println!(
        "# P9 {n} rooms, --max-staleness {staleness_flag}, 16 clients for {} s: {reads} reads, {hits} hits, p50 {:.2} ms, p99 {:.2} ms; upstream GetRoom {}, ListRooms {}",
        load.as_secs(),
        ms(p50),
        ms(p99),
        emulator.calls(Operation::GetRoom),
        emulator.calls(Operation::ListRooms),
    );
    println!(
        "P9 working_set {:.3} {:.2}",
        hits as f64 / reads as f64,
        p99.as_secs_f64() / p50.as_secs_f64()
    );
    bar("≥ 0.99, ≤ 3");
    service.stop().await;
}

/// The most of `times` in any window [t, t + 1 s).
fn most_in_one_second(times: &[Instant]) -> usize {
    let mut times = times.to_vec();
    times.sort();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// P3: with clients pushing 10× the budget on three operations at once, the
/// most upstream calls of any one operation in any 1 s window.
async fn p3_upstream_budget(scale: &Scale) {
    let (emulator, emulator_url) = emulator(Faults::default()).await;
    let db = TempDb::new();
    let service = Service::start(serve_config(&db.url, &emulator_url, &[])).await;
    let mut client = service.client().await;
    let mut arns = Vec::new();
    for i in 0..3 {
        let room = client
            .create_room(create(&format!("p3-{i}")))
            .await
            .expect("CreateRoom through the service")
            .into_inner();
        arns.push(room.arn);
    }
    // Let the budget refill, then count only the overload.
    tokio::time::sleep(Duration::from_secs(1)).await;
    emulator.clear_call_times();

    let offered_per_second = 10 * BUDGET_PER_SECOND;
    let deadline = Duration::from_secs(1);
    let outcomes = Arc::new(Mutex::new(BTreeMap::<(&'static str, String), usize>::new()));
    let channels = connect_many(&service.uri(), 4).await;
    let generators: Vec<JoinHandle<()>> = ["UpdateRoom", "GetRoom", "CreateRoom"]
        .into_iter()
        .enumerate()
        .map(|(g, op)| {
            let channel = channels[g % channels.len()].clone();
            let arns = arns.clone();
            let outcomes = outcomes.clone();
            let duration = scale.overload;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(
                    Duration::from_secs(1) / u32::try_from(offered_per_second).expect("rate"),
                );
                let end = tokio::time::Instant::now() + duration;
                let mut calls = Vec::new();
                for i in 0usize.. {
                    tick.tick().await;
                    if tokio::time::Instant::now() >= end {
                        break;
                    }
                    let mut client = RoomServiceClient::new(channel.clone());
                    let arn = arns[i % arns.len()].clone();
                    let outcomes = outcomes.clone();
                    calls.push(tokio::spawn(async move {
                        let call = async {
                            match op {
                                "UpdateRoom" => {
                                    let mut request = Request::new(proto::UpdateRoomRequest {
                                        identifier: arn,
                                        name: Some(format!("p3-update-{i}")),
                                        ..Default::default()
                                    });
                                    request.set_timeout(deadline);
                                    client.update_room(request).await.map(drop)
                                }
                                "GetRoom" => {
                                    let mut request = Request::new(proto::GetRoomRequest {
                                        identifier: arn,
                                        consistency: proto::ReadConsistency::Strong as i32,
                                    });
                                    request.set_timeout(deadline);
                                    client.get_room(request).await.map(drop)
                                }
                                _ => {
                                    let mut request = Request::new(create(&format!("p3-new-{i}")));
                                    request.set_timeout(deadline);
                                    client.create_room(request).await.map(drop)
                                }
                            }
                        };
                        // The client gives up a little after the deadline
                        // it asked the server to keep.
                        let outcome =
                            match tokio::time::timeout(deadline + Duration::from_millis(500), call)
                                .await
                            {
                                Ok(Ok(())) => "OK".to_owned(),
                                Ok(Err(status)) => format!("{:?}", status.code()),
                                Err(_) => "no answer by the deadline".to_owned(),
                            };
                        *outcomes
                            .lock()
                            .expect("outcomes lock")
                            .entry((op, outcome))
                            .or_default() += 1;
                    }));
                }
                for call in calls {
                    call.await.expect("a request task");
                }
            })
        })
        .collect();
    for generator in generators {
        generator.await.expect("a load generator");
    }
    // Exchanges with IVS Chat outlive their requests: wait until upstream
    // calls have stopped before counting.
    let mut last = total_calls(&emulator);
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = total_calls(&emulator);
        if now == last {
            break;
        }
        last = now;
    }

    let mut worst = 0;
    let mut per_operation = Vec::new();
    for op in Operation::ALL {
        let times = emulator.call_times(op);
        if times.is_empty() {
            continue;
        }
        let max = max_in_window(times.clone(), Duration::from_secs(1));
        worst = worst.max(max);
        per_operation.push(format!("{op:?} {max} (of {} calls)", times.len()));
    }
    println!(
        "# P3 clients offered {offered_per_second}/s per operation for {} s (UpdateRoom of 3 rooms, GetRoom STRONG, CreateRoom), deadline {} ms; service default budget ({BUDGET_PER_SECOND}/s per operation)",
        scale.overload.as_secs(),
        deadline.as_millis()
    );
    println!(
        "# P3 most upstream calls in a 1 s window: {}",
        per_operation.join(", ")
    );
    for ((op, outcome), n) in outcomes.lock().expect("outcomes lock").iter() {
        println!("# P3 {op}: {n} {outcome}");
    }
    println!("P3 max_upstream_calls_per_1s_window {worst}");
    bar("≤ 5");
    service.stop().await;
}

/// P4: one change fanned out to N watchers living in a process of their own,
/// the service beside etcd and beside a bare tonic broadcast, measured in
/// turn in one run (see `fanout`); and the RSS per idle watcher of the
/// service's process.
async fn p4_watchers(scale: &Scale, service_runtime: &tokio::runtime::Handle) {
    let db = TempDb::new();
    let config = serve_config(&db.url, "http://unused", &[]);
    let (_emulator, service) = service_runtime
        .spawn(async move {
            let (emulator, emulator_url) = emulator(Faults::default()).await;
            let config = ServeConfig {
                emulator_url: Some(emulator_url),
                ..config
            };
            (emulator, Service::start(config).await)
        })
        .await
        .expect("start the emulator and the service on their runtime");
    let mut updater = service.client().await;
    let room = updater
        .create_room(create("p4"))
        .await
        .expect("CreateRoom through the service")
        .into_inner();
    let (event, progress) = fanout::encoded_messages(&room);
    let bare = BareBroadcast::new(progress.clone());
    let (bare_uri, _bare_stop) = service_runtime
        .spawn(fanout::serve_bare(bare.clone()))
        .await
        .expect("start the bare broadcast server on the service's runtime");
    let writer = BareBroadcast::new(progress);
    let (writer_uri, _writer_stop) = service_runtime
        .spawn(fanout::serve_writer(writer.clone()))
        .await
        .expect("start the h2 writer server on the service's runtime");
    let etcd = Etcd::start().await;
    match &etcd {
        Some(_) => println!("# P4 etcd: {} (one watch per stream)", Etcd::version()),
        None => {
            println!("# P4 etcd: not installed (Debian's etcd-server): its ratios are not measured")
        }
    }
    let etcd_uri = etcd.as_ref().map(|e| e.uri.clone()).unwrap_or_default();
    let uri = |target: Target| match target {
        Target::Service => service.uri(),
        Target::Etcd => etcd_uri.clone(),
        Target::Bare => bare_uri.clone(),
        Target::Writer => writer_uri.clone(),
    };
    // BENCH_P4_TARGETS=service (a comma-separated list) measures only those,
    // for a profile of one; the lines then say what was not measured.
    let only = std::env::var("BENCH_P4_TARGETS").ok();
    let targets: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|t| *t != Target::Etcd || etcd.is_some())
        .filter(|t| {
            only.as_deref()
                .is_none_or(|only| *t == Target::Service || only.split(',').any(|o| o == t.name()))
        })
        .collect();
    println!(
        "# P4 an encoded room event is {} bytes: etcd's value and the bare server's message",
        event.len()
    );
    let mut changes = Changes {
        updater,
        arn: room.arn.clone(),
        etcd,
        bare,
        writer,
        event,
        made: 0,
    };
    // Changes 250 ms apart: the upstream budget (5/s) never delays one.
    let pace = Duration::from_millis(250);

    // One watcher each: the latency floor of each path.
    let mut processes = Vec::new();
    for &target in &targets {
        processes.push(
            WatcherProcess::start(target, &uri(target), 1, 1, target == Target::Service).await,
        );
    }
    let mut one: BTreeMap<&str, Vec<fanout::Delivery>> = BTreeMap::new();
    for _ in 0..scale.one_watcher_updates {
        for process in &mut processes {
            tokio::time::sleep(pace).await;
            let (delivery, _) = changes.deliver(process).await;
            one.entry(process.target.name()).or_default().push(delivery);
        }
    }
    for process in processes {
        process.stop().await;
    }
    let one_median = |target: Target, of: fn(&fanout::Delivery) -> Option<Duration>| {
        let samples: Vec<Duration> = one
            .get(target.name())
            .map(|d| d.iter().filter_map(of).collect())
            .unwrap_or_default();
        (!samples.is_empty()).then(|| median(&samples))
    };
    let service_sent = one_median(Target::Service, |d| Some(d.first)).expect("service deliveries");
    let service_transaction = one_median(Target::Service, |d| d.from_observed)
        .expect("the service's events carry observed_at");
    let service_commit = one_median(Target::Service, fanout::Delivery::p99_from_commit);
    let etcd_put = one_median(Target::Etcd, |d| Some(d.first));
    let bare_sent = one_median(Target::Bare, |d| Some(d.first));
    println!(
        "# P4 1 watcher, medians of {} changes: service: cache commit -> delivery {}, cache transaction (from observed_at, before the commit) -> delivery {:.2} ms, UpdateRoom sent -> delivery {:.2} ms; etcd: Put sent -> delivery {}; bare broadcast: send -> delivery {}",
        scale.one_watcher_updates,
        service_commit.map_or("not heard".to_owned(), |d| format!("{:.2} ms", ms(d))),
        ms(service_transaction),
        ms(service_sent),
        etcd_put.map_or("not measured".to_owned(), |d| format!("{:.2} ms", ms(d))),
        bare_sent.map_or("not measured".to_owned(), |d| format!("{:.2} ms", ms(d))),
    );

    // Many watchers.
    let many_updates = std::env::var("BENCH_P4_UPDATES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(scale.many_watcher_updates);
    let mut lines = Vec::new();
    for &(watchers, connections) in &scale.fanouts {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_before = rss_kib();
        let mut processes = vec![
            WatcherProcess::start(
                Target::Service,
                &uri(Target::Service),
                watchers,
                connections,
                false,
            )
            .await,
        ];
        // Settled: the streams' buffers are allocated as they are first used.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = rss_kib();
        let kib_per_watcher = rss_after.saturating_sub(rss_before) as f64 / watchers as f64;
        for &target in &targets[1..] {
            processes.push(
                WatcherProcess::start(target, &uri(target), watchers, connections, false).await,
            );
        }
        let mut runs: BTreeMap<&str, Vec<(fanout::Delivery, Duration)>> = BTreeMap::new();
        for _ in 0..many_updates {
            for process in &mut processes {
                tokio::time::sleep(pace).await;
                let delivered = changes.deliver(process).await;
                runs.entry(process.target.name())
                    .or_default()
                    .push(delivered);
            }
        }
        for process in processes {
            process.stop().await;
        }
        let p99_of = |target: Target| {
            runs.get(target.name())
                .map(|r| median(&r.iter().map(|(d, _)| d.p99).collect::<Vec<_>>()))
        };
        let per_delivery = |target: Target, of: fn(&(fanout::Delivery, Duration)) -> Duration| {
            runs.get(target.name()).map(|r| {
                r.iter().map(of).sum::<Duration>().as_secs_f64() * 1e6 / (watchers * r.len()) as f64
            })
        };
        println!(
            "# P4 {watchers} watchers on {connections} connections, medians over {many_updates} changes each, in turn:"
        );
        for &target in &targets {
            let spread = median(
                &runs[target.name()]
                    .iter()
                    .map(|(d, _)| d.last - d.first)
                    .collect::<Vec<_>>(),
            );
            println!(
                "#   {:8} p99 {:7.2} ms (per change: {}), first to last {:.2} ms; CPU per delivery: server {:.1} µs, watcher process {:.1} µs",
                target.name(),
                ms(p99_of(target).expect("measured")),
                list_ms(
                    &runs[target.name()]
                        .iter()
                        .map(|(d, _)| d.p99)
                        .collect::<Vec<_>>()
                ),
                ms(spread),
                per_delivery(target, |(_, server)| *server).expect("measured"),
                per_delivery(target, |(d, _)| d.watcher_cpu).expect("measured"),
            );
        }
        if lines.is_empty() {
            // Later sizes reuse what the first left allocated: not a measure.
            println!(
                "# P4 {watchers} watchers: the service's process (service, emulator and bare server, no watchers) {rss_before} KiB -> {rss_after} KiB: {kib_per_watcher:.2} KiB per idle watcher"
            );
        }
        // The service's p99 counts from its cache commit, as etcd's from its
        // Put and the bare server's from the message handed to it (and as
        // `one_watcher`); from the UpdateRoom sent it also holds the
        // upstream call, printed beside it.
        let from_commit: Vec<Duration> = runs[Target::Service.name()]
            .iter()
            .filter_map(|(d, _)| d.p99_from_commit())
            .collect();
        let service_p99 =
            (from_commit.len() == runs[Target::Service.name()].len()).then(|| median(&from_commit));
        let sent_p99 = p99_of(Target::Service).expect("measured");
        let bare_p99 = p99_of(Target::Bare);
        let writer_p99 = p99_of(Target::Writer);
        let beside = |p99: Duration, of: Option<Duration>, none: &str| {
            of.map_or(none.to_owned(), |of| {
                format!("{:.2}", p99.as_secs_f64() / of.as_secs_f64())
            })
        };
        let etcd_p99 = p99_of(Target::Etcd);
        let no_etcd = if changes.etcd.is_some() {
            "not-measured"
        } else {
            "no-etcd"
        };
        println!(
            "#   service p99 from its cache commit {}; from the UpdateRoom sent {:.2} ms, which is {} of etcd's and {} of the bare broadcast's",
            service_p99.map_or("not heard".to_owned(), |p| format!("{:.2} ms", ms(p))),
            ms(sent_p99),
            beside(sent_p99, etcd_p99, no_etcd),
            beside(sent_p99, bare_p99, "not-measured"),
        );
        // The writer floor beside etcd: how far the per-connection writer
        // could take the first ratio.
        println!(
            "#   h2 writer (one task per connection, no hyper or tonic) p99 ÷ etcd's {}; the service's from its commit ÷ the writer's {}",
            writer_p99.map_or("not-measured".to_owned(), |w| beside(w, etcd_p99, no_etcd)),
            service_p99.map_or("not heard".to_owned(), |p| beside(
                p,
                writer_p99,
                "not-measured"
            )),
        );
        let (beside_etcd, beside_bare) = match service_p99 {
            Some(p99) => (
                beside(p99, etcd_p99, no_etcd),
                beside(p99, bare_p99, "not-measured"),
            ),
            None => ("commit-not-heard".to_owned(), "commit-not-heard".to_owned()),
        };
        lines.push(if lines.is_empty() {
            format!("P4 fanout_{watchers} {beside_etcd} {beside_bare} {kib_per_watcher:.2}")
        } else {
            format!("P4 fanout_{watchers} {beside_etcd} {beside_bare}")
        });
    }
    for (i, line) in lines.into_iter().enumerate() {
        println!("{line}");
        bar(if i == 0 {
            "≤ 0.5, ≤ 1.2, ≤ 8"
        } else {
            "≤ 0.7, ≤ 1.2"
        });
    }
    // The commit is heard through the tracing layer P4 installs, unless the
    // run logs (RUST_LOG, BENCH_LOG_SINK) with a subscriber of its own.
    println!(
        "P4 one_watcher {}",
        match (service_commit, etcd_put) {
            (Some(commit), Some(etcd)) =>
                format!("{:.2}", commit.as_secs_f64() / etcd.as_secs_f64()),
            (None, _) => "commit-not-heard".to_owned(),
            (_, None) => "no-etcd".to_owned(),
        }
    );
    bar("≤ 1");
    service.stop().await;
}

/// How P4 makes a change for each target: an UpdateRoom through the service,
/// a put to etcd, a message given to the bare broadcast.
struct Changes {
    updater: RoomServiceClient<Channel>,
    arn: String,
    etcd: Option<Etcd>,
    bare: BareBroadcast,
    writer: BareBroadcast,
    event: prost::bytes::Bytes,
    made: usize,
}

impl Changes {
    /// Makes a change that `process` watches and returns how it arrived and
    /// the CPU its server used meanwhile (the service's and the bare
    /// server's threads in this process; etcd's process).
    async fn deliver(&mut self, process: &mut WatcherProcess) -> (fanout::Delivery, Duration) {
        self.made += 1;
        let etcd_pid = self.etcd.as_ref().map(Etcd::pid).unwrap_or_default();
        let server_cpu = |target: Target| match target {
            Target::Etcd => fanout::process_cpu(&etcd_pid),
            // The service's runtime (the bare server runs there too) and
            // sqlx's SQLite worker threads (the service's database).
            Target::Service | Target::Bare | Target::Writer => {
                fanout::threads_cpu("self", |name| {
                    name.starts_with(SERVICE_THREADS) || name.starts_with("sqlx-sqlite")
                })
            }
        };
        let before = server_cpu(process.target);
        let delivery = match process.target {
            Target::Service => {
                let (updater, arn, name) =
                    (&mut self.updater, &self.arn, format!("p4-{}", self.made));
                process
                    .deliver(async move {
                        updater
                            .update_room(proto::UpdateRoomRequest {
                                identifier: arn.clone(),
                                name: Some(name),
                                ..Default::default()
                            })
                            .await
                            .expect("UpdateRoom through the service");
                    })
                    .await
            }
            Target::Etcd => {
                let (etcd, event) = (self.etcd.as_mut().expect("etcd"), &self.event);
                process.deliver(async move { etcd.put(event).await }).await
            }
            Target::Bare => {
                let (bare, event) = (&self.bare, self.event.clone());
                process.deliver(async move { bare.send(event) }).await
            }
            Target::Writer => {
                let (writer, event) = (&self.writer, self.event.clone());
                process.deliver(async move { writer.send(event) }).await
            }
        };
        (delivery, server_cpu(process.target).saturating_sub(before))
    }
}

/// P5: cached GetRoom of random rooms with a big cache ÷ with 100 rooms,
/// interleaved; both caches seeded directly in the store.
async fn p5_many_rooms(scale: &Scale) {
    let (emulator, emulator_url) = emulator(Faults::default()).await;
    // The emulator knows none of the seeded rooms: keep the reconciler's
    // startup listing from ever answering (it would check each room upstream).
    let _quiet = emulator.hold_responses(Operation::ListRooms);
    let small_db = TempDb::new();
    let big_db = TempDb::new();
    let rooms = rooms(scale.rooms);
    let seeding = Instant::now();
    seed(&small_db.url, &rooms[..100]).await;
    seed(&big_db.url, &rooms).await;
    println!(
        "# P5 seeded {} + 100 rooms in {:.1} s",
        rooms.len(),
        seeding.elapsed().as_secs_f64()
    );
    // A held answer must not time out (the listing would be retried); a
    // request_id's lease must outlast the upstream timeout.
    let flags = [
        "--max-staleness",
        "1h",
        "--upstream-timeout",
        "1h",
        "--request-id-lease",
        "2h",
    ];
    let small = Service::start(serve_config(&small_db.url, &emulator_url, &flags)).await;
    let big = Service::start(serve_config(&big_db.url, &emulator_url, &flags)).await;

    let small_side = LoadTarget::connect(
        &small.uri(),
        Arc::new(rooms[..100].iter().map(|r| cached_get(&r.arn)).collect()),
    )
    .await;
    let big_side = LoadTarget::connect(
        &big.uri(),
        Arc::new(rooms.iter().map(|r| cached_get(&r.arn)).collect()),
    )
    .await;
    // Every room read once, so both caches start warm.
    for side in [&small_side, &big_side] {
        let touched = Instant::now();
        side.touch_all().await;
        println!(
            "# P5 read all {} rooms once in {:.1} s",
            side.requests.len(),
            touched.elapsed().as_secs_f64()
        );
    }
    let (big_rate, small_rate) = compare_throughput("P5", scale, &big_side, &small_side).await;
    println!(
        "# P5 cached GetRoom of a random room: {} rooms {big_rate:.0}/s, 100 rooms {small_rate:.0}/s",
        rooms.len()
    );
    println!(
        "P5 cached_get_throughput_ratio_{}_vs_100_rooms {:.3}",
        rooms.len(),
        big_rate / small_rate
    );
    bar("≥ 0.9");
    big.stop().await;
    small.stop().await;
}

/// P6: the latency UpdateRoom through the service adds to the same call
/// straight through the SDK (same emulator, answering after 5 ms), ÷ its
/// floor measured in the same run: a GetRoom from a bare tonic server (the
/// gRPC hop) plus the cache write an UpdateRoom must commit before it answers
/// (the room, its event and the revision, one durable SQLite transaction).
/// The same at 30 ms upstream, for reference.
async fn p6_update_overhead(scale: &Scale) {
    let mut ratios = Vec::new();
    for latency in [Duration::from_millis(5), Duration::from_millis(30)] {
        let figures = p6_at(scale, latency).await;
        let added = figures.service.saturating_sub(figures.sdk);
        let floor = figures.bare_hop + figures.cache_write;
        println!(
            "# P6 {} ms upstream: service ÷ SDK {:.3}; added {:.2} ms ÷ floor {:.2} ms (bare hop {:.2} + cache write {:.2}) = {:.3}",
            latency.as_millis(),
            figures.service.as_secs_f64() / figures.sdk.as_secs_f64(),
            ms(added),
            ms(floor),
            ms(figures.bare_hop),
            ms(figures.cache_write),
            added.as_secs_f64() / floor.as_secs_f64()
        );
        ratios.push(added.as_secs_f64() / floor.as_secs_f64());
    }
    println!("P6 added_over_floor {:.3}", ratios[0]);
    bar("≤ 1.1");
}

/// P6's medians at one upstream latency.
struct P6Figures {
    service: Duration,
    sdk: Duration,
    bare_hop: Duration,
    cache_write: Duration,
}

/// P6's calls against an emulator answering after `upstream_latency`: in
/// turn, UpdateRoom through the service and through the SDK, a cached
/// GetRoom through the service, a GetRoom from a bare tonic server, a cache
/// write on a store of its own.
async fn p6_at(scale: &Scale, upstream_latency: Duration) -> P6Figures {
    let (emulator, emulator_url) = emulator(Faults {
        latency: upstream_latency,
        ..Faults::default()
    })
    .await;
    let db = TempDb::new();
    let service = Service::start(serve_config(&db.url, &emulator_url, &[])).await;
    let mut client = service.client().await;
    let direct = sdk(&emulator_url);
    let created = client
        .create_room(create("p6"))
        .await
        .expect("CreateRoom through the service")
        .into_inner();
    let arn = created.arn.clone();
    // Where the service's time goes, measured alongside: a cached GetRoom
    // (the gRPC hop and the memory layer, no upstream call) and the cache
    // write an UpdateRoom makes, on a store of its own with the same settings.
    // A bare tonic server's GetRoom is the least a gRPC hop costs here.
    let bare = BareServer::start(created).await;
    let mut bare_client = RoomServiceClient::new(connect(&bare.uri()).await);
    let side_db = TempDb::new();
    let side_store = Store::open(&side_db.url).await.expect("open a side store");
    let mut side_room = rooms(1).remove(0);
    // One call every 100 ms, five kinds in turn: the service's UpdateRooms,
    // one upstream call each, come 500 ms apart, well within the budget (5/s).
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let warmup = 2;
    let calls_before: Vec<u64> = Operation::ALL
        .iter()
        .map(|op| emulator.calls(*op))
        .collect();
    let (mut through_service, mut through_sdk) = (Vec::new(), Vec::new());
    let (mut hops, mut bare_hops, mut cache_writes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + scale.update_pairs {
        tick.tick().await;
        let started = Instant::now();
        client
            .update_room(proto::UpdateRoomRequest {
                identifier: arn.clone(),
                name: Some(format!("p6-service-{i}")),
                ..Default::default()
            })
            .await
            .expect("UpdateRoom through the service");
        let service_time = started.elapsed();
        tick.tick().await;
        let started = Instant::now();
        direct
            .update_room()
            .identifier(&arn)
            .name(format!("p6-sdk-{i}"))
            .send()
            .await
            .expect("UpdateRoom through the SDK");
        let sdk_time = started.elapsed();
        tick.tick().await;
        let started = Instant::now();
        client
            .get_room(cached_get(&arn))
            .await
            .expect("cached GetRoom through the service");
        let hop_time = started.elapsed();
        tick.tick().await;
        let started = Instant::now();
        bare_client
            .get_room(cached_get(&arn))
            .await
            .expect("GetRoom from the bare server");
        let bare_hop_time = started.elapsed();
        tick.tick().await;
        side_room.name = format!("p6-store-{i}");
        side_room.update_time = Timestamp::now().truncate_to_micros();
        let started = Instant::now();
        side_store
            .put(&side_room, Timestamp::now(), EventSource::Api)
            .await
            .expect("cache write on the side store");
        let cache_write_time = started.elapsed();
        if i >= warmup {
            through_service.push(service_time);
            through_sdk.push(sdk_time);
            hops.push(hop_time);
            bare_hops.push(bare_hop_time);
            cache_writes.push(cache_write_time);
        }
    }
    side_store.close().await;
    bare.stop().await;
    // The SDK's own UpdateRooms counted out: what one service UpdateRoom costs upstream.
    let pairs = warmup + scale.update_pairs;
    let per_update: Vec<String> = Operation::ALL
        .iter()
        .zip(calls_before)
        .filter_map(|(op, before)| {
            let mut calls = emulator.calls(*op) - before;
            if *op == Operation::UpdateRoom {
                calls -= pairs as u64;
            }
            (calls > 0).then(|| format!("{op:?} {:.2}", calls as f64 / pairs as f64))
        })
        .collect();
    println!(
        "# P6 {} ms upstream: upstream calls per service UpdateRoom: {}",
        upstream_latency.as_millis(),
        per_update.join(", ")
    );
    let figures = P6Figures {
        service: median(&through_service),
        sdk: median(&through_sdk),
        bare_hop: median(&bare_hops),
        cache_write: median(&cache_writes),
    };
    println!(
        "# P6 {} ms upstream, {} pairs (after {warmup} warm-up pairs), medians: UpdateRoom through the service {:.2} ms, through the SDK {:.2} ms; a cached GetRoom through the service {:.2} ms, from a bare tonic server {:.2} ms; a cache write (Store::put: one transaction, SQLite synchronous=FULL) {:.2} ms",
        upstream_latency.as_millis(),
        scale.update_pairs,
        ms(figures.service),
        ms(figures.sdk),
        ms(median(&hops)),
        ms(figures.bare_hop),
        ms(figures.cache_write)
    );
    service.stop().await;
    figures
}

// ---------------------------------------------------------------------------
// Load generation (P1, P5)
// ---------------------------------------------------------------------------

/// Concurrent callers per load, and the connections they share.
const LOAD_CONCURRENCY: usize = 64;
const LOAD_CONNECTIONS: usize = 4;

/// One side of a throughput comparison: its connections and the GetRoom
/// requests its callers pick from at random.
struct LoadTarget {
    channels: Vec<Channel>,
    requests: Arc<Vec<proto::GetRoomRequest>>,
}

/// What one load run did.
#[derive(Debug, Default)]
struct LoadResult {
    completed: u64,
    failed: u64,
    first_failure: Option<Status>,
    elapsed: Duration,
}

impl LoadTarget {
    async fn connect(uri: &str, requests: Arc<Vec<proto::GetRoomRequest>>) -> LoadTarget {
        LoadTarget {
            channels: connect_many(uri, LOAD_CONNECTIONS).await,
            requests,
        }
    }

    /// `LOAD_CONCURRENCY` callers, each looping unary GetRoom of a random
    /// request for `duration`.
    async fn load(&self, duration: Duration) -> LoadResult {
        let started = Instant::now();
        let end = started + duration;
        let callers: Vec<_> = (0..LOAD_CONCURRENCY)
            .map(|i| {
                let mut client =
                    RoomServiceClient::new(self.channels[i % self.channels.len()].clone());
                let requests = self.requests.clone();
                tokio::spawn(async move {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(i as u64);
                    let mut result = LoadResult::default();
                    while Instant::now() < end {
                        let request = requests[rng.random_range(0..requests.len())].clone();
                        match client.get_room(request).await {
                            Ok(_) => result.completed += 1,
                            Err(status) => {
                                result.failed += 1;
                                result.first_failure.get_or_insert(status);
                            }
                        }
                    }
                    result
                })
            })
            .collect();
        let mut total = LoadResult::default();
        for caller in callers {
            let result = caller.await.expect("a load caller");
            total.completed += result.completed;
            total.failed += result.failed;
            if total.first_failure.is_none() {
                total.first_failure = result.first_failure;
            }
        }
        total.elapsed = started.elapsed();
        assert!(
            total.failed == 0,
            "{} of {} GetRoom calls failed, the first with {:?}",
            total.failed,
            total.failed + total.completed,
            total.first_failure
        );
        total
    }

    /// Every request once, `LOAD_CONCURRENCY` at a time.
    async fn touch_all(&self) {
        let next = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..LOAD_CONCURRENCY)
            .map(|i| {
                let mut client =
                    RoomServiceClient::new(self.channels[i % self.channels.len()].clone());
                let requests = self.requests.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    loop {
                        let at = next.fetch_add(1, Ordering::Relaxed);
                        let Some(request) = requests.get(at) else {
                            return;
                        };
                        client
                            .get_room(request.clone())
                            .await
                            .expect("GetRoom of a seeded room");
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.expect("a warm-up caller");
        }
    }
}

/// Loads `a` and `b` in turn (after a warm-up of each), `scale.rounds` times,
/// alternating which goes first (A B, B A, ...) so that machine noise, and
/// any drift in it, hits both alike; returns each side's calls per second
/// over all its rounds.
async fn compare_throughput(id: &str, scale: &Scale, a: &LoadTarget, b: &LoadTarget) -> (f64, f64) {
    a.load(scale.warmup).await;
    b.load(scale.warmup).await;
    let mut totals = [LoadResult::default(), LoadResult::default()];
    let mut rounds = [Vec::new(), Vec::new()];
    for round in 0..scale.rounds {
        let order = if round.is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        };
        for side in order {
            let result = [a, b][side].load(scale.slice).await;
            rounds[side].push(format!("{:.0}", rate(&result)));
            totals[side].completed += result.completed;
            totals[side].elapsed += result.elapsed;
        }
    }
    println!(
        "# {id} load: {LOAD_CONCURRENCY} callers over {LOAD_CONNECTIONS} connections, {} rounds of {} ms per side, alternating which goes first; per round (calls/s): {} vs {}",
        scale.rounds,
        scale.slice.as_millis(),
        rounds[0].join(" "),
        rounds[1].join(" ")
    );
    (rate(&totals[0]), rate(&totals[1]))
}

fn rate(result: &LoadResult) -> f64 {
    result.completed as f64 / result.elapsed.as_secs_f64()
}

/// Prints the bar a measure's line is held to, right after the line.
fn bar(bar: &str) {
    println!("#   bar: {bar}");
}

/// Ends the measure from a task whose panic nobody would see soon.
fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1)
}

// ---------------------------------------------------------------------------
// Servers and clients
// ---------------------------------------------------------------------------

/// A database of the measure's own, removed when dropped.
struct TempDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// A Postgres database to drop: the server's URL and the name.
    postgres: Option<(String, String)>,
}

impl TempDb {
    fn new() -> TempDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        TempDb {
            url: format!("sqlite://{}", dir.path().join("cache.db").display()),
            _dir: Some(dir),
            postgres: None,
        }
    }

    /// A fresh database on the Postgres of `IVSCHAT_ROOMS_TEST_POSTGRES_URL`
    /// (default: the local one); the measure cannot run without it.
    async fn postgres() -> TempDb {
        use sqlx::Connection as _;
        let admin = std::env::var("IVSCHAT_ROOMS_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("ivschat_rooms_bench_{}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("this measure needs Postgres at {admin}: {e}"));
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&mut conn)
                .await
                .expect("create the measure's database");
        }
        let base = admin.rsplit_once('/').expect("a database in the URL").0;
        TempDb {
            url: format!("{base}/{name}"),
            _dir: None,
            postgres: Some((admin, name)),
        }
    }

    /// The Postgres server's URL (its `postgres` database).
    fn admin_url(&self) -> String {
        self.postgres
            .as_ref()
            .expect("a Postgres database")
            .0
            .clone()
    }

    /// The Postgres database's name.
    fn name(&self) -> String {
        self.postgres
            .as_ref()
            .expect("a Postgres database")
            .1
            .clone()
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.postgres.take() {
            // Drop runs inside the measure's runtime: a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    use sqlx::Connection as _;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// An emulator on a loopback port, with `faults`.
async fn emulator(faults: Faults) -> (Emulator, String) {
    let emulator = Emulator::new(EmulatorConfig {
        faults,
        ..EmulatorConfig::default()
    })
    .expect("emulator");
    let url = emulator
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("emulator listens");
    (emulator, url)
}

/// The AWS SDK pointed at an emulator, with retries off.
fn sdk(url: &str) -> aws_sdk_ivschat::Client {
    sdk_in(url, "us-east-1")
}

/// The SDK against the emulator at `url`, signing for `region`.
fn sdk_in(url: &str, region: &str) -> aws_sdk_ivschat::Client {
    use aws_sdk_ivschat::config::{BehaviorVersion, Credentials, Region, retry::RetryConfig};
    let config = aws_sdk_ivschat::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .endpoint_url(url)
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_ivschat::Client::from_conf(config)
}

/// The service's defaults, in front of the emulator at `emulator_url`, with
/// the reconciler quiet after its startup listing, and `extra` flags.
fn serve_config(db_url: &str, emulator_url: &str, extra: &[&str]) -> ServeConfig {
    let args = [
        "ivschat-rooms",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--database-url",
        db_url,
        "--upstream",
        "emulator",
        "--emulator-url",
        emulator_url,
        "--reconcile-interval",
        "1h",
        "--resync-interval",
        "1h",
    ];
    let cli = Cli::try_parse_from(args.iter().chain(extra))
        .unwrap_or_else(|e| panic!("service flags {extra:?} do not parse: {e}"));
    match cli.into_command() {
        Command::Serve(config) => config,
        Command::Emulator(_) | Command::Watch(_) => unreachable!("serve was asked for"),
    }
}

/// The real server on a loopback port.
struct Service {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    /// Starts the server and waits until it serves and its startup listing is
    /// done (ListRooms waits for it).
    async fn start(config: ServeConfig) -> Service {
        let service = Service::spawn(config).await;
        service
            .client()
            .await
            .list_rooms(proto::ListRoomsRequest::default())
            .await
            .expect("the service's startup listing completes");
        service
    }

    /// Starts the server and waits until it serves.
    async fn spawn(config: ServeConfig) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(ivschat_rooms::server::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let service = Service { addr, stop, task };
        let channel = connect(&service.uri()).await;
        let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        if let Err(status) = health {
            let outcome = service.task.await;
            panic!("the service did not start: {status:?}; it said {outcome:?}");
        }
        service
    }

    fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn client(&self) -> RoomServiceClient<Channel> {
        RoomServiceClient::new(connect(&self.uri()).await)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the service stops within 30 s")
            .expect("the service task")
            .expect("the service stops cleanly");
    }
}

/// The least a tonic server can do for GetRoom: answer a constant Room.
struct BareService {
    room: proto::Room,
}

#[tonic::async_trait]
impl room_service_server::RoomService for BareService {
    type WatchRoomsStream = futures::stream::Pending<Result<proto::WatchRoomsResponse, Status>>;

    async fn get_room(
        &self,
        _request: Request<proto::GetRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        Ok(Response::new(self.room.clone()))
    }

    async fn create_room(
        &self,
        _request: Request<proto::CreateRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn update_room(
        &self,
        _request: Request<proto::UpdateRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn delete_room(
        &self,
        _request: Request<proto::DeleteRoomRequest>,
    ) -> Result<Response<proto::DeleteRoomResponse>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn list_rooms(
        &self,
        _request: Request<proto::ListRoomsRequest>,
    ) -> Result<Response<proto::ListRoomsResponse>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn tag_room(
        &self,
        _request: Request<proto::TagRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn untag_room(
        &self,
        _request: Request<proto::UntagRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn watch_rooms(
        &self,
        _request: Request<proto::WatchRoomsRequest>,
    ) -> Result<Response<Self::WatchRoomsStream>, Status> {
        Err(Status::unimplemented("bare server"))
    }
}

/// A bare tonic server (TCP_NODELAY, as the service's) on a loopback port.
struct BareServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl BareServer {
    async fn start(room: proto::Room) -> BareServer {
        BareServer::serve(room, None).await
    }

    /// The bare service inside the layers the service ships with (the access
    /// log and its metrics around everything, authentication without tokens
    /// around RoomService) and with the connection settings `config` gives
    /// the service (HTTP/2 keepalive, the stream limit, unvectored writes).
    async fn start_layered(room: proto::Room, config: &ServeConfig) -> BareServer {
        BareServer::serve(room, Some(config)).await
    }

    async fn serve(room: proto::Room, shipped: Option<&ServeConfig>) -> BareServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local address");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
            let conn = conn?;
            conn.set_nodelay(true)?;
            Ok::<_, std::io::Error>(conn)
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let service = RoomServiceServer::new(BareService { room });
        let task = match shipped {
            Some(config) => tokio::spawn(
                tonic::transport::Server::builder()
                    .layer(ivschat_rooms::grpc::AccessLogLayer)
                    .max_concurrent_streams(config.max_concurrent_streams)
                    .http2_keepalive_interval(Some(config.keepalive_interval))
                    .http2_keepalive_timeout(Some(config.keepalive_timeout))
                    .add_service(ivschat_rooms::grpc::Authenticated::new(service, None))
                    .serve_with_incoming_shutdown(
                        incoming.map(|conn| conn.map(ivschat_rooms::grpc::Unvectored::new)),
                        stopped,
                    ),
            ),
            None => tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, stopped),
            ),
        };
        BareServer { addr, stop, task }
    }

    fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the bare server task")
            .expect("the bare server stops cleanly");
    }
}

/// One connection (HTTP/2, TCP_NODELAY) to `uri`.
async fn connect(uri: &str) -> Channel {
    Endpoint::from_shared(uri.to_owned())
        .expect("a server URI")
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("could not connect to {uri}: {e}"))
}

/// `n` separate connections to `uri`.
async fn connect_many(uri: &str, n: usize) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(connect(uri).await);
    }
    channels
}

fn create(name: &str) -> proto::CreateRoomRequest {
    proto::CreateRoomRequest {
        name: name.to_owned(),
        ..Default::default()
    }
}

fn cached_get(arn: &str) -> proto::GetRoomRequest {
    proto::GetRoomRequest {
        identifier: arn.to_owned(),
        consistency: proto::ReadConsistency::Cached as i32,
    }
}

// ---------------------------------------------------------------------------
// Seeding (P5)
// ---------------------------------------------------------------------------

/// `n` distinct rooms as IVS Chat would describe them.
fn rooms(n: usize) -> Vec<Room> {
    let now = Timestamp::now().truncate_to_micros();
    (0..n)
        .map(|i| {
            let id = format!("bench{i:07}");
            Room {
                arn: format!("arn:aws:ivschat:us-east-1:123456789012:room/{id}"),
                id,
                name: format!("bench-room-{i}"),
                create_time: now,
                update_time: now,
                maximum_message_rate_per_second: Room::DEFAULT_MAXIMUM_MESSAGE_RATE_PER_SECOND,
                maximum_message_length: Room::DEFAULT_MAXIMUM_MESSAGE_LENGTH,
                message_review_handler: None,
                tags: BTreeMap::new(),
                logging_configuration_identifiers: Vec::new(),
                details_pending: false,
            }
        })
        .collect()
}

/// Puts `rooms` straight into the cache at `url`, confirmed now, and records
/// a full listing so the server answers ListRooms from the cache at once.
async fn seed(url: &str, rooms: &[Room]) {
    let store = Store::open(url).await.expect("open the cache to seed it");
    let now = Timestamp::now();
    for chunk in rooms.chunks(10_000) {
        store
            .put_many(chunk, now, EventSource::Reconciler)
            .await
            .expect("seed the cache");
    }
    store
        .set_full_listing_at("us-east-1", now)
        .await
        .expect("record a full listing");
    store.close().await;
}

// ---------------------------------------------------------------------------
// Arithmetic
// ---------------------------------------------------------------------------

/// The most of `times` in any half-open window `[t, t + window)`.
fn max_in_window(mut times: Vec<Instant>, window: Duration) -> usize {
    times.sort();
    let mut end = 0;
    let mut most = 0;
    for (start, &t) in times.iter().enumerate() {
        while end < times.len() && times[end] < t + window {
            end += 1;
        }
        most = most.max(end - start);
    }
    most
}

/// The nearest-rank 99th percentile.
fn p99(mut samples: Vec<Duration>) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    let rank = (samples.len() * 99).div_ceil(100);
    samples[rank.max(1) - 1]
}

fn median(samples: &[Duration]) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort();
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2
    } else {
        sorted[middle]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn list_ms(samples: &[Duration]) -> String {
    samples
        .iter()
        .map(|d| format!("{:.2}", ms(*d)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn total_calls(emulator: &Emulator) -> u64 {
    Operation::ALL
        .into_iter()
        .map(|op| emulator.calls(op))
        .sum()
}

/// This process's resident set, in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}
