//! The `ivschat-rooms` binary itself: configuration from flags and the
//! environment, the `aws` upstream through aws-config's standard chain, the
//! embedded default's warning, and shutdown on SIGTERM.

mod common;

use common::binary::{BIN, Server};
use common::proto;
use tokio::process::Command;

/// `ivschat-rooms serve` on port 0 with `args` and `env`.
async fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied());
    Server::spawn(command).await
}

/// `--upstream aws` takes endpoint, credentials and region from aws-config's
/// standard chain: here the environment, with AWS_ENDPOINT_URL_IVSCHAT
/// pointing at an emulator. Configuration comes from IVSCHAT_ROOMS_* variables.
#[tokio::test]
async fn aws_upstream_uses_the_standard_chain() {
    let (emulator, url) = common::emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("cache.db").display());
    let binary = start(
        &[],
        &[
            ("IVSCHAT_ROOMS_UPSTREAM", "aws"),
            ("IVSCHAT_ROOMS_DATABASE_URL", &db),
            ("AWS_ENDPOINT_URL_IVSCHAT", &url),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ],
    )
    .await;
    let room = binary
        .client()
        .await
        .create_room(proto::CreateRoomRequest {
            name: "via-aws-config".into(),
            ..Default::default()
        })
        .await
        .expect("create through the aws upstream")
        .into_inner();
    assert_eq!(emulator.rooms()[0].arn, room.arn);
    let (status, log) = binary.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
    assert!(
        !log.iter().any(|l| l.contains("no AWS is being used")),
        "the aws upstream must not claim to be the emulator: {log:#?}"
    );
}

/// A bare `serve` uses the embedded emulator, says so in one WARN line, keeps
/// its files in --data-dir, and exits cleanly on SIGTERM.
#[tokio::test]
async fn embedded_default_warns_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let binary = start(&["--data-dir", data_dir.to_str().unwrap()], &[]).await;
    binary
        .client()
        .await
        .create_room(proto::CreateRoomRequest::default())
        .await
        .expect("create through the embedded emulator");
    let (status, log) = binary.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
    let warnings: Vec<_> = log
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("no AWS is being used"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log:#?}");
    assert!(data_dir.join("rooms.db").exists());
    assert!(data_dir.join("rooms.db.emulator.json").exists());
}

/// A configuration mistake fails at startup with a clear message.
#[tokio::test]
async fn bad_database_url_fails_fast() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "mysql://x",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("database URL must start with sqlite:// or postgres://"),
        "{stderr}"
    );
}

/// Without --auth-tokens on an address other hosts can reach, the server
/// says in one WARN line that anyone may call it; on loopback it does not.
#[tokio::test]
async fn open_address_without_auth_warns() {
    const NO_AUTH: &str = "no --auth-tokens";
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    for (listen, warnings) in [("0.0.0.0:0", 1), ("127.0.0.1:0", 0)] {
        let mut command = Command::new(BIN);
        command.args(["serve", "--listen", listen, "--data-dir", data_dir]);
        let binary = Server::spawn(command).await;
        let (status, log) = binary.terminate().await;
        assert!(status.success(), "exit {status:?}: {log:#?}");
        let warned = log
            .iter()
            .filter(|l| l.contains("WARN") && l.contains(NO_AUTH))
            .count();
        assert_eq!(warned, warnings, "{listen}: {log:#?}");
    }
}

/// Every request is logged when it ends, with its method, room and code;
/// with --log-format json every log line is a JSON object.
#[tokio::test]
async fn requests_are_logged_with_method_room_and_code() {
    const GET_ROOM: &str = "/ivschat.rooms.v1.RoomService/GetRoom";
    let arn = "arn:aws:ivschat:us-east-1:123456789012:room/missing00001";
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let binary = start(
            &[
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--log-format",
                format,
            ],
            &[],
        )
        .await;
        let missing = binary
            .client()
            .await
            .get_room(proto::GetRoomRequest {
                identifier: arn.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        let (status, log) = binary.terminate().await;
        assert!(status.success(), "exit {status:?}: {log:#?}");
        let line = log
            .iter()
            .find(|l| l.contains(GET_ROOM))
            .unwrap_or_else(|| panic!("no access line for GetRoom ({format}): {log:#?}"));
        if format == "json" {
            for line in &log {
                let parsed = serde_json::from_str::<serde_json::Value>(line);
                assert!(parsed.is_ok(), "not JSON: {line}");
            }
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(json["target"], "ivschat_rooms::access", "{line}");
            assert_eq!(json["span"]["method"], GET_ROOM, "{line}");
            assert_eq!(json["span"]["room"], arn, "{line}");
            assert_eq!(json["span"]["code"], "NotFound", "{line}");
        } else {
            assert!(line.contains(&format!("room={arn}")), "{line}");
            assert!(line.contains("code=NotFound"), "{line}");
        }
    }
}

/// `/metrics` on its own port: requests by method and code, cache reads,
/// upstream calls and budget tokens by operation, watchers, the event-log
/// revision, reconciler passes, and a latency histogram.
#[tokio::test]
async fn metrics_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let binary = start(&["--data-dir", data_dir.to_str().unwrap()], &[]).await;
    let mut client = binary.client().await;
    // Answered once the startup listing (a full reconciler pass) is done.
    client
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .unwrap();
    let room = client
        .create_room(proto::CreateRoomRequest::default())
        .await
        .unwrap()
        .into_inner();
    let get = |identifier: &str| proto::GetRoomRequest {
        identifier: identifier.into(),
        ..Default::default()
    };
    client.get_room(get(&room.arn)).await.expect("a cache hit");
    let missing = "arn:aws:ivschat:us-east-1:123456789012:room/missing00001";
    client.get_room(get(missing)).await.unwrap_err();
    let mut watch = client
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch
        .message()
        .await
        .unwrap()
        .expect("the starting bookmark");

    let url = format!("http://{}/metrics", binary.metrics_address);
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
    };
    let method = |name: &str| format!("method=\"/ivschat.rooms.v1.RoomService/{name}\"");
    assert_eq!(
        value(&format!(
            "ivschat_rooms_requests_total{{{},code=\"Ok\"}}",
            method("CreateRoom")
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            "ivschat_rooms_requests_total{{{},code=\"NotFound\"}}",
            method("GetRoom")
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            "ivschat_rooms_request_duration_seconds_count{{{}}}",
            method("GetRoom")
        )),
        2.0
    );
    assert!(body.contains("ivschat_rooms_request_duration_seconds_bucket{"));
    // The ListRooms (from the cache) and the first GetRoom.
    assert_eq!(
        value("ivschat_rooms_cache_reads_total{result=\"hit\"}"),
        2.0
    );
    assert_eq!(
        value("ivschat_rooms_cache_reads_total{result=\"miss\"}"),
        1.0
    );
    assert_eq!(
        value("ivschat_rooms_upstream_calls_total{operation=\"CreateRoom\",region=\"us-east-1\"}"),
        1.0
    );
    assert_eq!(
        value(
            "ivschat_rooms_budget_tokens_taken_total{operation=\"CreateRoom\",region=\"us-east-1\"}"
        ),
        1.0
    );
    assert_eq!(value("ivschat_rooms_watchers"), 1.0);
    // What the alert rules compare with (deploy/prometheus).
    assert_eq!(value("ivschat_rooms_max_watchers"), 100_000.0);
    assert_eq!(
        value("ivschat_rooms_store_errors_total{kind=\"unavailable\"}"),
        0.0
    );
    assert_eq!(value("ivschat_rooms_event_revision"), 1.0);
    assert!(
        value(
            "ivschat_rooms_reconcile_runs_total{region=\"us-east-1\",kind=\"full\",result=\"ok\"}"
        ) >= 1.0
    );
    drop(watch);
    let (status, log) = binary.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
}
