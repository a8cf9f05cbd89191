//! Bearer-token authentication (`--auth-tokens`) and `--no-reflection`,
//! against the real server on port 0.

mod common;

use std::io::Write as _;

use common::{TestDb, TestServer, create, emulator, proto, serve_config};
use ivschat_rooms::emulator::{Emulator, Operation};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

const WRITER: &str = "writer-token-0123456789";
const READER: &str = "reader-token-9876543210";

/// A server whose token file holds WRITER and READER (read-only), with
/// `extra` flags; the token file lives as long as the returned value.
async fn secured(extra: &[&str]) -> (TestServer, Emulator, TestDb, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "# test tokens\n{WRITER}\n{READER} readonly").unwrap();
    let db = TestDb::sqlite();
    let (emulator, url) = emulator().await;
    let path = file.path().to_str().unwrap().to_owned();
    let flags: Vec<&str> = ["--auth-tokens", path.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let server = TestServer::start(serve_config(&db.url, &url, &flags)).await;
    (server, emulator, db, file)
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn get(arn: &str) -> proto::GetRoomRequest {
    proto::GetRoomRequest {
        identifier: arn.into(),
        ..Default::default()
    }
}

/// No token or an unknown one: UNAUTHENTICATED, for reads and writes, and
/// nothing reaches IVS Chat.
#[tokio::test]
async fn requests_without_a_known_token_are_unauthenticated() {
    let (server, emulator, _db, _file) = secured(&[]).await;
    let mut client = server.client.clone();
    let missing = client.create_room(create("anon")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let unknown = client
        .create_room(with_token(create("guess"), "writer-token-012345678"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    let read = client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::Unauthenticated);
    let watch = client
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::Unauthenticated);

    assert_eq!(emulator.calls(Operation::CreateRoom), 0);
    assert!(emulator.rooms().is_empty());
}

/// A read-only token reads and watches; its writes are PERMISSION_DENIED and
/// change nothing. A full token writes.
#[tokio::test]
async fn read_only_tokens_read_and_watch_but_do_not_write() {
    let (server, emulator, _db, _file) = secured(&[]).await;
    let mut client = server.client.clone();

    let room = client
        .create_room(with_token(create("by-writer"), WRITER))
        .await
        .expect("a full token creates")
        .into_inner();

    let read = client
        .get_room(with_token(get(&room.arn), READER))
        .await
        .expect("a read-only token reads")
        .into_inner();
    assert_eq!(read.name, "by-writer");
    let mut watch = client
        .watch_rooms(with_token(
            proto::WatchRoomsRequest {
                identifiers: vec![room.arn.clone()],
                include_snapshot: true,
                ..Default::default()
            },
            READER,
        ))
        .await
        .expect("a read-only token watches")
        .into_inner();
    let first = watch.message().await.unwrap().expect("a snapshot");
    assert!(first.kind.is_some());

    let creates = emulator.calls(Operation::CreateRoom);
    let denied = client
        .create_room(with_token(create("by-reader"), READER))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = client
        .update_room(with_token(
            proto::UpdateRoomRequest {
                identifier: room.arn.clone(),
                name: Some("renamed".into()),
                ..Default::default()
            },
            READER,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = client
        .delete_room(with_token(
            proto::DeleteRoomRequest {
                identifier: room.arn.clone(),
                ..Default::default()
            },
            READER,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(emulator.calls(Operation::CreateRoom), creates);
    assert_eq!(emulator.calls(Operation::UpdateRoom), 0);
    assert_eq!(emulator.calls(Operation::DeleteRoom), 0);
    let rooms = emulator.rooms();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].name, "by-writer");
}

async fn list_services(
    server: &TestServer,
    token: Option<&str>,
) -> Result<ServerReflectionResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]);
    let request = match token {
        Some(token) => with_token(requests, token),
        None => Request::new(requests),
    };
    let mut responses = client.server_reflection_info(request).await?.into_inner();
    responses.next().await.expect("a response")
}

/// Health needs no token; reflection needs one (read-only will do).
#[tokio::test]
async fn health_is_open_and_reflection_needs_a_token() {
    let (server, _emulator, _db, _file) = secured(&[]).await;
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("health without a token");

    let refused = list_services(&server, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let listed = list_services(&server, Some(READER)).await.unwrap();
    assert!(listed.message_response.is_some());
}

/// --no-reflection: the reflection services are gone (UNIMPLEMENTED), the
/// rest serves as before.
#[tokio::test]
async fn no_reflection_turns_reflection_off() {
    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let server = TestServer::start(serve_config(&db.url, &url, &["--no-reflection"])).await;
    let refused = list_services(&server, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    let mut client = server.client.clone();
    client
        .create_room(create("still-serving"))
        .await
        .expect("RoomService serves");
}

/// A bad token file stops the server from starting, saying which line.
#[tokio::test]
async fn a_bad_token_file_is_refused_at_startup() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "fine\nsecret-value admin").unwrap();
    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let path = file.path().to_str().unwrap().to_owned();
    let config = serve_config(&db.url, &url, &["--auth-tokens", path.as_str()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = ivschat_rooms::server::run(config, listener, std::future::pending())
        .await
        .expect_err("a malformed token file");
    let message = format!("{error:#}");
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.contains("secret-value"), "{message}");
}
