//! RoomService end to end: the real server on port 0, its cache on SQLite or
//! Postgres, the real AWS SDK, and the emulator standing in for IVS Chat.

mod common;

use std::collections::HashMap;

use common::{TestDb, TestServer, create, emulator, proto, sdk, serve_config, setup};
use ivschat_rooms::emulator::{Emulator, Faults, InjectedError, Operation};
use tonic::Code;
use tonic_types::StatusExt as _;

const LAMBDA: &str = "arn:aws:lambda:us-east-1:123456789012:function:review";
const LOGGING_A: &str = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/loggingA0001";
const LOGGING_B: &str = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/loggingB0002";
const UNKNOWN_ROOM: &str = "arn:aws:ivschat:us-east-1:123456789012:room/doesNotExist";

/// Two servers on one cache in front of one emulator, startup listings done,
/// so their calls really race.
async fn two_replicas(db: &TestDb) -> (TestServer, TestServer, Emulator) {
    let (emulator, url) = emulator().await;
    let config = serve_config(&db.url, &url, &["--max-staleness", "1h"]);
    let mut a = TestServer::start(config.clone()).await;
    let mut b = TestServer::start(config).await;
    a.wait_listed().await;
    b.wait_listed().await;
    (a, b, emulator)
}

/// Waits until a session of the Postgres database `url` waits for an
/// advisory lock: a replica waiting for a room's turn.
async fn waiting_for_a_turn(url: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks \
                 WHERE locktype = 'advisory' AND NOT granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&mut conn)
            .await
            .expect("pg_locks");
            if waiting > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a replica waits for the room's turn");
}

fn get(arn: &str, consistency: proto::ReadConsistency) -> proto::GetRoomRequest {
    proto::GetRoomRequest {
        identifier: arn.into(),
        consistency: consistency as i32,
    }
}

/// The fields a status's BadRequest names, in order.
fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A proto timestamp as nanoseconds since the epoch.
fn nanos(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1_000_000_000 + i64::from(t.nanos)
}

fn total_calls(emulator: &Emulator) -> u64 {
    Operation::ALL.iter().map(|op| emulator.calls(*op)).sum()
}

/// CreateRoom passes every field to IVS Chat and GetRoom returns the same room.
async fn create_then_get_round_trips(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    let created = server
        .client
        .create_room(proto::CreateRoomRequest {
            name: "lobby-1".into(),
            maximum_message_rate_per_second: Some(42),
            maximum_message_length: None,
            message_review_handler: Some(proto::MessageReviewHandler {
                uri: LAMBDA.into(),
                fallback_result: proto::FallbackResult::Deny as i32,
            }),
            tags: HashMap::from([("team".into(), "chat".into())]),
            logging_configuration_identifiers: vec![LOGGING_A.into()],
            request_id: String::new(),
            region: String::new(),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.name, "lobby-1");
    assert_eq!(created.maximum_message_rate_per_second, 42);
    assert_eq!(created.maximum_message_length, 500, "IVS Chat's default");
    assert_eq!(
        created.message_review_handler,
        Some(proto::MessageReviewHandler {
            uri: LAMBDA.into(),
            fallback_result: proto::FallbackResult::Deny as i32
        })
    );
    assert_eq!(created.tags.get("team").map(String::as_str), Some("chat"));
    assert_eq!(created.logging_configuration_identifiers, [LOGGING_A]);
    assert_eq!(
        created.arn,
        format!("arn:aws:ivschat:us-east-1:123456789012:room/{}", created.id)
    );
    assert_eq!(created.create_time, created.update_time);

    let upstream = emulator.rooms();
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].arn, created.arn);

    for consistency in [
        proto::ReadConsistency::Cached,
        proto::ReadConsistency::Strong,
    ] {
        let got = server
            .client
            .get_room(get(&created.arn, consistency))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got, created, "{consistency:?}");
    }
}

/// A cached read costs no upstream call; STRONG always costs one.
async fn cached_reads_spare_upstream(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &["--max-staleness", "1h"]).await;
    let room = server.create_room("a").await;
    let before = emulator.calls(Operation::GetRoom);
    for _ in 0..5 {
        server
            .client
            .get_room(get(&room.arn, proto::ReadConsistency::Unspecified))
            .await
            .unwrap();
    }
    assert_eq!(emulator.calls(Operation::GetRoom), before);
    server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Strong))
        .await
        .unwrap();
    assert_eq!(emulator.calls(Operation::GetRoom), before + 1);
}

/// Past --max-staleness a cached read goes upstream and sees changes made
/// behind the service's back; within it, STRONG does.
async fn stale_rows_are_read_again(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &["--max-staleness", "0s"]).await;
    let room = server.create_room("before").await;
    emulator
        .update_room(
            &room.arn,
            &ivschat_rooms::domain::RoomPatch {
                name: Some("after".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let got = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "after");
    assert!(nanos(&got.update_time) > nanos(&room.update_time));
}

/// UpdateRoom changes only what it is given; an empty handler uri removes the
/// handler; the logging list is replaced or cleared; updateTime moves forward.
async fn update_is_partial(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    let room = server
        .client
        .create_room(proto::CreateRoomRequest {
            name: "orig".into(),
            maximum_message_length: Some(300),
            message_review_handler: Some(proto::MessageReviewHandler {
                uri: LAMBDA.into(),
                fallback_result: 0,
            }),
            logging_configuration_identifiers: vec![LOGGING_A.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let renamed = server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            name: Some("renamed".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.name, "renamed");
    assert_eq!(renamed.maximum_message_length, 300);
    assert_eq!(renamed.message_review_handler, room.message_review_handler);
    assert_eq!(renamed.logging_configuration_identifiers, [LOGGING_A]);
    assert_eq!(renamed.create_time, room.create_time);
    assert!(nanos(&renamed.update_time) > nanos(&room.update_time));

    let replaced = server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            message_review_handler: Some(proto::MessageReviewHandler::default()),
            logging_configuration_identifiers: Some(proto::LoggingConfigurationIdentifiers {
                identifiers: vec![LOGGING_B.into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replaced.message_review_handler, None);
    assert_eq!(replaced.logging_configuration_identifiers, [LOGGING_B]);
    assert_eq!(replaced.name, "renamed");
    assert!(nanos(&replaced.update_time) > nanos(&renamed.update_time));

    let cleared = server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            logging_configuration_identifiers: Some(Default::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.logging_configuration_identifiers.is_empty());

    // The cache holds what IVS Chat holds.
    let upstream = emulator.rooms().pop().unwrap();
    let cached = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached, cleared);
    assert_eq!(upstream.name, "renamed");
    assert!(upstream.logging_configuration_identifiers.is_empty());
}

/// DeleteRoom deletes upstream and in the cache; later reads are NOT_FOUND
/// without asking IVS Chat again (within the staleness bound).
async fn delete_forgets_the_room(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &["--max-staleness", "1h"]).await;
    let room = server.create_room("doomed").await;
    server
        .client
        .delete_room(proto::DeleteRoomRequest {
            identifier: room.arn.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert!(emulator.rooms().is_empty());
    let calls = emulator.calls(Operation::GetRoom);
    let err = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        emulator.calls(Operation::GetRoom),
        calls,
        "answered from the tombstone"
    );
    let err = server
        .client
        .delete_room(proto::DeleteRoomRequest {
            identifier: room.arn.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let listed = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.rooms.is_empty());
}

/// ListRooms pages through the cache newest first, each room once, with IVS
/// Chat's filters; a bad token is INVALID_ARGUMENT.
async fn list_pages_and_filters(db: TestDb) {
    let (mut server, _emulator, _) = setup(&db, &[]).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let mut req = create(if i % 2 == 0 { "even" } else { "odd" });
        if i == 3 {
            req.message_review_handler = Some(proto::MessageReviewHandler {
                uri: LAMBDA.into(),
                fallback_result: 0,
            });
            req.logging_configuration_identifiers = vec![LOGGING_B.into()];
        }
        created.push(server.client.create_room(req).await.unwrap().into_inner());
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = server
            .client
            .list_rooms(proto::ListRoomsRequest {
                max_results: 3,
                next_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.rooms.len() <= 3);
        // Seven creations, each one event in the change log.
        assert_eq!(page.revision, 7, "the revision the page reflects");
        seen.extend(page.rooms);
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut expected = created.clone();
    expected.reverse(); // created later = updated later = listed first
    assert_eq!(seen, expected);

    let list = |req: proto::ListRoomsRequest| {
        let mut client = server.client.clone();
        async move { client.list_rooms(req).await.map(|r| r.into_inner().rooms) }
    };
    let odd = list(proto::ListRoomsRequest {
        name: "odd".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(odd.len(), 3);
    assert!(odd.iter().all(|r| r.name == "odd"));
    for req in [
        proto::ListRoomsRequest {
            message_review_handler_uri: LAMBDA.into(),
            ..Default::default()
        },
        proto::ListRoomsRequest {
            logging_configuration_identifier: LOGGING_B.into(),
            ..Default::default()
        },
    ] {
        let rooms = list(req).await.unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms[0].arn, created[3].arn);
    }
    let err = list(proto::ListRoomsRequest {
        next_token: "garbage!".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["next_token"]);
}

/// Rooms that existed in IVS Chat before the service started are listed once
/// the startup listing has filled the cache (marked details_pending until
/// read whole), then whole (with their message limits), one GetRoom each.
async fn startup_listing_fills_the_cache(db: TestDb) {
    let (emulator, url) = emulator().await;
    let aws = sdk(&url);
    for name in ["pre-a", "pre-b"] {
        aws.create_room()
            .name(name)
            .maximum_message_length(123)
            .send()
            .await
            .unwrap();
    }
    let mut server = TestServer::start(serve_config(&db.url, &url, &[])).await;
    let (listed, _) = common::load::list_all(&mut server.client).await;
    let names: Vec<_> = listed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"pre-a") && names.contains(&"pre-b"));
    assert!(
        listed
            .iter()
            .all(|r| r.details_pending == (r.maximum_message_length == 0))
    );
    let (rooms, _) = common::load::list_all_whole(&mut server.client).await;
    assert!(
        rooms
            .iter()
            .all(|r| r.maximum_message_length == 123 && !r.details_pending)
    );
    assert_eq!(
        emulator.calls(Operation::GetRoom),
        2,
        "one GetRoom per room listed"
    );
}

/// TagRoom and UntagRoom return the room as it is after, and the cache agrees
/// though tagging does not move updateTime.
async fn tags_round_trip(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &["--max-staleness", "1h"]).await;
    let room = server.create_room("tagged").await;
    let tagged = server
        .client
        .tag_room(proto::TagRoomRequest {
            identifier: room.arn.clone(),
            tags: HashMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tagged.tags.len(), 2);
    assert_eq!(tagged.update_time, room.update_time);
    let untagged = server
        .client
        .untag_room(proto::UntagRoomRequest {
            identifier: room.arn.clone(),
            tag_keys: vec!["a".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        untagged.tags,
        HashMap::from([("b".to_string(), "2".to_string())])
    );
    let cached = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.tags, untagged.tags);
    assert_eq!(emulator.rooms()[0].tags.len(), 1);
}

/// Invalid requests are INVALID_ARGUMENT naming each field (snake_case), and
/// never reach IVS Chat.
async fn invalid_requests_never_reach_upstream(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    let room = server.create_room("ok").await;
    let calls = total_calls(&emulator);
    let c = &mut server.client;
    let cases: Vec<(tonic::Status, Vec<&str>)> = vec![
        (
            c.create_room(proto::CreateRoomRequest {
                name: "no spaces".into(),
                maximum_message_rate_per_second: Some(101),
                maximum_message_length: Some(0),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            vec![
                "name",
                "maximum_message_rate_per_second",
                "maximum_message_length",
            ],
        ),
        (
            c.create_room(proto::CreateRoomRequest {
                message_review_handler: Some(proto::MessageReviewHandler {
                    uri: "arn:aws:sqs:us-east-1:123456789012:q".into(),
                    fallback_result: 0,
                }),
                logging_configuration_identifiers: vec![LOGGING_A.into(); 4],
                ..Default::default()
            })
            .await
            .unwrap_err(),
            vec![
                "message_review_handler.uri",
                "logging_configuration_identifiers",
            ],
        ),
        (
            c.create_room(proto::CreateRoomRequest {
                message_review_handler: Some(proto::MessageReviewHandler {
                    uri: LAMBDA.into(),
                    fallback_result: 7,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            vec!["message_review_handler.fallback_result"],
        ),
        (
            c.create_room(proto::CreateRoomRequest {
                tags: (0..51).map(|i| (format!("k{i}"), String::new())).collect(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            vec!["tags"],
        ),
        (
            c.get_room(get("room-1", proto::ReadConsistency::Cached))
                .await
                .unwrap_err(),
            vec!["identifier"],
        ),
        (
            c.get_room(proto::GetRoomRequest {
                identifier: room.arn.clone(),
                consistency: 9,
            })
            .await
            .unwrap_err(),
            vec!["consistency"],
        ),
        (
            c.update_room(proto::UpdateRoomRequest {
                identifier: room.arn.clone(),
                name: Some("x".repeat(129)),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            vec!["name"],
        ),
        (
            c.delete_room(proto::DeleteRoomRequest {
                identifier: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            vec!["identifier"],
        ),
        (
            c.list_rooms(proto::ListRoomsRequest {
                max_results: 51,
                ..Default::default()
            })
            .await
            .unwrap_err(),
            vec!["max_results"],
        ),
        (
            c.tag_room(proto::TagRoomRequest {
                identifier: room.arn.clone(),
                tags: HashMap::from([("k".repeat(129), "v".into())]),
            })
            .await
            .unwrap_err(),
            vec![],
        ),
        (
            c.untag_room(proto::UntagRoomRequest {
                identifier: room.arn.clone(),
                tag_keys: vec![String::new()],
            })
            .await
            .unwrap_err(),
            vec!["tag_keys[0]"],
        ),
        (
            c.untag_room(proto::UntagRoomRequest {
                identifier: room.arn.clone(),
                tag_keys: vec![],
            })
            .await
            .unwrap_err(),
            vec!["tag_keys"],
        ),
    ];
    for (i, (status, fields)) in cases.iter().enumerate() {
        assert_eq!(status.code(), Code::InvalidArgument, "case {i}: {status:?}");
        if fields.is_empty() {
            // A tag key is named by its value; just check there is one violation.
            assert_eq!(bad_fields(status).len(), 1, "case {i}");
        } else {
            assert_eq!(bad_fields(status), *fields, "case {i}");
        }
    }
    assert_eq!(total_calls(&emulator), calls, "no call reached IVS Chat");
    assert_eq!(emulator.rooms().len(), 1);
}

/// Each IVS Chat error reaches the client as its documented gRPC code, and an
/// unknown one as INTERNAL without its details.
async fn upstream_errors_map_to_codes(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    let err = server
        .client
        .get_room(get(UNKNOWN_ROOM, proto::ReadConsistency::Strong))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for (injected, code) in [
        (InjectedError::Internal, Code::Unavailable),
        (InjectedError::Throttling, Code::Unavailable),
        (InjectedError::ServiceQuotaExceeded, Code::ResourceExhausted),
        (InjectedError::AccessDenied, Code::PermissionDenied),
        (InjectedError::PendingVerification, Code::FailedPrecondition),
        (InjectedError::Conflict, Code::Aborted),
        (InjectedError::Unmodeled, Code::Internal),
    ] {
        emulator.set_faults(Faults {
            error_rate: 1.0,
            error: injected,
            ..Default::default()
        });
        let err = server.client.create_room(create("x")).await.unwrap_err();
        assert_eq!(err.code(), code, "{injected:?}: {err:?}");
        assert!(
            !err.message().contains("7f3a"),
            "internal details leaked: {}",
            err.message()
        );
    }
    emulator.set_faults(Faults::default());
    assert!(emulator.rooms().is_empty(), "no failed call created a room");
}

/// An upstream that does not answer in time, or cannot be reached, is UNAVAILABLE.
async fn unreachable_or_slow_upstream_is_unavailable(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &["--upstream-timeout", "200ms"]).await;
    emulator.set_faults(Faults {
        latency: std::time::Duration::from_secs(2),
        ..Default::default()
    });
    let err = server.client.create_room(create("slow")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // A port that is bound (so nobody else takes it) but not listening:
    // connections to it are refused.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = reserved.local_addr().unwrap();
    let mut server =
        TestServer::start(serve_config(&db.url, &format!("http://{closed}"), &[])).await;
    let err = server
        .client
        .get_room(get(UNKNOWN_ROOM, proto::ReadConsistency::Strong))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

/// A GetRoom answer that IVS Chat produced before an update, but that arrives
/// after it, can never overwrite the update in the cache: the older version loses.
async fn older_answer_never_overwrites_newer(db: TestDb) {
    let (mut a, mut b, emulator) = two_replicas(&db).await;
    let room = a.create_room("v1").await;

    let held = emulator.hold_responses(Operation::GetRoom);
    let gets = emulator.calls(Operation::GetRoom);
    let slow_read = tokio::spawn({
        let mut client = a.client.clone();
        let arn = room.arn.clone();
        async move {
            client
                .get_room(get(&arn, proto::ReadConsistency::Strong))
                .await
        }
    });
    // The emulator has read v1 (calls are counted once handled) and is holding
    // its answer back.
    emulator.wait_for_calls(Operation::GetRoom, gets + 1).await;
    let update = tokio::spawn({
        let mut client = b.client.clone();
        let arn = room.arn.clone();
        async move {
            client
                .update_room(proto::UpdateRoomRequest {
                    identifier: arn,
                    name: Some("v2".into()),
                    ..Default::default()
                })
                .await
        }
    });
    if db.url.starts_with("postgres") {
        // Replicas take a room's turns across the database: the update
        // waits for the read, so the slow answer lands first.
        waiting_for_a_turn(&db.url).await;
        assert_eq!(emulator.calls(Operation::UpdateRoom), 0, "the update waits");
        held.release();
        let answered = slow_read.await.unwrap().unwrap().into_inner();
        assert_eq!(answered.name, "v1");
        let v2 = update.await.unwrap().unwrap().into_inner();
        assert_eq!(v2.name, "v2");
    } else {
        // SQLite serves one process: two servers on one file race, and the
        // update-time rule decides.
        let v2 = update.await.unwrap().unwrap().into_inner();
        held.release();
        let answered = slow_read.await.unwrap().unwrap().into_inner();
        assert_eq!(
            answered, v2,
            "the newer cached version is what the slow read returns"
        );
    }
    for server in [&mut a, &mut b] {
        let cached = server
            .client
            .get_room(get(&room.arn, proto::ReadConsistency::Cached))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cached.name, "v2");
    }
}

/// Concurrent updates through two servers leave the cache holding exactly
/// what IVS Chat holds.
async fn racing_updates_converge(db: TestDb) {
    let (a, b, emulator) = two_replicas(&db).await;
    let room = a
        .client
        .clone()
        .create_room(create("r"))
        .await
        .unwrap()
        .into_inner();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut client = if i % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        let arn = room.arn.clone();
        tasks.push(tokio::spawn(async move {
            client
                .update_room(proto::UpdateRoomRequest {
                    identifier: arn,
                    name: Some(format!("n{i}")),
                    maximum_message_rate_per_second: Some(i + 1),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("update");
    }
    let upstream = emulator.rooms().pop().unwrap();
    let cached = a
        .client
        .clone()
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.name, upstream.name);
    assert_eq!(
        cached.maximum_message_rate_per_second,
        upstream.maximum_message_rate_per_second
    );
    assert_eq!(nanos(&cached.update_time), upstream.update_time.as_nanos());
}

/// A restarted server on the same database serves what it cached, even while
/// IVS Chat is failing.
async fn restart_keeps_the_cache(db: TestDb) {
    let (emulator, url) = emulator().await;
    let mut server =
        TestServer::start(serve_config(&db.url, &url, &["--max-staleness", "1h"])).await;
    let room = server.create_room("kept").await;
    // Wait for the startup listing so the cache is known to be complete.
    server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .expect("listing completes");
    server.stop().await;

    emulator.set_faults(Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    // ListRooms must not wait for a listing that cannot succeed now.
    let config = serve_config(
        &db.url,
        &url,
        &["--max-staleness", "1h", "--listing-wait", "0s"],
    );
    let mut server = TestServer::start(config).await;
    let got = server
        .client
        .get_room(get(&room.arn, proto::ReadConsistency::Cached))
        .await
        .expect("served from the cache")
        .into_inner();
    assert_eq!(got, room);
    let listed = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .expect("listing known complete from before the restart")
        .into_inner();
    assert_eq!(listed.rooms, [room]);
}

/// Throttling that outlasts the retries is UNAVAILABLE (IVS Chat cannot be
/// asked now; RESOURCE_EXHAUSTED is this service's own budget), after exactly
/// --upstream-max-attempts calls.
async fn throttling_after_retries_is_unavailable(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &["--upstream-max-attempts", "3"]).await;
    emulator.set_faults(Faults {
        error_rate: 1.0,
        error: InjectedError::Throttling,
        ..Default::default()
    });
    let err = server.client.create_room(create("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(emulator.calls(Operation::CreateRoom), 3);
}

/// A client that gives up after IVS Chat has made its write does not keep the
/// write from the cache: the exchange runs to completion (and shutdown waits
/// for it).
async fn abandoned_write_still_reaches_the_cache(db: TestDb) {
    let (server, emulator, url) = setup(&db, &[]).await;
    let held = emulator.hold_responses(Operation::CreateRoom);
    let mut request = tonic::Request::new(create("abandoned"));
    request.set_timeout(std::time::Duration::from_millis(100));
    let abandoned = tokio::spawn({
        let mut client = server.client.clone();
        async move { client.create_room(request).await }
    });
    emulator.wait_for_calls(Operation::CreateRoom, 1).await;
    let err = abandoned.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    held.release();
    server.stop().await;

    // Served from the cache alone: IVS Chat now fails every call.
    emulator.set_faults(Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let mut server =
        TestServer::start(serve_config(&db.url, &url, &["--listing-wait", "0s"])).await;
    let listed = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rooms;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].arn, emulator.rooms()[0].arn);
}

/// An UpdateRoom answer that arrives after another server learnt that the
/// room was deleted does not bring the room back into the cache. (A delete
/// through the other server would wait for the update: writes to one room
/// take turns across replicas. So the room is deleted behind the service's
/// back, and the other server learns it with a STRONG read.)
async fn late_answer_does_not_resurrect_a_deleted_room(db: TestDb) {
    let (mut a, mut b, emulator) = two_replicas(&db).await;
    let room = a.create_room("doomed").await;

    let held = emulator.hold_responses(Operation::UpdateRoom);
    let late_update = tokio::spawn({
        let mut client = a.client.clone();
        let arn = room.arn.clone();
        async move {
            client
                .update_room(proto::UpdateRoomRequest {
                    identifier: arn,
                    name: Some("updated".into()),
                    ..Default::default()
                })
                .await
        }
    });
    emulator.wait_for_calls(Operation::UpdateRoom, 1).await;
    emulator.delete_room(&room.arn).expect("delete");
    let strong_read = tokio::spawn({
        let mut client = b.client.clone();
        let arn = room.arn.clone();
        async move {
            client
                .get_room(get(&arn, proto::ReadConsistency::Strong))
                .await
        }
    });
    if db.url.starts_with("postgres") {
        // The read takes the room's turn across replicas: it waits for the
        // update, whose answer lands first; then it finds the room gone.
        waiting_for_a_turn(&db.url).await;
        held.release();
        late_update
            .await
            .unwrap()
            .expect("IVS Chat did apply the update");
        let gone = strong_read.await.unwrap().unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
    } else {
        // Two servers on one SQLite file race: the tombstone decides.
        let gone = strong_read.await.unwrap().unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
        held.release();
        late_update
            .await
            .unwrap()
            .expect("IVS Chat did apply the update");
    }

    for server in [&mut a, &mut b] {
        let err = server
            .client
            .get_room(get(&room.arn, proto::ReadConsistency::Cached))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let listed = server
            .client
            .list_rooms(proto::ListRoomsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.rooms.is_empty(), "{:?}", listed.rooms);
    }
}

on_both_backends!(
    throttling_after_retries_is_unavailable,
    abandoned_write_still_reaches_the_cache,
    late_answer_does_not_resurrect_a_deleted_room,
    create_then_get_round_trips,
    cached_reads_spare_upstream,
    stale_rows_are_read_again,
    update_is_partial,
    delete_forgets_the_room,
    list_pages_and_filters,
    startup_listing_fills_the_cache,
    tags_round_trip,
    invalid_requests_never_reach_upstream,
    upstream_errors_map_to_codes,
    unreachable_or_slow_upstream_is_unavailable,
    older_answer_never_overwrites_newer,
    racing_updates_converge,
    restart_keeps_the_cache,
);
