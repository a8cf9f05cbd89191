//! The in-memory hot layer stays exact: it never answers with a row older
//! than a commit its process knows of, whether the write was its own or
//! another replica's.

mod common;

use std::time::Duration;

use common::{TestDb, TestServer, emulator, proto, room, serve_config};
use ivschat_rooms::domain::{EventSource, RoomArn, Timestamp};
use ivschat_rooms::feed::{Feed, FeedSettings};
use ivschat_rooms::hot::HotRooms;
use ivschat_rooms::store::Store;
use proto::watch_rooms_response::Kind;
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(30);

const ROOM: &str = "hotRoom00001";

/// The layer's rules, driven directly: a commit not yet applied hides every
/// entry, an applied event drops the room's (and leaves its row as the last
/// known, exactly the store's), and a row read before the last applied event
/// is not taken in.
async fn memory_never_serves_past_a_known_commit(db: TestDb) {
    let store = Store::open(&db.url).await.unwrap();
    let v1 = room(ROOM, 10, "v1");
    let arn = RoomArn::parse("arn", &v1.arn).unwrap();
    store
        .put(&v1, Timestamp::now(), EventSource::Api)
        .await
        .unwrap();
    let hot = HotRooms::load(&store, 100).await.unwrap();
    assert_eq!(hot.get(&arn).expect("loaded at startup").room, v1);

    // A commit of this process the layer has not applied yet.
    store
        .put(&room(ROOM, 20, "v2"), Timestamp::now(), EventSource::Api)
        .await
        .unwrap();
    assert!(hot.get(&arn).is_none(), "a known commit not yet applied");

    let feed = Feed::start(store.clone(), FeedSettings::default(), hot.clone())
        .await
        .unwrap();
    let (row, as_of) = store.get_at_revision(&arn).await.unwrap();
    let row = row.unwrap();
    tokio::time::timeout(PATIENCE, feed.caught_up(as_of))
        .await
        .unwrap();
    assert!(hot.get(&arn).is_none(), "the event dropped the entry");
    assert_eq!(
        **hot.last_known(&arn).expect("the event's row is known"),
        row,
        "the last known row is the store's, confirmation included"
    );
    hot.fill(&arn, row, as_of);
    assert_eq!(hot.get(&arn).unwrap().room.name, "v2");

    // A slow reader's row, read before the next change was applied.
    let (old_row, old_as_of) = store.get_at_revision(&arn).await.unwrap();
    store
        .put(&room(ROOM, 30, "v3"), Timestamp::now(), EventSource::Api)
        .await
        .unwrap();
    let newest = store.revision().await.unwrap();
    tokio::time::timeout(PATIENCE, feed.caught_up(newest))
        .await
        .unwrap();
    hot.fill(&arn, old_row.unwrap(), old_as_of);
    assert!(hot.get(&arn).is_none(), "a row older than an applied event");
    let (row, as_of) = store.get_at_revision(&arn).await.unwrap();
    hot.fill(&arn, row.unwrap(), as_of);
    assert_eq!(hot.get(&arn).unwrap().room.name, "v3");

    // Deleting drops it too, and the tombstone read back answers as such.
    store
        .mark_deleted(&arn, Timestamp::now(), EventSource::Api)
        .await
        .unwrap();
    assert!(hot.get(&arn).is_none());
    let newest = store.revision().await.unwrap();
    tokio::time::timeout(PATIENCE, feed.caught_up(newest))
        .await
        .unwrap();
    let (row, as_of) = store.get_at_revision(&arn).await.unwrap();
    let known = hot.last_known(&arn).expect("the tombstone is known");
    assert!(known.deleted);
    assert_eq!(**known, *row.as_ref().unwrap());
    hot.fill(&arn, row.unwrap(), as_of);
    assert!(hot.get(&arn).unwrap().deleted);
    feed.stop().await;

    // A layer of capacity 0 holds nothing.
    let off = HotRooms::load(&store, 0).await.unwrap();
    let (row, as_of) = store.get_at_revision(&arn).await.unwrap();
    off.fill(&arn, row.unwrap(), as_of);
    assert!(off.get(&arn).is_none() && off.is_empty());
}

on_both_backends!(memory_never_serves_past_a_known_commit);

/// Two replicas on one Postgres: replica A serves a room from memory, replica
/// B changes it; as soon as A has the change (its watchers see it), A's
/// cached reads answer with the change, never the entry it outdated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_another_replica_reach_the_memory_layer() {
    let Some(db) = TestDb::postgres("writes_on_another_replica_reach_the_memory_layer").await
    else {
        return;
    };
    let (_emulator, url) = emulator().await;
    // No staleness bound to hide behind, no timer to re-read the log: only
    // B's notifications can tell A.
    let config = serve_config(
        &db.url,
        &url,
        &["--max-staleness", "1h", "--event-poll-interval", "1h"],
    );
    let mut a = TestServer::start(config.clone()).await;
    let mut b = TestServer::start(config).await;
    a.wait_listed().await;
    b.wait_listed().await;

    let room = a.create_room("first").await;
    let get = || proto::GetRoomRequest {
        identifier: room.arn.clone(),
        consistency: proto::ReadConsistency::Cached as i32,
    };
    for _ in 0..2 {
        let hit = a.client.get_room(get()).await.unwrap();
        assert_eq!(hit.metadata().get("x-cache").unwrap(), "hit");
        assert_eq!(hit.into_inner().name, "first");
    }
    let mut watch = a
        .client
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let mut next_event = async || loop {
        let message = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        if let Some(Kind::Event(event)) = message.kind {
            return event;
        }
    };

    b.client
        .update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            name: Some("second".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next_event().await.room.unwrap().name, "second");
    let read = a.client.get_room(get()).await.unwrap();
    assert_eq!(read.metadata().get("x-cache").unwrap(), "hit");
    assert_eq!(read.into_inner().name, "second");

    b.client
        .tag_room(proto::TagRoomRequest {
            identifier: room.arn.clone(),
            tags: [("team".to_owned(), "chat".to_owned())].into(),
        })
        .await
        .unwrap();
    next_event().await;
    let read = a.client.get_room(get()).await.unwrap().into_inner();
    assert_eq!(read.tags.get("team").map(String::as_str), Some("chat"));

    b.client
        .delete_room(proto::DeleteRoomRequest {
            identifier: room.arn.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    next_event().await;
    let err = a.client.get_room(get()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}
