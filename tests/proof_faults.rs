//! The service under load while things break: IVS Chat failing a third of
//! its calls (5xx, throttling and answers slower than the upstream timeout),
//! the server killed with SIGKILL mid-write, and its Postgres connections
//! cut. Each runs the real binary on port 0 against an emulator in this
//! process (which outlives the server, as AWS would), on a database of its
//! own, and ends by checking the cache and the change log against the
//! emulator.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ivschat_rooms::emulator::{Faults, InjectedError, InjectedFault, Operation};
use sqlx::Connection as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use common::binary::{Server, WAIT, within};
use common::load::{
    Client, Watcher, assert_real_versions, assert_same_rooms, fold, full_passes, list_all,
    list_all_whole, log_through, one_full_pass_after, upstream_rooms,
};
use common::{POSTGRES_URL_VAR, TestDb, create, proto};

/// Outcomes of requests by method and code, with the first message of each.
type Tally = HashMap<(&'static str, Code), (u64, String)>;

/// One line per method and code, sorted, for printing.
fn show(tally: &Tally) -> Vec<String> {
    let mut lines: Vec<_> = tally
        .iter()
        .map(|((method, code), (n, message))| format!("{method} {code:?}: {n} {message}"))
        .collect();
    lines.sort();
    lines
}

fn record<T>(tally: &mut Tally, method: &'static str, result: &Result<T, tonic::Status>) {
    let (code, message) = match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    };
    tally.entry((method, code)).or_insert((0, message)).0 += 1;
}

fn merge(into: &mut Tally, from: Tally) {
    for (key, (n, message)) in from {
        into.entry(key).or_insert((0, message)).0 += n;
    }
}

fn count(tally: &Tally, keep: impl Fn(&str, Code) -> bool) -> u64 {
    tally
        .iter()
        .filter(|((method, code), _)| keep(method, *code))
        .map(|(_, (n, _))| n)
        .sum()
}

/// Runs one client until `stop`: `step(client, i)` makes its i-th request(s)
/// and records them.
fn client_loop<F, Fut>(client: Client, stop: CancellationToken, step: F) -> JoinHandle<Tally>
where
    F: Fn(Client, u64) -> Fut + Send + 'static,
    Fut: Future<Output = Tally> + Send,
{
    tokio::spawn(async move {
        let mut tally = Tally::new();
        let mut i = 0;
        while !stop.is_cancelled() {
            merge(&mut tally, step(client.clone(), i).await);
            i += 1;
        }
        tally
    })
}

/// The mixed load: cached reads of the known rooms (counting the answers
/// marked stale), writes of every kind (creating and deleting rooms of their
/// own, changing the known ones), and listings.
fn mixed_load(
    client: &Client,
    known: &[String],
    stop: &CancellationToken,
) -> Vec<JoinHandle<Tally>> {
    let mut clients = Vec::new();
    for reader in 0..2_u64 {
        let known = known.to_vec();
        clients.push(client_loop(
            client.clone(),
            stop.clone(),
            move |mut client, i| {
                let arn = known[usize::try_from(i * 3 + reader).unwrap() % known.len()].clone();
                async move {
                    let mut tally = Tally::new();
                    let read = client
                        .get_room(proto::GetRoomRequest {
                            identifier: arn,
                            consistency: proto::ReadConsistency::Cached as i32,
                        })
                        .await;
                    let stale = read
                        .as_ref()
                        .is_ok_and(|r| r.metadata().get("x-cache").is_some_and(|v| v == "stale"));
                    record(
                        &mut tally,
                        if stale { "GetRoom (stale)" } else { "GetRoom" },
                        &read,
                    );
                    tally
                }
            },
        ));
    }
    for writer in 0..2_u64 {
        let known = known.to_vec();
        clients.push(client_loop(
            client.clone(),
            stop.clone(),
            move |mut client, i| {
                let arn = known[usize::try_from(i * 5 + writer).unwrap() % known.len()].clone();
                async move {
                    let mut tally = Tally::new();
                    match i % 4 {
                        0 => {
                            let update = client
                                .update_room(proto::UpdateRoomRequest {
                                    identifier: arn,
                                    name: Some(format!("w{writer}-{i}")),
                                    maximum_message_length: Some(
                                        1 + i32::try_from(i % 500).unwrap(),
                                    ),
                                    ..Default::default()
                                })
                                .await;
                            record(&mut tally, "UpdateRoom", &update);
                        }
                        1 => {
                            let tag = client
                                .tag_room(proto::TagRoomRequest {
                                    identifier: arn,
                                    tags: [(format!("w{writer}"), i.to_string())].into(),
                                })
                                .await;
                            record(&mut tally, "TagRoom", &tag);
                        }
                        2 => {
                            let untag = client
                                .untag_room(proto::UntagRoomRequest {
                                    identifier: arn,
                                    tag_keys: vec![format!("w{}", 1 - writer)],
                                })
                                .await;
                            record(&mut tally, "UntagRoom", &untag);
                        }
                        _ => {
                            let created = client
                                .create_room(create(&format!("new-w{writer}-{i}")))
                                .await;
                            record(&mut tally, "CreateRoom", &created);
                            if let Ok(room) = created {
                                let deleted = client
                                    .delete_room(proto::DeleteRoomRequest {
                                        identifier: room.into_inner().arn,
                                        ..Default::default()
                                    })
                                    .await;
                                record(&mut tally, "DeleteRoom", &deleted);
                            }
                        }
                    }
                    tally
                }
            },
        ));
    }
    clients.push(client_loop(
        client.clone(),
        stop.clone(),
        |mut client, i| async move {
            let mut tally = Tally::new();
            let list = client
                .list_rooms(proto::ListRoomsRequest {
                    max_results: 1 + i32::try_from(i % 50).unwrap(),
                    ..Default::default()
                })
                .await;
            record(&mut tally, "ListRooms", &list);
            tally
        },
    ));
    clients
}

/// Stops the load and adds up what its clients got.
async fn stop_load(stop: &CancellationToken, clients: Vec<JoinHandle<Tally>>) -> Tally {
    stop.cancel();
    let mut tally = Tally::new();
    for client in clients {
        merge(
            &mut tally,
            within("a client to stop", client).await.unwrap(),
        );
    }
    tally
}

async fn create_known(client: &mut Client, n: usize) -> Vec<String> {
    let mut known = Vec::new();
    for i in 0..n {
        let room = within(
            "CreateRoom",
            client.create_room(create(&format!("known-{i}"))),
        )
        .await
        .expect("create a known room")
        .into_inner();
        known.push(room.arn);
    }
    known
}

/// A third of IVS Chat's answers are faults, in equal parts 500
/// InternalServerException, 429 ThrottlingException and answers slower than
/// the server's --upstream-timeout (the call took effect, the answer is
/// lost), while clients read, write, list and watch. Cached reads of cached
/// rooms keep succeeding (stale-if-error); writes succeed or fail with a
/// code worth retrying, never INTERNAL; every event is well formed and
/// shows a room as IVS Chat really had it, with no gap in revisions; once
/// the faults stop, one reconciling pass makes the cache equal IVS Chat's
/// rooms, and the change log replays into exactly the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_leave_reads_served_and_the_cache_converging() {
    const KNOWN: usize = 10;
    let started = Instant::now();
    let db = TestDb::sqlite();
    let (emulator, url) = common::emulator().await;
    emulator.keep_versions();
    let flags = [
        "--upstream-timeout",
        "300ms",
        // Two attempts, so that a fault outlasts the retries often enough
        // for failures to reach clients.
        "--upstream-max-attempts",
        "2",
        "--upstream-rate",
        "1000",
        // Cached reads go to IVS Chat after 100 ms, and so meet the faults.
        "--max-staleness",
        "100ms",
        "--stale-if-error",
        "1h",
        "--reconcile-interval",
        "200ms",
        "--resync-interval",
        "1s",
    ];
    let server = Server::against(&db.url, &url, &flags).await;
    let mut client = server.client().await;
    let known = create_known(&mut client, KNOWN).await;
    let (_, start) = list_all(&mut client).await;
    let watcher = Watcher::start(client.clone(), Vec::new(), start, None);

    let slow = Duration::from_millis(600);
    emulator.set_faults(Faults {
        mix: vec![
            (InjectedFault::Error(InjectedError::Internal), 0.1),
            (InjectedFault::Error(InjectedError::Throttling), 0.1),
            (InjectedFault::Slow(slow), 0.1),
        ],
        ..Faults::default()
    });
    let stop = CancellationToken::new();
    let clients = mixed_load(&client, &known, &stop);
    // Load until IVS Chat has answered (or failed) enough reads and writes.
    let (gets, updates) = (
        emulator.calls(Operation::GetRoom),
        emulator.calls(Operation::UpdateRoom),
    );
    tokio::time::timeout(WAIT * 3, async {
        emulator.wait_for_calls(Operation::GetRoom, gets + 60).await;
        emulator
            .wait_for_calls(Operation::UpdateRoom, updates + 30)
            .await;
    })
    .await
    .expect("the load reaches IVS Chat");
    let tally = stop_load(&stop, clients).await;
    let faulty_for = started.elapsed();

    emulator.set_faults(Faults::default());
    let passes = full_passes(&server).await;
    one_full_pass_after(&server, passes).await;
    let (cached, revision) = list_all_whole(&mut client).await;
    assert_same_rooms(&cached, &upstream_rooms(&emulator));

    let watched = watcher.finish(revision).await;
    assert_eq!(watched.last, revision);
    let versions = emulator.versions();
    assert_real_versions(&watched.events, &versions);
    let log = log_through(&mut client, revision).await;
    assert_eq!(
        log[usize::try_from(start).unwrap()..],
        watched.events[..],
        "the watcher saw exactly the log"
    );
    assert_eq!(fold(&log), cached, "the log replays into exactly the cache");

    eprintln!(
        "faults: {:.1} s under faults, {} requests, {} events watched, {} room versions upstream, \
         {} full passes; outcomes {:#?}",
        faulty_for.as_secs_f64(),
        count(&tally, |_, _| true),
        watched.events.len(),
        versions.len(),
        full_passes(&server).await,
        show(&tally),
    );
    let unexpected: Vec<_> = tally
        .iter()
        .filter(|((method, code), _)| match *method {
            "GetRoom" | "GetRoom (stale)" | "ListRooms" => *code != Code::Ok,
            // A delete whose first attempt took effect, answer lost, is
            // retried and finds the room gone: NOT_FOUND is its true answer.
            "DeleteRoom" => !matches!(
                code,
                Code::Ok | Code::Unavailable | Code::ResourceExhausted | Code::NotFound
            ),
            _ => !matches!(code, Code::Ok | Code::Unavailable | Code::ResourceExhausted),
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "cached reads and listings must succeed, writes fail only with a code \
         worth retrying: {unexpected:#?}"
    );
    // The faults reached the clients: some reads were answered stale, some
    // writes failed.
    assert!(
        count(&tally, |m, _| m == "GetRoom (stale)") > 0,
        "{:#?}",
        show(&tally)
    );
    assert!(
        count(&tally, |m, c| !m.starts_with("GetRoom") && c != Code::Ok) > 0,
        "{:#?}",
        show(&tally)
    );
}

/// SIGKILL lands while writers create, update, tag and delete rooms; the
/// server restarts on the same SQLite file, in front of the same (external)
/// emulator. After its startup reconciling pass, the cache equals IVS
/// Chat's rooms field by field, and the change log is 1..=N with no gap and
/// no repeat, holds exactly what a watcher saw before the kill, and replays
/// into exactly the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_write_load_then_restart_converges() {
    const EVENTS_BEFORE_KILL: u64 = 150;
    let db = TestDb::sqlite();
    let (emulator, url) = common::emulator().await;
    let flags = ["--upstream-rate", "1000", "--reconcile-interval", "1h"];
    let mut server = Server::against(&db.url, &url, &flags).await;
    let mut client = server.client().await;
    server.logged("full listing of IVS Chat complete").await;
    let known = create_known(&mut client, 8).await;
    let stop = CancellationToken::new();
    let clients = mixed_load(&client, &known, &stop);

    // Kill once a watcher has seen the log grow enough, while the writers
    // keep writing.
    let seen_before_kill = Watcher::start(client.clone(), Vec::new(), 0, None)
        .finish(EVENTS_BEFORE_KILL)
        .await;
    server.kill_9().await;
    let tally = stop_load(&stop, clients).await;
    drop(client);
    let failed_writes = count(&tally, |m, c| {
        !m.starts_with("GetRoom") && m != "ListRooms" && c != Code::Ok
    });
    assert!(
        failed_writes > 0,
        "SIGKILL cut writes off: {:#?}",
        show(&tally)
    );

    let mut server = Server::against(&db.url, &url, &flags).await;
    let mut client = server.client().await;
    // The startup full listing takes in whatever IVS Chat did for writes
    // whose answers SIGKILL cut off.
    server.logged("full listing of IVS Chat complete").await;
    let (cached, revision) = list_all_whole(&mut client).await;
    assert_same_rooms(&cached, &upstream_rooms(&emulator));

    let log = log_through(&mut client, revision).await;
    assert_eq!(
        log[..seen_before_kill.events.len()],
        seen_before_kill.events[..],
        "what was streamed before the kill is in the log, at the same revisions"
    );
    assert_eq!(fold(&log), cached, "the log replays into exactly the cache");

    let reconciled = log
        .iter()
        .filter(|e| e.source == proto::EventSource::Reconciler as i32)
        .count();
    eprintln!(
        "kill -9: killed after revision {}; {} writes acknowledged, {failed_writes} cut off; \
         log ends at {revision}, {reconciled} event(s) found by reconciling; {} rooms",
        seen_before_kill.last,
        count(&tally, |m, c| !m.starts_with("GetRoom")
            && m != "ListRooms"
            && c == Code::Ok),
        cached.len(),
    );
}

/// Postgres goes away under load and comes back; the service recovers by
/// itself. The machine's Postgres server is shared (other tests, other
/// people's databases, CI's service container), so restarting it is not an
/// option here; instead, for a while, every connection to this test's
/// database is terminated as soon as it appears (pg_terminate_backend, as
/// a restart does to each backend: 57P01 admin shutdown), which is what a
/// restart looks like from the service: the pool's connections, the LISTEN
/// connection and the reconciler's lock connection all die, and new ones
/// die too until it ends. Meanwhile requests fail only with UNAVAILABLE;
/// afterwards reads, writes and watchers work again without a restart of
/// the service, nothing is lost (a watcher streaming across the outage,
/// resuming if it must, has every revision, the log replays into the cache) and one reconciling
/// pass makes the cache equal IVS Chat's rooms (writes IVS Chat accepted
/// while the cache could not store them included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_cut_under_load_then_the_service_recovers() {
    const OUTAGE: Duration = Duration::from_secs(3);
    let Some(db) =
        TestDb::postgres("postgres_connections_cut_under_load_then_the_service_recovers").await
    else {
        return;
    };
    let (emulator, url) = common::emulator().await;
    let flags = [
        "--upstream-rate",
        "1000",
        "--max-staleness",
        "100ms",
        "--reconcile-interval",
        "200ms",
        "--resync-interval",
        "1s",
        "--bookmark-interval",
        "200ms",
    ];
    let server = Server::against(&db.url, &url, &flags).await;
    let mut client = server.client().await;
    let known = create_known(&mut client, 10).await;
    let (_, start) = list_all(&mut client).await;
    let watcher = Watcher::start(client.clone(), Vec::new(), start, None);
    let stop = CancellationToken::new();
    let clients = mixed_load(&client, &known, &stop);
    // The load is under way: some updates have reached IVS Chat.
    let updates = emulator.calls(Operation::UpdateRoom);
    within(
        "updates under load",
        emulator.wait_for_calls(Operation::UpdateRoom, updates + 10),
    )
    .await;

    let admin_url = std::env::var(POSTGRES_URL_VAR).expect("set, since the database was made");
    let database = db.url.rsplit('/').next().unwrap().to_owned();
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    let outage = Instant::now();
    let mut terminated = 0_u64;
    while outage.elapsed() < OUTAGE {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&database)
        .fetch_all(&mut admin)
        .await
        .expect("terminate the test database's connections");
        terminated += killed.into_iter().filter(|k| *k).count() as u64;
        // New connections come and die at this pace, as during a restart.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = stop_load(&stop, clients).await;

    // Right after: each kind of request works at its first try.
    let after = Instant::now();
    let room = within(
        "UpdateRoom after the outage",
        client.update_room(proto::UpdateRoomRequest {
            identifier: known[0].clone(),
            name: Some("after-the-outage".into()),
            ..Default::default()
        }),
    )
    .await
    .expect("a write after the outage")
    .into_inner();
    let read = within(
        "GetRoom after the outage",
        client.get_room(proto::GetRoomRequest {
            identifier: known[0].clone(),
            consistency: proto::ReadConsistency::Cached as i32,
        }),
    )
    .await
    .expect("a read after the outage")
    .into_inner();
    assert_eq!(read, room, "the cache took the write");
    let (listed, revision_after) = list_all(&mut client).await;
    assert!(listed.contains(&room));
    let fresh = Watcher::start(client.clone(), vec![room.arn.clone()], revision_after, None);
    let created = within(
        "CreateRoom after the outage",
        client.create_room(create("after-the-outage")),
    )
    .await
    .expect("a create after the outage")
    .into_inner();
    within(
        "TagRoom after the outage",
        client.tag_room(proto::TagRoomRequest {
            identifier: room.arn.clone(),
            tags: [("after".into(), "outage".into())].into(),
        }),
    )
    .await
    .expect("a tag after the outage");
    let (_, revision) = list_all(&mut client).await;
    let fresh = fresh.finish(revision).await;
    assert_eq!(
        fresh.events.len(),
        1,
        "a new watcher sees the tag: {:#?}",
        fresh.events
    );
    let recovered_in = after.elapsed();

    let passes = full_passes(&server).await;
    one_full_pass_after(&server, passes).await;
    let (cached, revision) = list_all_whole(&mut client).await;
    assert!(cached.iter().any(|r| r.arn == created.arn));
    assert_same_rooms(&cached, &upstream_rooms(&emulator));
    let watched = watcher.finish(revision).await;
    let log = log_through(&mut client, revision).await;
    assert_eq!(
        log[usize::try_from(start).unwrap()..],
        watched.events[..],
        "the watcher, streaming across the outage, saw exactly the log"
    );
    assert_eq!(fold(&log), cached, "the log replays into exactly the cache");

    eprintln!(
        "postgres outage: {terminated} connections terminated over {OUTAGE:?}; \
         {} requests meanwhile, outcomes {:#?}; first requests after it served in {:?}; \
         the watcher opened {} streams and saw {} events; log ends at {revision}",
        count(&during, |_, _| true),
        show(&during),
        recovered_in,
        watched.streams,
        watched.events.len(),
    );
    assert!(terminated > 0);
    let unexpected: Vec<_> = during
        .iter()
        .filter(|((_, code), _)| !matches!(code, Code::Ok | Code::Unavailable))
        .collect();
    assert!(
        unexpected.is_empty(),
        "while the database is away, requests fail only with UNAVAILABLE: {unexpected:#?}"
    );
    assert!(
        count(&during, |_, c| c == Code::Unavailable) > 0,
        "the outage reached clients: {:#?}",
        show(&during)
    );
}
