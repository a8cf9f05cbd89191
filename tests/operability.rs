//! What operators and grpcurl users rely on: health, reflection (v1 and
//! v1alpha, the error details included), and the embedded default upstream
//! surviving restarts.

mod common;

use clap::Parser as _;
use common::{TestDb, TestServer, emulator, proto, serve_config};
use ivschat_rooms::config::{Cli, Command};
use tokio_stream::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const ROOM_SERVICE: &str = "ivschat.rooms.v1.RoomService";

/// grpc.health.v1 reports the server and RoomService as SERVING.
#[tokio::test]
async fn health_reports_serving() {
    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let server = TestServer::start(serve_config(&db.url, &url, &[])).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", ROOM_SERVICE] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// Reflection v1 lists our services and describes RoomService.
#[tokio::test]
async fn reflection_v1_describes_the_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let server = TestServer::start(serve_config(&db.url, &url, &[])).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(ROOM_SERVICE.into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [ROOM_SERVICE, "grpc.health.v1.Health"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

/// Reflection v1alpha, the only one grpcurl 1.8 and grpcio speak, answers too.
#[tokio::test]
async fn reflection_v1alpha_lists_the_service() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let server = TestServer::start(serve_config(&db.url, &url, &[])).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    assert!(list.service.iter().any(|s| s.name == ROOM_SERVICE));
}

/// Reflection (v1alpha, grpcurl 1.8's) serves the messages refusals carry
/// in their details, with everything they import, so grpcurl prints
/// `google.rpc.BadRequest`, `ErrorInfo` and `RetryInfo` as JSON.
#[tokio::test]
async fn reflection_serves_the_error_details() {
    use prost::Message as _;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let server = TestServer::start(serve_config(&db.url, &url, &[])).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let mut ask = async |request: MessageRequest| {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        match responses.next().await.unwrap().unwrap().message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => files
                .file_descriptor_proto
                .iter()
                .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
                .collect::<Vec<_>>(),
            other => panic!("expected file descriptors, got {other:?}"),
        }
    };
    for (symbol, message) in [
        ("google.rpc.BadRequest", "BadRequest"),
        ("google.rpc.ErrorInfo", "ErrorInfo"),
        ("google.rpc.RetryInfo", "RetryInfo"),
    ] {
        let files = ask(MessageRequest::FileContainingSymbol(symbol.into())).await;
        let file = files
            .iter()
            .find(|f| f.message_type.iter().any(|m| m.name() == message))
            .unwrap_or_else(|| panic!("{symbol} is not described: {files:#?}"));
        assert_eq!(file.package(), "google.rpc");
        // What it imports is served too (RetryInfo's delay is a Duration).
        for dependency in &file.dependency {
            let served = ask(MessageRequest::FileByFilename(dependency.clone())).await;
            assert!(
                served.iter().any(|f| f.name() == dependency),
                "{dependency}, which {symbol} imports, is not served"
            );
        }
    }
}

/// With the embedded default upstream, rooms survive a restart in both the
/// cache and the emulator's state file, which sits beside the cache.
#[tokio::test]
async fn embedded_upstream_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = || {
        let args = ["ivschat-rooms", "--listen", "127.0.0.1:0", "--data-dir"];
        match Cli::try_parse_from(args.into_iter().chain([data_dir.to_str().unwrap()]))
            .unwrap()
            .into_command()
        {
            Command::Serve(config) => config,
            Command::Emulator(_) | Command::Watch(_) => unreachable!(),
        }
    };
    let mut server = TestServer::start(config()).await;
    let room = server
        .client
        .create_room(proto::CreateRoomRequest {
            name: "persistent".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    server.stop().await;
    assert!(data_dir.join("rooms.db").exists());
    assert!(data_dir.join("rooms.db.emulator.json").exists());

    let mut server = TestServer::start(config()).await;
    let strong = server
        .client
        .get_room(proto::GetRoomRequest {
            identifier: room.arn.clone(),
            consistency: proto::ReadConsistency::Strong as i32,
        })
        .await
        .expect("the emulator kept the room")
        .into_inner();
    assert_eq!(strong, room);
    let listed = server
        .client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rooms, [room]);
}

/// Shutdown turns health NOT_SERVING first: a health watcher sees it, and
/// while --shutdown-delay runs the server still serves.
#[tokio::test]
async fn shutdown_turns_health_not_serving_first() {
    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let mut server =
        TestServer::start(serve_config(&db.url, &url, &["--shutdown-delay", "1h"])).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = |message: Option<tonic_health::pb::HealthCheckResponse>| {
        ServingStatus::try_from(message.expect("a status").status).unwrap()
    };
    assert_eq!(
        status(watch.message().await.unwrap()),
        ServingStatus::Serving
    );

    server.begin_shutdown();
    assert_eq!(
        status(watch.message().await.unwrap()),
        ServingStatus::NotServing
    );
    let room_service = health
        .check(HealthCheckRequest {
            service: ROOM_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(room_service.status, ServingStatus::NotServing as i32);
    // Not yet stopped accepting: a new connection is still served.
    let mut client = proto::room_service_client::RoomServiceClient::new(server.channel().await);
    client
        .create_room(common::create("during-the-delay"))
        .await
        .expect("served during --shutdown-delay");
}
