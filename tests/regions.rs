//! Several IVS Chat regions behind one service: calls routed by the room's
//! ARN, region fields on CreateRoom, ListRooms and WatchRooms, a budget, a
//! reconciler and a leader per region, one region failing while the other
//! serves, and the upgrade of a cache written when one region was served.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::binary::{BIN, Server, within};
use common::{TestDb, TestServer, max_per_second, proto, sdk_in, serve_config};
use ivschat_rooms::domain::{EventSource, Room, Timestamp};
use ivschat_rooms::emulator::{
    Emulator, EmulatorConfig, Faults, InjectedError, Operation, TpsLimit,
};
use ivschat_rooms::store::Store;
use tonic::Code;
use tonic_types::StatusExt as _;

const EAST: &str = "us-east-1";
const WEST: &str = "eu-west-1";
const BOTH: &str = "us-east-1,eu-west-1";

type Watch = tonic::Streaming<proto::WatchRoomsResponse>;

/// An emulator with `faults`, on a loopback port.
async fn emulator_with(faults: Faults) -> (Emulator, String) {
    common::emulator_with(EmulatorConfig {
        faults,
        ..EmulatorConfig::default()
    })
    .await
}

/// A server on `db` serving both regions of the emulator at `url`, its
/// startup listings done.
async fn serve_both(db: &TestDb, url: &str, extra: &[&str]) -> TestServer {
    let mut flags = vec!["--regions", BOTH];
    flags.extend(extra);
    let mut server = TestServer::start(serve_config(&db.url, url, &flags)).await;
    server.wait_listed().await;
    server
}

fn create_in(region: &str, name: &str) -> proto::CreateRoomRequest {
    proto::CreateRoomRequest {
        name: name.into(),
        region: region.into(),
        ..Default::default()
    }
}

fn get(arn: &str, consistency: proto::ReadConsistency) -> proto::GetRoomRequest {
    proto::GetRoomRequest {
        identifier: arn.into(),
        consistency: consistency as i32,
    }
}

fn region_of(arn: &str) -> &str {
    arn.split(':').nth(3).expect("an ARN")
}

/// The fields a status's BadRequest names, in order.
fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Every call the emulator has had, per operation, in every region.
fn all_calls(emulator: &Emulator) -> Vec<u64> {
    Operation::ALL.map(|op| emulator.calls(op)).to_vec()
}

/// The next room event of `stream`, past progress messages.
async fn next_event(stream: &mut Watch) -> proto::RoomEvent {
    within("a watch event", async {
        loop {
            let message = stream.message().await.expect("stream").expect("open");
            if let Some(proto::watch_rooms_response::Kind::Event(event)) = message.kind {
                return event;
            }
        }
    })
    .await
}

async fn watch(server: &mut TestServer, regions: &[&str]) -> Watch {
    server
        .client
        .watch_rooms(proto::WatchRoomsRequest {
            regions: regions.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

// ---------------------------------------------------------------------------
// Routing

/// A room created in each region lands there (each region's own clients see
/// it, the other's do not); every RPC about a room goes to its ARN's region;
/// an ARN or a region not served is INVALID_ARGUMENT naming the field and
/// the regions served, and nothing is sent upstream.
async fn calls_go_to_the_region_in_the_arn(db: TestDb) {
    let (emulator, url) = emulator_with(Faults::default()).await;
    let mut server = serve_both(&db, &url, &[]).await;
    let c = &mut server.client;
    let east = c
        .create_room(create_in("", "east"))
        .await
        .unwrap()
        .into_inner();
    let west = c
        .create_room(create_in(WEST, "west"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        region_of(&east.arn),
        EAST,
        "no region: the first of --regions"
    );
    assert_eq!(region_of(&west.arn), WEST);
    for (region, room, other) in [(EAST, &east, &west), (WEST, &west, &east)] {
        let sdk = sdk_in(&url, region);
        let listed = sdk.list_rooms().send().await.unwrap();
        let arns: Vec<&str> = listed.rooms().iter().filter_map(|r| r.arn()).collect();
        assert_eq!(
            arns,
            [room.arn.as_str()],
            "{region}'s own clients see its room only"
        );
        assert!(sdk.get_room().identifier(&other.arn).send().await.is_err());
    }

    // Each call reaches its room's region and no other.
    let strong = proto::ReadConsistency::Strong;
    for (region, room) in [(EAST, &east), (WEST, &west)] {
        let other = if region == EAST { WEST } else { EAST };
        let before = emulator.calls_in(other, Operation::GetRoom)
            + emulator.calls_in(other, Operation::UpdateRoom)
            + emulator.calls_in(other, Operation::TagResource)
            + emulator.calls_in(other, Operation::UntagResource);
        let got = c
            .get_room(get(&room.arn, strong))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.name, room.name);
        let renamed = c
            .update_room(proto::UpdateRoomRequest {
                identifier: room.arn.clone(),
                name: Some(format!("{}-renamed", room.name)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(renamed.name, format!("{}-renamed", room.name));
        c.tag_room(proto::TagRoomRequest {
            identifier: room.arn.clone(),
            tags: [("k".to_owned(), region.to_owned())].into(),
        })
        .await
        .unwrap();
        let upstream = emulator.rooms_in(region);
        assert_eq!(upstream.len(), 1);
        assert_eq!(upstream[0].name, renamed.name);
        assert_eq!(upstream[0].tags.get("k").map(String::as_str), Some(region));
        c.untag_room(proto::UntagRoomRequest {
            identifier: room.arn.clone(),
            tag_keys: vec!["k".into()],
        })
        .await
        .unwrap();
        assert!(emulator.rooms_in(region)[0].tags.is_empty());
        let after = emulator.calls_in(other, Operation::GetRoom)
            + emulator.calls_in(other, Operation::UpdateRoom)
            + emulator.calls_in(other, Operation::TagResource)
            + emulator.calls_in(other, Operation::UntagResource);
        assert_eq!(
            after, before,
            "nothing about a {region} room went to {other}"
        );
    }

    // Not served: refused, named, nothing sent.
    let elsewhere = east.arn.replace(":us-east-1:", ":ap-south-1:");
    let calls = all_calls(&emulator);
    let refusals = [
        c.get_room(get(&elsewhere, strong)).await.unwrap_err(),
        c.get_room(get(&elsewhere, proto::ReadConsistency::Cached))
            .await
            .unwrap_err(),
        c.update_room(proto::UpdateRoomRequest {
            identifier: elsewhere.clone(),
            name: Some("x".into()),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.delete_room(proto::DeleteRoomRequest {
            identifier: elsewhere.clone(),
            expected_update_time: None,
        })
        .await
        .unwrap_err(),
        c.tag_room(proto::TagRoomRequest {
            identifier: elsewhere.clone(),
            tags: [("k".to_owned(), "v".to_owned())].into(),
        })
        .await
        .unwrap_err(),
        c.untag_room(proto::UntagRoomRequest {
            identifier: elsewhere.clone(),
            tag_keys: vec!["k".into()],
        })
        .await
        .unwrap_err(),
    ];
    for status in &refusals {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(status), ["identifier"], "{status:?}");
        assert!(
            status.message().contains("ap-south-1")
                && status.message().contains(BOTH.replace(',', ", ").as_str()),
            "names the region and those served: {status:?}"
        );
    }
    for (status, field) in [
        (
            c.create_room(create_in("ap-south-1", "nowhere"))
                .await
                .unwrap_err(),
            "region",
        ),
        (
            c.list_rooms(proto::ListRoomsRequest {
                region: "ap-south-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "region",
        ),
        (
            c.watch_rooms(proto::WatchRoomsRequest {
                identifiers: vec![elsewhere.clone()],
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "identifiers[0]",
        ),
        (
            c.watch_rooms(proto::WatchRoomsRequest {
                regions: vec![WEST.into(), "ap-south-1".into()],
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "regions[1]",
        ),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(&status), [field], "{status:?}");
        assert!(
            status.message().contains("us-east-1, eu-west-1"),
            "{status:?}"
        );
    }
    assert_eq!(all_calls(&emulator), calls, "nothing was sent upstream");

    // Deleting routes too.
    c.delete_room(proto::DeleteRoomRequest {
        identifier: west.arn.clone(),
        expected_update_time: None,
    })
    .await
    .unwrap();
    assert!(emulator.rooms_in(WEST).is_empty());
    assert_eq!(emulator.rooms_in(EAST).len(), 1);
    server.stop().await;
}

/// ListRooms without a region merges every region's rooms newest first, with
/// one paging token across them; with one, only that region's.
async fn list_rooms_merges_filters_and_pages(db: TestDb) {
    let (_emulator, url) = emulator_with(Faults::default()).await;
    let mut server = serve_both(&db, &url, &[]).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let region = if i % 2 == 0 { EAST } else { WEST };
        let room = server
            .client
            .create_room(create_in(region, &format!("room-{i}")))
            .await
            .unwrap()
            .into_inner();
        created.push(room.arn);
    }
    let list = |region: &str, next_token: String| proto::ListRoomsRequest {
        region: region.into(),
        max_results: 2,
        next_token,
        ..Default::default()
    };
    for region in ["", EAST, WEST] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = server
                .client
                .list_rooms(list(region, token))
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            seen.extend(page.rooms.into_iter().map(|r| r.arn));
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        let expected: Vec<String> = created
            .iter()
            .rev()
            .filter(|arn| region.is_empty() || region_of(arn) == region)
            .cloned()
            .collect();
        assert_eq!(seen, expected, "region {region:?}: newest first, each once");
        assert_eq!(pages, expected.len().div_ceil(2), "region {region:?}");
    }
    server.stop().await;
}

/// WatchRooms with `regions` passes the events of those regions' rooms only,
/// in a snapshot too.
async fn watch_filters_by_region(db: TestDb) {
    let (_emulator, url) = emulator_with(Faults::default()).await;
    let mut server = serve_both(&db, &url, &[]).await;
    let before = server
        .client
        .create_room(create_in(WEST, "before"))
        .await
        .unwrap()
        .into_inner();
    server
        .client
        .create_room(create_in(EAST, "before-east"))
        .await
        .unwrap();
    let mut west = watch(&mut server, &[WEST]).await;
    let mut all = watch(&mut server, &[]).await;
    let east_room = server
        .client
        .create_room(create_in(EAST, "east"))
        .await
        .unwrap()
        .into_inner();
    let west_room = server
        .client
        .create_room(create_in(WEST, "west"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut all).await.room.unwrap().arn, east_room.arn);
    assert_eq!(next_event(&mut all).await.room.unwrap().arn, west_room.arn);
    assert_eq!(
        next_event(&mut west).await.room.unwrap().arn,
        west_room.arn,
        "the us-east-1 event is not passed"
    );
    let mut snapshot = server
        .client
        .watch_rooms(proto::WatchRoomsRequest {
            regions: vec![WEST.into()],
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut snapshotted = BTreeSet::new();
    loop {
        match snapshot.message().await.unwrap().unwrap().kind.unwrap() {
            proto::watch_rooms_response::Kind::Event(e) => {
                snapshotted.insert(e.room.unwrap().arn);
            }
            proto::watch_rooms_response::Kind::Progress(p) if p.snapshot_complete => break,
            proto::watch_rooms_response::Kind::Progress(_) => {}
        }
    }
    assert_eq!(snapshotted, BTreeSet::from([before.arn, west_room.arn]));
    drop((west, all, snapshot));
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Per region: budgets, reconcilers, faults

/// AWS's quotas are per region: offered 50 GetRoom calls per second in each
/// region, each region's IVS Chat sees at most 5 in any second and about 5
/// on average (SQLite: this process's budgets; Postgres: the fleet's).
async fn each_region_has_its_own_budget(db: TestDb) {
    let (emulator, url) = emulator_with(Faults {
        tps_limit: Some(TpsLimit::Aws),
        ..Faults::default()
    })
    .await;
    let east = sdk_in(&url, EAST)
        .create_room()
        .name("e")
        .send()
        .await
        .unwrap();
    let west = sdk_in(&url, WEST)
        .create_room()
        .name("w")
        .send()
        .await
        .unwrap();
    // AWS's rate (5 per second), not the tests' unlimited one.
    let flags = ["--regions", BOTH, "--upstream-rate", "5"];
    let mut server = TestServer::start(serve_config(&db.url, &url, &flags)).await;
    server.wait_listed().await;
    emulator.clear_call_times();
    const LOAD: Duration = Duration::from_secs(4);
    let started = tokio::time::Instant::now();
    let mut offered = tokio::task::JoinSet::new();
    for arn in [
        east.arn().unwrap().to_owned(),
        west.arn().unwrap().to_owned(),
    ] {
        for _ in 0..10 {
            let mut client = server.client.clone();
            let arn = arn.clone();
            offered.spawn(async move {
                // 10 clients × a call every 200 ms: 50 per second per region.
                while started.elapsed() < LOAD {
                    let mut request =
                        tonic::Request::new(get(&arn, proto::ReadConsistency::Strong));
                    request.set_timeout(Duration::from_millis(200));
                    let _ = client.get_room(request).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    }
    offered.join_all().await;
    for region in [EAST, WEST] {
        let times = emulator.call_times_in(region, Operation::GetRoom);
        let most = max_per_second(&times);
        assert!(most <= 5, "{region}: {most} GetRoom calls in one second");
        let rate = times.len() as f64 / LOAD.as_secs_f64();
        assert!(
            rate >= 3.5,
            "{region}: only {rate:.1} GetRoom calls per second of its own 5 ({} calls)",
            times.len()
        );
    }
    server.stop().await;
}

/// The reconciler of each region finds rooms created, changed and deleted
/// behind the service's back there.
async fn each_region_is_reconciled(db: TestDb) {
    let (emulator, url) = emulator_with(Faults::default()).await;
    let mut server = serve_both(
        &db,
        &url,
        &[
            "--reconcile-interval",
            "100ms",
            "--resync-interval",
            "300ms",
        ],
    )
    .await;
    let gone = server
        .client
        .create_room(create_in(WEST, "gone"))
        .await
        .unwrap()
        .into_inner();
    let mut stream = watch(&mut server, &[]).await;
    let east = sdk_in(&url, EAST)
        .create_room()
        .name("behind-east")
        .send()
        .await
        .unwrap();
    let west = sdk_in(&url, WEST)
        .create_room()
        .name("behind-west")
        .send()
        .await
        .unwrap();
    emulator.delete_room(&gone.arn).unwrap();
    let mut created = BTreeSet::new();
    let mut deleted = BTreeSet::new();
    while created.len() < 2 || deleted.is_empty() {
        let event = next_event(&mut stream).await;
        assert_eq!(
            event.source,
            proto::EventSource::Reconciler as i32,
            "{event:?}"
        );
        let arn = event.room.unwrap().arn;
        if event.r#type == proto::EventType::Deleted as i32 {
            deleted.insert(arn);
        } else {
            created.insert(arn);
        }
    }
    assert_eq!(
        created,
        BTreeSet::from([
            east.arn().unwrap().to_owned(),
            west.arn().unwrap().to_owned()
        ])
    );
    assert_eq!(deleted, BTreeSet::from([gone.arn]));
    drop(stream);
    server.stop().await;
}

/// One region's IVS Chat failing does not hold the other up: its rooms keep
/// stale-if-error reads, the other region answers as before, and ListRooms of
/// the healthy region is served while the failing one has not been listed.
async fn one_region_down_the_other_serves(db: TestDb) {
    let (emulator, url) = emulator_with(Faults::default()).await;
    let east_room = sdk_in(&url, EAST)
        .create_room()
        .name("e")
        .send()
        .await
        .unwrap();
    let west_room = sdk_in(&url, WEST)
        .create_room()
        .name("w")
        .send()
        .await
        .unwrap();
    // Down from the start: its first listing cannot complete.
    let down = Faults {
        error_rate: 1.0,
        error: InjectedError::Internal,
        ..Faults::default()
    };
    emulator.set_region_faults(WEST, down.clone());
    let flags = [
        "--regions",
        BOTH,
        "--listing-wait",
        "300ms",
        "--max-staleness",
        "1ms",
        "--stale-if-error",
        "1h",
        "--reconcile-interval",
        "100ms",
    ];
    let mut server = TestServer::start(serve_config(&db.url, &url, &flags)).await;
    let c = &mut server.client;
    let east_listed = c
        .list_rooms(proto::ListRoomsRequest {
            region: EAST.into(),
            ..Default::default()
        })
        .await
        .expect("the healthy region is listed and served")
        .into_inner();
    assert_eq!(east_listed.rooms.len(), 1);
    let all = c
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(all.code(), Code::Unavailable, "{all:?}");
    assert!(
        all.message().contains(WEST) && !all.message().contains(EAST),
        "{all:?}"
    );
    let strong = proto::ReadConsistency::Strong;
    let cached = proto::ReadConsistency::Cached;
    assert_eq!(
        c.get_room(get(east_room.arn().unwrap(), strong))
            .await
            .unwrap()
            .into_inner()
            .name,
        "e"
    );
    let err = c
        .get_room(get(west_room.arn().unwrap(), strong))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // West recovers and is listed; then goes down again: its cached room is
    // served stale, east's reads go on.
    emulator.set_region_faults(WEST, Faults::default());
    within("the recovered region's first listing", async {
        while c
            .list_rooms(proto::ListRoomsRequest::default())
            .await
            .is_err()
        {}
    })
    .await;
    c.get_room(get(west_room.arn().unwrap(), strong))
        .await
        .unwrap();
    emulator.set_region_faults(WEST, down);
    let stale = c
        .get_room(get(west_room.arn().unwrap(), cached))
        .await
        .expect("stale-if-error");
    assert_eq!(stale.metadata().get("x-cache").unwrap(), "stale");
    assert_eq!(stale.into_inner().name, "w");
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let fresh = c
            .get_room(get(east_room.arn().unwrap(), cached))
            .await
            .unwrap();
        assert_ne!(fresh.metadata().get("x-cache").unwrap(), "stale");
    }
    eprintln!(
        "10 east reads beside a down west took {:?}",
        started.elapsed()
    );
    server.stop().await;
}

/// A region no longer served keeps its rows in the cache, unserved: ListRooms
/// leaves them out and their ARNs are refused.
async fn a_region_no_longer_served_is_left_out(db: TestDb) {
    let (_emulator, url) = emulator_with(Faults::default()).await;
    let mut server = serve_both(&db, &url, &[]).await;
    let east = server
        .client
        .create_room(create_in(EAST, "e"))
        .await
        .unwrap()
        .into_inner();
    let west = server
        .client
        .create_room(create_in(WEST, "w"))
        .await
        .unwrap()
        .into_inner();
    server.stop().await;
    let mut server = TestServer::start(serve_config(&db.url, &url, &["--regions", EAST])).await;
    let listed = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let arns: Vec<String> = listed.rooms.into_iter().map(|r| r.arn).collect();
    assert_eq!(arns, [east.arn]);
    let refused = server
        .client
        .get_room(get(&west.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    server.stop().await;
}

on_both_backends!(
    a_region_no_longer_served_is_left_out,
    calls_go_to_the_region_in_the_arn,
    list_rooms_merges_filters_and_pages,
    watch_filters_by_region,
    each_region_has_its_own_budget,
    each_region_is_reconciled,
    one_region_down_the_other_serves,
    a_one_region_cache_upgrades_in_place,
);

// ---------------------------------------------------------------------------
// Upgrade in place

/// What today's release left in a cache: rooms through the store (and so
/// their change-log events and revisions) and its listing state under the
/// key it used, of no region.
async fn one_region_cache(url: &str, rooms: &[Room]) -> u64 {
    let store = Store::open(url).await.expect("open the cache");
    let asked = Timestamp::now();
    for room in rooms {
        store
            .put(room, asked, EventSource::Reconciler)
            .await
            .unwrap();
    }
    store.close().await;
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::query("INSERT INTO cache_state (key, value) VALUES ('full_listing_at', $1)")
        .bind(asked.as_nanos())
        .execute(&mut conn)
        .await
        .unwrap();
    let revision: i64 = sqlx::query_scalar("SELECT value FROM cache_state WHERE key = 'revision'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM cache_state ORDER BY key")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(
        !keys.iter().any(|k| k.contains(EAST)),
        "nothing per region yet: {keys:?}"
    );
    conn.close().await.unwrap();
    u64::try_from(revision).unwrap()
}

/// A cache written when one region was served keeps its rooms, its change
/// log and revisions, and its listing state: ListRooms is answered at once
/// (while IVS Chat's listing is held back), watchers resume where they were.
async fn a_one_region_cache_upgrades_in_place(db: TestDb) {
    let (emulator, url) = emulator_with(Faults::default()).await;
    let sdk = sdk_in(&url, EAST);
    let mut rooms = Vec::new();
    for i in 0..3 {
        let out = sdk
            .create_room()
            .name(format!("old-{i}"))
            .send()
            .await
            .unwrap();
        rooms.push(
            emulator
                .rooms()
                .into_iter()
                .find(|r| Some(r.arn.as_str()) == out.arn())
                .unwrap(),
        );
    }
    let revision = one_region_cache(&db.url, &rooms).await;
    assert_eq!(revision, 3);
    // The service's own first listing cannot complete meanwhile.
    let held = emulator.hold_responses(Operation::ListRooms);
    let mut server =
        TestServer::start(serve_config(&db.url, &url, &["--listing-wait", "2s"])).await;
    let listed = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .expect("the old listing state still serves ListRooms")
        .into_inner();
    assert_eq!(listed.revision, revision);
    let names: BTreeSet<String> = listed.rooms.into_iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        BTreeSet::from(["old-0".into(), "old-1".into(), "old-2".into()])
    );
    // A watcher of the old release resumes after revision 1 without OUT_OF_RANGE.
    let mut resumed = server
        .client
        .watch_rooms(proto::WatchRoomsRequest {
            after_revision: Some(1),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let mut revisions = Vec::new();
    while revisions.len() < 2 {
        revisions.push(next_event(&mut resumed).await.revision);
    }
    assert_eq!(revisions, [2, 3]);
    // New changes continue the same log.
    server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: rooms[0].arn.clone(),
            name: Some("renamed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next_event(&mut resumed).await.revision, 4);
    drop(resumed);
    held.release();
    server.stop().await;
}

// ---------------------------------------------------------------------------
// The embedded upstream, through aws-config, and a fleet

/// With the embedded upstream and several `--regions`, one emulator plays
/// each: rooms land in their region, and after a restart both regions' rooms
/// are still there (one state file), read STRONG from each region.
#[tokio::test]
async fn the_embedded_upstream_plays_every_region() {
    use clap::Parser as _;
    use ivschat_rooms::config::{Cli, Command};
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = || {
        let args = [
            "ivschat-rooms",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        let rest = ["--regions", BOTH, "--data-dir", data_dir.to_str().unwrap()];
        match Cli::try_parse_from(args.into_iter().chain(rest))
            .unwrap()
            .into_command()
        {
            Command::Serve(config) => config,
            Command::Emulator(_) | Command::Watch(_) => unreachable!(),
        }
    };
    let mut server = TestServer::start(config()).await;
    let mut rooms = Vec::new();
    for region in [EAST, WEST] {
        let room = server
            .client
            .create_room(create_in(region, region))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(region_of(&room.arn), region);
        rooms.push(room);
    }
    server.stop().await;
    assert!(data_dir.join("rooms.db.emulator.json").exists());

    let mut server = TestServer::start(config()).await;
    for room in &rooms {
        let strong = server
            .client
            .get_room(get(&room.arn, proto::ReadConsistency::Strong))
            .await
            .expect("the emulator kept the room in its region")
            .into_inner();
        assert_eq!(&strong, room);
    }
    for region in [EAST, WEST] {
        let listed = server
            .client
            .list_rooms(proto::ListRoomsRequest {
                region: region.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let names: Vec<String> = listed.rooms.into_iter().map(|r| r.name).collect();
        assert_eq!(names, [region]);
    }
    server.stop().await;
}

/// `--upstream aws` with AWS_ENDPOINT_URL_IVSCHAT: the endpoint applies to
/// every region, each call signed for its own (the emulator tells them apart
/// by the signature).
#[tokio::test]
async fn the_aws_upstream_serves_every_region_at_one_endpoint() {
    let (emulator, url) = emulator_with(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("cache.db").display());
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream", "aws"])
        .args(["--database-url", &db, "--regions", BOTH])
        .envs([
            ("AWS_ENDPOINT_URL_IVSCHAT", url.as_str()),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ])
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION");
    let mut binary = Server::spawn(command).await;
    let line = binary.logged("serving ivschat.rooms.v1.RoomService").await;
    assert!(
        line.contains("us-east-1, eu-west-1"),
        "the startup log names the regions: {line}"
    );
    let mut client = binary.client().await;
    for region in [EAST, WEST] {
        let room = client
            .create_room(create_in(region, region))
            .await
            .expect("create through the aws upstream")
            .into_inner();
        assert_eq!(region_of(&room.arn), region);
        let theirs = emulator.rooms_in(region);
        assert_eq!(theirs.len(), 1);
        assert_eq!(theirs[0].arn, room.arn);
        let got = client
            .get_room(get(&room.arn, proto::ReadConsistency::Strong))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.name, region);
    }
    let listed = client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rooms.len(), 2);
    let (status, log) = binary.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
}

/// Replicas on Postgres, two regions: each region has one leader at a time,
/// and when a leader is killed (-9) another replica takes that region over
/// and finds changes made there behind the service's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_s_leadership_survives_a_killed_replica() {
    let Some(db) = TestDb::postgres("each_region_s_leadership_survives_a_killed_replica").await
    else {
        return;
    };
    let (emulator, url) = emulator_with(Faults::default()).await;
    let flags = [
        "--regions",
        BOTH,
        "--reconcile-interval",
        "200ms",
        "--upstream-rate",
        "1000",
    ];
    let mut a = Server::against(&db.url, &url, &flags).await;
    // Replica a starts first and leads both regions.
    let mut led = BTreeSet::new();
    while led.len() < 2 {
        led.extend(regions_led(&a.logged("this replica reconciles").await));
    }
    let mut b = Server::against(&db.url, &url, &flags).await;
    let mut watcher = b
        .client()
        .await
        .watch_rooms(proto::WatchRoomsRequest {
            regions: vec![WEST.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !b.logged_so_far()
            .iter()
            .any(|l| l.contains("this replica reconciles")),
        "one leader per region"
    );
    a.kill_9().await;
    let mut taken = BTreeSet::new();
    while taken.len() < 2 {
        taken.extend(regions_led(&b.logged("this replica reconciles").await));
    }
    // The new leader of eu-west-1 finds a change made there.
    let behind = sdk_in(&url, WEST)
        .create_room()
        .name("behind")
        .send()
        .await
        .unwrap();
    let event = next_event(&mut watcher).await;
    assert_eq!(event.room.unwrap().arn, behind.arn().unwrap());
    assert_eq!(event.source, proto::EventSource::Reconciler as i32);
    drop(watcher);
    assert_eq!(emulator.rooms_in(WEST).len(), 1);
    let (status, log) = b.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
}

/// The regions a log line says this replica now reconciles.
fn regions_led(line: &str) -> Vec<&'static str> {
    [EAST, WEST]
        .into_iter()
        .filter(|region| line.contains("this replica reconciles") && line.contains(region))
        .collect()
}
