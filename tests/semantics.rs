//! What AWS does not give and the service does: idempotent CreateRoom
//! (request_id) and conditional UpdateRoom/DeleteRoom (expected_update_time).

mod common;

use std::time::Duration;

use common::binary::{BIN, Server, within};
use common::{TestDb, TestServer, create, emulator, proto, serve_config, setup};
use ivschat_rooms::domain::{Operation, RoomPatch};
use ivschat_rooms::emulator::{Faults, InjectedError};
use tonic::Code;
use tonic_types::StatusExt as _;

/// The tag a CreateRoom with a request_id puts on its room.
const REQUEST_ID_TAG: &str = "ivschat-rooms:request-id";

fn with_id(name: &str, request_id: &str) -> proto::CreateRoomRequest {
    proto::CreateRoomRequest {
        request_id: request_id.into(),
        ..create(name)
    }
}

fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A retry returns the first call's room, whatever happened to it since; the
/// same id with other parameters is refused; another id creates another room.
async fn a_retried_create_returns_the_first_room(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    let first = server
        .client
        .create_room(with_id("a", "req-1"))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        first.tags.get(REQUEST_ID_TAG).map(String::as_str),
        Some("req-1")
    );
    server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: first.arn.clone(),
            name: Some("renamed".into()),
            ..Default::default()
        })
        .await
        .expect("update");
    let retry = server
        .client
        .create_room(with_id("a", "req-1"))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retry, first, "the retry answers as the first call did");
    assert_eq!(emulator.calls(Operation::CreateRoom), 1);

    let other = server
        .client
        .create_room(with_id("b", "req-1"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert_eq!(bad_fields(&other), ["request_id"]);
    assert_eq!(emulator.calls(Operation::CreateRoom), 1);

    let second = server
        .client
        .create_room(with_id("a", "req-2"))
        .await
        .expect("another request_id")
        .into_inner();
    assert_ne!(second.arn, first.arn);
    assert_eq!(emulator.rooms().len(), 2);
}

/// Concurrent calls with one request_id, on one replica or two sharing a
/// Postgres database, create one room and all answer with it.
async fn concurrent_duplicates_create_one_room(db: TestDb, replicas: usize) {
    let (emulator, url) = emulator().await;
    let mut servers = Vec::new();
    for _ in 0..replicas {
        let mut server = TestServer::start(serve_config(&db.url, &url, &[])).await;
        server.wait_listed().await;
        servers.push(server);
    }
    let held = emulator.hold_responses(Operation::CreateRoom);
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut client = servers[i % replicas].client.clone();
            tokio::spawn(async move { client.create_room(with_id("dup", "same")).await })
        })
        .collect();
    // The first has created the room in IVS Chat; the answer is held.
    within(
        "the first CreateRoom",
        emulator.wait_for_calls(Operation::CreateRoom, 1),
    )
    .await;
    held.release();
    let mut arns = Vec::new();
    for call in calls {
        arns.push(call.await.unwrap().expect("create").into_inner().arn);
    }
    arns.dedup();
    assert_eq!(arns.len(), 1, "{arns:?}");
    assert_eq!(emulator.calls(Operation::CreateRoom), 1);
    assert_eq!(emulator.rooms().len(), 1);
}

async fn concurrent_duplicates_on_one_replica(db: TestDb) {
    concurrent_duplicates_create_one_room(db, 1).await;
}

/// The request_id is remembered by the database: a restarted server answers
/// a retry with the room, without calling IVS Chat.
async fn a_request_id_survives_a_restart(db: TestDb) {
    let (server, emulator, url) = setup(&db, &[]).await;
    let mut client = server.client.clone();
    let first = client
        .create_room(with_id("r", "restart"))
        .await
        .unwrap()
        .into_inner();
    server.stop().await;
    let mut server = TestServer::start(serve_config(&db.url, &url, &[])).await;
    let retry = server
        .client
        .create_room(with_id("r", "restart"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, first);
    assert_eq!(emulator.calls(Operation::CreateRoom), 1);
}

/// A failure IVS Chat certainly did not act on gives the request_id up: the
/// retry creates the room.
async fn a_refused_create_can_be_retried(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    emulator.set_faults(Faults {
        error_rate: 1.0,
        error: InjectedError::ServiceQuotaExceeded,
        ..Faults::default()
    });
    let refused = server
        .client
        .create_room(with_id("q", "quota"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(emulator.rooms().is_empty());
    emulator.set_faults(Faults::default());
    let room = server
        .client
        .create_room(with_id("q", "quota"))
        .await
        .expect("the retry creates the room")
        .into_inner();
    assert_eq!(emulator.rooms().len(), 1);
    assert_eq!(emulator.rooms()[0].arn, room.arn);
}

/// A CreateRoom that IVS Chat carried out but whose answer never came (a
/// timeout): the retry, once the claim has run out, finds the room by its
/// tag instead of creating a second.
async fn a_timed_out_create_is_found_by_the_retry(db: TestDb) {
    let flags = ["--upstream-timeout", "300ms", "--request-id-lease", "400ms"];
    let (mut server, emulator, _) = setup(&db, &flags).await;
    emulator.set_faults(Faults {
        latency_by_operation: [(Operation::CreateRoom, Duration::from_secs(2))].into(),
        ..Faults::default()
    });
    let lost = server
        .client
        .create_room(with_id("slow", "timeout"))
        .await
        .unwrap_err();
    assert_eq!(lost.code(), Code::Unavailable, "{lost:?}");
    assert_eq!(
        emulator.rooms().len(),
        1,
        "IVS Chat created it all the same"
    );
    let retry = server
        .client
        .create_room(with_id("slow", "timeout"))
        .await
        .expect("the retry")
        .into_inner();
    assert_eq!(retry.arn, emulator.rooms()[0].arn);
    assert_eq!(
        emulator.calls(Operation::CreateRoom),
        1,
        "not created again"
    );
    assert!(emulator.calls(Operation::ListRooms) >= 2, "looked for it");
}

/// kill -9 between IVS Chat creating the room and the server recording it:
/// after a restart, the retry finds that room rather than making another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cut_by_kill_9_is_recovered_after_restart() {
    let (emulator, url) = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--upstream", "emulator"])
            .args(["--emulator-url", &url, "--upstream-timeout", "1s"])
            .args(["--request-id-lease", "2s"])
            .arg("--data-dir")
            .arg(dir.path());
        Server::spawn(command)
    };
    let server = start().await;
    let mut client = server.client().await;
    let held = emulator.hold_responses(Operation::CreateRoom);
    let call = tokio::spawn(async move { client.create_room(with_id("crash", "kill")).await });
    within(
        "the CreateRoom",
        emulator.wait_for_calls(Operation::CreateRoom, 1),
    )
    .await;
    server.kill_9().await;
    held.release();
    assert!(call.await.unwrap().is_err(), "the client lost its answer");

    let server = start().await;
    let mut client = server.client().await;
    let retry = within("the retry", client.create_room(with_id("crash", "kill")))
        .await
        .expect("the retry")
        .into_inner();
    let rooms = emulator.rooms();
    assert_eq!(rooms.len(), 1, "{rooms:#?}");
    assert_eq!(retry.arn, rooms[0].arn);
    assert_eq!(emulator.calls(Operation::CreateRoom), 1);
}

/// A DeleteRoom whose first attempt IVS Chat carried out but never answered
/// in time is retried; the retry's NOT_FOUND is that attempt's doing, so the
/// delete succeeds.
async fn a_delete_retried_after_a_lost_answer_succeeds(db: TestDb) {
    let flags = [
        "--upstream-max-attempts",
        "2",
        "--upstream-timeout",
        "300ms",
    ];
    let (mut server, emulator, _) = setup(&db, &flags).await;
    let room = server.create_room("gone").await;
    let held = emulator.hold_responses(Operation::DeleteRoom);
    let mut client = server.client.clone();
    let request = proto::DeleteRoomRequest {
        identifier: room.arn.clone(),
        ..Default::default()
    };
    let delete = tokio::spawn(async move { client.delete_room(request).await });
    // The first attempt deleted the room and timed out; the second is here.
    within(
        "the retry",
        emulator.wait_for_calls(Operation::DeleteRoom, 2),
    )
    .await;
    held.release();
    delete.await.unwrap().expect("the delete succeeds");
    assert!(emulator.rooms().is_empty());
}

fn aborted_at(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "UPDATE_TIME_MISMATCH");
    info.metadata["update_time"].clone()
}

/// expected_update_time is checked against IVS Chat, not the cache: a
/// change made behind the service's back makes the write ABORTED (and the
/// cache learns of it); a mismatch changes nothing.
async fn conditional_writes_check_upstream(db: TestDb) {
    let (mut server, emulator, _) = setup(&db, &[]).await;
    let room = server.create_room("c").await;
    let updated = server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            name: Some("c2".into()),
            expected_update_time: room.update_time,
            ..Default::default()
        })
        .await
        .expect("the expected update_time")
        .into_inner();
    assert_eq!(updated.name, "c2");

    let updates = emulator.calls(Operation::UpdateRoom);
    let stale = server
        .client
        .update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            name: Some("lost".into()),
            expected_update_time: room.update_time,
            ..Default::default()
        })
        .await
        .unwrap_err();
    aborted_at(&stale);
    assert_eq!(emulator.calls(Operation::UpdateRoom), updates);

    // Behind our back: the cache still holds `updated`.
    let behind = emulator
        .update_room(
            &room.arn,
            &RoomPatch {
                name: Some("elsewhere".into()),
                ..RoomPatch::default()
            },
        )
        .unwrap();
    let refused = server
        .client
        .delete_room(proto::DeleteRoomRequest {
            identifier: room.arn.clone(),
            expected_update_time: updated.update_time,
        })
        .await
        .unwrap_err();
    let at = aborted_at(&refused);
    assert!(!at.is_empty());
    assert_eq!(emulator.rooms().len(), 1, "not deleted");
    assert_eq!(emulator.calls(Operation::UpdateRoom), updates);
    let cached = server
        .client
        .get_room(proto::GetRoomRequest {
            identifier: room.arn.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.name, "elsewhere", "the fresh read reached the cache");

    server
        .client
        .delete_room(proto::DeleteRoomRequest {
            identifier: room.arn.clone(),
            expected_update_time: Some(prost_types::Timestamp {
                seconds: behind.update_time.as_nanos().div_euclid(1_000_000_000),
                nanos: behind.update_time.as_nanos().rem_euclid(1_000_000_000) as i32,
            }),
        })
        .await
        .expect("delete at the current update_time");
    assert!(emulator.rooms().is_empty());
}

/// Conditional updates from one update_time, sent together (to one replica
/// or two sharing Postgres), while IVS Chat is slow enough that their reads
/// would all see that time if they were not serialized: exactly one wins.
async fn one_of_concurrent_conditional_updates_wins(db: TestDb, replicas: usize) {
    let (emulator, url) = emulator().await;
    let mut servers = Vec::new();
    for _ in 0..replicas {
        let mut server = TestServer::start(serve_config(&db.url, &url, &[])).await;
        server.wait_listed().await;
        servers.push(server);
    }
    let room = servers[0].create_room("race").await;
    emulator.set_faults(Faults {
        latency_by_operation: [(Operation::UpdateRoom, Duration::from_millis(100))].into(),
        ..Faults::default()
    });
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let mut client = servers[i % replicas].client.clone();
            let request = proto::UpdateRoomRequest {
                identifier: room.arn.clone(),
                name: Some(format!("winner-{i}")),
                expected_update_time: room.update_time,
                ..Default::default()
            };
            tokio::spawn(async move { client.update_room(request).await })
        })
        .collect();
    let mut won = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(room) => won.push(room.into_inner().name),
            Err(status) => {
                aborted_at(&status);
            }
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    assert_eq!(emulator.calls(Operation::UpdateRoom), 1);
    assert_eq!(emulator.rooms()[0].name, won[0]);
}

async fn one_conditional_update_wins_on_one_replica(db: TestDb) {
    one_of_concurrent_conditional_updates_wins(db, 1).await;
}

on_both_backends!(
    a_retried_create_returns_the_first_room,
    concurrent_duplicates_on_one_replica,
    a_request_id_survives_a_restart,
    a_refused_create_can_be_retried,
    a_timed_out_create_is_found_by_the_retry,
    a_delete_retried_after_a_lost_answer_succeeds,
    conditional_writes_check_upstream,
    one_conditional_update_wins_on_one_replica,
);

/// Two replicas sharing one Postgres database.
mod replicas {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_duplicates_create_one_room() {
        if let Some(db) = TestDb::postgres("replicas_duplicates").await {
            super::concurrent_duplicates_create_one_room(db, 2).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_conditional_update_wins() {
        if let Some(db) = TestDb::postgres("replicas_conditional").await {
            one_of_concurrent_conditional_updates_wins(db, 2).await;
        }
    }
}
