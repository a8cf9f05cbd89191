//! P11: one replica cut off from Postgres silently, as a network partition
//! cuts it (packets dropped, sockets kept open, behind a proxy that answers
//! Postgres's keepalives), while it leads the reconciler and holds the
//! change log's revision row in the middle of a write. The fault is played
//! by the tests' loopback proxy (`tests/common/proxy.rs`, shared, not
//! copied).
//!
//! Three figures, each a ratio measured in this run: the takeover (from the
//! cut to the other replica's reconciler finding a change made behind the
//! service's back) ÷ 15 s; the longest a healthy replica's write was held ÷
//! `store::WRITE_STALL_BOUND`; the share of cached reads the cut-off replica
//! answered within their 2 s deadline.

use std::time::{Duration, Instant};

use ivschat_rooms::domain::RoomPatch;
use ivschat_rooms::grpc::proto;
use ivschat_rooms::store::WRITE_STALL_BOUND;
use proto::watch_rooms_response::Kind;
use tonic::Request;

#[path = "../../tests/common/proxy.rs"]
#[allow(dead_code)] // the bench uses part of it
mod proxy;

use proxy::{FaultProxy, REVISION_LOCK, ServerSide};

use super::{Scale, Service, TempDb, bar, emulator, serve_config};

/// The takeover goal.
const TAKEOVER_GOAL: Duration = Duration::from_secs(15);

/// A cached read's deadline on the cut-off replica.
const READ_DEADLINE: Duration = Duration::from_secs(2);

pub(super) async fn p11_partition(scale: &Scale) {
    let (emulator, emulator_url) = emulator(Default::default()).await;
    let db = TempDb::postgres().await;
    let proxy = FaultProxy::before_postgres(&db.url).await;
    let fast = ["--reconcile-interval", "1s"];
    // The cut-off replica leads: started first.
    let cut = Service::start(serve_config(&proxy.url_for(&db.url), &emulator_url, &fast)).await;
    let healthy = Service::start(serve_config(&db.url, &emulator_url, &fast)).await;
    let mut to_cut = cut.client().await;
    let mut to_healthy = healthy.client().await;

    // Rooms the cut-off replica knows only from the change log (changed
    // recently on the other replica).
    let mut watch_cut = to_cut
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .expect("watch the cut-off replica")
        .into_inner();
    let mut arns = Vec::new();
    for i in 0..scale.partition_rooms {
        let room = to_healthy
            .create_room(proto::CreateRoomRequest {
                name: format!("p11-{i}"),
                ..Default::default()
            })
            .await
            .expect("CreateRoom")
            .into_inner();
        arns.push(room.arn);
    }
    let last = arns.last().expect("rooms").clone();
    next_event(&mut watch_cut, |e| {
        e.room.as_ref().is_some_and(|r| r.arn == last)
    })
    .await;
    let changed = arns[0].clone();
    let mut watch_healthy = to_healthy
        .watch_rooms(proto::WatchRoomsRequest {
            identifiers: vec![changed.clone()],
            ..Default::default()
        })
        .await
        .expect("watch the healthy replica")
        .into_inner();

    // The cut: just after the cut-off replica's write took the revision row.
    proxy.blackhole_after(REVISION_LOCK, ServerSide::Kept);
    let cut_write = tokio::spawn({
        let mut client = to_cut.clone();
        let arn = arns[1].clone();
        async move {
            client
                .update_room(proto::UpdateRoomRequest {
                    identifier: arn,
                    name: Some("p11-cut-off".into()),
                    ..Default::default()
                })
                .await
        }
    });
    tokio::time::timeout(Duration::from_secs(30), proxy.blackholed())
        .await
        .expect("the cut-off replica's write reaches its transaction");
    let cut_at = Instant::now();
    emulator
        .update_room(
            &changed,
            &RoomPatch {
                name: Some("p11-behind-our-back".into()),
                ..Default::default()
            },
        )
        .expect("a change made behind the service's back");

    // Meanwhile: the healthy replica's writes, the cut-off one's cached reads.
    let writes = tokio::spawn({
        let mut client = to_healthy.clone();
        let arn = arns[2].clone();
        async move {
            let mut longest = Duration::ZERO;
            for i in 0..5 {
                let started = Instant::now();
                client
                    .update_room(proto::UpdateRoomRequest {
                        identifier: arn.clone(),
                        name: Some(format!("p11-healthy-{i}")),
                        ..Default::default()
                    })
                    .await
                    .expect("the healthy replica's writes succeed");
                longest = longest.max(started.elapsed());
            }
            longest
        }
    });
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reads = tokio::spawn({
        let mut client = to_cut.clone();
        let arns = arns.clone();
        let reading = reading.clone();
        async move {
            let (mut asked, mut answered) = (0usize, 0usize);
            // A read every 10 ms, round the rooms, for the whole cut.
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            for arn in arns.iter().cycle() {
                if !reading.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                pace.tick().await;
                let mut request = Request::new(proto::GetRoomRequest {
                    identifier: arn.clone(),
                    consistency: proto::ReadConsistency::Cached as i32,
                });
                request.set_timeout(READ_DEADLINE);
                let started = Instant::now();
                let read = client.get_room(request).await;
                asked += 1;
                if read.is_ok() && started.elapsed() < READ_DEADLINE {
                    answered += 1;
                }
            }
            (asked, answered)
        }
    });
    next_event(&mut watch_healthy, |e| {
        e.room
            .as_ref()
            .is_some_and(|r| r.name == "p11-behind-our-back")
    })
    .await;
    let takeover = cut_at.elapsed();
    reading.store(false, std::sync::atomic::Ordering::SeqCst);
    let longest = writes.await.expect("the writes");
    let (asked, answered) = reads.await.expect("the reads");
    let refused = cut_write.await.expect("the cut-off write");
    proxy.pass();
    println!(
        "# P11 takeover {:.2} s; the healthy replica's longest write {:.2} s (bound {} s); cached reads on the cut-off replica {answered} of {asked} within {} s; its write under way at the cut: {}",
        takeover.as_secs_f64(),
        longest.as_secs_f64(),
        WRITE_STALL_BOUND.as_secs(),
        READ_DEADLINE.as_secs(),
        match &refused {
            Ok(_) => "acknowledged".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        }
    );
    println!(
        "P11 partition {:.2} {:.2} {:.3}",
        takeover.as_secs_f64() / TAKEOVER_GOAL.as_secs_f64(),
        longest.as_secs_f64() / WRITE_STALL_BOUND.as_secs_f64(),
        answered as f64 / asked as f64
    );
    bar("≤ 1, ≤ 1, = 1");
    // The heal: the cut-off replica writes again.
    let recovered = Instant::now();
    loop {
        let write = to_cut
            .update_room(proto::UpdateRoomRequest {
                identifier: arns[3].clone(),
                name: Some("p11-healed".into()),
                ..Default::default()
            })
            .await;
        if write.is_ok() {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(60),
            "the cut-off replica did not recover: {write:?}"
        );
    }
    println!(
        "# P11 the cut-off replica wrote again {:.2} s after the heal",
        recovered.elapsed().as_secs_f64()
    );
    drop((to_cut, to_healthy, watch_cut, watch_healthy));
    cut.stop().await;
    healthy.stop().await;
}

/// The next event on `stream` that `wanted` picks (within a minute).
async fn next_event(
    stream: &mut tonic::Streaming<proto::WatchRoomsResponse>,
    wanted: impl Fn(&proto::RoomEvent) -> bool,
) -> proto::RoomEvent {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.message().await {
                Ok(Some(proto::WatchRoomsResponse {
                    kind: Some(Kind::Event(event)),
                })) if wanted(&event) => return event,
                Ok(Some(_)) => {}
                other => panic!("the watch stream ended: {other:?}"),
            }
        }
    })
    .await
    .expect("the event within a minute")
}
