//! The persistent room cache, `ivschat_rooms::store::Store`, on SQLite and on
//! Postgres: what it stores and gives back, the update-time rule, tombstones,
//! listing, confirmation, cache state, reopening and concurrent writers.

// `common` also serves the server tests: what this file leaves unused is fine.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ivschat_rooms::domain::{
    Error, EventSource, FallbackResult, ListQuery, MessageReviewHandler, Room, RoomArn, Timestamp,
};
use ivschat_rooms::store::{CachedRoom, Store};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

const ARN_PREFIX: &str = "arn:aws:ivschat:us-east-1:123456789012";
const LAMBDA: &str = "arn:aws:lambda:us-east-1:123456789012:function:review";
/// `LAMBDA` is a prefix of it.
const LAMBDA_LONGER: &str = "arn:aws:lambda:us-east-1:123456789012:function:review2";

const API: EventSource = EventSource::Api;

fn ts(nanos: i64) -> Timestamp {
    Timestamp::from_nanos(nanos)
}

fn room_arn(id: &str) -> String {
    format!("{ARN_PREFIX}:room/{id}")
}

fn arn(id: &str) -> RoomArn {
    RoomArn::parse("arn", &room_arn(id)).expect("a valid room ARN")
}

fn log_arn(id: &str) -> String {
    format!("{ARN_PREFIX}:logging-configuration/{id}")
}

/// A plain room: no handler, no tags, no logging.
fn room(id: &str, update_nanos: i64) -> Room {
    Room {
        arn: room_arn(id),
        id: id.to_owned(),
        name: format!("room-{id}"),
        create_time: ts(1_600_000_000_000_000_000),
        update_time: ts(update_nanos),
        maximum_message_rate_per_second: Room::DEFAULT_MAXIMUM_MESSAGE_RATE_PER_SECOND,
        maximum_message_length: Room::DEFAULT_MAXIMUM_MESSAGE_LENGTH,
        message_review_handler: None,
        tags: BTreeMap::new(),
        logging_configuration_identifiers: Vec::new(),
        details_pending: false,
    }
}

fn with_tags(mut room: Room, tags: &[(&str, &str)]) -> Room {
    room.tags = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    room
}

fn with_handler(mut room: Room, uri: &str, fallback_result: FallbackResult) -> Room {
    room.message_review_handler = Some(MessageReviewHandler {
        uri: uri.to_owned(),
        fallback_result,
    });
    room
}

fn with_logging(mut room: Room, ids: &[&str]) -> Room {
    room.logging_configuration_identifiers = ids.iter().map(|id| log_arn(id)).collect();
    room
}

fn live(room: &Room, validated_at: i64) -> CachedRoom {
    CachedRoom {
        room: room.clone(),
        validated_at: ts(validated_at),
        deleted: false,
    }
}

async fn open(db: &common::TestDb) -> Store {
    Store::open(&db.url).await.unwrap()
}

async fn get(store: &Store, id: &str) -> Option<CachedRoom> {
    store.get(&arn(id)).await.unwrap()
}

/// Every page of `query` from the first on, asserting each page's size.
async fn all_pages(store: &Store, mut query: ListQuery) -> Vec<Vec<Room>> {
    let mut pages = Vec::new();
    loop {
        let page = store.list(&query, &[]).await.unwrap().0;
        assert!(
            page.rooms.len() <= query.limit(),
            "a page of {} rooms when at most {} were asked for",
            page.rooms.len(),
            query.limit()
        );
        pages.push(page.rooms);
        match page.next_token {
            Some(token) => {
                assert!(pages.len() <= 1_000, "the listing does not end: {pages:?}");
                query.next_token = Some(token);
            }
            None => return pages,
        }
    }
}

/// The ARNs of every room `query` lists, over all pages.
async fn listed_arns(store: &Store, query: ListQuery) -> Vec<String> {
    all_pages(store, query)
        .await
        .into_iter()
        .flatten()
        .map(|r| r.arn)
        .collect()
}

/// `put` stores a new room and returns it as stored; `get` gives back every
/// field as it was put: tags (unicode included), logging identifiers in their
/// order, a handler with a DENY fallback, no handler as `None`, extreme limits.
async fn put_then_get_round_trips_every_field(db: common::TestDb) {
    let store = open(&db).await;
    let full = with_logging(
        with_handler(
            with_tags(
                Room {
                    name: "Salle de réunion — 会议室 🎉".to_owned(),
                    create_time: ts(1_700_000_000_123_456_789),
                    maximum_message_rate_per_second: 100,
                    maximum_message_length: 10_000,
                    ..room("abcdEFGH1234", 1_700_000_001_987_654_321)
                },
                &[
                    ("team", "chat"),
                    ("ключ", "значение"),
                    ("emoji", "🦀 crab"),
                    ("empty", ""),
                ],
            ),
            LAMBDA,
            FallbackResult::Deny,
        ),
        &["zzzz9999", "aaaa0000"],
    );
    let bare = room("plainRoom0001", 5);
    let allowing = with_handler(
        room("allowRoom0001", 6),
        LAMBDA_LONGER,
        FallbackResult::Allow,
    );

    let validated = 1_700_000_002_000_000_001;
    assert_eq!(
        store.put(&full, ts(validated), API).await.unwrap(),
        live(&full, validated)
    );
    assert_eq!(store.put(&bare, ts(7), API).await.unwrap(), live(&bare, 7));
    assert_eq!(
        store.put(&allowing, ts(8), API).await.unwrap(),
        live(&allowing, 8)
    );

    let got = get(&store, "abcdEFGH1234")
        .await
        .expect("the room is cached");
    assert_eq!(got, live(&full, validated));
    let handler = got.room.message_review_handler.expect("a handler");
    assert_eq!(handler.fallback_result, FallbackResult::Deny);
    assert_eq!(got.room.tags["ключ"], "значение");
    assert_eq!(
        got.room.logging_configuration_identifiers,
        [log_arn("zzzz9999"), log_arn("aaaa0000")]
    );

    let got_bare = get(&store, "plainRoom0001")
        .await
        .expect("the room is cached");
    assert_eq!(got_bare, live(&bare, 7));
    assert_eq!(got_bare.room.message_review_handler, None);
    assert!(got_bare.room.tags.is_empty());
    assert!(got_bare.room.logging_configuration_identifiers.is_empty());

    assert_eq!(get(&store, "allowRoom0001").await, Some(live(&allowing, 8)));
    assert_eq!(get(&store, "neverStored1").await, None);
}

/// A version with a newer `update_time` replaces the cached one, content and
/// `validated_at` alike.
async fn newer_update_time_replaces(db: common::TestDb) {
    let store = open(&db).await;
    let old = with_tags(room("upd1", 100), &[("v", "1")]);
    store.put(&old, ts(1_000), API).await.unwrap();

    let new = with_logging(
        with_handler(
            with_tags(
                Room {
                    name: "renamed".to_owned(),
                    maximum_message_length: 42,
                    ..room("upd1", 101)
                },
                &[("v", "2")],
            ),
            LAMBDA,
            FallbackResult::Deny,
        ),
        &["log1"],
    );
    assert_eq!(
        store.put(&new, ts(900), API).await.unwrap(),
        live(&new, 900)
    );
    assert_eq!(get(&store, "upd1").await, Some(live(&new, 900)));

    // And back to no handler, no tags, no logging with a yet newer version.
    let newest = room("upd1", 102);
    assert_eq!(
        store.put(&newest, ts(901), API).await.unwrap(),
        live(&newest, 901)
    );
    assert_eq!(get(&store, "upd1").await, Some(live(&newest, 901)));
}

/// A version with an older `update_time` is refused: `put` answers with the
/// newer row the cache keeps, whose `validated_at` does not move.
async fn older_update_time_is_refused(db: common::TestDb) {
    let store = open(&db).await;
    let newer = with_tags(
        Room {
            name: "newer".to_owned(),
            ..room("old1", 200)
        },
        &[("v", "new")],
    );
    store.put(&newer, ts(1_000), API).await.unwrap();

    let older = with_handler(
        with_tags(
            Room {
                name: "older".to_owned(),
                ..room("old1", 199)
            },
            &[("v", "old")],
        ),
        LAMBDA,
        FallbackResult::Allow,
    );
    assert_eq!(
        store.put(&older, ts(2_000), API).await.unwrap(),
        live(&newer, 1_000)
    );
    assert_eq!(get(&store, "old1").await, Some(live(&newer, 1_000)));
}

/// An equal `update_time` with different content replaces (TagResource does
/// not move `updateTime`): tags, handler and logging identifiers alike.
async fn equal_update_time_with_different_content_replaces(db: common::TestDb) {
    let store = open(&db).await;
    let first = with_tags(room("eq1", 300), &[("a", "1")]);
    store.put(&first, ts(1_000), API).await.unwrap();

    let retagged = with_tags(room("eq1", 300), &[("a", "1"), ("b", "2")]);
    assert_eq!(
        store.put(&retagged, ts(1_100), API).await.unwrap(),
        live(&retagged, 1_100)
    );
    assert_eq!(get(&store, "eq1").await, Some(live(&retagged, 1_100)));

    let untagged = room("eq1", 300);
    assert_eq!(
        store.put(&untagged, ts(1_200), API).await.unwrap(),
        live(&untagged, 1_200)
    );
    assert_eq!(get(&store, "eq1").await, Some(live(&untagged, 1_200)));

    let other = with_logging(
        with_handler(room("eq1", 300), LAMBDA, FallbackResult::Deny),
        &["log1"],
    );
    assert_eq!(
        store.put(&other, ts(1_300), API).await.unwrap(),
        live(&other, 1_300)
    );
    assert_eq!(get(&store, "eq1").await, Some(live(&other, 1_300)));

    // Different content observed by a call that started earlier loses: it is
    // the older view of the same version.
    let stale = with_tags(room("eq1", 300), &[("stale", "1")]);
    assert_eq!(
        store.put(&stale, ts(1_250), API).await.unwrap(),
        live(&other, 1_300)
    );
}

/// An equal `update_time` with the same content keeps the content and moves
/// `validated_at` forward to the newer confirmation, never back.
async fn equal_update_time_same_content_moves_validated_at(db: common::TestDb) {
    let store = open(&db).await;
    let r = with_logging(
        with_handler(
            with_tags(room("same1", 400), &[("k", "v")]),
            LAMBDA,
            FallbackResult::Deny,
        ),
        &["log1", "log2"],
    );
    store.put(&r, ts(1_000), API).await.unwrap();
    assert_eq!(
        store.put(&r, ts(5_000), API).await.unwrap(),
        live(&r, 5_000)
    );
    assert_eq!(get(&store, "same1").await, Some(live(&r, 5_000)));
    // A confirmation that was asked for earlier but answered later never
    // moves validated_at back.
    assert_eq!(
        store.put(&r, ts(3_000), API).await.unwrap(),
        live(&r, 5_000)
    );
}

/// `mark_deleted` leaves a tombstone: `get` says deleted; an answer to a call
/// that started before the deletion was recorded never brings the room back,
/// whatever its version; one to a call that started after it does.
async fn tombstone_holds_against_earlier_calls(db: common::TestDb) {
    let store = open(&db).await;
    let r = with_tags(room("del1", 500), &[("k", "v")]);
    store.put(&r, ts(1_000), API).await.unwrap();

    store
        .mark_deleted(&arn("del1"), ts(2_000), API)
        .await
        .unwrap();
    let tombstone = CachedRoom {
        room: r.clone(),
        validated_at: ts(2_000),
        deleted: true,
    };
    assert_eq!(get(&store, "del1").await, Some(tombstone.clone()));

    // Slow answers to calls that started before the deletion was recorded:
    // the same version, changed tags, older, or even newer (an UpdateRoom on
    // another replica that IVS Chat applied before the delete).
    assert_eq!(store.put(&r, ts(1_900), API).await.unwrap(), tombstone);
    let retagged = with_tags(room("del1", 500), &[("k", "other")]);
    assert_eq!(
        store.put(&retagged, ts(1_901), API).await.unwrap(),
        tombstone
    );
    let older = room("del1", 499);
    assert_eq!(store.put(&older, ts(1_902), API).await.unwrap(), tombstone);
    let newer = room("del1", 501);
    assert_eq!(store.put(&newer, ts(2_000), API).await.unwrap(), tombstone);
    assert_eq!(get(&store, "del1").await, Some(tombstone));

    // A call that started after the deletion and still found the room: the
    // deletion was wrong (or IVS Chat was not yet consistent), the room is back.
    assert_eq!(
        store.put(&newer, ts(4_000), API).await.unwrap(),
        live(&newer, 4_000)
    );
    assert_eq!(get(&store, "del1").await, Some(live(&newer, 4_000)));

    // A deletion recorded before the last confirmation does not apply.
    store
        .mark_deleted(&arn("del1"), ts(3_000), API)
        .await
        .unwrap();
    assert_eq!(get(&store, "del1").await, Some(live(&newer, 4_000)));
}

/// `mark_deleted` of a room the cache never held leaves a tombstone too, so a
/// slow answer from another replica cannot bring it in; other rooms are left
/// alone, and the tombstone is never listed.
async fn mark_deleted_of_unknown_room_leaves_a_tombstone(db: common::TestDb) {
    let store = open(&db).await;
    let other = room("kept1", 600);
    store.put(&other, ts(10), API).await.unwrap();

    store
        .mark_deleted(&arn("neverSeen1"), ts(20), API)
        .await
        .unwrap();
    let tombstone = get(&store, "neverSeen1").await.expect("a tombstone");
    assert!(tombstone.deleted);
    assert_eq!(tombstone.validated_at, ts(20));
    assert_eq!(get(&store, "kept1").await, Some(live(&other, 10)));
    let listed = store.list(&ListQuery::default(), &[]).await.unwrap().0;
    assert_eq!(listed.rooms, [other]);

    let slow = room("neverSeen1", 1);
    assert!(store.put(&slow, ts(15), API).await.unwrap().deleted);
    assert_eq!(
        store.put(&slow, ts(30), API).await.unwrap(),
        live(&slow, 30)
    );
}

/// A room put in from a listing (its details pending) never replaces the
/// same version read whole, even by a later call; the version read whole
/// replaces it (logged as a change of the limits); it fills an empty row
/// or an older tombstone, and lists and round-trips as pending; and
/// `rooms_pending_details` names the live pending rooms of a region only.
async fn pending_details_never_replace_a_room_read_whole(db: common::TestDb) {
    let store = open(&db).await;
    let pending = |room: &Room| Room {
        maximum_message_rate_per_second: 0,
        maximum_message_length: 0,
        details_pending: true,
        ..room.clone()
    };
    // Read whole first: a listing that started later keeps it whole.
    let whole = room("whole1", 500);
    store.put(&whole, ts(10), API).await.unwrap();
    let kept = store
        .put(&pending(&whole), ts(20), EventSource::Reconciler)
        .await
        .unwrap();
    assert_eq!(kept, live(&whole, 10));
    // Listed first: stored as pending, listed as pending, and queued.
    let listed = room("listed1", 500);
    assert_eq!(
        store
            .put(&pending(&listed), ts(20), EventSource::Reconciler)
            .await
            .unwrap(),
        live(&pending(&listed), 20)
    );
    assert_eq!(
        get(&store, "listed1").await,
        Some(live(&pending(&listed), 20))
    );
    let page = store.list(&ListQuery::default(), &[]).await.unwrap().0;
    assert!(page.rooms.contains(&pending(&listed)));
    assert_eq!(
        store.rooms_pending_details("us-east-1", 10).await.unwrap(),
        [arn("listed1")]
    );
    assert!(
        store
            .rooms_pending_details("eu-west-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The same version read whole by a later call completes it, as an event
    // naming the limits and the flag.
    let revision = store.revision().await.unwrap();
    assert_eq!(
        store
            .put(&listed, ts(30), EventSource::Reconciler)
            .await
            .unwrap(),
        live(&listed, 30)
    );
    let events = store.events_after(revision, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].changed_fields,
        [
            "maximum_message_rate_per_second",
            "maximum_message_length",
            "details_pending"
        ]
    );
    assert!(events[0].previous.as_ref().unwrap().details_pending);
    assert!(!events[0].room.details_pending);
    assert!(
        store
            .rooms_pending_details("us-east-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A tombstone older than the listing gives way to it; a newer one holds.
    store
        .mark_deleted(&arn("gone1"), ts(40), API)
        .await
        .unwrap();
    let gone = room("gone1", 500);
    assert!(
        store
            .put(&pending(&gone), ts(35), EventSource::Reconciler)
            .await
            .unwrap()
            .deleted
    );
    assert_eq!(
        store
            .put(&pending(&gone), ts(45), EventSource::Reconciler)
            .await
            .unwrap(),
        live(&pending(&gone), 45)
    );
    // A pending tombstone's room is no longer queued.
    store
        .mark_deleted(&arn("gone1"), ts(50), API)
        .await
        .unwrap();
    assert!(
        store
            .rooms_pending_details("us-east-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// `list` shows only live rooms, newest `update_time` first, equal
/// `update_time`s ordered by ARN.
async fn list_is_live_rooms_newest_first(db: common::TestDb) {
    let store = open(&db).await;
    let rooms = [
        room("b1", 10),
        room("a1", 30),
        room("c1", 20),
        room("tieC", 25),
        room("tieA", 25),
        room("tieB", 25),
        room("gone1", 40),
        room("gone2", 25),
    ];
    for r in &rooms {
        store.put(r, ts(1), API).await.unwrap();
    }
    store.mark_deleted(&arn("gone1"), ts(2), API).await.unwrap();
    store.mark_deleted(&arn("gone2"), ts(2), API).await.unwrap();

    let page = store.list(&ListQuery::default(), &[]).await.unwrap().0;
    assert_eq!(page.next_token, None);
    let ids: Vec<&str> = page.rooms.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a1", "tieA", "tieB", "tieC", "c1", "b1"]);
    // Whole rooms, as stored.
    assert_eq!(page.rooms[0], rooms[1]);

    // A deleted room brought back by a newer version is listed again.
    store.put(&room("gone1", 41), ts(3), API).await.unwrap();
    let page = store.list(&ListQuery::default(), &[]).await.unwrap().0;
    assert_eq!(page.rooms[0], room("gone1", 41));
    assert_eq!(page.rooms.len(), 7);
}

/// Paging with `max_results` visits every live room exactly once, in the
/// order of one unpaged listing, and only the last page has no `next_token`
/// (also when the rooms fill the last page exactly).
async fn list_pages_visit_every_room_once(db: common::TestDb) {
    let store = open(&db).await;
    let mut expected: Vec<(i64, String)> = Vec::new();
    // 12 live rooms, in groups sharing an update_time so that pages split ties.
    for i in 0..14_i64 {
        let id = format!("page{:02}", (i * 5) % 14);
        let r = room(&id, 1_000 + i / 3);
        store.put(&r, ts(1), API).await.unwrap();
        if i % 5 == 4 {
            store.mark_deleted(&r.arn(), ts(2), API).await.unwrap();
        } else {
            expected.push((r.update_time.as_nanos(), r.arn));
        }
    }
    assert_eq!(expected.len(), 12);
    expected.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let expected: Vec<String> = expected.into_iter().map(|(_, arn)| arn).collect();

    assert_eq!(listed_arns(&store, ListQuery::default()).await, expected);
    for max in [1, 2, 3, 4, 5, 6, 11, 12, 13, 100] {
        let query = ListQuery {
            max_results: Some(max),
            ..ListQuery::default()
        };
        let pages = all_pages(&store, query).await;
        let max = usize::try_from(max).unwrap();
        assert_eq!(pages.len(), expected.len().div_ceil(max), "pages of {max}");
        for page in &pages[..pages.len() - 1] {
            assert_eq!(page.len(), max, "a page that is not the last is full");
        }
        let arns: Vec<String> = pages.into_iter().flatten().map(|r| r.arn).collect();
        assert_eq!(arns, expected, "pages of {max}");
    }
}

/// The `name` filter lists exactly the live rooms of that name (case
/// included; an empty name the unnamed rooms), and pages within the filter.
async fn list_filters_by_name(db: common::TestDb) {
    let store = open(&db).await;
    let named = |id: &str, t: i64, name: &str| Room {
        name: name.to_owned(),
        ..room(id, t)
    };
    for r in [
        named("n1", 10, "lobby"),
        named("n2", 30, "lobby"),
        named("n3", 20, "lobby-2"),
        named("n4", 40, "Lobby"),
        named("n5", 50, "lobb"),
        named("n6", 60, "lobby"),
        named("n7", 70, ""),
    ] {
        store.put(&r, ts(1), API).await.unwrap();
    }
    store.mark_deleted(&arn("n6"), ts(2), API).await.unwrap();

    let query = ListQuery {
        name: Some("lobby".to_owned()),
        max_results: Some(1),
        ..ListQuery::default()
    };
    assert_eq!(
        listed_arns(&store, query).await,
        [room_arn("n2"), room_arn("n1")]
    );
    let none = ListQuery {
        name: Some("nobody".to_owned()),
        ..ListQuery::default()
    };
    assert_eq!(store.list(&none, &[]).await.unwrap().0.rooms, []);
    // `Some("")` is the rooms without a name, not every room.
    let unnamed = ListQuery {
        name: Some(String::new()),
        ..ListQuery::default()
    };
    assert_eq!(listed_arns(&store, unnamed).await, [room_arn("n7")]);
}

/// The `message_review_handler_uri` filter is an exact match: a URI that is a
/// prefix of another does not match it, and rooms without a handler are left
/// out; an empty URI lists exactly the rooms without a handler.
async fn list_filters_by_review_handler_uri(db: common::TestDb) {
    let store = open(&db).await;
    for r in [
        with_handler(room("h1", 10), LAMBDA, FallbackResult::Allow),
        with_handler(room("h2", 20), LAMBDA_LONGER, FallbackResult::Allow),
        with_handler(room("h3", 30), LAMBDA, FallbackResult::Deny),
        room("h4", 40),
        with_handler(room("h5", 50), LAMBDA, FallbackResult::Deny),
    ] {
        store.put(&r, ts(1), API).await.unwrap();
    }
    store.mark_deleted(&arn("h5"), ts(2), API).await.unwrap();

    let by_uri = |uri: &str| ListQuery {
        message_review_handler_uri: Some(uri.to_owned()),
        ..ListQuery::default()
    };
    assert_eq!(
        listed_arns(&store, by_uri(LAMBDA)).await,
        [room_arn("h3"), room_arn("h1")]
    );
    assert_eq!(
        listed_arns(&store, by_uri(LAMBDA_LONGER)).await,
        [room_arn("h2")]
    );
    assert_eq!(
        listed_arns(
            &store,
            by_uri("arn:aws:lambda:us-east-1:123456789012:function:rev")
        )
        .await,
        Vec::<String>::new()
    );
    // `Some("")` is the rooms without a handler.
    assert_eq!(listed_arns(&store, by_uri("")).await, [room_arn("h4")]);
}

/// The `logging_configuration_identifier` filter is membership in a room's
/// list: at any position, never by prefix (an identifier that is a prefix of
/// another) nor by a case-insensitive match.
async fn list_filters_by_logging_configuration_identifier(db: common::TestDb) {
    let store = open(&db).await;
    for r in [
        with_logging(room("l1", 10), &["abcd"]),
        with_logging(room("l2", 20), &["abcdEFGH1234"]),
        with_logging(room("l3", 30), &["zzzz", "abcd"]),
        with_logging(room("l4", 40), &["ABCD"]),
        with_logging(room("l5", 50), &["abc", "abcde", "xabcd"]),
        room("l6", 60),
        with_logging(room("l7", 70), &["abcd"]),
    ] {
        store.put(&r, ts(1), API).await.unwrap();
    }
    store.mark_deleted(&arn("l7"), ts(2), API).await.unwrap();

    let by_log = |id: &str| ListQuery {
        logging_configuration_identifier: Some(log_arn(id)),
        ..ListQuery::default()
    };
    assert_eq!(
        listed_arns(&store, by_log("abcd")).await,
        [room_arn("l3"), room_arn("l1")]
    );
    assert_eq!(
        listed_arns(&store, by_log("abcdEFGH1234")).await,
        [room_arn("l2")]
    );
    assert_eq!(listed_arns(&store, by_log("ABCD")).await, [room_arn("l4")]);
    assert_eq!(listed_arns(&store, by_log("zzzz")).await, [room_arn("l3")]);
    assert_eq!(
        listed_arns(&store, by_log("abcdE")).await,
        Vec::<String>::new()
    );
    assert_eq!(
        listed_arns(&store, by_log("bcd")).await,
        Vec::<String>::new()
    );

    // Filters combine.
    let both = ListQuery {
        name: Some("room-l1".to_owned()),
        ..by_log("abcd")
    };
    assert_eq!(listed_arns(&store, both).await, [room_arn("l1")]);
}

/// A `next_token` this store did not issue is INVALID_ARGUMENT naming
/// `nextToken`; an empty one means the first page.
async fn list_rejects_an_invalid_next_token(db: common::TestDb) {
    use base64::Engine as _;
    let store = open(&db).await;
    store.put(&room("tok1", 1), ts(1), API).await.unwrap();

    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    for token in [
        "not a token!".to_owned(),
        "====".to_owned(),
        b64("no colon here"),
        b64("twelve:key").replace('d', "*"),
        b64("notanumber:arn"),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xff, 0xfe, b':', b'1']),
    ] {
        let query = ListQuery {
            next_token: Some(token.clone()),
            ..ListQuery::default()
        };
        match store.list(&query, &[]).await {
            Err(Error::InvalidArgument(violations)) => {
                assert_eq!(violations.len(), 1, "{token:?}: {violations:?}");
                assert_eq!(violations[0].field, "nextToken", "{token:?}");
            }
            other => panic!("next_token {token:?} gave {other:?}"),
        }
    }

    let empty = ListQuery {
        next_token: Some(String::new()),
        ..ListQuery::default()
    };
    assert_eq!(
        store.list(&empty, &[]).await.unwrap().0.rooms,
        [room("tok1", 1)]
    );
}

/// `live_rooms_unconfirmed_since(t)` is the live rooms with `validated_at`
/// strictly before `t`: not tombstones, not rooms confirmed at or after `t`.
async fn live_rooms_unconfirmed_since_lists_stale_live_rooms(db: common::TestDb) {
    let store = open(&db).await;
    store.put(&room("s1", 1), ts(100), API).await.unwrap();
    store.put(&room("s2", 1), ts(199), API).await.unwrap();
    store.put(&room("s3", 1), ts(200), API).await.unwrap();
    store.put(&room("s4", 1), ts(300), API).await.unwrap();
    store.put(&room("s5", 1), ts(50), API).await.unwrap();
    store.mark_deleted(&arn("s5"), ts(60), API).await.unwrap();
    // Another region's room: its own listings confirm it.
    let mut elsewhere = room("s6", 1);
    elsewhere.arn = elsewhere.arn.replace(":us-east-1:", ":eu-west-1:");
    store.put(&elsewhere, ts(100), API).await.unwrap();

    let unconfirmed = |t: i64| {
        let store = store.clone();
        async move {
            store
                .live_rooms_unconfirmed_since("us-east-1", ts(t))
                .await
                .unwrap()
                .into_iter()
                .collect::<BTreeSet<RoomArn>>()
        }
    };
    assert_eq!(
        unconfirmed(200).await,
        BTreeSet::from([arn("s1"), arn("s2")])
    );
    assert_eq!(unconfirmed(100).await, BTreeSet::new());
    assert_eq!(
        unconfirmed(1_000).await,
        BTreeSet::from([arn("s1"), arn("s2"), arn("s3"), arn("s4")])
    );

    store.confirm(&arn("s1"), ts(1), ts(250)).await.unwrap();
    assert_eq!(unconfirmed(200).await, BTreeSet::from([arn("s2")]));
}

/// `confirm` moves `validated_at` (forward) only when the cached version has
/// that `update_time` and is live; it changes nothing else and creates nothing.
async fn confirm_moves_validated_at_of_the_matching_live_version(db: common::TestDb) {
    let store = open(&db).await;
    let r = with_tags(room("c1", 700), &[("k", "v")]);
    store.put(&r, ts(1_000), API).await.unwrap();

    // Another version than the cached one: nothing moves.
    store.confirm(&arn("c1"), ts(699), ts(2_000)).await.unwrap();
    store.confirm(&arn("c1"), ts(701), ts(2_000)).await.unwrap();
    assert_eq!(get(&store, "c1").await, Some(live(&r, 1_000)));

    store.confirm(&arn("c1"), ts(700), ts(2_000)).await.unwrap();
    assert_eq!(get(&store, "c1").await, Some(live(&r, 2_000)));

    // A confirmation older than the last one does not move it back.
    store.confirm(&arn("c1"), ts(700), ts(1_500)).await.unwrap();
    assert_eq!(get(&store, "c1").await, Some(live(&r, 2_000)));

    // A tombstone is not confirmed: it stays deleted at its time.
    store
        .mark_deleted(&arn("c1"), ts(3_000), API)
        .await
        .unwrap();
    store.confirm(&arn("c1"), ts(700), ts(4_000)).await.unwrap();
    assert_eq!(
        get(&store, "c1").await,
        Some(CachedRoom {
            room: r,
            validated_at: ts(3_000),
            deleted: true,
        })
    );

    store.confirm(&arn("c2"), ts(700), ts(4_000)).await.unwrap();
    assert_eq!(get(&store, "c2").await, None);

    // Many at once (a listing's page): each by the same rule.
    let (m1, m2) = (room("m1", 10), room("m2", 20));
    store.put(&m1, ts(100), API).await.unwrap();
    store.put(&m2, ts(100), API).await.unwrap();
    store
        .confirm_many(
            &[
                (arn("m1"), ts(10)),
                (arn("m2"), ts(19)),
                (arn("c2"), ts(700)),
            ],
            ts(500),
        )
        .await
        .unwrap();
    assert_eq!(get(&store, "m1").await.unwrap().validated_at, ts(500));
    assert_eq!(
        get(&store, "m2").await.unwrap().validated_at,
        ts(100),
        "another version than the cached one: not confirmed"
    );
    assert_eq!(get(&store, "c2").await, None, "nothing created");
}

/// `list` with regions lists only the rooms whose ARNs are in them, merged
/// newest first; without, every room.
async fn list_filters_by_region(db: common::TestDb) {
    let store = open(&db).await;
    let in_region = |id: &str, update: i64, region: &str| {
        let mut r = room(id, update);
        r.arn = r.arn.replace(":us-east-1:", &format!(":{region}:"));
        r
    };
    let east = in_region("e1", 3, "us-east-1");
    let west = in_region("w1", 2, "eu-west-1");
    let south = in_region("s1", 1, "ap-south-1");
    for r in [&east, &west, &south] {
        store.put(r, ts(10), API).await.unwrap();
    }
    let arns = |regions: &'static [&'static str]| {
        let store = store.clone();
        async move {
            let page = store.list(&ListQuery::default(), regions).await.unwrap().0;
            page.rooms.into_iter().map(|r| r.arn).collect::<Vec<_>>()
        }
    };
    assert_eq!(arns(&["us-east-1"]).await, [east.arn.as_str()]);
    assert_eq!(
        arns(&["us-east-1", "eu-west-1"]).await,
        [east.arn.clone(), west.arn.clone()]
    );
    assert_eq!(arns(&[]).await, [east.arn, west.arn, south.arn]);
    assert_eq!(arns(&["eu-north-1"]).await, Vec::<String>::new());
}

/// `full_listing_at` is `None` on a fresh store; `set_full_listing_at`
/// overwrites it and persists across a reopen of the same database.
async fn full_listing_at_persists_across_reopen(db: common::TestDb) {
    let store = open(&db).await;
    assert_eq!(store.full_listing_at("us-east-1").await.unwrap(), None);

    store
        .set_full_listing_at("us-east-1", ts(1_700_000_000_000_000_001))
        .await
        .unwrap();
    assert_eq!(
        store.full_listing_at("us-east-1").await.unwrap(),
        Some(ts(1_700_000_000_000_000_001))
    );
    store
        .set_full_listing_at("us-east-1", ts(1_700_000_000_000_000_002))
        .await
        .unwrap();
    assert_eq!(
        store.full_listing_at("us-east-1").await.unwrap(),
        Some(ts(1_700_000_000_000_000_002))
    );
    // Each region's listing is its own.
    assert_eq!(store.full_listing_at("eu-west-1").await.unwrap(), None);
    store.close().await;

    let reopened = open(&db).await;
    assert_eq!(
        reopened.full_listing_at("us-east-1").await.unwrap(),
        Some(ts(1_700_000_000_000_000_002))
    );
}

/// Opening a database whose migrations were already applied works and keeps
/// its rows: live rooms, tombstones and the listing order.
async fn reopening_keeps_rooms(db: common::TestDb) {
    let store = open(&db).await;
    let kept = with_logging(
        with_handler(
            with_tags(room("keep1", 20), &[("é", "ü")]),
            LAMBDA,
            FallbackResult::Deny,
        ),
        &["log1"],
    );
    let other = room("keep2", 10);
    store.put(&kept, ts(100), API).await.unwrap();
    store.put(&other, ts(101), API).await.unwrap();
    store.put(&room("gone1", 30), ts(102), API).await.unwrap();
    store
        .mark_deleted(&arn("gone1"), ts(103), API)
        .await
        .unwrap();
    store.close().await;

    let reopened = open(&db).await;
    // Opened a third time while the second is still open.
    let third = open(&db).await;
    assert_eq!(get(&reopened, "keep1").await, Some(live(&kept, 100)));
    assert_eq!(get(&third, "keep2").await, Some(live(&other, 101)));
    assert!(
        get(&reopened, "gone1")
            .await
            .expect("the tombstone")
            .deleted
    );
    assert_eq!(
        reopened
            .list(&ListQuery::default(), &[])
            .await
            .unwrap()
            .0
            .rooms,
        [kept.clone(), other]
    );

    // And the update-time rule still holds on the reopened store.
    assert_eq!(
        reopened
            .put(&room("keep1", 19), ts(200), API)
            .await
            .unwrap(),
        live(&kept, 100)
    );
}

/// 50 concurrent `put`s of versions of one room, in random order, leave
/// exactly the newest version; each `put` answers with its own version or a
/// newer one.
async fn concurrent_puts_keep_the_newest(db: common::TestDb) {
    let store = open(&db).await;
    let seed: u64 = rand::rng().random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut versions: Vec<Room> = (0..50_i64)
        .map(|i| {
            with_tags(
                Room {
                    name: format!("version-{i}"),
                    ..room("race1", 1_000 + i * 7)
                },
                &[("version", &i.to_string())],
            )
        })
        .collect();
    let newest = versions.last().expect("50 versions").clone();
    versions.shuffle(&mut rng);

    let start = Arc::new(tokio::sync::Barrier::new(versions.len()));
    let tasks: Vec<_> = versions
        .into_iter()
        .map(|version| {
            let store = store.clone();
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                // validated_at follows update_time, as it would in real life.
                let validated_at = ts(version.update_time.as_nanos() * 10);
                let stored = store.put(&version, validated_at, API).await.unwrap();
                (version, stored)
            })
        })
        .collect();
    for task in tasks {
        let (version, stored) = task.await.unwrap();
        assert!(!stored.deleted, "seed {seed}");
        assert!(
            stored.room.update_time >= version.update_time,
            "seed {seed}: put of {} answered with the older {}",
            version.update_time.as_nanos(),
            stored.room.update_time.as_nanos()
        );
        assert_eq!(
            stored.room.tags["version"],
            stored.room.name.trim_start_matches("version-"),
            "seed {seed}: a row mixing two versions"
        );
    }

    let expected = live(&newest, newest.update_time.as_nanos() * 10);
    assert_eq!(get(&store, "race1").await, Some(expected), "seed {seed}");
    assert_eq!(
        store
            .list(&ListQuery::default(), &[])
            .await
            .unwrap()
            .0
            .rooms,
        [newest],
        "seed {seed}"
    );
}

on_both_backends!(
    list_filters_by_region,
    put_then_get_round_trips_every_field,
    newer_update_time_replaces,
    older_update_time_is_refused,
    equal_update_time_with_different_content_replaces,
    equal_update_time_same_content_moves_validated_at,
    tombstone_holds_against_earlier_calls,
    mark_deleted_of_unknown_room_leaves_a_tombstone,
    pending_details_never_replace_a_room_read_whole,
    list_is_live_rooms_newest_first,
    list_pages_visit_every_room_once,
    list_filters_by_name,
    list_filters_by_review_handler_uri,
    list_filters_by_logging_configuration_identifier,
    list_rejects_an_invalid_next_token,
    live_rooms_unconfirmed_since_lists_stale_live_rooms,
    confirm_moves_validated_at_of_the_matching_live_version,
    full_listing_at_persists_across_reopen,
    reopening_keeps_rooms,
    concurrent_puts_keep_the_newest,
);

/// A SQLite URL whose directory does not exist yet gets the directory (and the
/// file) created, and the store works there and on a reopen. SQLite only: a
/// Postgres database is not a path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_creates_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("cache.db");
    assert!(!dir.path().join("a").exists());
    let url = format!("sqlite://{}", path.display());

    let store = Store::open(&url).await.unwrap();
    assert!(path.is_file(), "{} was not created", path.display());
    let r = room("dir1", 1);
    assert_eq!(store.put(&r, ts(2), API).await.unwrap(), live(&r, 2));
    store.close().await;

    let reopened = Store::open(&url).await.unwrap();
    assert_eq!(get(&reopened, "dir1").await, Some(live(&r, 2)));
}
