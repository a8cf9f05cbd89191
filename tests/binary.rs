//! The `ivschat-rooms` binary itself: configuration from flags and the
//! environment, the `aws` upstream through aws-config's standard chain, the
//! embedded default's warning, and shutdown on SIGTERM.

mod common;

use std::process::Stdio;

use common::proto;
use common::proto::room_service_client::RoomServiceClient;
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

/// A running `ivschat-rooms serve` and the address it reported.
struct Binary {
    child: Child,
    stderr: Lines<BufReader<ChildStderr>>,
    seen: Vec<String>,
    address: String,
}

impl Binary {
    /// Starts the binary on port 0 and waits for its "serving" log line.
    async fn start(args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ivschat-rooms"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the binary");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let address = loop {
            let line = stderr
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("the binary exited before serving: {seen:#?}"));
            seen.push(line.clone());
            if line.contains("serving ivschat.rooms.v1.RoomService") {
                let address = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("address="))
                    .expect("the serving line names its address");
                break address.to_owned();
            }
        };
        Binary {
            child,
            stderr,
            seen,
            address,
        }
    }

    async fn client(&self) -> RoomServiceClient<tonic::transport::Channel> {
        RoomServiceClient::connect(format!("http://{}", self.address))
            .await
            .expect("connect")
    }

    /// Sends SIGTERM and waits for the exit status and the rest of the log.
    async fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().expect("running").to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(killed.success());
        while let Some(line) = self.stderr.next_line().await.unwrap() {
            self.seen.push(line);
        }
        (self.child.wait().await.unwrap(), self.seen)
    }
}

/// `--upstream aws` takes endpoint, credentials and region from aws-config's
/// standard chain: here the environment, with AWS_ENDPOINT_URL_IVSCHAT
/// pointing at an emulator. Configuration comes from IVSCHAT_ROOMS_* variables.
#[tokio::test]
async fn aws_upstream_uses_the_standard_chain() {
    let (emulator, url) = common::emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("cache.db").display());
    let binary = Binary::start(
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
    let binary = Binary::start(&["--data-dir", data_dir.to_str().unwrap()], &[]).await;
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
    let out = Command::new(env!("CARGO_BIN_EXE_ivschat-rooms"))
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
