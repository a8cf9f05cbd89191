//! Cached reads kept fresh by listings: with more rooms than GetRoom's budget
//! could re-read within `--max-staleness`, the reconciler's full listings
//! (one ListRooms call confirms 50 rooms) confirm every room before it goes
//! stale, so every cached read is a hit and no unchanged room is read again;
//! and a room changed behind the service's back is still found. A cold
//! cache serves ListRooms once its first listing is in (rooms marked
//! `details_pending`), and reads each room whole once after, users first.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::binary::within;
use common::{TestDb, TestServer, load, proto, sdk, serve_config};
use ivschat_rooms::domain::{EventSource, Room, RoomPatch, Timestamp};
use ivschat_rooms::emulator::{Emulator, EmulatorConfig, Faults, Operation, TpsLimit};
use ivschat_rooms::store::Store;

/// Rooms, more than GetRoom's 5 per second could re-read within the
/// staleness (60 rooms ÷ 5 per second = 12 s > 3 s).
const ROOMS: usize = 60;
const STALENESS: Duration = Duration::from_secs(3);

/// An emulator at AWS's rates holding `ROOMS` rooms, last updated a minute
/// apart over the past hour (so the incremental pass, which stops at the
/// first page reaching what it examined before, confirms only the newest
/// page: the others are the full listings' to confirm), and a cache on `db`
/// already holding each of them as IVS Chat has it, with a full listing
/// recorded: the service starts warm, as after a restart.
async fn warm(db: &TestDb) -> (Emulator, String, Vec<String>, tempfile::TempDir) {
    let (emulator, url, rooms, dir) = account().await;
    let store = Store::open(&db.url).await.unwrap();
    let now = Timestamp::now();
    store
        .put_many(&rooms, now, EventSource::Reconciler)
        .await
        .unwrap();
    store.set_full_listing_at("us-east-1", now).await.unwrap();
    store.close().await;
    let arns = rooms.into_iter().map(|r| r.arn).collect();
    (emulator, url, arns, dir)
}

/// An emulator at AWS's rates holding `ROOMS` rooms, each with message
/// limits of its own, last updated a minute apart over the past hour; and
/// the rooms.
async fn account() -> (Emulator, String, Vec<Room>, tempfile::TempDir) {
    let (scratch, url) = common::emulator().await;
    let client = sdk(&url);
    for i in 0..ROOMS {
        client
            .create_room()
            .name(format!("room-{i}"))
            .maximum_message_rate_per_second(1 + i as i32 % 100)
            .maximum_message_length(1 + (i as i32 * 7) % 500)
            .send()
            .await
            .unwrap();
    }
    let mut rooms = scratch.rooms();
    let hour_ago = Timestamp::now()
        .saturating_sub(Duration::from_secs(3600))
        .truncate_to_micros();
    for (i, room) in rooms.iter_mut().enumerate() {
        let at = hour_ago.saturating_add(Duration::from_secs(60 * i as u64));
        room.create_time = at;
        room.update_time = at;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("emulator.json");
    std::fs::write(
        &state,
        serde_json::to_vec(&serde_json::json!({ "rooms": rooms })).unwrap(),
    )
    .unwrap();
    let (emulator, url) = common::emulator_with(EmulatorConfig {
        state_file: Some(state),
        faults: Faults {
            tps_limit: Some(TpsLimit::Aws),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    (emulator, url, rooms, dir)
}

/// The budget at AWS's rates (the tests' servers otherwise have none).
const AWS_RATES: [&str; 2] = ["--upstream-rate", "5"];

fn flags() -> Vec<&'static str> {
    vec![
        "--max-staleness",
        "3s",
        // AWS's rates, and a reconciler as it ships but for the short
        // staleness: no resync of its own for the length of the test.
        "--upstream-rate",
        "5",
        "--reconcile-interval",
        "500ms",
        "--resync-interval",
        "1h",
    ]
}

/// Reads every room CACHED (1 s deadline), round after round, for three
/// staleness periods, through each of `servers` in turn; returns the count of
/// each `x-cache` answer.
async fn read_for_three_periods(
    servers: &mut [TestServer],
    arns: &[String],
) -> BTreeMap<String, usize> {
    let mut answers = BTreeMap::new();
    let started = tokio::time::Instant::now();
    let mut round = 0usize;
    while started.elapsed() < STALENESS * 3 {
        let server = &mut servers[round % servers.len()];
        for arn in arns {
            let mut request = tonic::Request::new(proto::GetRoomRequest {
                identifier: arn.clone(),
                consistency: proto::ReadConsistency::Cached as i32,
            });
            request.set_timeout(Duration::from_secs(1));
            let answer = match server.client.get_room(request).await {
                Ok(response) => response
                    .metadata()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned(),
                Err(status) => format!("{:?}", status.code()),
            };
            *answers.entry(answer).or_default() += 1;
        }
        round += 1;
        // A round of reads every 100 ms: a load, not a wait for an event.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answers
}

/// Every cached read over three staleness periods is a hit, and IVS Chat
/// sees no GetRoom: the listings alone keep the rooms confirmed.
async fn listings_keep_every_room_fresh(db: TestDb) {
    let (emulator, url, arns, _state) = warm(&db).await;
    let mut servers = vec![TestServer::start(serve_config(&db.url, &url, &flags())).await];
    let answers = read_for_three_periods(&mut servers, &arns).await;
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["hit"],
        "every cached read is a hit: {answers:?}"
    );
    assert_eq!(
        emulator.calls(Operation::GetRoom),
        0,
        "no unchanged room is read again"
    );
    assert!(
        emulator.calls(Operation::ListRooms) >= 3,
        "listings confirmed the rooms: {} ListRooms calls",
        emulator.calls(Operation::ListRooms)
    );
    for server in servers {
        server.stop().await;
    }
}

/// A room renamed, one re-tagged (same updateTime) and one deleted behind
/// the service's back are found by the listings, each at the cost of one
/// GetRoom; the other rooms stay hits without one.
async fn changes_behind_our_back_are_still_found(db: TestDb) {
    let (emulator, url, arns, _state) = warm(&db).await;
    let mut server = TestServer::start(serve_config(&db.url, &url, &flags())).await;
    let mut stream = server
        .client
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    emulator
        .update_room(
            &arns[0],
            &RoomPatch {
                name: Some("renamed".into()),
                ..RoomPatch::default()
            },
        )
        .unwrap();
    sdk(&url)
        .tag_resource()
        .resource_arn(&arns[1])
        .tags("k", "v")
        .send()
        .await
        .unwrap();
    emulator.delete_room(&arns[2]).unwrap();
    let mut found = BTreeMap::new();
    within("the three changes to be found", async {
        while found.len() < 3 {
            let message = stream.message().await.unwrap().unwrap();
            if let Some(proto::watch_rooms_response::Kind::Event(event)) = message.kind {
                assert_eq!(event.source, proto::EventSource::Reconciler as i32);
                let room = event.room.unwrap();
                found.insert(room.arn.clone(), (event.r#type, room));
            }
        }
    })
    .await;
    assert_eq!(found[&arns[0]].1.name, "renamed");
    assert_eq!(
        found[&arns[1]].1.tags.get("k").map(String::as_str),
        Some("v")
    );
    assert_eq!(found[&arns[2]].0, proto::EventType::Deleted as i32);
    assert_eq!(
        emulator.calls(Operation::GetRoom),
        3,
        "one GetRoom per changed room, none for the others"
    );
    drop(stream);
    server.stop().await;
}

/// Writes of ours that land while a full listing pages (its page showing
/// the rooms as they were) are not confirmed away: the rename keeps its newer
/// version and the re-tag its tags, and nothing is logged as the reconciler's.
async fn writes_during_a_listing_are_not_confirmed_away(db: TestDb) {
    let (emulator, url, arns, _state) = warm(&db).await;
    let store = Store::open(&db.url).await.unwrap();
    let listed_before = store.full_listing_at("us-east-1").await.unwrap();
    // The startup listing's first page is read, and its answer held.
    let held = emulator.hold_responses(Operation::ListRooms);
    let mut server = TestServer::start(serve_config(&db.url, &url, &flags())).await;
    emulator.wait_for_calls(Operation::ListRooms, 1).await;
    let revision = store.revision().await.unwrap();
    // The newest rooms: both on the held first page.
    let (renamed, tagged) = (&arns[ROOMS - 1], &arns[ROOMS - 2]);
    server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: renamed.clone(),
            name: Some("renamed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    server
        .client
        .tag_room(proto::TagRoomRequest {
            identifier: tagged.clone(),
            tags: [("k".to_owned(), "v".to_owned())].into(),
        })
        .await
        .unwrap();
    held.release();
    within("the listing to complete", async {
        while store.full_listing_at("us-east-1").await.unwrap() == listed_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let cached = |arn: &String| proto::GetRoomRequest {
        identifier: arn.clone(),
        consistency: proto::ReadConsistency::Cached as i32,
    };
    let got = server
        .client
        .get_room(cached(renamed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "renamed");
    let got = server
        .client
        .get_room(cached(tagged))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.tags.get("k").map(String::as_str), Some("v"));
    let events = store.events_after(revision, 100).await.unwrap();
    assert!(
        events.iter().all(|e| e.source == EventSource::Api),
        "only our writes are logged: {events:?}"
    );
    store.close().await;
    server.stop().await;
}

/// The room as a listing shows it: its message limits still to be read.
fn pending(room: &proto::Room) -> proto::Room {
    proto::Room {
        maximum_message_rate_per_second: 0,
        maximum_message_length: 0,
        details_pending: true,
        ..room.clone()
    }
}

/// Asserts that the change log is each room put in from the listing
/// (CREATED, details pending) and then read whole (UPDATED: the limits and
/// the flag), nothing else, and that it folds into `upstream`.
fn assert_created_pending_then_completed(log: &[proto::RoomEvent], upstream: &[proto::Room]) {
    let mut per_room = BTreeMap::<&str, Vec<&proto::RoomEvent>>::new();
    for event in log {
        per_room
            .entry(&event.room.as_ref().unwrap().arn)
            .or_default()
            .push(event);
    }
    assert_eq!(per_room.len(), upstream.len());
    for room in upstream {
        let events = &per_room[room.arn.as_str()];
        assert_eq!(events.len(), 2, "two events for {}: {events:#?}", room.arn);
        assert_eq!(events[0].r#type, proto::EventType::Created as i32);
        assert_eq!(events[0].room.as_ref(), Some(&pending(room)));
        assert_eq!(events[1].r#type, proto::EventType::Updated as i32);
        assert_eq!(events[1].room.as_ref(), Some(room));
        assert_eq!(
            events[1].changed_fields,
            [
                "maximum_message_rate_per_second",
                "maximum_message_length",
                "details_pending"
            ]
        );
    }
    assert_eq!(load::fold(log), upstream);
}

/// A cold cache of a whole account (more rooms than GetRoom reads in
/// seconds): ListRooms is served as soon as the first full listing is in,
/// its rooms marked `details_pending` and otherwise IVS Chat's; a user's
/// GetRoom of the room the warm-up reads last goes through within its
/// 1 s deadline (users before the warm-up) and answers it whole; then every
/// room is read whole exactly once, and the log shows each created pending,
/// then completed.
async fn a_cold_cache_serves_the_listing_first(db: TestDb) {
    let (emulator, url, rooms, _state) = account().await;
    let mut server = TestServer::start(serve_config(&db.url, &url, &AWS_RATES)).await;
    let (listed, _) = load::list_all(&mut server.client).await;
    let read_whole = emulator.calls(Operation::GetRoom);
    let upstream = load::upstream_rooms(&emulator);
    assert_eq!(listed.len(), ROOMS);
    let still_pending = listed.iter().filter(|r| r.details_pending).count();
    assert!(
        still_pending >= ROOMS / 2,
        "ListRooms is served before the rooms are read whole: {still_pending} of {ROOMS} \
         pending after {read_whole} GetRoom calls"
    );
    for (cached, upstream) in listed.iter().zip(&upstream) {
        if cached.details_pending {
            assert_eq!(cached, &pending(upstream));
        } else {
            assert_eq!(cached, upstream);
        }
    }
    // The warm-up reads the newest first: the oldest room is read last.
    let oldest = upstream
        .iter()
        .find(|r| r.arn == rooms[0].arn)
        .unwrap()
        .clone();
    assert!(listed.contains(&pending(&oldest)));
    let mut request = tonic::Request::new(proto::GetRoomRequest {
        identifier: oldest.arn.clone(),
        consistency: proto::ReadConsistency::Cached as i32,
    });
    request.set_timeout(Duration::from_secs(1));
    let read = server
        .client
        .get_room(request)
        .await
        .expect("a user's GetRoom during the warm-up is answered within its deadline");
    assert_eq!(read.metadata().get("x-cache").unwrap(), "miss");
    assert_eq!(read.into_inner(), oldest, "GetRoom answers the room whole");
    // Every room created pending, then completed: 2 events each.
    let log = load::log_through(&mut server.client, 2 * ROOMS as u64).await;
    assert_created_pending_then_completed(&log, &upstream);
    assert_eq!(
        emulator.calls(Operation::GetRoom),
        ROOMS as u64,
        "each room read whole once (the user's read included)"
    );
    let (listed, _) = load::list_all(&mut server.client).await;
    load::assert_same_rooms(&listed, &upstream);
    server.stop().await;
}

on_both_backends!(
    a_cold_cache_serves_the_listing_first,
    listings_keep_every_room_fresh,
    changes_behind_our_back_are_still_found,
    writes_during_a_listing_are_not_confirmed_away,
);

/// Replicas sharing Postgres: the leading replica's listings confirm the
/// rows every replica reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_s_listings_confirm_rows_for_every_replica() {
    let Some(db) = TestDb::postgres("the_leader_s_listings_confirm_rows_for_every_replica").await
    else {
        return;
    };
    let (emulator, url, arns, _state) = warm(&db).await;
    let mut servers = vec![
        TestServer::start(serve_config(&db.url, &url, &flags())).await,
        TestServer::start(serve_config(&db.url, &url, &flags())).await,
    ];
    let answers = read_for_three_periods(&mut servers, &arns).await;
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["hit"],
        "every cached read on either replica is a hit: {answers:?}"
    );
    assert_eq!(emulator.calls(Operation::GetRoom), 0);
    for server in servers {
        server.stop().await;
    }
}

/// Replicas sharing a cold Postgres cache: both serve ListRooms once the
/// leader's first listing is in, and the leader alone reads the rooms whole,
/// each once for the fleet; both then list every room whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_a_cold_cache_s_listing_and_read_each_room_once() {
    let Some(db) =
        TestDb::postgres("replicas_serve_a_cold_cache_s_listing_and_read_each_room_once").await
    else {
        return;
    };
    let (emulator, url, _rooms, _state) = account().await;
    let mut servers = vec![
        TestServer::start(serve_config(&db.url, &url, &AWS_RATES)).await,
        TestServer::start(serve_config(&db.url, &url, &AWS_RATES)).await,
    ];
    let upstream = load::upstream_rooms(&emulator);
    for server in &mut servers {
        let (listed, _) = load::list_all(&mut server.client).await;
        assert_eq!(listed.len(), ROOMS);
        for (cached, upstream) in listed.iter().zip(&upstream) {
            assert!(cached == upstream || cached == &pending(upstream));
        }
    }
    let log = load::log_through(&mut servers[1].client, 2 * ROOMS as u64).await;
    assert_created_pending_then_completed(&log, &upstream);
    assert_eq!(emulator.calls(Operation::GetRoom), ROOMS as u64);
    for server in &mut servers {
        let (listed, _) = load::list_all(&mut server.client).await;
        load::assert_same_rooms(&listed, &upstream);
    }
    for server in servers {
        server.stop().await;
    }
}
