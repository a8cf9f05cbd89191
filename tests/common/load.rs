//! For tests that load a running server and then check it against "AWS" (the
//! emulator): every cached room, the change log replayed, watchers that
//! resume across disconnects, and waiting for the reconciler's passes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ivschat_rooms::domain::{FallbackResult, Room, Timestamp};
use ivschat_rooms::emulator::Emulator;
use ivschat_rooms::grpc::proto;
use proto::room_service_client::RoomServiceClient;
use proto::watch_rooms_response::Kind;
use proto::{EventType, WatchRoomsRequest, WatchRoomsResponse};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::binary::{Server, WAIT, within};

pub type Client = RoomServiceClient<Channel>;

/// A room as the service shows it, field for field (grpc::convert's mapping).
pub fn as_proto(room: &Room) -> proto::Room {
    let timestamp = |t: Timestamp| prost_types::Timestamp {
        seconds: t.as_nanos().div_euclid(1_000_000_000),
        nanos: i32::try_from(t.as_nanos().rem_euclid(1_000_000_000)).unwrap(),
    };
    proto::Room {
        arn: room.arn.clone(),
        id: room.id.clone(),
        name: room.name.clone(),
        create_time: Some(timestamp(room.create_time)),
        update_time: Some(timestamp(room.update_time)),
        maximum_message_rate_per_second: room.maximum_message_rate_per_second,
        maximum_message_length: room.maximum_message_length,
        message_review_handler: room.message_review_handler.as_ref().map(|h| {
            proto::MessageReviewHandler {
                uri: h.uri.clone(),
                fallback_result: match h.fallback_result {
                    FallbackResult::Allow => proto::FallbackResult::Allow,
                    FallbackResult::Deny => proto::FallbackResult::Deny,
                } as i32,
            }
        }),
        tags: room.tags.clone().into_iter().collect(),
        logging_configuration_identifiers: room.logging_configuration_identifiers.clone(),
        details_pending: room.details_pending,
    }
}

/// The emulator's rooms, sorted by ARN, as the service shows them.
pub fn upstream_rooms(emulator: &Emulator) -> Vec<proto::Room> {
    let mut rooms: Vec<_> = emulator.rooms().iter().map(as_proto).collect();
    rooms.sort_by(|a, b| a.arn.cmp(&b.arn));
    rooms
}

/// Every cached room (ListRooms, all pages, sorted by ARN) and the one
/// change-log revision they reflect; lists again if a change landed between
/// pages, or a call crossed a GOAWAY.
pub async fn list_all(client: &mut Client) -> (Vec<proto::Room>, u64) {
    'again: loop {
        let mut rooms = Vec::new();
        let mut revision = None;
        let mut next_token = String::new();
        loop {
            let page = within(
                "ListRooms",
                client.list_rooms(proto::ListRoomsRequest {
                    next_token: next_token.clone(),
                    ..Default::default()
                }),
            )
            .await;
            let page = match page {
                Ok(page) => page.into_inner(),
                // Never reached the server (an aged connection): list again.
                Err(status) if crossed_goaway(&status) => continue 'again,
                Err(status) => panic!("ListRooms: {status:?}"),
            };
            if *revision.get_or_insert(page.revision) != page.revision {
                continue 'again;
            }
            rooms.extend(page.rooms);
            if page.next_token.is_empty() {
                break;
            }
            next_token = page.next_token;
        }
        rooms.sort_by(|a, b| a.arn.cmp(&b.arn));
        return (rooms, revision.unwrap_or_default());
    }
}

/// Every cached room as [`list_all`] gives them, once every room a cold
/// cache's first listing put in has been read whole (no `details_pending`):
/// awaits the log's events for the rooms still pending, then lists again.
pub async fn list_all_whole(client: &mut Client) -> (Vec<proto::Room>, u64) {
    loop {
        let (rooms, revision) = list_all(client).await;
        let mut pending: BTreeSet<String> = rooms
            .iter()
            .filter(|r| r.details_pending)
            .map(|r| r.arn.clone())
            .collect();
        if pending.is_empty() {
            return (rooms, revision);
        }
        let mut stream = client
            .watch_rooms(WatchRoomsRequest {
                after_revision: Some(revision),
                ..Default::default()
            })
            .await
            .expect("watch the rooms still pending")
            .into_inner();
        within("the rooms listed to be read whole", async {
            while !pending.is_empty() {
                // A stream ended early (a server's connection age): list again.
                let Ok(Some(message)) = stream.message().await else {
                    return;
                };
                if let Some(Kind::Event(event)) = message.kind
                    && let Some(room) = event.room
                    && (!room.details_pending || event.r#type == EventType::Deleted as i32)
                {
                    pending.remove(&room.arn);
                }
            }
        })
        .await;
    }
}

/// Asserts that the cache holds exactly the upstream rooms, each equal field
/// by field (both sorted by ARN).
pub fn assert_same_rooms(cached: &[proto::Room], upstream: &[proto::Room]) {
    let arns = |rooms: &[proto::Room]| rooms.iter().map(|r| r.arn.clone()).collect::<Vec<_>>();
    assert_eq!(
        arns(cached),
        arns(upstream),
        "the cache must hold exactly the rooms upstream has"
    );
    for (cached, upstream) in cached.iter().zip(upstream) {
        assert_eq!(cached, upstream, "the cached room must equal upstream's");
    }
}

/// Full reconciling passes the server has completed.
pub async fn full_passes(server: &Server) -> u64 {
    let passes = server
        .metric(
            "ivschat_rooms_reconcile_runs_total",
            &[("kind", "full"), ("result", "ok")],
        )
        .await;
    // A counter: a whole number.
    passes as u64
}

/// Waits until the server has completed two more full reconciling passes
/// than `since` (from [`full_passes`]): the first may have started before
/// `since` was read, the second started after it ended, so one whole pass
/// ran after. A pass is not something a client can await, so this polls
/// the server's counter (every 50 ms, for at most [`WAIT`]).
pub async fn one_full_pass_after(server: &Server, since: u64) {
    within("a full reconciling pass", async {
        while full_passes(server).await < since + 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// The change log 1..=`through`, read by a watch from revision 0 (resumed
/// after the last event received when the stream ends resumably, e.g. at
/// --max-connection-age); fails on any gap or repeat.
pub async fn log_through(client: &mut Client, through: u64) -> Vec<proto::RoomEvent> {
    let mut log = Vec::new();
    within("the whole change log", async {
        'resume: while (log.len() as u64) < through {
            let opened = client
                .watch_rooms(WatchRoomsRequest {
                    after_revision: Some(log.len() as u64),
                    ..Default::default()
                })
                .await;
            let mut stream = match opened {
                Ok(stream) => stream.into_inner(),
                Err(status) if resumable(&status) => continue 'resume,
                Err(status) => panic!("watch the log: {status:?}"),
            };
            while (log.len() as u64) < through {
                match stream.message().await {
                    Ok(Some(WatchRoomsResponse {
                        kind: Some(Kind::Event(event)),
                    })) => {
                        assert_eq!(
                            event.revision,
                            log.len() as u64 + 1,
                            "the log's revisions follow each other: {event:#?}"
                        );
                        log.push(event);
                    }
                    Ok(Some(_progress)) => {}
                    Ok(None) => panic!("the log stream ended at {}", log.len()),
                    Err(status) if resumable(&status) => continue 'resume,
                    Err(status) => panic!("the log streams: {status:?}"),
                }
            }
        }
    })
    .await;
    log
}

/// Replays events into rooms (sorted by ARN), checking that each event's
/// `previous` is the room the earlier events left, so that none was lost,
/// repeated or reordered.
pub fn fold(events: &[proto::RoomEvent]) -> Vec<proto::Room> {
    let mut rooms = BTreeMap::<String, proto::Room>::new();
    for event in events {
        let room = event.room.clone().expect("an event carries its room");
        let current = rooms.get(&room.arn);
        match EventType::try_from(event.r#type) {
            Ok(EventType::Created) => {
                assert!(current.is_none(), "CREATED for a live room: {event:#?}");
                assert!(event.previous.is_none(), "{event:#?}");
                rooms.insert(room.arn.clone(), room);
            }
            Ok(EventType::Updated) => {
                assert_eq!(current, event.previous.as_ref(), "{event:#?}");
                rooms.insert(room.arn.clone(), room);
            }
            Ok(EventType::Deleted) => {
                assert_eq!(current, Some(&room), "DELETED carries the last room");
                rooms.remove(&room.arn);
            }
            other => panic!("unexpected event type {other:?} in the log: {event:#?}"),
        }
    }
    rooms.into_values().collect()
}

/// The versions the emulator's rooms had (from [`Emulator::versions`]), to
/// tell whether the service shows a room as IVS Chat had it.
pub struct RealVersions {
    /// Each version whole, and as a listing puts it in (`details_pending`,
    /// its limits 0).
    whole: BTreeSet<String>,
    /// Each version's fields but its tags, and its tags, apart.
    fields: BTreeSet<String>,
    tags: BTreeSet<String>,
}

/// `room`'s fields but its tags, and its tags in key order (a `HashMap`'s
/// Debug order differs between maps).
fn parts(room: &proto::Room) -> (String, String) {
    let tags: BTreeMap<_, _> = room.tags.iter().collect();
    let fields = proto::Room {
        tags: Default::default(),
        ..room.clone()
    };
    (format!("{fields:?}"), format!("{} {tags:?}", room.arn))
}

impl RealVersions {
    pub fn of(versions: &[Room]) -> RealVersions {
        let mut real = RealVersions {
            whole: BTreeSet::new(),
            fields: BTreeSet::new(),
            tags: BTreeSet::new(),
        };
        for room in versions {
            let whole = as_proto(room);
            let listed = proto::Room {
                maximum_message_rate_per_second: 0,
                maximum_message_length: 0,
                details_pending: true,
                ..whole.clone()
            };
            for shown in [whole, listed] {
                let (fields, tags) = parts(&shown);
                real.whole.insert(format!("{fields} {tags}"));
                real.fields.insert(fields);
                real.tags.insert(tags);
            }
        }
        real
    }

    /// Whether IVS Chat had `room`: one of its versions, or, after a tag
    /// change through the service, one version's tags on another's fields.
    /// TagRoom and UntagRoom read back only the tags (ListTagsForResource,
    /// the tag quota) and apply them to the cached row, whose other fields
    /// may lag a change made in IVS Chat directly until the reconciler reads
    /// the room (README, "Tags").
    pub fn had(&self, room: &proto::Room) -> bool {
        let (fields, tags) = parts(room);
        self.whole.contains(&format!("{fields} {tags}"))
            || (self.fields.contains(&fields) && self.tags.contains(&tags))
    }
}

/// Asserts that every room an event shows (after and before the change) is
/// a version the emulator really had ([`RealVersions::had`]).
pub fn assert_real_versions(events: &[proto::RoomEvent], versions: &[Room]) {
    let versions = RealVersions::of(versions);
    for event in events {
        for room in event.room.iter().chain(&event.previous) {
            assert!(
                versions.had(room),
                "an event shows a room as upstream never had it: {event:#?}"
            );
        }
    }
}

/// What a [`Watcher`] saw.
#[derive(Debug)]
pub struct Watched {
    /// Every event, across its streams, in order.
    pub events: Vec<proto::RoomEvent>,
    /// The revision it had seen everything through, when it finished.
    pub last: u64,
    /// Streams it opened (1 + reconnects).
    pub streams: usize,
}

/// A WatchRooms client that resumes after the last revision it saw whenever
/// its stream ends with UNAVAILABLE (server going away, connection aged,
/// database down) or it hangs up itself, and checks as it goes that every
/// message decodes, every event is well formed and for its rooms, and
/// revisions only grow (watching every room: with no gap).
pub struct Watcher {
    task: JoinHandle<Watched>,
    through: watch::Sender<u64>,
}

impl Watcher {
    /// Watches `arns` (every room when empty) after revision `after`, hanging
    /// up by itself after each `hang_up_after` (if given) and resuming.
    pub fn start(
        mut client: Client,
        arns: Vec<String>,
        after: u64,
        hang_up_after: Option<Duration>,
    ) -> Watcher {
        let (through, mut until) = watch::channel(u64::MAX);
        let task = tokio::spawn(async move {
            let mut watched = Watched {
                events: Vec::new(),
                last: after,
                streams: 0,
            };
            loop {
                if watched.last >= *until.borrow_and_update() {
                    return watched;
                }
                watched.streams += 1;
                let request = WatchRoomsRequest {
                    identifiers: arns.clone(),
                    after_revision: Some(watched.last),
                    include_snapshot: false,
                    regions: Vec::new(),
                };
                let mut stream = match client.watch_rooms(request).await {
                    Ok(stream) => stream.into_inner(),
                    Err(status) if resumable(&status) => {
                        // Back off a little before trying again.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(status) => panic!("WatchRooms refused: {status:?}"),
                };
                let hang_up = tokio::time::sleep(hang_up_after.unwrap_or(WAIT * 100));
                tokio::pin!(hang_up);
                loop {
                    let message = tokio::select! {
                        _ = until.changed() => None,
                        () = &mut hang_up => break,
                        message = stream.message() => Some(message),
                    };
                    match message {
                        None => {}
                        Some(Ok(Some(WatchRoomsResponse {
                            kind: Some(Kind::Event(event)),
                        }))) => {
                            check_event(&event, &arns, watched.last);
                            watched.last = event.revision;
                            watched.events.push(event);
                        }
                        Some(Ok(Some(WatchRoomsResponse {
                            kind: Some(Kind::Progress(progress)),
                        }))) => {
                            assert!(
                                progress.revision >= watched.last,
                                "a bookmark went back from {}: {progress:?}",
                                watched.last
                            );
                            watched.last = progress.revision;
                        }
                        Some(Ok(Some(empty))) => panic!("a message with nothing in it: {empty:?}"),
                        Some(Ok(None)) => break,
                        Some(Err(status)) if status.code() == tonic::Code::Unavailable => break,
                        Some(Err(status)) => panic!("the watch stream failed: {status:?}"),
                    }
                    if watched.last >= *until.borrow_and_update() {
                        return watched;
                    }
                }
            }
        });
        Watcher { task, through }
    }

    /// Waits until it has seen everything through `revision` (by events or
    /// bookmarks), then stops it.
    pub async fn finish(self, revision: u64) -> Watched {
        self.through.send_replace(revision);
        within("a watcher to catch up", self.task)
            .await
            .expect("the watcher's checks hold")
    }
}

/// Whether a call failed in the client's transport because it crossed the
/// server's GOAWAY (a connection reaching --max-connection-age) and so never
/// reached the service: CANCELLED because the connection closed before the
/// call was sent, or h2's "GoAway NO_ERROR from the remote" for a stream
/// above the GOAWAY's last stream id, which the server did not process.
/// gRPC clients that retry such calls transparently, as grpc-go's do, never
/// show them; tonic's do.
pub fn crossed_goaway(status: &tonic::Status) -> bool {
    let from_transport =
        std::error::Error::source(status).is_some_and(|e| e.is::<tonic::transport::Error>());
    let refused_stream = || {
        // h2 is not a dependency of the tests: its error is read from Debug.
        let debug = format!("{:?}", std::error::Error::source(status));
        debug.contains("GoAway(") && debug.contains("NO_ERROR") && debug.contains("Remote")
    };
    from_transport
        && match status.code() {
            tonic::Code::Cancelled => true,
            tonic::Code::Internal => refused_stream(),
            _ => false,
        }
}

/// Whether a watch that failed so may be opened again: UNAVAILABLE, or a
/// call that never reached the service (see [`crossed_goaway`]).
fn resumable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || crossed_goaway(status)
}

/// An event is one of the three kinds, carries its room (and, unless
/// CREATED, the room before), is for one of `arns` (any when empty), and
/// comes after `last` (right after it, watching every room).
fn check_event(event: &proto::RoomEvent, arns: &[String], last: u64) {
    let room = event.room.as_ref().expect("an event carries its room");
    match EventType::try_from(event.r#type) {
        Ok(EventType::Created) => assert!(event.previous.is_none(), "{event:#?}"),
        Ok(EventType::Updated | EventType::Deleted) => {
            let previous = event.previous.as_ref().expect("and the room before");
            assert_eq!(previous.arn, room.arn, "{event:#?}");
        }
        other => panic!("a watch event of type {other:?}: {event:#?}"),
    }
    if arns.is_empty() {
        assert_eq!(event.revision, last + 1, "no gap, no repeat: {event:#?}");
    } else {
        assert!(arns.contains(&room.arn), "not a watched room: {event:#?}");
        assert!(event.revision > last, "in order, once: {event:#?}");
    }
}
