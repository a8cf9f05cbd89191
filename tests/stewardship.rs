//! Upstream stewardship: the budget (under paused time, and end to end),
//! throttling fed back into it, one upstream call for many readers of a room,
//! stale-if-error and the cache headers that say what happened.

mod common;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common::{TestDb, TestServer, create, max_per_second, proto, sdk, serve_config, setup};
use futures::future::join_all;
use ivschat_rooms::budget::{Budget, BudgetSettings, Caller, LocalBudget, Operation as Op};
use ivschat_rooms::domain::{Error, RoomPatch};
use ivschat_rooms::emulator::{Faults, InjectedError, Operation};
use tokio::time::Instant;
use tonic::Code;

fn get(arn: &str, consistency: proto::ReadConsistency) -> proto::GetRoomRequest {
    proto::GetRoomRequest {
        identifier: arn.into(),
        consistency: consistency as i32,
    }
}

/// A GetRoom running on its own, to be awaited later.
fn spawn_get(
    server: &TestServer,
    arn: &str,
    consistency: proto::ReadConsistency,
) -> tokio::task::JoinHandle<Result<tonic::Response<proto::Room>, tonic::Status>> {
    let mut client = server.client.clone();
    let request = get(arn, consistency);
    tokio::spawn(async move { client.get_room(request).await })
}

fn header<'a>(metadata: &'a tonic::metadata::MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).and_then(|v| v.to_str().ok())
}

fn budget(rate: u32, max_wait: Duration) -> Arc<LocalBudget> {
    Arc::new(LocalBudget::new(
        "us-east-1",
        &BudgetSettings {
            rate: NonZeroU32::new(rate),
            rates: HashMap::from([(Op::ListRooms, NonZeroU32::new(2).unwrap())]),
            max_wait,
        },
    ))
}

/// Hundreds of users and background work on several operations at once, in
/// waves: no operation ever gets more than its rate in any second, users who
/// cannot be served before their deadline are refused, the rest are served
/// before it. Paused time: the minutes pass at once.
#[tokio::test(start_paused = true)]
async fn the_budget_is_never_exceeded() {
    let budget = budget(5, Duration::from_secs(8));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for wave in 0..3u64 {
        for n in 0..150u64 {
            let op = [Op::GetRoom, Op::UpdateRoom, Op::ListRooms][(n % 3) as usize];
            let budget = budget.clone();
            let at = start + Duration::from_secs(wave * 7) + Duration::from_millis(n * 3);
            // Every third user says no deadline (the budget's max_wait).
            let deadline = (n % 3 != 0).then(|| at + Duration::from_millis(500 + n * 40));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let result = budget.acquire(op, Caller::User { deadline }).await;
                let limit = deadline.unwrap_or(at + Duration::from_secs(8));
                (op, Instant::now(), result, limit)
            }));
        }
    }
    // Background work on two operations, wanting far more than the rate.
    let background: Vec<_> = [Op::GetRoom, Op::ListRooms]
        .into_iter()
        .map(|op| {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..40 {
                    budget.acquire(op, Caller::Background).await.unwrap();
                    times.push(Instant::now());
                }
                (op, times)
            })
        })
        .collect();
    let mut granted: HashMap<Op, Vec<Instant>> = HashMap::new();
    let (mut served, mut refused) = (0, 0);
    for task in join_all(tasks).await {
        let (op, at, result, limit) = task.unwrap();
        match result {
            Ok(()) => {
                assert!(
                    at <= limit,
                    "{op}: served at {:?}, after its deadline",
                    at - start
                );
                granted.entry(op).or_default().push(at);
                served += 1;
            }
            Err(Error::ResourceExhausted { message, .. }) => {
                assert!(message.contains(&op.to_string()), "{message}");
                refused += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(
        served > 50 && refused > 100,
        "served {served}, refused {refused}"
    );
    for task in join_all(background).await {
        let (op, times) = task.unwrap();
        granted.entry(op).or_default().extend(times);
    }
    let (get, update, list) = (
        max_per_second(&granted[&Op::GetRoom]),
        max_per_second(&granted[&Op::UpdateRoom]),
        max_per_second(&granted[&Op::ListRooms]),
    );
    assert!(
        get <= 5 && update <= 5 && list <= 2,
        "{get} {update} {list}"
    );
    assert_eq!(update, 5, "a busy operation gets its whole rate");
}

/// Every grant of one operation, users and background alike, is counted in
/// the same window: together they stay within the rate, and background
/// work gets nothing while users wait.
#[tokio::test(start_paused = true)]
async fn the_reconciler_spends_only_what_users_leave() {
    let budget = budget(5, Duration::from_secs(60));
    let start = Instant::now();
    let users: Vec<_> = (0..20)
        .map(|_| {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget.acquire(Op::GetRoom, Caller::USER).await.unwrap();
                Instant::now()
            })
        })
        .collect();
    // Let every user queue before the background asks.
    tokio::task::yield_now().await;
    let background = tokio::spawn({
        let budget = budget.clone();
        async move {
            let mut times = Vec::new();
            for _ in 0..10 {
                budget
                    .acquire(Op::GetRoom, Caller::Background)
                    .await
                    .unwrap();
                times.push(Instant::now());
            }
            times
        }
    });
    let users: Vec<Instant> = join_all(users)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let background = background.await.unwrap();
    let last_user = *users.iter().max().unwrap();
    assert!(
        background.iter().all(|t| *t > last_user),
        "the background took a token while users waited"
    );
    let all: Vec<Instant> = users.iter().chain(&background).copied().collect();
    assert_eq!(max_per_second(&all), 5);
    // 30 calls at 5 per second (and a little headroom): six seconds and a bit.
    let took = background.last().unwrap().duration_since(start);
    assert!(
        took >= Duration::from_millis(5800) && took < Duration::from_secs(7),
        "{took:?}"
    );
}

/// A ThrottlingException pauses the operation's bucket, longer each time in
/// a row; a success ends that.
#[tokio::test(start_paused = true)]
async fn throttling_pauses_the_bucket() {
    let budget = budget(5, Duration::from_secs(60));
    let op = Op::UpdateRoom;
    budget.acquire(op, Caller::USER).await.unwrap();
    let t0 = Instant::now();
    budget.throttled(op).await;
    budget.acquire(op, Caller::USER).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    budget.throttled(op).await;
    let t1 = Instant::now();
    budget.acquire(op, Caller::Background).await.unwrap();
    assert!(Instant::now() - t1 >= Duration::from_secs(2));
    budget.succeeded(op).await;
    budget.throttled(op).await;
    let t2 = Instant::now();
    budget.acquire(op, Caller::USER).await.unwrap();
    assert_eq!(
        Instant::now() - t2,
        Duration::from_secs(1),
        "reset by the success"
    );
    // A user whose deadline falls inside a pause is refused at once.
    budget.throttled(op).await;
    let t3 = Instant::now();
    let err = budget
        .acquire(
            op,
            Caller::User {
                deadline: Some(t3 + Duration::from_millis(100)),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted { .. }), "{err:?}");
    assert_eq!(Instant::now(), t3);
}

/// End to end, with AWS's 5 per second: clients pushing ten times that get
/// RESOURCE_EXHAUSTED for what cannot be served before their deadline, IVS
/// Chat never sees more than the budget, and refused writes change nothing.
async fn clients_over_the_budget_are_refused(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &["--upstream-rate", "5"]).await;
    let mut arns = Vec::new();
    for n in 0..5 {
        arns.push(server.create_room(&format!("room-{n}")).await.arn);
    }
    let before = emulator.calls(Operation::UpdateRoom);
    let started = std::time::Instant::now();
    let results = join_all((0..50).map(|n| {
        let mut client = server.client.clone();
        let arn = arns[n % arns.len()].clone();
        async move {
            let mut request = tonic::Request::new(proto::UpdateRoomRequest {
                identifier: arn,
                name: Some(format!("renamed-{n}")),
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(1));
            client.update_room(request).await
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exhausted = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|e| e.code() == Code::ResourceExhausted)
        })
        .count();
    let calls = emulator.calls(Operation::UpdateRoom) - before;
    assert_eq!(
        calls, ok as u64,
        "every served update is one call, and only those"
    );
    // At 5 per second (with headroom), a second's worth plus one.
    let most = 1 + (elapsed.as_secs_f64() * 5.0) as usize;
    assert!(ok >= 1 && ok <= most, "{ok} served in {elapsed:?}");
    assert!(exhausted >= 40, "{exhausted} refused: {results:?}");
    let names: Vec<String> = emulator.rooms().into_iter().map(|r| r.name).collect();
    let renamed = names.iter().filter(|n| n.starts_with("renamed-")).count();
    assert!(
        renamed <= ok,
        "a refused update reached IVS Chat: {names:?}"
    );
}

/// When IVS Chat throttles (someone else spends the account's quota), the
/// budget backs off instead of retrying in a storm: far fewer calls than
/// requests × attempts, and the requests end UNAVAILABLE, not hanging.
async fn throttling_feeds_back_into_the_budget(db: TestDb) {
    let (mut server, emulator, _) = setup(
        &db,
        &[
            "--upstream-rate",
            "5",
            "--upstream-max-attempts",
            "3",
            "--upstream-max-wait",
            "3s",
        ],
    )
    .await;
    emulator.set_faults(Faults {
        tps_limit: NonZeroU32::new(1).map(Into::into),
        ..Default::default()
    });
    let before = emulator.calls(Operation::GetRoom);
    let results = join_all((0..20).map(|n| {
        let mut client = server.client.clone();
        async move {
            let arn = format!("arn:aws:ivschat:us-east-1:123456789012:room/missing{n:05}");
            client
                .get_room(get(&arn, proto::ReadConsistency::Strong))
                .await
        }
    }))
    .await;
    let calls = emulator.calls(Operation::GetRoom) - before;
    // Without the pause: 5 a second for 3 seconds, 15 calls or more.
    assert!(calls <= 8, "{calls} calls upstream");
    for result in &results {
        let code = result.as_ref().unwrap_err().code();
        assert!(
            matches!(
                code,
                Code::NotFound | Code::Unavailable | Code::ResourceExhausted
            ),
            "{result:?}"
        );
    }
    let _ = server.create_room("after").await;
}

/// 1,000 concurrent cached reads of a room the cache has never seen cost one
/// GetRoom: they share the call under way.
async fn concurrent_cold_reads_share_one_call(db: TestDb) {
    let (server, emulator, url) = setup(&db, &[]).await;
    let room = sdk(&url).create_room().name("cold").send().await.unwrap();
    let arn = room.arn.unwrap();
    let before = emulator.calls(Operation::GetRoom);
    let held = emulator.hold_responses(Operation::GetRoom);
    let reads = tokio::spawn({
        let client = server.client.clone();
        let arn = arn.clone();
        join_all((0..1000).map(move |_| {
            let mut client = client.clone();
            let arn = arn.clone();
            async move {
                client
                    .get_room(get(&arn, proto::ReadConsistency::Cached))
                    .await
            }
        }))
    });
    emulator
        .wait_for_calls(Operation::GetRoom, before + 1)
        .await;
    held.release();
    for read in reads.await.unwrap() {
        assert_eq!(read.expect("read").into_inner().name, "cold");
    }
    assert_eq!(emulator.calls(Operation::GetRoom) - before, 1);
}

/// A STRONG read never takes the answer of a call sent before it arrived:
/// it sees a change that completed before it, even while an older read of
/// the room is still under way.
async fn strong_reads_join_only_calls_not_yet_sent(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    let room = server.create_room("before").await;
    let before = emulator.calls(Operation::GetRoom);
    let held = emulator.hold_responses(Operation::GetRoom);
    let first = spawn_get(&server, &room.arn, proto::ReadConsistency::Strong);
    emulator
        .wait_for_calls(Operation::GetRoom, before + 1)
        .await;
    emulator
        .update_room(
            &room.arn,
            &RoomPatch {
                name: Some("after".into()),
                ..RoomPatch::default()
            },
        )
        .unwrap();
    let second = spawn_get(&server, &room.arn, proto::ReadConsistency::Strong);
    held.release();
    assert_eq!(first.await.unwrap().unwrap().into_inner().name, "before");
    assert_eq!(second.await.unwrap().unwrap().into_inner().name, "after");
    assert_eq!(emulator.calls(Operation::GetRoom) - before, 2);
}

/// Cache headers: a fresh cached answer is a hit with its age, a read of IVS
/// Chat a miss; ListRooms is a hit; NOT_FOUND says which it was too.
async fn cache_headers_say_what_happened(db: TestDb) {
    let (mut server, _emulator, url) = setup(&db, &["--max-staleness", "1h"]).await;
    let room = server.create_room("known").await;
    let hit = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap();
    assert_eq!(header(hit.metadata(), "x-cache"), Some("hit"));
    let age: f64 = header(hit.metadata(), "x-cache-age")
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");

    let strong = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Strong))
        .await
        .unwrap();
    assert_eq!(header(strong.metadata(), "x-cache"), Some("miss"));
    assert_eq!(header(strong.metadata(), "x-cache-age"), Some("0.000"));

    let cold = sdk(&url).create_room().name("cold").send().await.unwrap();
    let cold = cold.arn.unwrap();
    let first = server
        .client
        .get_room(get(&cold, proto::ReadConsistency::Cached))
        .await
        .unwrap();
    assert_eq!(header(first.metadata(), "x-cache"), Some("miss"));
    let second = server
        .client
        .get_room(get(&cold, proto::ReadConsistency::Cached))
        .await
        .unwrap();
    assert_eq!(header(second.metadata(), "x-cache"), Some("hit"));

    let listed = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap();
    assert_eq!(header(listed.metadata(), "x-cache"), Some("hit"));
    assert!(header(listed.metadata(), "x-cache-age").is_some());

    let missing = "arn:aws:ivschat:us-east-1:123456789012:room/neverExisted";
    let err = server
        .client
        .get_room(get(missing, proto::ReadConsistency::Cached))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(header(err.metadata(), "x-cache"), Some("miss"));
    let err = server
        .client
        .get_room(get(missing, proto::ReadConsistency::Cached))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        header(err.metadata(), "x-cache"),
        Some("hit"),
        "the tombstone"
    );
}

/// While IVS Chat is down or throttling, a cached read past its staleness
/// bound is served from the cache, marked stale; STRONG reads and writes fail
/// with UNAVAILABLE and change nothing. Past the hard limit, nothing is served.
async fn stale_if_error(db: TestDb) {
    // Every cached read asks IVS Chat (no staleness is fresh enough).
    let (mut server, emulator, url) = setup(&db, &["--max-staleness", "0s"]).await;
    let room = server.create_room("kept").await;
    for error in [InjectedError::Internal, InjectedError::Throttling] {
        emulator.set_faults(Faults {
            error_rate: 1.0,
            error,
            ..Default::default()
        });
        let stale = server
            .client
            .get_room(get(&room.arn, proto::ReadConsistency::Cached))
            .await
            .unwrap_or_else(|e| panic!("{error:?}: {e:?}"));
        assert_eq!(header(stale.metadata(), "x-cache"), Some("stale"));
        let age: f64 = header(stale.metadata(), "x-cache-age")
            .unwrap()
            .parse()
            .unwrap();
        assert!(age >= 0.0);
        assert_eq!(stale.into_inner(), room);

        let err = server
            .client
            .get_room(get(&room.arn, proto::ReadConsistency::Strong))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{error:?}: {err:?}");
        let err = server
            .client
            .update_room(proto::UpdateRoomRequest {
                identifier: room.arn.clone(),
                name: Some("changed".into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{error:?}: {err:?}");
        let err = server.client.create_room(create("new")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{error:?}: {err:?}");
    }
    emulator.set_faults(Faults::default());
    assert_eq!(emulator.rooms().len(), 1);
    assert_eq!(emulator.rooms()[0].name, "kept");
    let fresh = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap();
    assert_eq!(header(fresh.metadata(), "x-cache"), Some("miss"));
    assert_eq!(
        fresh.into_inner(),
        room,
        "the cache kept the room as it was"
    );
    server.stop().await;

    // The hard limit at zero: nothing stale is ever served.
    let mut strict = TestServer::start(serve_config(
        &db.url,
        &url,
        &["--max-staleness", "0s", "--stale-if-error", "0s"],
    ))
    .await;
    emulator.set_faults(Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let err = strict
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

on_both_backends!(
    clients_over_the_budget_are_refused,
    throttling_feeds_back_into_the_budget,
    concurrent_cold_reads_share_one_call,
    strong_reads_join_only_calls_not_yet_sent,
    cache_headers_say_what_happened,
    stale_if_error,
);
