//! An hour of mixed traffic compressed into about a minute and a half,
//! against the real binary (SQLite, an emulator in this process): reads,
//! writes, listings and changes made in IVS Chat directly across many rooms,
//! while watchers connect, hang up and resume, and the server ages
//! connections out. Memory stays flat, and no watcher loses an event.

mod common;

use std::time::{Duration, Instant};

use ivschat_rooms::domain::RoomPatch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use common::binary::{Server, within};
use common::load::{
    Client, Watched, Watcher, assert_same_rooms, crossed_goaway, fold, full_passes, list_all,
    list_all_whole, log_through, one_full_pass_after, upstream_rooms,
};
use common::{TestDb, create, proto};

const ROOMS: usize = 200;
/// Load before the first memory sample (caches, pools and rings fill up).
const WARM_UP: Duration = Duration::from_secs(15);
/// Load after it.
const SOAK: Duration = Duration::from_secs(60);

/// Requests of one client until `stop`: how many, and the failures.
fn client_loop<F, Fut>(
    client: Client,
    stop: CancellationToken,
    step: F,
) -> JoinHandle<(u64, Vec<tonic::Status>)>
where
    F: Fn(Client, usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    tokio::spawn(async move {
        let (mut done, mut failed) = (0, Vec::new());
        while !stop.is_cancelled() {
            if let Err(status) = step(client.clone(), usize::try_from(done).unwrap()).await {
                failed.push(status);
            }
            done += 1;
        }
        (done, failed)
    })
}

fn pick(rooms: &[String], i: usize, salt: usize) -> String {
    rooms[(i * 7919 + salt * 104_729) % rooms.len()].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_of_traffic_keeps_memory_flat_and_loses_no_event() {
    let begun = Instant::now();
    let db = TestDb::sqlite();
    let (emulator, url) = common::emulator().await;
    let flags = [
        "--upstream-rate",
        "1000",
        // Reads go to IVS Chat every few seconds, per room.
        "--max-staleness",
        "3s",
        "--reconcile-interval",
        "500ms",
        "--resync-interval",
        "5s",
        "--bookmark-interval",
        "300ms",
        // A ring the warm-up fills (the default, 4,096 events of a few KiB,
        // would still be filling at the end and look like growth); watchers
        // that fall behind it read the log.
        "--event-ring-capacity",
        "512",
        // Connections are closed and reopened all along.
        "--max-connection-age",
        "5s",
        "--max-connection-age-grace",
        "1s",
    ];
    let server = Server::against(&db.url, &url, &flags).await;
    let mut client = server.client().await;
    let mut rooms = Vec::new();
    for i in 0..ROOMS {
        let room = within(
            "CreateRoom",
            client.create_room(create(&format!("soak-{i}"))),
        )
        .await
        .expect("create")
        .into_inner();
        rooms.push(room.arn);
    }
    let (_, start) = list_all(&mut client).await;

    // Watchers: four of every room, four of a handful each, all hanging up
    // every second or two and resuming after the last revision they saw.
    let watchers: Vec<(Vec<String>, Watcher)> = (0..8)
        .map(|w| {
            let arns: Vec<String> = if w < 4 {
                Vec::new()
            } else {
                (0..5).map(|k| pick(&rooms, k, w)).collect()
            };
            let hang_up = Duration::from_millis(1000 + 250 * w as u64);
            let watcher = Watcher::start(client.clone(), arns.clone(), start, Some(hang_up));
            (arns, watcher)
        })
        .collect();

    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for reader in 0..3 {
        let rooms = rooms.clone();
        clients.push(client_loop(
            client.clone(),
            stop.clone(),
            move |mut c, i| {
                let identifier = pick(&rooms, i, reader);
                // One read in twenty asks IVS Chat whatever the cache holds.
                let consistency = if i % 20 == 0 {
                    proto::ReadConsistency::Strong
                } else {
                    proto::ReadConsistency::Cached
                };
                async move {
                    c.get_room(proto::GetRoomRequest {
                        identifier,
                        consistency: consistency as i32,
                    })
                    .await
                    .map(drop)
                }
            },
        ));
    }
    for writer in 0..2 {
        let rooms = rooms.clone();
        clients.push(client_loop(
            client.clone(),
            stop.clone(),
            move |mut c, i| {
                let identifier = pick(&rooms, i, 10 + writer);
                async move {
                    match i % 10 {
                        0..=5 => c
                            .update_room(proto::UpdateRoomRequest {
                                identifier,
                                name: Some(format!("w{writer}-{i}")),
                                maximum_message_length: Some(1 + i32::try_from(i % 500).unwrap()),
                                ..Default::default()
                            })
                            .await
                            .map(drop),
                        6 | 7 => c
                            .tag_room(proto::TagRoomRequest {
                                identifier,
                                tags: [(format!("k{}", i % 3), i.to_string())].into(),
                            })
                            .await
                            .map(drop),
                        8 => c
                            .untag_room(proto::UntagRoomRequest {
                                identifier,
                                tag_keys: vec![format!("k{}", i % 3)],
                            })
                            .await
                            .map(drop),
                        // A short-lived room: created and deleted.
                        _ => match c.create_room(create(&format!("brief-{writer}-{i}"))).await {
                            Ok(room) => c
                                .delete_room(proto::DeleteRoomRequest {
                                    identifier: room.into_inner().arn,
                                    ..Default::default()
                                })
                                .await
                                .map(drop),
                            Err(status) => Err(status),
                        },
                    }
                }
            },
        ));
    }
    clients.push(client_loop(
        client.clone(),
        stop.clone(),
        |mut c, i| async move {
            let name = if i % 2 == 0 { "" } else { "soak-1" };
            c.list_rooms(proto::ListRoomsRequest {
                name: name.into(),
                max_results: 1 + i32::try_from(i % 50).unwrap(),
                ..Default::default()
            })
            .await
            .map(drop)
        },
    ));
    // Changes made in IVS Chat directly, for the reconciler to find: about
    // five a second.
    let behind_our_back = {
        let (emulator, rooms, stop) = (emulator.clone(), rooms.clone(), stop.clone());
        tokio::spawn(async move {
            let mut changes = 0_usize;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !stop.is_cancelled() {
                tick.tick().await;
                let patch = RoomPatch {
                    maximum_message_rate_per_second: Some(1 + i32::try_from(changes % 99).unwrap()),
                    ..RoomPatch::default()
                };
                emulator
                    .update_room(&pick(&rooms, changes, 99), &patch)
                    .expect("change a room in IVS Chat");
                changes += 1;
            }
            changes
        })
    };

    // The load runs for a fixed time: its length is the point of this test,
    // not an event to wait for.
    tokio::time::sleep(WARM_UP).await;
    let warm_rss = server.rss_kib();
    let mut samples = vec![warm_rss];
    let soak = Instant::now();
    while soak.elapsed() < SOAK {
        tokio::time::sleep(Duration::from_secs(5)).await;
        samples.push(server.rss_kib());
    }
    let end_rss = server.rss_kib();
    stop.cancel();
    let (mut requests, mut failed) = (0, Vec::new());
    for c in clients {
        let (done, failures) = within("a client to stop", c).await.unwrap();
        requests += done;
        failed.extend(failures);
    }
    let (crossed, failed): (Vec<_>, Vec<_>) = failed.into_iter().partition(crossed_goaway);
    let changed_upstream = within("the direct changes to stop", behind_our_back)
        .await
        .unwrap();

    // Quiet now: once a whole reconciling pass has run, the log is complete.
    let passes = full_passes(&server).await;
    one_full_pass_after(&server, passes).await;
    let (cached, revision) = list_all_whole(&mut client).await;
    assert_same_rooms(&cached, &upstream_rooms(&emulator));
    let log = log_through(&mut client, revision).await;
    assert_eq!(fold(&log), cached, "the log replays into exactly the cache");

    let mut delivered = 0;
    let mut streams = 0;
    for (arns, watcher) in watchers {
        let Watched {
            events,
            last,
            streams: opened,
        } = watcher.finish(revision).await;
        assert_eq!(last, revision, "every watcher reaches the store's revision");
        let expected: Vec<_> = log[usize::try_from(start).unwrap()..]
            .iter()
            .filter(|e| arns.is_empty() || arns.contains(&e.room.as_ref().unwrap().arn))
            .cloned()
            .collect();
        assert!(
            events == expected,
            "a watcher of {arns:?}, across {opened} streams, must see exactly the log's \
             events for its rooms: {} seen, {} in the log",
            events.len(),
            expected.len()
        );
        delivered += events.len();
        streams += opened;
    }

    let growth = i64::try_from(end_rss).unwrap() - i64::try_from(warm_rss).unwrap();
    eprintln!(
        "soak: {:.0} s in all; {requests} requests ({} cancelled by the client's transport \
         at a GOAWAY, {} failed), {changed_upstream} \
         changes made in IVS Chat directly; log {start}..={revision}; {delivered} events \
         delivered to 8 watchers over {streams} streams; RSS {warm_rss} KiB after the \
         warm-up, {end_rss} KiB at the end ({growth:+} KiB); every 5 s: {samples:?}",
        begun.elapsed().as_secs_f64(),
        crossed.len(),
        failed.len(),
    );
    assert!(
        failed.is_empty(),
        "no request fails when nothing is broken: {failed:#?}"
    );
    assert!(
        growth < i64::try_from((warm_rss / 5).max(4096)).unwrap(),
        "memory must stay flat: {warm_rss} KiB after the warm-up, {end_rss} KiB at the end"
    );
}
