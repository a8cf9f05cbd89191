//! Replicas sharing Postgres act as one service: one AWS budget for the fleet
//! (counted where IVS Chat receives the calls), one GetRoom per cold room
//! across replicas, and every change made through the service logged `API`
//! whichever replica reconciles. The binary, as a user runs it, against an
//! emulator in the test's process, which counts and times every call.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::binary::{Server, WAIT, within};
use common::fleet::{emulator_apart, replicas};
use common::load::Client;
use common::pg::PrivatePostgres;
use common::{TestDb, max_per_second, proto, sdk, with_deadline};
use futures::future::join_all;
use ivschat_rooms::emulator::{Emulator, Faults, InjectedError, Operation, TpsLimit};
use tonic::Code;

/// These tests measure rates at IVS Chat on a two-core machine: one at a
/// time, so that their replicas do not starve each other of CPU.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An emulator at AWS's published rates (5 per second for room calls, 10
/// for tag calls), on a loopback port.
async fn aws_like_emulator() -> (Emulator, String) {
    emulator_apart(Faults {
        tps_limit: Some(TpsLimit::Aws),
        ..Faults::default()
    })
    .await
}

/// `n` rooms made in IVS Chat directly (before the service saw them), the
/// emulator's TPS limit lifted meanwhile.
async fn rooms_upstream(emulator: &Emulator, url: &str, n: usize, prefix: &str) -> Vec<String> {
    let faults = emulator.faults();
    emulator.set_faults(Faults {
        tps_limit: None,
        ..faults.clone()
    });
    let sdk = sdk(url);
    let mut arns = Vec::new();
    for i in 0..n {
        let room = sdk
            .create_room()
            .name(format!("{prefix}-{i}"))
            .send()
            .await
            .expect("create a room upstream");
        arns.push(room.arn.expect("an ARN"));
    }
    emulator.set_faults(faults);
    arns
}

/// What a load's requests came back with.
#[derive(Debug, Default)]
struct Outcomes {
    ok: usize,
    exhausted: usize,
    other: Vec<tonic::Status>,
}

/// Offers `per_second` requests per second to `client` for `length`, each
/// made by `request(n)` and sent by `send`, every one with a 1 s deadline.
async fn offer<F, Fut>(per_second: u32, length: Duration, send: F) -> Outcomes
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let end = tokio::time::Instant::now() + length;
    let mut calls = Vec::new();
    let mut n = 0;
    while tick.tick().await < end {
        calls.push(tokio::spawn(send(n)));
        n += 1;
    }
    let mut outcomes = Outcomes::default();
    for call in join_all(calls).await {
        match call.expect("a request task") {
            Ok(()) => outcomes.ok += 1,
            Err(status) if status.code() == Code::ResourceExhausted => outcomes.exhausted += 1,
            Err(status) => outcomes.other.push(status),
        }
    }
    outcomes
}

/// UpdateRoom of one of `arns` (round robin) through `client`, 1 s deadline.
fn updates(
    client: Client,
    arns: Arc<Vec<String>>,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>> {
    move |n| {
        let mut client = client.clone();
        let arn = arns[n as usize % arns.len()].clone();
        Box::pin(async move {
            let request = proto::UpdateRoomRequest {
                identifier: arn,
                name: Some(format!("n{n}")),
                ..Default::default()
            };
            client
                .update_room(with_deadline(request, Duration::from_secs(1)))
                .await
                .map(drop)
        })
    }
}

/// STRONG GetRoom of one of `arns` (round robin), 1 s deadline.
fn strong_reads(
    client: Client,
    arns: Arc<Vec<String>>,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>> {
    move |n| {
        let mut client = client.clone();
        let arn = arns[n as usize % arns.len()].clone();
        Box::pin(async move {
            let request = proto::GetRoomRequest {
                identifier: arn,
                consistency: proto::ReadConsistency::Strong as i32,
            };
            match client
                .get_room(with_deadline(request, Duration::from_secs(1)))
                .await
            {
                // IVS Chat answered: the read was served.
                Ok(_) => Ok(()),
                Err(status) if status.code() == Code::NotFound => Ok(()),
                Err(status) => Err(status),
            }
        })
    }
}

/// Slots of the shared budget handed out so far, per operation, from the
/// database.
async fn slots_granted(db: &str) -> Vec<(String, i64)> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(db).await.expect("connect");
    sqlx::query_as("SELECT operation, granted FROM upstream_budgets ORDER BY operation")
        .fetch_all(&mut conn)
        .await
        .expect("read the budgets")
}

/// Waits until every slot the fleet was granted has reached the emulator as
/// a call, or was left unused by its replica and counted so (a throttle
/// came after it was booked, or the replica woke too late for it); each slot
/// lies within its request's deadline, so this is soon. Returns the slots.
async fn every_slot_used(db: &str, emulator: &Emulator, servers: &[&Server]) -> Vec<(String, i64)> {
    within("every granted slot to be used", async {
        loop {
            let granted = slots_granted(db).await;
            let mut used = true;
            for (op, granted) in &granted {
                let mut unused = 0.0;
                for server in servers {
                    unused += server
                        .metric(
                            "ivschat_rooms_budget_slots_unused_total",
                            &[("operation", op.as_str())],
                        )
                        .await;
                }
                let calls = emulator.calls(op.parse().unwrap());
                used &= calls + unused as u64 == *granted as u64;
            }
            if used {
                return granted;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Calls of `op` the emulator received in `[from, to)`.
fn received(emulator: &Emulator, op: Operation, from: Instant, to: Instant) -> Vec<Instant> {
    emulator
        .call_times(op)
        .into_iter()
        .filter(|t| *t >= from && *t < to)
        .collect()
}

async fn throttles(server: &Server) -> f64 {
    server
        .metric("ivschat_rooms_upstream_throttles_total", &[])
        .await
}

/// Three replicas with default budgets, each offered 20 UpdateRoom and 20
/// STRONG GetRoom per second (four times the rate each): IVS Chat (at AWS's
/// rates) never receives more than 5 of either in any second and never
/// throttles, the fleet uses at least 90 % of the rate, and so does one
/// replica loaded while the others idle. Every slot granted was used:
/// refused requests held none.
///
/// The rate is counted over ten seconds: the budget spaces the fleet's slots
/// 1.06 / 5 s apart (4.72 per second), so over five seconds one slot left
/// unused by a late wake on a busy host is the whole margin above 90 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("three_replicas_share_one_budget").await else {
        return;
    };
    let (emulator, url) = aws_like_emulator().await;
    let arns = Arc::new(rooms_upstream(&emulator, &url, 12, "fleet").await);
    let servers = replicas(3, &db.url, &url, &[]).await;
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(server.client().await);
    }
    const RATE: f64 = 5.0;
    const LOAD: Duration = Duration::from_secs(11);
    // A second of ramp-up (the fleet books ahead) is left out of the rate.
    const RAMP: Duration = Duration::from_secs(1);

    for loaded in [3, 1] {
        let start = Instant::now();
        let loads = clients[..loaded].iter().flat_map(|client| {
            [
                tokio::spawn(offer(20, LOAD, updates(client.clone(), arns.clone()))),
                tokio::spawn(offer(20, LOAD, strong_reads(client.clone(), arns.clone()))),
            ]
        });
        let outcomes: Vec<Outcomes> = join_all(loads.collect::<Vec<_>>())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let end = start + LOAD;
        for outcome in &outcomes {
            assert!(
                outcome
                    .other
                    .iter()
                    .all(|s| matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled)),
                "only the budget's refusals (or a deadline): {:?}",
                outcome.other
            );
            assert!(outcome.exhausted > 0, "the load is over the budget");
        }
        for op in [Operation::UpdateRoom, Operation::GetRoom] {
            let times = received(&emulator, op, start, end + Duration::from_secs(2));
            let most = max_per_second(&times);
            let steady = received(&emulator, op, start + RAMP, end).len() as f64
                / (LOAD - RAMP).as_secs_f64();
            let mut late = 0.0;
            for server in &servers {
                late += server
                    .metric(
                        "ivschat_rooms_budget_slots_unused_total",
                        &[("operation", &op.to_string()), ("reason", "late")],
                    )
                    .await;
            }
            eprintln!(
                "{loaded} replica(s) loaded, {op}: at most {most} in a second, {steady:.2}/s, \
                 {late} slot(s) so far left unused by a late wake"
            );
            assert!(most as f64 <= RATE, "{op}: {most} calls in one second");
            assert!(
                steady >= 0.9 * RATE,
                "{op}: {steady:.2} calls/s with {loaded} replica(s) loaded, {late} slot(s) so far \
                 left unused by a late wake"
            );
        }
        // Whatever was granted reaches IVS Chat before the next round.
        every_slot_used(&db.url, &emulator, &servers.iter().collect::<Vec<_>>()).await;
    }
    for server in &servers {
        assert_eq!(
            throttles(server).await,
            0.0,
            "IVS Chat never throttled the fleet"
        );
        // Each replica shows the fleet's use of the budget.
        let fleet = server
            .metric(
                "ivschat_rooms_budget_fleet_slots",
                &[("operation", "UpdateRoom"), ("region", "us-east-1")],
            )
            .await;
        assert!(fleet > 0.0, "the fleet's UpdateRoom slots: {fleet}");
    }
    let granted = every_slot_used(&db.url, &emulator, &servers.iter().collect::<Vec<_>>()).await;
    assert!(
        granted.iter().any(|(op, n)| op == "UpdateRoom" && *n > 0),
        "{granted:?}"
    );
}

/// With default flags, TagRoom through one replica reaches at least 8 per
/// second (TagResource and ListTagsForResource, 10 per second each, and no
/// GetRoom), and IVS Chat never throttles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_room_reaches_the_tag_quota() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("tag_room_reaches_the_tag_quota").await else {
        return;
    };
    let (emulator, url) = aws_like_emulator().await;
    let arns = Arc::new(rooms_upstream(&emulator, &url, 10, "tags").await);
    let servers = replicas(1, &db.url, &url, &[]).await;
    let client = servers[0].client().await;
    let gets_before = emulator.calls(Operation::GetRoom);
    const LOAD: Duration = Duration::from_secs(5);
    let tag = {
        let arns = arns.clone();
        move |n: u64| {
            let mut client = client.clone();
            let arn = arns[n as usize % arns.len()].clone();
            async move {
                let request = proto::TagRoomRequest {
                    identifier: arn,
                    tags: [(format!("k{}", n % 7), format!("v{n}"))].into(),
                };
                let room = client
                    .tag_room(with_deadline(request, Duration::from_secs(2)))
                    .await?
                    .into_inner();
                assert_eq!(
                    room.tags.get(&format!("k{}", n % 7)),
                    Some(&format!("v{n}")),
                    "the answer shows the new tag"
                );
                Ok(())
            }
        }
    };
    let start = Instant::now();
    let outcomes = offer(20, LOAD, tag).await;
    assert!(outcomes.other.is_empty(), "{:?}", outcomes.other);
    // Counted where IVS Chat receives them, after a second of ramp-up.
    let tagged = received(
        &emulator,
        Operation::TagResource,
        start + Duration::from_secs(1),
        start + LOAD,
    );
    let per_second = tagged.len() as f64 / (LOAD - Duration::from_secs(1)).as_secs_f64();
    eprintln!("TagRoom: {per_second:.2} per second at IVS Chat, {outcomes:?}");
    assert!(per_second >= 8.0, "{per_second:.2} TagRoom per second");
    assert_eq!(throttles(&servers[0]).await, 0.0);
    // Tag changes are read back with ListTagsForResource (or, when its
    // budget has no slot in time, the change made is applied to the cached
    // tags), not with GetRoom (the reconciler may still read a room whose
    // tags it saw change).
    assert!(emulator.calls(Operation::ListTagsForResource) > 0);
    assert!(
        emulator.calls(Operation::GetRoom) - gets_before
            < emulator.calls(Operation::TagResource) / 4,
        "tags are read back without GetRoom"
    );
    // The cache holds exactly IVS Chat's tags.
    let mut client = servers[0].client().await;
    for room in emulator.rooms() {
        let cached = client
            .get_room(proto::GetRoomRequest {
                identifier: room.arn.clone(),
                consistency: proto::ReadConsistency::Cached as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cached.tags, room.tags.clone().into_iter().collect());
    }
}

/// Users on one replica saturate GetRoom while the reconciler, on another,
/// has rooms to read: it takes no GetRoom until the users are gone. A user
/// whose slot would lie past its deadline is refused at once
/// (RESOURCE_EXHAUSTED, not DEADLINE_EXCEEDED), holding no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_before_background_across_replicas() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("users_before_background_across_replicas").await else {
        return;
    };
    let (emulator, url) = aws_like_emulator().await;
    // Users read rooms IVS Chat does not have (NOT_FOUND costs a GetRoom all
    // the same), each rarely, so no read waits for another's turn: every
    // user waiting holds a slot of the budget.
    let arns: Arc<Vec<String>> = Arc::new(
        (0..400)
            .map(|n| common::room_arn(&format!("user{n:05}")))
            .collect(),
    );
    // The first replica leads the reconciler (it started first).
    let flags = ["--reconcile-interval", "200ms"];
    let leader = replicas(1, &db.url, &url, &flags).await.remove(0);
    let users = replicas(1, &db.url, &url, &flags).await.remove(0);
    let mut watch = users.client().await;
    let (_, revision) = common::load::list_all(&mut watch).await;

    const LOAD: Duration = Duration::from_secs(6);
    // Until the last user is offered, users book the budget ahead of now.
    let loaded_until = std::time::SystemTime::now() + LOAD;
    let load = tokio::spawn(offer(
        40,
        LOAD,
        strong_reads(users.client().await, arns.clone()),
    ));
    // While the users are at it, rooms appear behind the service's back and
    // the reconciler lists them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listings = emulator.calls(Operation::ListRooms);
    let new_rooms = rooms_upstream(&emulator, &url, 3, "behind").await;
    within("the reconciler to list the new rooms twice", async {
        while emulator.calls(Operation::ListRooms) < listings + 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let outcomes = load.await.unwrap();
    let users_done = common::load::list_all(&mut watch).await.1;
    assert!(
        outcomes.exhausted > 0,
        "the users wanted more than the rate"
    );
    assert!(outcomes.other.is_empty(), "{:?}", outcomes.other);
    // Nothing of the reconciler's reached the cache while users waited.
    let events = common::load::log_through(&mut watch, users_done).await;
    let found_while_loaded: Vec<_> = events[revision as usize..]
        .iter()
        .filter(|e| new_rooms.contains(&e.room.as_ref().unwrap().arn))
        // A full listing puts a room in as listed, at no GetRoom's cost.
        .filter(|e| !e.room.as_ref().unwrap().details_pending)
        .filter(|e| {
            let at = e.observed_at.unwrap();
            std::time::UNIX_EPOCH + Duration::new(at.seconds as u64, at.nanos as u32) < loaded_until
        })
        .collect();
    assert!(
        found_while_loaded.is_empty(),
        "the reconciler took GetRoom slots users were waiting for: {found_while_loaded:#?}"
    );
    // Once the users are gone it reads them.
    within("the reconciler to cache the new rooms", async {
        loop {
            let (rooms, _) = common::load::list_all(&mut watch).await;
            let cached: BTreeSet<_> = rooms.iter().map(|r| r.arn.clone()).collect();
            if new_rooms.iter().all(|arn| cached.contains(arn)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    every_slot_used(&db.url, &emulator, &[&leader, &users]).await;
    drop(leader);
}

/// A ThrottlingException seen by one replica pauses the operation for every
/// replica: right after it, another replica refuses at once a request whose
/// deadline falls inside the pause, and serves one that can wait it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_on_one_replica_pauses_all() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("throttling_on_one_replica_pauses_all").await else {
        return;
    };
    let (emulator, url) = aws_like_emulator().await;
    let arns = rooms_upstream(&emulator, &url, 2, "throttle").await;
    let servers = replicas(2, &db.url, &url, &["--upstream-max-attempts", "1"]).await;
    let (mut a, mut b) = (servers[0].client().await, servers[1].client().await);
    let update = |arn: &str, name: &str| proto::UpdateRoomRequest {
        identifier: arn.into(),
        name: Some(name.into()),
        ..Default::default()
    };
    emulator.set_faults(Faults {
        error_rate: 1.0,
        error: InjectedError::Throttling,
        tps_limit: Some(TpsLimit::Aws),
        ..Faults::default()
    });
    let throttled = a.update_room(update(&arns[0], "x")).await.unwrap_err();
    assert_eq!(throttled.code(), Code::Unavailable, "{throttled:?}");
    emulator.set_faults(Faults {
        tps_limit: Some(TpsLimit::Aws),
        ..Faults::default()
    });
    let calls = emulator.calls(Operation::UpdateRoom);
    let asked = Instant::now();
    let refused = b
        .update_room(with_deadline(
            update(&arns[1], "y"),
            Duration::from_millis(400),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("budget"),
        "says whose limit: {refused:?}"
    );
    assert!(asked.elapsed() < Duration::from_millis(400));
    assert_eq!(emulator.calls(Operation::UpdateRoom), calls, "nothing sent");
    b.update_room(with_deadline(update(&arns[1], "z"), Duration::from_secs(5)))
        .await
        .expect("served once the pause is over");
    let times = emulator.call_times(Operation::UpdateRoom);
    let pause = times[times.len() - 1] - times[times.len() - 2];
    assert!(
        pause >= Duration::from_millis(900),
        "the other replica waited out the pause: {pause:?}"
    );
}

/// Slots another replica booked before a throttle go unused: replica B has
/// UpdateRoom slots booked for the next two seconds when replica A's call
/// comes back throttled, and IVS Chat receives none of B's calls while the
/// pause lasts (B hears of it through Postgres); B's requests are served
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booked_slots_wait_out_another_replicas_throttle() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("booked_slots_wait_out_another_replicas_throttle").await else {
        return;
    };
    let (emulator, url) = aws_like_emulator().await;
    let arns = rooms_upstream(&emulator, &url, 11, "booked").await;
    let servers = replicas(2, &db.url, &url, &["--upstream-max-attempts", "1"]).await;
    let (mut a, b) = (servers[0].client().await, servers[1].client().await);
    let aws = Faults {
        tps_limit: Some(TpsLimit::Aws),
        ..Faults::default()
    };
    let before = emulator.calls(Operation::UpdateRoom);
    // A's call is answered with a throttle, held back until B has booked.
    emulator.set_faults(Faults {
        error_rate: 1.0,
        error: InjectedError::Throttling,
        ..aws.clone()
    });
    let held = emulator.hold_responses(Operation::UpdateRoom);
    let throttled = tokio::spawn(async move {
        a.update_room(proto::UpdateRoomRequest {
            identifier: arns[0].clone(),
            name: Some("a".into()),
            ..Default::default()
        })
        .await
    });
    emulator
        .wait_for_calls(Operation::UpdateRoom, before + 1)
        .await;
    emulator.set_faults(aws);
    let booked: Vec<_> = (1..11)
        .map(|n| {
            let mut b = b.clone();
            let arn = rooms_arn(&emulator, n);
            tokio::spawn(async move {
                let request = proto::UpdateRoomRequest {
                    identifier: arn,
                    name: Some(format!("b{n}")),
                    ..Default::default()
                };
                b.update_room(with_deadline(request, Duration::from_secs(8)))
                    .await
            })
        })
        .collect();
    // B's first booked call has reached IVS Chat: all ten are booked.
    emulator
        .wait_for_calls(Operation::UpdateRoom, before + 2)
        .await;
    let released = Instant::now();
    held.release();
    let throttled = throttled.await.unwrap().unwrap_err();
    assert_eq!(throttled.code(), Code::Unavailable, "{throttled:?}");
    for call in join_all(booked).await {
        call.unwrap().expect("served after the pause");
    }
    let during_pause = received(
        &emulator,
        Operation::UpdateRoom,
        released + Duration::from_millis(100),
        released + Duration::from_millis(900),
    );
    assert!(
        during_pause.is_empty(),
        "{} of B's booked calls reached IVS Chat during A's pause",
        during_pause.len()
    );
}

/// The ARN of the emulator's room named `booked-{n}`.
fn rooms_arn(emulator: &Emulator, n: usize) -> String {
    emulator
        .rooms()
        .into_iter()
        .find(|r| r.name == format!("booked-{n}"))
        .expect("the room")
        .arn
}

/// A room created through one replica, whose answer is slow to come back,
/// while the other replica reconciles and lists it: the reconciler leaves
/// it alone (a creation is in flight on the fleet), and its creation is
/// logged `API`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_on_one_replica_is_logged_api_on_the_other() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("a_creation_on_one_replica_is_logged_api_on_the_other").await
    else {
        return;
    };
    let (emulator, url) = emulator_apart(Faults::default()).await;
    let flags = [
        "--upstream-rate",
        "1000",
        "--reconcile-interval",
        "20ms",
        "--resync-interval",
        "100ms",
    ];
    // The first replica started leads the reconciler.
    let reconciling = replicas(1, &db.url, &url, &flags).await.remove(0);
    let serving = replicas(1, &db.url, &url, &flags).await.remove(0);
    let mut client = serving.client().await;
    let held = emulator.hold_responses(Operation::CreateRoom);
    let created = tokio::spawn({
        let mut client = client.clone();
        async move { client.create_room(common::create("slow-answer")).await }
    });
    emulator.wait_for_calls(Operation::CreateRoom, 1).await;
    // IVS Chat has the room; the reconciler lists it, twice, full listings
    // included, while the creation's answer is held back.
    let listings = emulator.calls(Operation::ListRooms);
    emulator
        .wait_for_calls(Operation::ListRooms, listings + 6)
        .await;
    held.release();
    let room = created.await.unwrap().expect("created").into_inner();
    let (_, through) = common::load::list_all(&mut client).await;
    let log = common::load::log_through(&mut client, through).await;
    let created: Vec<_> = log
        .iter()
        .filter(|e| e.room.as_ref().unwrap().arn == room.arn)
        .collect();
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!(
        created[0].source,
        proto::EventSource::Api as i32,
        "the creation is ours: {:#?}",
        created[0]
    );
    drop(reconciling);
}

/// 1,000 concurrent cold GetRoom of one room spread over three replicas cost
/// one GetRoom; STRONG reads still each see IVS Chat after they arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_reads_across_replicas_cost_one_get() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("cold_reads_across_replicas_cost_one_get").await else {
        return;
    };
    let (emulator, url) = aws_like_emulator().await;
    let servers = replicas(3, &db.url, &url, &[]).await;
    // A room the cache has never seen (no reconciling pass after startup's).
    let arn = rooms_upstream(&emulator, &url, 1, "cold").await.remove(0);
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(server.client().await);
    }
    let before = emulator.calls(Operation::GetRoom);
    let reads = (0..1000).map(|n| {
        let mut client = clients[n % clients.len()].clone();
        let arn = arn.clone();
        tokio::spawn(async move {
            client
                .get_room(proto::GetRoomRequest {
                    identifier: arn,
                    consistency: proto::ReadConsistency::Cached as i32,
                })
                .await
        })
    });
    for read in join_all(reads.collect::<Vec<_>>()).await {
        read.unwrap().expect("a cold read is served");
    }
    assert_eq!(emulator.calls(Operation::GetRoom) - before, 1);

    // STRONG: a change made behind our back is seen by a read after it.
    let renamed = ivschat_rooms::domain::RoomPatch {
        name: Some("renamed".into()),
        ..Default::default()
    };
    emulator.update_room(&arn, &renamed).unwrap();
    let strong = clients[1]
        .get_room(proto::GetRoomRequest {
            identifier: arn.clone(),
            consistency: proto::ReadConsistency::Strong as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strong.name, "renamed");
}

/// Two replicas: users change rooms through one (UpdateRoom, TagRoom,
/// UntagRoom) while the other reconciles often and rooms change behind the
/// service's back. Every event of the rooms the users change is `API`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_the_service_are_logged_api() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(db) = TestDb::postgres("changes_through_the_service_are_logged_api").await else {
        return;
    };
    let (emulator, url) = emulator_apart(Faults::default()).await;
    let ours = rooms_upstream(&emulator, &url, 8, "ours").await;
    let theirs = rooms_upstream(&emulator, &url, 4, "theirs").await;
    let flags = [
        "--upstream-rate",
        "1000",
        "--reconcile-interval",
        "20ms",
        "--resync-interval",
        "300ms",
    ];
    // The first replica started leads the reconciler.
    let reconciling = replicas(1, &db.url, &url, &flags).await.remove(0);
    let serving = replicas(1, &db.url, &url, &flags).await.remove(0);
    let mut client = serving.client().await;
    // The rooms made upstream before, read whole by the reconciler.
    let (_, start) = common::load::list_all_whole(&mut client).await;

    let load_for = Duration::from_secs(12);
    let writers = (0..ours.len()).map(|w| {
        let mut client = client.clone();
        let arn = ours[w].clone();
        tokio::spawn(async move {
            let end = Instant::now() + load_for;
            let mut n = 0u64;
            while Instant::now() < end {
                let result = match n % 3 {
                    0 => client
                        .update_room(proto::UpdateRoomRequest {
                            identifier: arn.clone(),
                            name: Some(format!("n{n}")),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    1 => client
                        .tag_room(proto::TagRoomRequest {
                            identifier: arn.clone(),
                            tags: [("k".to_owned(), format!("v{n}"))].into(),
                        })
                        .await
                        .map(drop),
                    _ => client
                        .untag_room(proto::UntagRoomRequest {
                            identifier: arn.clone(),
                            tag_keys: vec!["k".into()],
                        })
                        .await
                        .map(drop),
                };
                result.expect("a write through the service");
                n += 1;
            }
            n
        })
    });
    // Rooms created through the serving replica while the other lists.
    let creator = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let end = Instant::now() + load_for;
            let mut made = Vec::new();
            while Instant::now() < end {
                let room = client
                    .create_room(common::create(&format!("made-{}", made.len())))
                    .await
                    .expect("a create through the service")
                    .into_inner();
                made.push(room.arn);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            made
        })
    };
    let behind = {
        let emulator = emulator.clone();
        let theirs = theirs.clone();
        tokio::spawn(async move {
            let end = Instant::now() + load_for;
            let mut n = 0u64;
            while Instant::now() < end {
                let patch = ivschat_rooms::domain::RoomPatch {
                    name: Some(format!("t{n}")),
                    ..Default::default()
                };
                emulator
                    .update_room(&theirs[n as usize % theirs.len()], &patch)
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let writes: u64 = join_all(writers.collect::<Vec<_>>())
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    behind.await.unwrap();
    let made = creator.await.unwrap();
    let (_, through) = common::load::list_all(&mut client).await;
    let log = common::load::log_through(&mut client, through).await;
    let ours: BTreeSet<_> = ours.into_iter().chain(made.iter().cloned()).collect();
    let mislabelled: Vec<_> = log[start as usize..]
        .iter()
        .filter(|e| ours.contains(&e.room.as_ref().unwrap().arn))
        .filter(|e| e.source != proto::EventSource::Api as i32)
        .collect();
    let by_reconciler = log[start as usize..]
        .iter()
        .filter(|e| e.source == proto::EventSource::Reconciler as i32)
        .count();
    eprintln!(
        "{writes} writes and {} creates through the service, {} events, {by_reconciler} by the reconciler",
        made.len(),
        log.len() - start as usize
    );
    assert!(
        by_reconciler > 0,
        "the reconciler found the changes behind our back"
    );
    assert!(
        mislabelled.is_empty(),
        "{} of our changes logged as the reconciler's: {:#?}",
        mislabelled.len(),
        mislabelled.first()
    );
    drop(reconciling);
}

/// Faults under load on a Postgres the test runs itself: a replica killed
/// with kill -9, and the database stopped and started again for real. IVS
/// Chat never receives more than the rate, cached reads are answered while
/// the database is down, the fleet recovers by itself, and the cache and its
/// change log lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_never_break_the_rate_or_lose_anything() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    if PrivatePostgres::available().is_none() {
        if std::env::var_os(common::REQUIRE_POSTGRES_VAR).is_some() {
            panic!("Postgres's server programs (initdb, pg_ctl) are not installed");
        }
        eprintln!("SKIPPED: no initdb/pg_ctl to run a private Postgres");
        return;
    }
    let pg = PrivatePostgres::start();
    let db = pg.url();
    let (emulator, url) = aws_like_emulator().await;
    let arns = Arc::new(rooms_upstream(&emulator, &url, 10, "faults").await);
    let mut servers = replicas(3, &db, &url, &["--max-staleness", "2s"]).await;
    let start = Instant::now();

    // Load on every replica while one is killed.
    let load = |client: Client| {
        tokio::spawn(offer(
            20,
            Duration::from_secs(4),
            updates(client, arns.clone()),
        ))
    };
    let mut loads = Vec::new();
    for server in &servers {
        loads.push(load(server.client().await));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers.remove(2).kill_9().await;
    let outcomes = join_all(loads).await;
    // The survivors' users were served (the killed one's lost their calls).
    for outcome in &outcomes[..2] {
        let outcome = outcome.as_ref().unwrap();
        assert!(outcome.ok > 0, "{outcome:?}");
        assert!(outcome.other.is_empty(), "{outcome:?}");
    }

    // Reads cached now are answered while the database is down.
    let mut a = servers[0].client().await;
    for arn in arns.iter() {
        a.get_room(proto::GetRoomRequest {
            identifier: arn.clone(),
            consistency: proto::ReadConsistency::Cached as i32,
        })
        .await
        .expect("a cached read");
    }
    pg.stop();
    let stopped = Instant::now();
    let read_all = |a: Client| {
        let arns = arns.clone();
        async move {
            let mut statuses = Vec::new();
            for arn in arns.iter() {
                let read = a
                    .clone()
                    .get_room(with_deadline(
                        proto::GetRoomRequest {
                            identifier: arn.clone(),
                            consistency: proto::ReadConsistency::Cached as i32,
                        },
                        Duration::from_secs(2),
                    ))
                    .await
                    .expect("cached reads are answered while the database is down");
                assert_eq!(read.get_ref().arn, *arn);
                statuses.push(
                    read.metadata()
                        .get("x-cache")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            statuses
        }
    };
    read_all(a.clone()).await;
    // Past --max-staleness (2 s) the rows are served stale, from memory,
    // before the requests' deadlines.
    tokio::time::sleep(
        (stopped + Duration::from_millis(2500)).saturating_duration_since(Instant::now()),
    )
    .await;
    let statuses = read_all(a.clone()).await;
    assert!(
        statuses.iter().all(|s| s == "stale"),
        "served stale while the database is down: {statuses:?}"
    );
    // Writes fail retryably, and send nothing.
    let calls = emulator.calls(Operation::UpdateRoom);
    let write = a
        .update_room(with_deadline(
            proto::UpdateRoomRequest {
                identifier: arns[0].clone(),
                name: Some("while-down".into()),
                ..Default::default()
            },
            Duration::from_secs(3),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            write.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ),
        "{write:?}"
    );
    assert_eq!(emulator.calls(Operation::UpdateRoom), calls);
    pg.start_again();

    // Recovers by itself: writes through both replicas work again.
    let mut b = servers[1].client().await;
    within("writes to work again", async {
        loop {
            let request = proto::UpdateRoomRequest {
                identifier: arns[1].clone(),
                name: Some("after".into()),
                ..Default::default()
            };
            match b.update_room(request).await {
                Ok(_) => return,
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::ResourceExhausted | Code::Internal
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    let more = tokio::spawn(offer(
        20,
        Duration::from_secs(2),
        updates(a.clone(), arns.clone()),
    ));
    assert!(more.await.unwrap().ok > 0);

    // Never above the rate, all along.
    let times = received(
        &emulator,
        Operation::UpdateRoom,
        start,
        Instant::now() + WAIT,
    );
    let most = max_per_second(&times);
    assert!(most <= 5, "{most} UpdateRoom in one second");

    // Nothing lost: the cache comes to equal IVS Chat by itself (a write
    // the killed replica made upstream is found by the reconciler), and the
    // change log replays into it.
    let upstream = common::load::upstream_rooms(&emulator);
    let (cached, revision) = within("the cache to equal IVS Chat", async {
        loop {
            let (cached, revision) = common::load::list_all(&mut a).await;
            if cached == upstream {
                return (cached, revision);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    common::load::assert_same_rooms(&cached, &upstream);
    let log = common::load::log_through(&mut a, revision).await;
    common::load::assert_same_rooms(&common::load::fold(&log), &cached);
    drop(servers);
    drop(pg);
}
