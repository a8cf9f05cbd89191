//! Limits: the number of watch streams a process serves, and the size of a
//! request message. Past them a request is refused and changes nothing.

mod common;

use common::{TestDb, create, proto, setup};
use ivschat_rooms::domain::Error;
use ivschat_rooms::emulator::Operation;
use ivschat_rooms::feed::{Feed, FeedSettings, WatchRequest};
use ivschat_rooms::hot::HotRooms;
use ivschat_rooms::store::Store;
use tonic::Code;
use tonic_types::StatusExt as _;

/// Past --max-watchers, WatchRooms is RESOURCE_EXHAUSTED and says which
/// limit; the streams already open go on.
#[tokio::test]
async fn watch_streams_past_the_limit_are_refused() {
    let db = TestDb::sqlite();
    let (mut server, _emulator, _url) = setup(&db, &["--max-watchers", "2"]).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = server
            .client
            .watch_rooms(proto::WatchRoomsRequest::default())
            .await
            .expect("within the limit")
            .into_inner();
        stream
            .message()
            .await
            .unwrap()
            .expect("the starting bookmark");
        open.push(stream);
    }
    let refused = server
        .client
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("this server's watch limit (--max-watchers) reached"),
        "the message says whose limit it is: {refused:?}"
    );
    assert_eq!(
        refused
            .get_details_error_info()
            .map(|i| i.reason)
            .as_deref(),
        Some("MAX_WATCHERS")
    );

    let room = server.create_room("seen").await;
    for stream in &mut open {
        let event = stream.message().await.unwrap().expect("an event");
        let Some(proto::watch_rooms_response::Kind::Event(event)) = event.kind else {
            panic!("expected the creation, got {event:?}")
        };
        assert_eq!(event.room.unwrap().arn, room.arn);
    }
}

/// A watch stream gives its place back when it ends, and so does one that
/// fails to start.
#[tokio::test]
async fn a_watch_stream_gives_its_place_back() {
    let db = TestDb::sqlite();
    let store = Store::open(&db.url).await.unwrap();
    let hot = HotRooms::load(&store, 0).await.unwrap();
    let settings = FeedSettings {
        max_watchers: 1,
        ..FeedSettings::default()
    };
    let feed = Feed::start(store, settings, hot).await.unwrap();

    let first = feed
        .watch(WatchRequest::default())
        .await
        .expect("room for one");
    assert_eq!(feed.watchers(), 1);
    let Err(Error::ResourceExhausted { .. }) = feed.watch(WatchRequest::default()).await else {
        panic!("a second watcher was let in")
    };
    drop(first);
    assert_eq!(feed.watchers(), 0);

    let future = WatchRequest {
        after_revision: Some(1_000),
        ..WatchRequest::default()
    };
    let Err(Error::RevisionOutOfRange { .. }) = feed.watch(future).await else {
        panic!("a revision the log does not hold yet was accepted")
    };
    assert_eq!(feed.watchers(), 0);
    let _again = feed
        .watch(WatchRequest::default())
        .await
        .expect("room again");
    feed.stop().await;
}

/// A request larger than --max-request-size is refused before it is decoded:
/// nothing reaches IVS Chat.
#[tokio::test]
async fn requests_past_the_size_limit_are_refused() {
    let db = TestDb::sqlite();
    let (mut server, emulator, _url) = setup(&db, &["--max-request-size", "4096"]).await;
    let huge = proto::CreateRoomRequest {
        name: "x".repeat(8192),
        ..Default::default()
    };
    let refused = server.client.create_room(huge).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert_names_the_size_limit(&refused);
    assert_eq!(emulator.calls(Operation::CreateRoom), 0);

    let watch = proto::WatchRoomsRequest {
        identifiers: vec!["y".repeat(8192)],
        ..Default::default()
    };
    let refused = server.client.watch_rooms(watch).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert_names_the_size_limit(&refused);

    server
        .client
        .create_room(create("small"))
        .await
        .expect("a request under the limit is served");
}

/// The refusal says whose limit it is (the flag and both sizes), and carries
/// them for machines in a `google.rpc.ErrorInfo`.
fn assert_names_the_size_limit(refused: &tonic::Status) {
    let message = refused.message();
    assert!(
        message.contains("--max-request-size 4096 bytes"),
        "{refused:?}"
    );
    assert!(message.contains("this server's limit"), "{refused:?}");
    let info = refused
        .get_details_error_info()
        .expect("an ErrorInfo says which limit");
    assert_eq!(info.reason, "REQUEST_TOO_LARGE");
    assert_eq!(info.domain, "ivschat-rooms");
    assert_eq!(info.metadata["limit"], "4096");
    let size: usize = info.metadata["size"].parse().expect("a size in bytes");
    assert!(size > 8192, "the request's own size: {size}");
}

/// With --max-connection-age, a watch stream ends with UNAVAILABLE half way
/// through its connection's grace period (after the GOAWAY, before the cut),
/// saying where to resume; resuming there on a new connection loses nothing.
#[tokio::test]
async fn watch_streams_end_cleanly_at_the_connection_age_and_resume() {
    let db = TestDb::sqlite();
    let flags = [
        "--max-connection-age",
        "1s",
        "--max-connection-age-grace",
        "2s",
    ];
    let (mut server, _emulator, _url) = setup(&db, &flags).await;
    let mut client = proto::room_service_client::RoomServiceClient::new(server.channel().await);
    let mut stream = client
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    let room = server.create_room("before-the-age").await;
    let ended = loop {
        match stream.message().await {
            Ok(Some(message)) => match message.kind {
                Some(proto::watch_rooms_response::Kind::Event(event)) => {
                    assert_eq!(event.room.unwrap().arn, room.arn);
                    last = Some(event.revision);
                }
                Some(proto::watch_rooms_response::Kind::Progress(p)) => {
                    last = Some(p.revision);
                }
                other => panic!("unexpected {other:?}"),
            },
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("maximum age"), "{ended:?}");
    let last = last.expect("the creation was seen");
    assert!(
        ended.message().contains(&format!("after_revision {last}")),
        "{ended:?} after revision {last}"
    );

    // The same channel connects anew; resume where the stream said.
    let mut resumed = client
        .watch_rooms(proto::WatchRoomsRequest {
            after_revision: Some(last),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let after = server.create_room("after-the-age").await;
    let event = loop {
        let message = resumed.message().await.unwrap().expect("a message");
        if let Some(proto::watch_rooms_response::Kind::Event(event)) = message.kind {
            break event;
        }
    };
    assert_eq!(event.revision, last + 1);
    assert_eq!(event.room.unwrap().arn, after.arn);
}

/// Refusals for want of a budget slot say it is this service's budget (not
/// AWS's), carry `ErrorInfo` (UPSTREAM_BUDGET_EXHAUSTED) and a `RetryInfo`
/// whose delay is when the next slot comes.
#[tokio::test]
async fn the_budget_s_refusal_says_whose_limit_and_when_to_retry() {
    let db = TestDb::sqlite();
    let (mut server, emulator, _url) = setup(&db, &["--upstream-rate", "1"]).await;
    let room = server.create_room("budgeted").await;
    let update = |name: &str| {
        let mut request = tonic::Request::new(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            name: Some(name.into()),
            ..Default::default()
        });
        request.set_timeout(std::time::Duration::from_millis(300));
        request
    };
    server.client.update_room(update("first")).await.unwrap();
    let refused = server
        .client
        .update_room(update("second"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("this service's budget of IVS Chat calls exhausted"),
        "{refused:?}"
    );
    assert_eq!(
        refused
            .get_details_error_info()
            .map(|i| i.reason)
            .as_deref(),
        Some("UPSTREAM_BUDGET_EXHAUSTED")
    );
    let delay = refused
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a retry delay");
    // One slot a second (1.04 s apart), the first just taken.
    assert!(
        delay > std::time::Duration::from_millis(300)
            && delay <= std::time::Duration::from_millis(1040),
        "{delay:?}"
    );
    assert_eq!(emulator.calls(Operation::UpdateRoom), 1);
}

/// UNAVAILABLE carries a `RetryInfo` where the service knows when a retry
/// can succeed: IVS Chat throttling us (the pause the budget took), and
/// ListRooms while the first listing fills the cache.
#[tokio::test]
async fn unavailable_says_when_to_retry_where_it_knows() {
    use ivschat_rooms::emulator::{Faults, InjectedError};
    use std::time::Duration;

    let db = TestDb::sqlite();
    let (emulator, url) = common::emulator().await;
    let held = emulator.hold_responses(Operation::ListRooms);
    let mut server = common::TestServer::start(common::serve_config(
        &db.url,
        &url,
        &["--listing-wait", "100ms", "--upstream-max-attempts", "1"],
    ))
    .await;
    let refused = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.get_details_retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1)),
        "{refused:?}"
    );
    drop(held);
    server.wait_listed().await;

    let room = server.create_room("throttled").await;
    emulator.set_faults(Faults {
        error_rate: 1.0,
        error: InjectedError::Throttling,
        ..Faults::default()
    });
    let refused = server
        .client
        .get_room(proto::GetRoomRequest {
            identifier: room.arn.clone(),
            consistency: proto::ReadConsistency::Strong as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("throttling"), "{refused:?}");
    assert_eq!(
        refused.get_details_retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1)),
        "the first throttle pauses GetRoom for 1 s: {refused:?}"
    );
}
