//! WatchRooms end to end: the change log, snapshots, resume, compaction, the
//! reconciler's events, slow watchers and replicas; the real server on port 0
//! in front of the emulator, on SQLite and on Postgres.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{TestDb, TestServer, emulator, proto, sdk, serve_config, setup};
use futures::StreamExt as _;
use proto::watch_rooms_response::Kind;
use tonic::Code;
use tonic::codec::Streaming;
use tonic_types::StatusExt as _;

/// Long enough for anything a test waits on; a hang fails instead of blocking.
const PATIENCE: Duration = Duration::from_secs(30);

type Watch = Streaming<proto::WatchRoomsResponse>;

const CREATED: i32 = proto::EventType::Created as i32;
const UPDATED: i32 = proto::EventType::Updated as i32;
const DELETED: i32 = proto::EventType::Deleted as i32;
const SNAPSHOT: i32 = proto::EventType::Snapshot as i32;
const API: i32 = proto::EventSource::Api as i32;
const RECONCILER: i32 = proto::EventSource::Reconciler as i32;

async fn watch(server: &mut TestServer, request: proto::WatchRoomsRequest) -> Watch {
    server
        .client
        .watch_rooms(request)
        .await
        .expect("watch starts")
        .into_inner()
}

fn after(revision: u64) -> proto::WatchRoomsRequest {
    proto::WatchRoomsRequest {
        after_revision: Some(revision),
        ..Default::default()
    }
}

/// The next message of a stream.
async fn next(stream: &mut Watch) -> Kind {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a message in time")
        .expect("the stream goes on")
        .expect("the stream is not over")
        .kind
        .expect("a message has a kind")
}

/// The next event, skipping bookmarks.
async fn next_event(stream: &mut Watch) -> proto::RoomEvent {
    let event = async {
        loop {
            if let Kind::Event(event) = next(stream).await {
                return event;
            }
        }
    };
    // Bookmarks keep coming: bound the whole wait, not each message.
    tokio::time::timeout(PATIENCE, event)
        .await
        .expect("an event in time")
}

/// Events until (and including) `revision`.
async fn events_through(stream: &mut Watch, revision: u64) -> Vec<proto::RoomEvent> {
    let mut events = Vec::new();
    let collect = async {
        loop {
            match next(stream).await {
                Kind::Event(event) => {
                    let done = event.revision >= revision;
                    events.push(event);
                    if done {
                        return;
                    }
                }
                Kind::Progress(p) if p.revision >= revision => return,
                Kind::Progress(_) => {}
            }
        }
    };
    if tokio::time::timeout(PATIENCE, collect).await.is_err() {
        panic!(
            "no events through revision {revision} in time; got revisions {:?}",
            revisions(&events)
        );
    }
    events
}

fn revisions(events: &[proto::RoomEvent]) -> Vec<u64> {
    events.iter().map(|e| e.revision).collect()
}

fn rename(arn: &str, name: &str) -> proto::UpdateRoomRequest {
    proto::UpdateRoomRequest {
        identifier: arn.into(),
        name: Some(name.into()),
        ..Default::default()
    }
}

async fn list_all(server: &mut TestServer) -> (Vec<proto::Room>, u64) {
    let page = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(page.next_token.is_empty(), "tests list one page");
    (page.rooms, page.revision)
}

/// Applies events to rooms by ARN, as a watcher keeping a copy would.
fn apply(rooms: &mut BTreeMap<String, proto::Room>, event: &proto::RoomEvent) {
    let room = event.room.clone().expect("an event has a room");
    match event.r#type {
        DELETED => {
            rooms.remove(&room.arn);
        }
        _ => {
            rooms.insert(room.arn.clone(), room);
        }
    }
}

on_both_backends!(
    events_say_what_changed,
    bad_watch_requests_are_refused,
    snapshot_then_live_has_no_gap_or_duplicate,
    resume_after_cancel_delivers_exactly_the_missed_events,
    out_of_band_changes_arrive_from_the_reconciler,
    compacted_revisions_are_out_of_range,
    thousand_concurrent_updates_arrive_in_order_without_gaps,
    slow_watcher_does_not_delay_a_fast_one,
    shutdown_ends_streams_with_unavailable,
    the_largest_room_event_arrives_whole,
);

/// Each kind of change is one event with its type, source, the room before
/// and after and the names of the fields that differ; ListRooms' revision is
/// where a watcher starts to see exactly the changes after the page.
async fn events_say_what_changed(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &[]).await;
    let (_, start) = list_all(&mut server).await;
    let mut stream = watch(&mut server, after(start)).await;

    let room = server.create_room("lobby").await;
    let created = next_event(&mut stream).await;
    assert_eq!(created.revision, start + 1);
    assert_eq!((created.r#type, created.source), (CREATED, API));
    assert_eq!(created.room.as_ref(), Some(&room));
    assert_eq!(created.previous, None);
    assert!(created.observed_at.is_some());

    let renamed = server
        .client
        .update_room(rename(&room.arn, "hall"))
        .await
        .unwrap()
        .into_inner();
    let updated = next_event(&mut stream).await;
    assert_eq!(updated.revision, start + 2);
    assert_eq!((updated.r#type, updated.source), (UPDATED, API));
    assert_eq!(updated.changed_fields, ["name", "update_time"]);
    assert_eq!(updated.previous.as_ref(), Some(&room));
    assert_eq!(updated.room.as_ref(), Some(&renamed));

    let tagged = server
        .client
        .tag_room(proto::TagRoomRequest {
            identifier: room.arn.clone(),
            tags: [("team".to_owned(), "a".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    let event = next_event(&mut stream).await;
    assert_eq!(event.revision, start + 3);
    assert_eq!(event.r#type, UPDATED);
    assert!(event.changed_fields.contains(&"tags".to_owned()));
    assert_eq!(event.room.as_ref(), Some(&tagged));

    // A page read now reflects all three; a watch from its revision sees the
    // delete and nothing before it.
    let (rooms, revision) = list_all(&mut server).await;
    assert_eq!((rooms, revision), (vec![tagged.clone()], start + 3));
    let mut from_page = watch(&mut server, after(revision)).await;
    server
        .client
        .delete_room(proto::DeleteRoomRequest {
            identifier: room.arn.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    for stream in [&mut stream, &mut from_page] {
        let deleted = next_event(stream).await;
        assert_eq!(deleted.revision, start + 4);
        assert_eq!((deleted.r#type, deleted.source), (DELETED, API));
        assert_eq!(deleted.room.as_ref(), Some(&tagged), "the last known room");
    }

    // Reading a room again changes nothing, so logs nothing: the next event
    // is the next change.
    let other = server.create_room("other").await;
    server
        .client
        .get_room(proto::GetRoomRequest {
            identifier: other.arn.clone(),
            consistency: proto::ReadConsistency::Strong as i32,
        })
        .await
        .unwrap();
    server
        .client
        .update_room(rename(&other.arn, "other-2"))
        .await
        .unwrap();
    let events = events_through(&mut stream, start + 6).await;
    assert_eq!(revisions(&events), [start + 5, start + 6]);
    assert_eq!(events[1].changed_fields, ["name", "update_time"]);
}

/// Bad identifiers and a snapshot with a resume point are INVALID_ARGUMENT,
/// naming the field.
async fn bad_watch_requests_are_refused(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &[]).await;
    let room = server.create_room("lobby").await;
    let status = server
        .client
        .watch_rooms(proto::WatchRoomsRequest {
            identifiers: vec![room.arn.clone(), "not-an-arn".into()],
            ..Default::default()
        })
        .await
        .expect_err("a bad identifier is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<_> = status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["identifiers[1]"]);

    let status = server
        .client
        .watch_rooms(proto::WatchRoomsRequest {
            after_revision: Some(0),
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .expect_err("a snapshot starts from now");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "include_snapshot"
    );
}

/// The list-then-watch race, closed: rooms change while a snapshot is taken;
/// the snapshot plus the events after its revision give exactly the final
/// state, with revisions following on from the snapshot's with no gap.
async fn snapshot_then_live_has_no_gap_or_duplicate(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &[]).await;
    let mut arns = Vec::new();
    for i in 0..5 {
        let room = server.create_room(&format!("room-{i}")).await;
        arns.push(room.arn);
    }
    // Writers run while the snapshot is taken.
    let writers: Vec<_> = arns
        .iter()
        .map(|arn| {
            let (mut client, arn) = (server.client.clone(), arn.clone());
            tokio::spawn(async move {
                for n in 0..10 {
                    client
                        .update_room(rename(&arn, &format!("n{n}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut stream = watch(
        &mut server,
        proto::WatchRoomsRequest {
            include_snapshot: true,
            ..Default::default()
        },
    )
    .await;
    let mut rooms = BTreeMap::new();
    let snapshot_revision = loop {
        match next(&mut stream).await {
            Kind::Event(event) => {
                assert_eq!((event.r#type, event.revision), (SNAPSHOT, 0));
                apply(&mut rooms, &event);
            }
            Kind::Progress(p) => {
                assert!(p.snapshot_complete, "the first progress ends the snapshot");
                break p.revision;
            }
        }
    };
    assert_eq!(rooms.len(), 5, "every room is in the snapshot");
    for writer in writers {
        writer.await.unwrap();
    }
    let (listed, newest) = list_all(&mut server).await;
    assert_eq!(newest, 5 + 50, "five creations and fifty updates");
    let events = if snapshot_revision < newest {
        events_through(&mut stream, newest).await
    } else {
        Vec::new()
    };
    let expected: Vec<u64> = (snapshot_revision + 1..=newest).collect();
    assert_eq!(revisions(&events), expected, "no gap, no duplicate");
    for event in &events {
        apply(&mut rooms, event);
    }
    let listed: BTreeMap<_, _> = listed.into_iter().map(|r| (r.arn.clone(), r)).collect();
    assert_eq!(rooms, listed, "snapshot + events = the cache");
}

/// A watcher that goes away and comes back with the last revision it saw gets
/// exactly what it missed.
async fn resume_after_cancel_delivers_exactly_the_missed_events(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &[]).await;
    let (_, start) = list_all(&mut server).await;
    let mut stream = watch(&mut server, after(start)).await;
    let room = server.create_room("a").await;
    let last_seen = next_event(&mut stream).await.revision;
    drop(stream);

    for n in 0..5 {
        server
            .client
            .update_room(rename(&room.arn, &format!("b{n}")))
            .await
            .unwrap();
    }
    let (_, newest) = list_all(&mut server).await;
    let mut resumed = watch(&mut server, after(last_seen)).await;
    let missed = events_through(&mut resumed, newest).await;
    assert_eq!(
        revisions(&missed),
        (last_seen + 1..=newest).collect::<Vec<_>>()
    );
    let names: Vec<_> = missed
        .iter()
        .map(|e| e.room.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, ["b0", "b1", "b2", "b3", "b4"]);
    // And then live, with nothing repeated.
    server
        .client
        .update_room(rename(&room.arn, "c"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut resumed).await.revision, newest + 1);
}

/// Changes made in IVS Chat behind the service's back (here: straight on the
/// emulator through the SDK) reach watchers with source RECONCILER: updates
/// by the incremental pass, tag changes, deletions and creations by it or
/// the full resync.
async fn out_of_band_changes_arrive_from_the_reconciler(db: TestDb) {
    let (mut server, _emulator, url) = setup(
        &db,
        &["--reconcile-interval", "50ms", "--resync-interval", "200ms"],
    )
    .await;
    let aws = sdk(&url);
    let room = server.create_room("ours").await;
    let (_, start) = list_all(&mut server).await;
    let mut stream = watch(&mut server, after(start)).await;

    aws.update_room()
        .identifier(&room.arn)
        .name("theirs")
        .send()
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!((event.r#type, event.source), (UPDATED, RECONCILER));
    assert_eq!(event.room.as_ref().unwrap().name, "theirs");
    assert!(event.changed_fields.contains(&"name".to_owned()));
    assert_eq!(event.previous.as_ref().unwrap().name, "ours");

    aws.tag_resource()
        .resource_arn(&room.arn)
        .tags("owner", "them")
        .send()
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!((event.r#type, event.source), (UPDATED, RECONCILER));
    assert!(event.changed_fields.contains(&"tags".to_owned()));
    assert_eq!(event.room.as_ref().unwrap().tags["owner"], "them");

    let theirs = aws.create_room().name("new").send().await.unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!((event.r#type, event.source), (CREATED, RECONCILER));
    assert_eq!(event.room.as_ref().unwrap().arn, theirs.arn().unwrap());
    // Found by a full listing rather than the incremental pass, it is put in
    // as listed, then read whole: one more event.
    let completions = if event.room.as_ref().unwrap().details_pending {
        let event = next_event(&mut stream).await;
        assert_eq!((event.r#type, event.source), (UPDATED, RECONCILER));
        let room = event.room.as_ref().unwrap();
        assert_eq!(room.arn, theirs.arn().unwrap());
        assert!(!room.details_pending);
        assert_eq!(room.maximum_message_length, 500);
        1
    } else {
        0
    };

    aws.delete_room()
        .identifier(&room.arn)
        .send()
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!((event.r#type, event.source), (DELETED, RECONCILER));
    assert_eq!(event.room.as_ref().unwrap().arn, room.arn);
    assert_eq!(
        event.revision,
        start + 4 + completions,
        "one event per change, in order"
    );

    let (rooms, _) = list_all(&mut server).await;
    let arns: Vec<_> = rooms.iter().map(|r| r.arn.as_str()).collect();
    assert_eq!(arns, [theirs.arn().unwrap()], "the cache followed IVS Chat");
}

/// Past the retained log, a resume is OUT_OF_RANGE with the oldest revision
/// still available in the error details; from there on it works. A revision
/// from the future is OUT_OF_RANGE too.
async fn compacted_revisions_are_out_of_range(db: TestDb) {
    let (mut server, _emulator, _) = setup(
        &db,
        &[
            "--event-retention-count",
            "2",
            "--compaction-interval",
            "20ms",
        ],
    )
    .await;
    let room = server.create_room("r").await;
    for n in 0..4 {
        server
            .client
            .update_room(rename(&room.arn, &format!("n{n}")))
            .await
            .unwrap();
    }
    let (_, newest) = list_all(&mut server).await;
    assert_eq!(newest, 5);
    // Compaction runs in the background (also while the updates ran): ask
    // until it has caught up with the newest revision.
    let oldest_available = |status: &tonic::Status| {
        let info = status.get_details_error_info().expect("ErrorInfo details");
        assert_eq!(info.reason, "REVISION_OUT_OF_RANGE");
        info.metadata["oldest_available_revision"].clone()
    };
    let status = tokio::time::timeout(PATIENCE, async {
        loop {
            match server.client.watch_rooms(after(0)).await {
                Err(status) if status.code() != Code::OutOfRange => {
                    panic!("unexpected {status:?}")
                }
                Err(status) if oldest_available(&status) == "4" => break status,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("compaction keeps the newest two");
    assert!(status.message().contains("compacted"), "{status:?}");

    let status = server.client.watch_rooms(after(2)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let mut resumed = watch(&mut server, after(3)).await;
    assert_eq!(revisions(&events_through(&mut resumed, 5).await), [4, 5]);

    let status = server.client.watch_rooms(after(99)).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::OutOfRange,
        "a revision from the future"
    );
}

/// 1,000 concurrent updates of 10 rooms: a watcher of everything sees every
/// revision once, in order; a watcher of two rooms sees exactly theirs, in
/// the same order; each room's last event is the room as GetRoom returns it.
async fn thousand_concurrent_updates_arrive_in_order_without_gaps(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &[]).await;
    let mut arns = Vec::new();
    for i in 0..10 {
        let room = server.create_room(&format!("room-{i}")).await;
        arns.push(room.arn);
    }
    let (_, start) = list_all(&mut server).await;
    let mut all = watch(&mut server, after(start)).await;
    let mut some = watch(
        &mut server,
        proto::WatchRoomsRequest {
            identifiers: arns[..2].to_vec(),
            after_revision: Some(start),
            include_snapshot: false,
            regions: Vec::new(),
        },
    )
    .await;
    let client = server.client.clone();
    futures::stream::iter(0..1000)
        .map(|i| {
            let (mut client, arn) = (client.clone(), arns[i % 10].clone());
            async move { client.update_room(rename(&arn, &format!("u{i}"))).await }
        })
        .buffer_unordered(100)
        .for_each(|result| async move {
            result.expect("update");
        })
        .await;

    let end = start + 1000;
    let everything = events_through(&mut all, end).await;
    assert_eq!(
        revisions(&everything),
        (start + 1..=end).collect::<Vec<_>>()
    );
    let theirs: Vec<_> = everything
        .iter()
        .filter(|e| arns[..2].contains(&e.room.as_ref().unwrap().arn))
        .cloned()
        .collect();
    assert_eq!(theirs.len(), 200);
    let filtered = events_through(&mut some, theirs.last().unwrap().revision).await;
    assert_eq!(filtered, theirs, "the filtered watcher's events, in order");

    let mut last = BTreeMap::new();
    for event in &everything {
        apply(&mut last, event);
    }
    for arn in &arns {
        let room = server
            .client
            .get_room(proto::GetRoomRequest {
                identifier: arn.clone(),
                consistency: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(last.get(arn), Some(&room));
    }
}

/// A watcher that does not read holds up neither writers nor another watcher;
/// when it reads again it gets everything, from the log (the ring here holds
/// 8 events), in order.
async fn slow_watcher_does_not_delay_a_fast_one(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &["--event-ring-capacity", "8"]).await;
    let room = server.create_room("r").await;
    let (_, start) = list_all(&mut server).await;
    let mut slow = watch(&mut server, after(start)).await;
    let mut fast = watch(&mut server, after(start)).await;
    // Names long enough that the slow stream's transport windows fill.
    let long = "x".repeat(120);
    for n in 0..300 {
        server
            .client
            .update_room(rename(&room.arn, &format!("{long}{n}")))
            .await
            .unwrap();
        // The fast watcher keeps up as it goes.
        let event = next_event(&mut fast).await;
        assert_eq!(event.revision, start + 1 + n);
    }
    let behind = events_through(&mut slow, start + 300).await;
    assert_eq!(
        revisions(&behind),
        (start + 1..=start + 300).collect::<Vec<_>>()
    );
}

/// A watch stream's encoding buffer starts small (1 KiB): an event of the
/// largest room IVS Chat allows (50 tags, keys of 128 and values of 256
/// characters: over 16 KiB encoded, twice tonic's usual buffer) still
/// arrives whole.
async fn the_largest_room_event_arrives_whole(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &[]).await;
    let room = server.create_room("r").await;
    let (_, start) = list_all(&mut server).await;
    let mut stream = watch(&mut server, after(start)).await;
    let tags: std::collections::HashMap<String, String> = (0..50)
        .map(|i| (format!("{i:0>128}"), format!("{i:v>256}")))
        .collect();
    let tagged = server
        .client
        .tag_room(proto::TagRoomRequest {
            identifier: room.arn.clone(),
            tags: tags.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let event = next_event(&mut stream).await;
    assert_eq!(event.revision, start + 1);
    assert_eq!(event.room.as_ref(), Some(&tagged));
    assert_eq!(event.room.as_ref().map(|r| &r.tags), Some(&tags));
    let encoded = proto::WatchRoomsResponse {
        kind: Some(proto::watch_rooms_response::Kind::Event(event)),
    };
    assert!(prost::Message::encoded_len(&encoded) > 16 * 1024);
    // And the stream goes on.
    server
        .client
        .update_room(rename(&room.arn, "after"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut stream).await.revision, start + 2);
}

/// Shutdown ends watch streams at once with UNAVAILABLE naming the revision
/// to resume after, instead of waiting out the grace period.
async fn shutdown_ends_streams_with_unavailable(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &["--shutdown-grace", "1h"]).await;
    server.create_room("r").await;
    let (_, newest) = list_all(&mut server).await;
    let mut stream = watch(&mut server, after(0)).await;
    assert_eq!(revisions(&events_through(&mut stream, newest).await), [1]);
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("shutdown does not wait for watchers");
    let status = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream ends")
        .expect_err("with a status");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("after_revision 1"),
        "{}",
        status.message()
    );
}

/// Two replicas on one Postgres behave as one: a change through either reaches
/// a watcher on the other, in revision order, woken by NOTIFY (not polling);
/// the reconciler runs on one of them and passes to the other when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_share_one_stream_and_one_reconciler() {
    let Some(db) =
        TestDb::postgres("replicas_on_postgres_share_one_stream_and_one_reconciler").await
    else {
        return;
    };
    let (_emulator, url) = emulator().await;
    let config = serve_config(
        &db.url,
        &url,
        &[
            "--reconcile-interval",
            "50ms",
            "--resync-interval",
            "1h",
            // No re-reading the log on a timer: what the other replica
            // commits can only arrive through LISTEN/NOTIFY.
            "--event-poll-interval",
            "1h",
        ],
    );
    let mut a = TestServer::start(config.clone()).await;
    a.wait_listed().await;
    let mut b = TestServer::start(config).await;
    b.wait_listed().await;
    let (_, start) = list_all(&mut b).await;
    let mut on_b = watch(&mut b, after(start)).await;
    let mut on_a = watch(&mut a, after(start)).await;

    let room = a.create_room("x").await;
    for n in 0..10 {
        let replica = if n % 2 == 0 { &mut a } else { &mut b };
        replica
            .client
            .update_room(rename(&room.arn, &format!("n{n}")))
            .await
            .unwrap();
    }
    let expected: Vec<u64> = (start + 1..=start + 11).collect();
    let seen_on_b = events_through(&mut on_b, start + 11).await;
    let seen_on_a = events_through(&mut on_a, start + 11).await;
    assert_eq!(revisions(&seen_on_b), expected);
    assert_eq!(seen_on_a, seen_on_b, "both replicas tell the same story");
    assert_eq!(seen_on_b[10].room.as_ref().unwrap().name, "n9");

    // A started first, so it reconciles; stopped, it hands over to B.
    a.stop().await;
    sdk(&url)
        .update_room()
        .identifier(&room.arn)
        .name("behind-our-back")
        .send()
        .await
        .unwrap();
    let event = next_event(&mut on_b).await;
    assert_eq!((event.r#type, event.source), (UPDATED, RECONCILER));
    assert_eq!(event.revision, start + 12);
    assert_eq!(event.room.as_ref().unwrap().name, "behind-our-back");
}
