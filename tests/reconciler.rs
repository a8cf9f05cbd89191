//! The reconciler's parts, driven directly: what an incremental pass spends
//! upstream, the change log it writes, leadership on Postgres, and progress
//! bookmarks under paused time.

mod common;

use std::time::Duration;

use common::{TestDb, emulator, room, room_arn, sdk};
use futures::StreamExt as _;
use ivschat_rooms::budget::{BudgetSettings, LocalBudget};
use ivschat_rooms::domain::{EventKind, EventSource, RoomArn, RoomPatch, Timestamp};
use ivschat_rooms::emulator::{Emulator, Operation};
use ivschat_rooms::feed::{Feed, FeedSettings, WatchItem, WatchRequest};
use ivschat_rooms::hot::HotRooms;
use ivschat_rooms::reconciler::Passes;
use ivschat_rooms::rooms::{Rooms, RoomsSettings};
use ivschat_rooms::store::{DEPOSED, Store, fenced};
use ivschat_rooms::upstream::{Upstream, UpstreamSettings, Upstreams};

/// The room policy over a fresh store and the emulator at `url`, and the
/// reconciler's passes over them.
async fn rooms_on(db: &TestDb, url: &str) -> (Rooms, Passes, Store) {
    let store = Store::open(&db.url).await.expect("store");
    let upstream = Upstream::at_endpoint(
        url,
        "us-east-1",
        UpstreamSettings {
            timeout: Duration::from_secs(5),
            max_attempts: 1,
        },
        std::sync::Arc::new(LocalBudget::new(
            "us-east-1",
            &BudgetSettings {
                rate: Some(std::num::NonZeroU32::MAX),
                ..BudgetSettings::default()
            },
        )),
    );
    let rooms = Rooms::new(
        store.clone(),
        HotRooms::off(),
        Upstreams::new(vec![upstream.clone()]),
        RoomsSettings {
            max_staleness: Duration::from_secs(3600),
            listing_wait: Duration::from_secs(5),
            stale_if_error: Duration::ZERO,
            request_id_retention: Duration::from_secs(3600),
            request_id_lease: Duration::from_secs(10),
        },
    )
    .await
    .expect("rooms");
    // Rooms here are all seconds old: no look-back, so that the watermark's
    // effect on paging shows.
    let passes = Passes::new(rooms.clone(), store.clone(), upstream, Duration::ZERO);
    (rooms, passes, store)
}

fn rename(name: &str) -> RoomPatch {
    RoomPatch {
        name: Some(name.into()),
        ..RoomPatch::default()
    }
}

/// Runs one incremental pass: the rooms it fetched, and the ListRooms and
/// GetRoom calls the emulator answered meanwhile.
async fn incremental_pass(passes: &Passes, emulator: &Emulator) -> (usize, u64, u64) {
    let (list, get) = (
        emulator.calls(Operation::ListRooms),
        emulator.calls(Operation::GetRoom),
    );
    let report = passes.reconcile_recent().await.unwrap();
    (
        report.fetched,
        emulator.calls(Operation::ListRooms) - list,
        emulator.calls(Operation::GetRoom) - get,
    )
}

on_both_backends!(
    incremental_pass_pages_only_down_to_what_the_last_pass_saw,
    full_listing_finds_deletions_and_logs_them,
    change_log_matches_the_cache_and_survives_compaction,
    compaction_by_age_only_removes_a_prefix,
);

/// Nothing changed: one ListRooms and nothing else. One room changed: one
/// ListRooms and one GetRoom. Sixty changed (more than a page of 50): pages
/// until a page has nothing newer, one GetRoom each. Every change found is
/// one RECONCILER event.
async fn incremental_pass_pages_only_down_to_what_the_last_pass_saw(db: TestDb) {
    let (emulator, url) = emulator().await;
    let aws = sdk(&url);
    for i in 0..120 {
        aws.create_room()
            .name(format!("r{i}"))
            .send()
            .await
            .unwrap();
    }
    let (_, passes, store) = rooms_on(&db, &url).await;
    let report = passes.full_listing().await.unwrap();
    assert_eq!(
        (report.listed, report.fetched, report.pending),
        (120, 0, 120),
        "new rooms are put in as listed, their details read after"
    );
    assert_eq!(emulator.calls(Operation::GetRoom), 0);
    let after_listing = store.revision().await.unwrap();
    assert_eq!(after_listing, 120, "one CREATED per room");

    assert_eq!(incremental_pass(&passes, &emulator).await, (0, 1, 0));
    assert_eq!(
        store.revision().await.unwrap(),
        after_listing,
        "no change, no event"
    );

    let all = emulator.rooms();
    emulator
        .update_room(&all[7].arn, &rename("changed"))
        .unwrap();
    assert_eq!(incremental_pass(&passes, &emulator).await, (1, 1, 1));
    let events = store.events_after(after_listing, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].kind, events[0].source),
        (EventKind::Updated, EventSource::Reconciler)
    );
    assert_eq!(events[0].room.name, "changed");

    for room in all.iter().take(60) {
        emulator
            .update_room(&room.arn, &rename(&format!("{}-2", room.name)))
            .unwrap();
    }
    // 50 newer, then 10 newer and 40 listed before: the last pass saw those.
    assert_eq!(incremental_pass(&passes, &emulator).await, (60, 2, 60));
    assert_eq!(store.revision().await.unwrap(), after_listing + 61);
}

/// A room deleted in IVS Chat behind our back is found by the full listing,
/// forgotten, and logged as DELETED from the reconciler with its last known
/// content; a second listing finds nothing to do.
async fn full_listing_finds_deletions_and_logs_them(db: TestDb) {
    let (_emulator, url) = emulator().await;
    let aws = sdk(&url);
    let kept = aws.create_room().name("kept").send().await.unwrap();
    let gone = aws.create_room().name("gone").send().await.unwrap();
    let (rooms, passes, store) = rooms_on(&db, &url).await;
    passes.full_listing().await.unwrap();
    let before = store.revision().await.unwrap();

    aws.delete_room()
        .identifier(gone.arn().unwrap())
        .send()
        .await
        .unwrap();
    let report = passes.full_listing().await.unwrap();
    assert_eq!((report.listed, report.deleted), (1, 1));
    let events = store.events_after(before, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(
        (event.kind, event.source),
        (EventKind::Deleted, EventSource::Reconciler)
    );
    assert_eq!(event.room.arn, gone.arn().unwrap());
    assert_eq!(event.room.name, "gone");

    let again = passes.full_listing().await.unwrap();
    assert_eq!((again.fetched, again.deleted), (0, 0));
    assert_eq!(store.revision().await.unwrap(), before + 1);
    let listing = rooms
        .list(ivschat_rooms::domain::ListQuery::default(), "")
        .await
        .unwrap();
    let arns: Vec<_> = listing.page.rooms.iter().map(|r| r.arn.as_str()).collect();
    assert_eq!(arns, [kept.arn().unwrap()]);
}

/// Replaying the log gives the cache; writes that change nothing log nothing;
/// compaction keeps the newest events (never the newest one) and revisions
/// keep counting after it.
async fn change_log_matches_the_cache_and_survives_compaction(db: TestDb) {
    let store = Store::open(&db.url).await.unwrap();
    let arn = room_arn;
    let api = EventSource::Api;
    store
        .put(&room("a", 10, "a"), Timestamp::from_nanos(10), api)
        .await
        .unwrap();
    store
        .put(&room("b", 10, "b"), Timestamp::from_nanos(10), api)
        .await
        .unwrap();
    // Same version, observed later: no visible change, no event.
    store
        .put(&room("a", 10, "a"), Timestamp::from_nanos(20), api)
        .await
        .unwrap();
    // Older version: refused by the update-time rule, no event.
    store
        .put(&room("a", 5, "old"), Timestamp::from_nanos(30), api)
        .await
        .unwrap();
    assert_eq!(store.revision().await.unwrap(), 2);
    store
        .put(&room("a", 40, "a2"), Timestamp::from_nanos(40), api)
        .await
        .unwrap();
    let b = RoomArn::parse("arn", &arn("b")).unwrap();
    store
        .mark_deleted(&b, Timestamp::from_nanos(50), api)
        .await
        .unwrap();
    // Deleting what is already deleted, or never was: no event.
    store
        .mark_deleted(&b, Timestamp::from_nanos(60), api)
        .await
        .unwrap();
    let never = RoomArn::parse("arn", &arn("never")).unwrap();
    store
        .mark_deleted(&never, Timestamp::from_nanos(60), api)
        .await
        .unwrap();

    let events = store.events_after(0, 100).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| (e.revision, e.kind)).collect();
    assert_eq!(
        kinds,
        [
            (1, EventKind::Created),
            (2, EventKind::Created),
            (3, EventKind::Updated),
            (4, EventKind::Deleted),
        ]
    );
    assert_eq!(events[2].changed_fields, ["name", "update_time"]);
    assert_eq!(events[2].previous.as_ref().unwrap().name, "a");
    let snapshot = store.snapshot(&[]).await.unwrap();
    assert_eq!(snapshot.revision, 4);
    assert_eq!(snapshot.rooms, [room("a", 40, "a2")]);

    // Keep 2 by count: 3 and 4 stay.
    assert_eq!(store.compact(2, None).await.unwrap(), 2);
    assert_eq!(store.oldest_revision().await.unwrap(), Some(3));
    // By age, everything is old; the newest stays all the same.
    store.compact(1000, Some(Timestamp::now())).await.unwrap();
    assert_eq!(store.oldest_revision().await.unwrap(), Some(4));
    store
        .put(&room("c", 70, "c"), Timestamp::from_nanos(70), api)
        .await
        .unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        5,
        "revisions go on after compaction"
    );
    let reopened = Store::open(&db.url).await.unwrap();
    assert_eq!(reopened.revision().await.unwrap(), 5);
}

/// On Postgres one replica at a time holds a region's reconciler turn (a
/// lease); it passes on when the holder gives it up (or its lease runs out).
/// Each region's turn is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_at_a_time_on_postgres() {
    let Some(db) = TestDb::postgres("one_replica_leads_at_a_time_on_postgres").await else {
        return;
    };
    let a = Store::open(&db.url).await.unwrap();
    let b = Store::open(&db.url).await.unwrap();
    let mut leader = a
        .try_lead("us-east-1")
        .await
        .unwrap()
        .expect("the first asker leads");
    assert!(
        b.try_lead("us-east-1").await.unwrap().is_none(),
        "one leader at a time"
    );
    let other_region = b
        .try_lead("eu-west-1")
        .await
        .unwrap()
        .expect("another region's turn is free");
    assert!(
        a.try_lead("eu-west-1").await.unwrap().is_none(),
        "one leader per region"
    );
    leader.check().await.expect("still leading");
    leader.resign().await;
    let next = b.try_lead("us-east-1").await.unwrap();
    assert!(next.is_some(), "the turn passes on");
    other_region.resign().await;
}

/// On Postgres a leader's lease that ran out unrenewed passes to another
/// replica with a new generation, and from then on every write of the
/// deposed leader's passes (fenced by its generation) is refused and
/// changes nothing, while the new leader's go through; the deposed leader
/// cannot renew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_passes_cannot_write() {
    let Some(db) = TestDb::postgres("a_deposed_leaders_passes_cannot_write").await else {
        return;
    };
    let a = Store::open(&db.url).await.unwrap();
    let b = Store::open(&db.url).await.unwrap();
    let lease = Duration::from_secs(2);
    let mut deposed = a
        .try_lead_for("us-east-1", lease)
        .await
        .unwrap()
        .expect("the first asker leads");
    let old_fence = deposed.fence().expect("a lease on Postgres");
    // The lease runs out by the clock (nothing else to wait on), and only then
    // can it pass on.
    assert!(b.try_lead_for("us-east-1", lease).await.unwrap().is_none());
    tokio::time::sleep(lease).await;
    let leader = b
        .try_lead_for("us-east-1", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a lease that ran out passes on");
    let new_fence = leader.fence().unwrap();
    assert!(new_fence.generation > old_fence.generation);

    let revision = a.revision().await.unwrap();
    let stale = room("fencedRoom01", 10, "from-the-deposed-leader");
    let refused = fenced(
        old_fence.clone(),
        a.put(&stale, Timestamp::now(), EventSource::Reconciler),
    )
    .await
    .expect_err("a deposed leader's write");
    assert!(refused.to_string().contains(DEPOSED), "{refused}");
    let arn = RoomArn::parse("arn", &stale.arn).unwrap();
    let refused = fenced(
        old_fence,
        a.mark_deleted(&arn, Timestamp::now(), EventSource::Reconciler),
    )
    .await
    .expect_err("a deposed leader's deletion");
    assert!(refused.to_string().contains(DEPOSED), "{refused}");
    assert_eq!(a.revision().await.unwrap(), revision, "nothing logged");
    assert!(a.get(&arn).await.unwrap().is_none(), "nothing cached");
    assert!(
        deposed.check().await.is_err(),
        "the deposed leader cannot renew"
    );

    let fresh = room("fencedRoom01", 20, "from-the-new-leader");
    fenced(
        new_fence,
        b.put(&fresh, Timestamp::now(), EventSource::Reconciler),
    )
    .await
    .expect("the new leader writes");
    assert_eq!(a.get(&arn).await.unwrap().unwrap().room, fresh);
    // Unfenced writes (users') are not the leases' business.
    a.put(
        &room("fencedRoom01", 30, "a-user"),
        Timestamp::now(),
        EventSource::Api,
    )
    .await
    .expect("a user's write");
}

/// A store on `db` and a feed over it that bookmarks every `interval`.
async fn feed_with_bookmarks(db: &TestDb, interval: Duration) -> (Store, Feed) {
    let store = Store::open(&db.url).await.unwrap();
    let settings = FeedSettings {
        bookmark_interval: interval,
        ..FeedSettings::default()
    };
    let feed = Feed::start(store.clone(), settings, HotRooms::off())
        .await
        .unwrap();
    (store, feed)
}

/// Bookmarks: an idle watcher gets a progress every interval, on its own
/// timer; an event delivered restarts it. Paused time, no waiting.
#[tokio::test]
async fn idle_watchers_get_bookmarks_every_interval() {
    let db = TestDb::sqlite();
    let interval = Duration::from_secs(10);
    let (store, feed) = feed_with_bookmarks(&db, interval).await;
    let mut watcher = Box::pin(feed.watch(WatchRequest::default()).await.unwrap());
    // Another watcher that nobody reads must not matter.
    let ignored = feed.watch(WatchRequest::default()).await.unwrap();
    tokio::time::pause();

    // A stream says at once where it starts.
    let started = tokio::time::Instant::now();
    let item = watcher.next().await.unwrap().unwrap();
    assert_eq!(
        item,
        WatchItem::Progress {
            revision: 0,
            snapshot_complete: false
        }
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
    let item = watcher.next().await.unwrap().unwrap();
    assert_eq!(
        item,
        WatchItem::Progress {
            revision: 0,
            snapshot_complete: false
        }
    );
    // Paused time is exact up to the timer's millisecond resolution.
    let about = |elapsed: Duration, expected: Duration| {
        assert!(
            elapsed >= expected && elapsed <= expected + Duration::from_millis(5),
            "{elapsed:?}, expected {expected:?}"
        );
    };
    about(started.elapsed(), interval);
    let item = watcher.next().await.unwrap().unwrap();
    assert!(matches!(item, WatchItem::Progress { revision: 0, .. }));
    about(started.elapsed(), 2 * interval);
    assert_eq!(feed.watchers(), 2);
    drop(ignored);
    assert_eq!(feed.watchers(), 1, "a dropped stream is gone at once");

    let room = room("bookmarked1", 1, "b");
    // The database is written in real time: paused time would jump ahead,
    // past the pool's timeouts, while the write waits on the database.
    tokio::time::resume();
    store
        .put(&room, Timestamp::now(), EventSource::Api)
        .await
        .unwrap();
    feed.caught_up(1).await;
    tokio::time::pause();
    let item = watcher.next().await.unwrap().unwrap();
    assert!(
        matches!(&item, WatchItem::Event(e) if e.revision == 1),
        "{item:?}"
    );
    let delivered = tokio::time::Instant::now();
    let item = watcher.next().await.unwrap().unwrap();
    assert_eq!(
        item,
        WatchItem::Progress {
            revision: 1,
            snapshot_complete: false
        }
    );
    about(delivered.elapsed(), interval);
    feed.stop().await;
}

/// A watcher catching up through more events than one batch, none of them
/// its own, still gets its bookmark when one is due, saying how far it got:
/// it does not wait for the end of the backlog.
#[tokio::test]
async fn a_watcher_busy_with_events_it_filters_out_still_gets_bookmarks() {
    let db = TestDb::sqlite();
    let interval = Duration::from_secs(10);
    let (store, feed) = feed_with_bookmarks(&db, interval).await;
    let own = RoomArn::parse("arn", &room_arn("quiet")).unwrap();
    let mut watcher = Box::pin(
        feed.watch(WatchRequest {
            arns: vec![own],
            ..WatchRequest::default()
        })
        .await
        .unwrap(),
    );
    let start = watcher.next().await.unwrap().unwrap();
    assert!(matches!(start, WatchItem::Progress { revision: 0, .. }));

    // More than a batch (256) of other rooms' events.
    let others: Vec<_> = (0..600)
        .map(|i| room(&format!("busy{i:06}"), 1, "b"))
        .collect();
    store
        .put_many(&others, Timestamp::now(), EventSource::Api)
        .await
        .unwrap();
    feed.caught_up(600).await;
    tokio::time::pause();
    tokio::time::advance(interval + Duration::from_millis(1)).await;

    let item = watcher.next().await.unwrap().unwrap();
    match item {
        WatchItem::Progress { revision, .. } => assert!(
            (1..600).contains(&revision),
            "a bookmark part way through the backlog, not {revision}"
        ),
        other => panic!("a bookmark, not {other:?}"),
    }
    // Then the rest, and the next bookmark an interval later.
    let next = watcher.next().await.unwrap().unwrap();
    assert!(
        matches!(next, WatchItem::Progress { revision: 600, .. }),
        "{next:?}"
    );
    feed.stop().await;
}

/// Clocks need not agree with revision order (replicas' clocks differ, NTP
/// steps back): compaction by age still removes only a prefix of the log, so
/// a watcher never skips a revision in the middle.
async fn compaction_by_age_only_removes_a_prefix(db: TestDb) {
    let store = Store::open(&db.url).await.unwrap();
    for i in 1..=5 {
        let room = room(&format!("prefix{i:06}"), 1, "p");
        store
            .put(&room, Timestamp::now(), EventSource::Api)
            .await
            .unwrap();
    }
    // Revision 4 was observed by a replica whose clock was an hour behind.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE room_events SET observed_at = observed_at - $1 WHERE revision = 4")
        .bind(3_600_000_000_000_i64)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    // Older than ten minutes ago: only revision 4 by its clock.
    let cutoff = Timestamp::from_nanos(Timestamp::now().as_nanos() - 600_000_000_000);
    let removed = store.compact(1000, Some(cutoff)).await.unwrap();
    assert_eq!(removed, 4, "revisions 1 to 4, not 4 alone");
    let left: Vec<u64> = store
        .events_after(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(left, [5]);
}
