//! WatchRooms through the real binary: a server killed with SIGKILL mid-stream
//! and restarted on the same data directory resumes exactly where its watchers
//! left off, and its change log replays into exactly the rooms it caches; the
//! `watch` CLI prints events and resumes by itself across such a restart; and
//! when the replica that reconciles is killed, another one sharing its
//! Postgres database takes over.

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use ivschat_rooms::grpc::proto;
use ivschat_rooms::grpc::proto::room_service_client::RoomServiceClient;
use ivschat_rooms::grpc::proto::watch_rooms_response::Kind;
use proto::{EventSource, EventType};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use common::TestDb;
use common::binary::{BIN, Server, within};
use common::load::{fold, list_all};
use common::pki::Pki;

/// A `ivschat-rooms watch` process: its stdout line by line, its stderr
/// collected until it exits.
struct WatchCli {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<Vec<String>>,
}

impl WatchCli {
    fn start(args: &[&str]) -> WatchCli {
        let mut child = Command::new(BIN)
            .arg("watch")
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("IVSCHAT_ROOMS_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start watch");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Ok(Some(line)) = stderr.next_line().await {
                lines.push(line);
            }
            lines
        });
        WatchCli {
            child,
            stdout,
            stderr,
        }
    }

    async fn line(&mut self) -> String {
        within("a line from watch", self.stdout.next_line())
            .await
            .unwrap()
            .expect("watch exited")
    }

    async fn json(&mut self) -> Value {
        let line = self.line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Kills it and returns what it printed since the last line read, and
    /// its log.
    async fn kill(mut self) -> (Vec<String>, Vec<String>) {
        self.child.start_kill().expect("kill watch");
        within("watch to exit", self.child.wait()).await.unwrap();
        let mut rest = Vec::new();
        while let Some(line) = within("watch's stdout to close", self.stdout.next_line())
            .await
            .unwrap()
        {
            rest.push(line);
        }
        let log = within("watch's stderr to close", self.stderr)
            .await
            .unwrap();
        (rest, log)
    }
}

async fn watch(
    client: &mut RoomServiceClient<Channel>,
    after_revision: u64,
) -> Streaming<proto::WatchRoomsResponse> {
    within(
        "WatchRooms",
        client.watch_rooms(proto::WatchRoomsRequest {
            after_revision: Some(after_revision),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|s| panic!("watch after revision {after_revision}: {s:?}"))
    .into_inner()
}

/// The next event on the stream, skipping progress bookmarks.
async fn next_event(stream: &mut Streaming<proto::WatchRoomsResponse>) -> proto::RoomEvent {
    // Bookmarks keep coming: bound the whole wait, not each message.
    within("a watch event", async {
        loop {
            match stream.message().await {
                Ok(Some(proto::WatchRoomsResponse {
                    kind: Some(Kind::Event(event)),
                })) => return event,
                Ok(Some(_progress)) => {}
                Ok(None) => panic!("the watch stream ended"),
                Err(status) => panic!("the watch stream failed: {status:?}"),
            }
        }
    })
    .await
}

/// Events `first..=last` from the stream, failing on any gap or repeat.
async fn events_through(
    stream: &mut Streaming<proto::WatchRoomsResponse>,
    first: u64,
    last: u64,
) -> Vec<proto::RoomEvent> {
    let mut events = Vec::new();
    for expected in first..=last {
        let event = next_event(stream).await;
        assert_eq!(
            event.revision, expected,
            "revisions must be consecutive with no repeats: {event:#?}"
        );
        events.push(event);
    }
    events
}

fn is(event: &proto::RoomEvent, kind: EventType, arn: &str) -> bool {
    event.r#type == kind as i32 && event.room.as_ref().is_some_and(|r| r.arn == arn)
}

/// SIGKILL lands while a watcher streams and writers keep updating rooms.
/// After a restart on the same data directory (SQLite cache and the embedded
/// emulator's state), resuming after the last revision received delivers
/// exactly the later events, consecutively; and replaying the whole log gives
/// exactly the rooms the cache serves (the change and its event commit
/// together or not at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_resume_from_the_same_revision() {
    const ROOMS: usize = 3;
    const EVENTS_BEFORE_KILL: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--reconcile-interval", "100ms"];
    let server = Server::start("127.0.0.1:0", dir.path(), &flags).await;
    let mut client = server.client().await;
    let (rooms, revision) = list_all(&mut client).await;
    assert!(rooms.is_empty() && revision == 0, "{rooms:?} at {revision}");

    let mut stream = watch(&mut client, 0).await;
    let mut arns = Vec::new();
    for i in 0..ROOMS {
        let room = within(
            "CreateRoom",
            client.create_room(proto::CreateRoomRequest {
                name: format!("crash-{i}"),
                ..Default::default()
            }),
        )
        .await
        .expect("create")
        .into_inner();
        arns.push(room.arn);
    }
    // One writer per room, each updating its room until the server dies
    // under it, so that several updates are in flight at different stages
    // (in IVS Chat, or between IVS Chat and the cache) when SIGKILL lands.
    let writers: Vec<_> = arns
        .iter()
        .map(|arn| {
            let mut client = client.clone();
            let arn = arn.clone();
            tokio::spawn(async move {
                let mut done = 0_usize;
                loop {
                    let update = client.update_room(proto::UpdateRoomRequest {
                        identifier: arn.clone(),
                        name: Some(format!("update-{done}")),
                        maximum_message_length: Some(1 + i32::try_from(done % 500).unwrap()),
                        ..Default::default()
                    });
                    match update.await {
                        Ok(_) => done += 1,
                        Err(status) => return (done, status.code()),
                    }
                }
            })
        })
        .collect();
    let mut received = Vec::new();
    while received.len() < EVENTS_BEFORE_KILL {
        let event = next_event(&mut stream).await;
        assert_eq!(event.revision, received.len() as u64 + 1, "{event:#?}");
        received.push(event);
    }

    server.kill_9().await;
    // The stream breaks; events already on the wire may still arrive first.
    let broke = loop {
        match within("the stream to break", stream.message()).await {
            Ok(Some(proto::WatchRoomsResponse {
                kind: Some(Kind::Event(event)),
            })) => {
                assert_eq!(event.revision, received.len() as u64 + 1, "{event:#?}");
                received.push(event);
            }
            Ok(Some(_progress)) => {}
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert!(
        broke.is_some(),
        "a stream cut by SIGKILL must fail, not end as if complete"
    );
    let mut updates = 0;
    for writer in writers {
        let (done, code) = within("a writer to fail", writer).await.unwrap();
        assert_ne!(code, tonic::Code::Ok);
        updates += done;
    }
    let last = received.last().unwrap().revision;
    assert!(
        received[..ROOMS]
            .iter()
            .zip(&arns)
            .all(|(e, arn)| is(e, EventType::Created, arn)),
        "{received:#?}"
    );
    drop(client);

    let mut server = Server::start("127.0.0.1:0", dir.path(), &flags).await;
    let mut client = server.client().await;
    let mut resumed = watch(&mut client, last).await;
    let renamed = within(
        "UpdateRoom",
        client.update_room(proto::UpdateRoomRequest {
            identifier: arns[0].clone(),
            name: Some("after-restart".into()),
            ..Default::default()
        }),
    )
    .await
    .expect("update after restart")
    .into_inner();
    assert_eq!(renamed.name, "after-restart");
    let created = within(
        "CreateRoom",
        client.create_room(proto::CreateRoomRequest {
            name: "created-after-restart".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("create after restart")
    .into_inner();
    within(
        "DeleteRoom",
        client.delete_room(proto::DeleteRoomRequest {
            identifier: arns[1].clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("delete after restart");
    // The startup full listing has also taken in whatever IVS Chat did for a
    // write that SIGKILL cut off before its answer reached the cache.
    server.logged("full listing of IVS Chat complete").await;

    let (rooms, revision) = list_all(&mut client).await;
    let mut expected_arns = vec![arns[0].clone(), arns[2].clone(), created.arn.clone()];
    expected_arns.sort();
    assert_eq!(
        rooms.iter().map(|r| r.arn.clone()).collect::<Vec<_>>(),
        expected_arns
    );
    assert!(revision >= last + 3, "{revision} after {last}");

    let after = events_through(&mut resumed, last + 1, revision).await;
    let api = |e: &proto::RoomEvent| e.source == EventSource::Api as i32;
    assert!(
        after.iter().any(|e| is(e, EventType::Updated, &arns[0])
            && api(e)
            && e.room.as_ref().unwrap().name == "after-restart"),
        "{after:#?}"
    );
    assert!(
        after
            .iter()
            .any(|e| is(e, EventType::Created, &created.arn)),
        "{after:#?}"
    );
    assert!(
        after
            .iter()
            .any(|e| is(e, EventType::Deleted, &arns[1]) && api(e)),
        "{after:#?}"
    );

    let mut replay = watch(&mut client, 0).await;
    let log = events_through(&mut replay, 1, revision).await;
    let cut = usize::try_from(last).unwrap();
    assert_eq!(
        log[..cut],
        received[..],
        "the log must hold exactly what was streamed before the kill"
    );
    assert_eq!(
        log[cut..],
        after[..],
        "resuming must deliver exactly the log after {last}"
    );
    assert_eq!(
        fold(&log),
        rooms,
        "replaying the log must give exactly the cached rooms"
    );

    let reconciled = after
        .iter()
        .filter(|e| e.source == EventSource::Reconciler as i32)
        .count();
    println!(
        "killed at revision {last} after {updates} acknowledged updates; \
         {reconciled} event(s) found by the startup listing; log ends at {revision}"
    );
}

/// `ivschat-rooms watch --json` prints one JSON object per event; when the
/// server is killed and comes back, it resumes after the last revision it
/// printed, so the next line is the next revision and nothing is printed
/// twice. Without --json, lines read `<revision> <TYPE> <arn> ...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cli_prints_events_and_resumes_after_a_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    // The reconciler waits an hour between passes (its startup listing still
    // runs at once): a room created through the API can otherwise be found
    // by a pass before the API's own answer reaches the cache, and be logged
    // as RECONCILER, which would make the `source` check below flaky.
    let flags = ["--reconcile-interval", "1h"];
    let server = Server::start("127.0.0.1:0", dir.path(), &flags).await;
    let url = server.url();
    let mut client = server.client().await;
    // A fresh cache is at revision 0: after it is every event, so the CLI
    // misses nothing whenever its stream opens.
    let mut cli = WatchCli::start(&["--server", &url, "--json", "--after-revision", "0"]);

    let room = within(
        "CreateRoom",
        client.create_room(proto::CreateRoomRequest {
            name: "cli-first".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("create")
    .into_inner();
    let created = cli.json().await;
    assert_eq!(created["type"], "CREATED", "{created}");
    assert_eq!(created["revision"], 1, "{created}");
    assert_eq!(created["source"], "API", "{created}");
    assert_eq!(created["arn"], room.arn.as_str(), "{created}");
    assert_eq!(
        created["changed_fields"],
        serde_json::json!([]),
        "{created}"
    );
    assert_eq!(created["room"]["name"], "cli-first", "{created}");
    assert!(created.get("previous").is_none(), "{created}");

    within(
        "UpdateRoom",
        client.update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            name: Some("cli-second".into()),
            ..Default::default()
        }),
    )
    .await
    .expect("update");
    let updated = cli.json().await;
    assert_eq!(updated["type"], "UPDATED", "{updated}");
    assert_eq!(updated["revision"], 2, "{updated}");
    assert_eq!(updated["source"], "API", "{updated}");
    assert_eq!(updated["arn"], room.arn.as_str(), "{updated}");
    assert_eq!(
        updated["changed_fields"],
        serde_json::json!(["name", "update_time"]),
        "{updated}"
    );
    assert_eq!(updated["previous"]["name"], "cli-first", "{updated}");
    assert_eq!(updated["room"]["name"], "cli-second", "{updated}");

    // SIGKILL frees the port at once (no process holds the listening socket
    // any more, and the listener is bound with SO_REUSEADDR, so connections
    // left in TIME_WAIT do not block it), so the server comes back on the
    // very address the CLI keeps retrying. Some other process could in
    // principle take the port in between; nothing here does.
    let address = server.address.clone();
    drop(client);
    server.kill_9().await;
    let server = Server::start(&address, dir.path(), &flags).await;
    assert_eq!(server.address, address);
    let mut client = server.client().await;

    within(
        "UpdateRoom",
        client.update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            maximum_message_length: Some(123),
            ..Default::default()
        }),
    )
    .await
    .expect("update after restart");
    let resumed = cli.json().await;
    assert_eq!(resumed["type"], "UPDATED", "{resumed}");
    assert_eq!(resumed["revision"], 3, "the next revision, once: {resumed}");
    assert_eq!(resumed["source"], "API", "{resumed}");
    assert_eq!(resumed["arn"], room.arn.as_str(), "{resumed}");
    assert_eq!(
        resumed["changed_fields"],
        serde_json::json!(["update_time", "maximum_message_length"]),
        "{resumed}"
    );
    assert_eq!(resumed["room"]["maximum_message_length"], 123, "{resumed}");

    // Human format, from a snapshot: one SNAPSHOT line per room, the
    // revision it reflects, then changes.
    let mut human = WatchCli::start(&["--server", &url, "--snapshot"]);
    let snapshot = human.line().await;
    assert!(
        snapshot.starts_with(&format!("0 SNAPSHOT {} name=cli-second", room.arn)),
        "{snapshot}"
    );
    assert_eq!(human.line().await, "3 SNAPSHOT_COMPLETE");
    within(
        "UpdateRoom",
        client.update_room(proto::UpdateRoomRequest {
            identifier: room.arn.clone(),
            name: Some("cli-third".into()),
            ..Default::default()
        }),
    )
    .await
    .expect("another update");
    let line = human.line().await;
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[..3], ["4", "UPDATED", room.arn.as_str()], "{line}");
    assert!(
        line.contains(" name=cli-third") && line.contains(" source=API"),
        "{line}"
    );
    let json = cli.json().await;
    assert_eq!(json["revision"], 4, "{json}");
    assert_eq!(json["room"]["name"], "cli-third", "{json}");

    let (more, _) = human.kill().await;
    assert!(more.is_empty(), "{more:#?}");
    let (more, log) = cli.kill().await;
    assert!(more.is_empty(), "printed nothing else: {more:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("watch interrupted; resuming") && l.contains("Some(2)")),
        "the CLI should have resumed after revision 2: {log:#?}"
    );
}

/// `--after-revision` and `--snapshot` contradict each other: clap refuses
/// the pair (usage error, exit code 2) before any connection is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cli_refuses_after_revision_with_snapshot() {
    let out = within(
        "watch to refuse its arguments",
        Command::new(BIN)
            .args([
                "watch",
                "--server",
                "http://127.0.0.1:1",
                "--after-revision",
                "0",
                "--snapshot",
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// With --auth-tokens, `watch --token` watches with a read-only token and
/// `watch` without one is refused for good; no token, good or bad, reaches
/// the server's or the CLI's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cli_sends_its_token_and_no_log_holds_one() {
    const WRITER: &str = "writer-secret-5f1c";
    const READER: &str = "reader-secret-9a2e";
    const WRONG: &str = "wrong-secret-77d0";
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{WRITER}\n{READER} readonly\n")).unwrap();
    let flags = [
        "--auth-tokens",
        tokens.to_str().unwrap(),
        "--reconcile-interval",
        "1h",
    ];
    let server = Server::start("127.0.0.1:0", dir.path(), &flags).await;
    let url = server.url();

    let refused = within(
        "watch without a token to give up",
        Command::new(BIN)
            .args(["watch", "--server", &url])
            .env_remove("IVSCHAT_ROOMS_TOKEN")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(refusal.contains("missing credentials"), "{refusal}");

    let mut cli = WatchCli::start(&[
        "--server",
        &url,
        "--json",
        "--after-revision",
        "0",
        "--token",
        READER,
    ]);
    let mut client = server.client().await;
    let bearer = |token: &str| {
        let mut request = tonic::Request::new(proto::CreateRoomRequest {
            name: "authorized".into(),
            ..Default::default()
        });
        let value = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
        request
    };
    let wrong = within("CreateRoom", client.create_room(bearer(WRONG)))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    let room = within("CreateRoom", client.create_room(bearer(WRITER)))
        .await
        .expect("a full token creates")
        .into_inner();
    let created = cli.json().await;
    assert_eq!(created["type"], "CREATED", "{created}");
    assert_eq!(created["arn"], room.arn.as_str(), "{created}");

    let (_, cli_log) = cli.kill().await;
    let (status, server_log) = server.terminate().await;
    assert!(status.success(), "exit {status:?}: {server_log:#?}");
    let logs = cli_log.iter().chain(&server_log).map(String::as_str);
    for line in logs.chain(refusal.lines()) {
        for secret in [WRITER, READER, WRONG] {
            assert!(!line.contains(secret), "a token in a log: {line}");
        }
    }
}

/// Over mutual TLS, `watch --tls-ca --tls-identity` is served (tls.rs shows
/// that clients without a certificate from the CA are not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cli_speaks_mutual_tls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut flags = pki.server_flags();
    flags.extend(["--tls-client-ca".into(), pki.path("ca.pem")]);
    flags.extend(["--reconcile-interval".into(), "1h".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start("127.0.0.1:0", dir.path(), &flags).await;
    let url = format!("https://{}", server.address);

    let (ca, identity) = (pki.path("ca.pem"), pki.path("client.pem"));
    let mut cli = WatchCli::start(&[
        "--server",
        &url,
        "--tls-ca",
        &ca,
        "--tls-identity",
        &identity,
        "--json",
        "--after-revision",
        "0",
    ]);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    let room = within(
        "CreateRoom over mutual TLS",
        RoomServiceClient::new(channel).create_room(proto::CreateRoomRequest {
            name: "mtls".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("create")
    .into_inner();
    let created = cli.json().await;
    assert_eq!(created["type"], "CREATED", "{created}");
    assert_eq!(created["arn"], room.arn.as_str(), "{created}");
    cli.kill().await;
    let (status, log) = server.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
}

/// What a replica logs when it takes the reconciler's turn.
const LEADS: &str = "this replica reconciles the cache with IVS Chat";

/// `ivschat-rooms serve` sharing the database at `db_url` with other
/// replicas, in front of the emulator at `emulator_url`, reconciling every
/// 100ms when it leads.
async fn replica(db_url: &str, emulator_url: &str) -> Server {
    let mut command = Command::new(BIN);
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db_url,
        "--upstream",
        "emulator",
        "--emulator-url",
        emulator_url,
        "--reconcile-interval",
        "100ms",
        "--resync-interval",
        "1h",
    ]);
    Server::spawn(command).await
}

/// When a log line was written: tracing's default format starts with an
/// RFC 3339 UTC timestamp.
fn logged_at(line: &str) -> SystemTime {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    humantime::parse_rfc3339(stamp)
        .unwrap_or_else(|e| panic!("no timestamp ({e}) at the start of {line:?}"))
}

/// The next event, which must be `revision`, an UPDATED of `arn` to `name`
/// found by the reconciler.
async fn reconciled_rename(
    stream: &mut Streaming<proto::WatchRoomsResponse>,
    revision: u64,
    arn: &str,
    name: &str,
) -> proto::RoomEvent {
    let event = events_through(stream, revision, revision).await.remove(0);
    assert!(is(&event, EventType::Updated, arn), "{event:#?}");
    assert_eq!(
        event.source,
        EventSource::Reconciler as i32,
        "an out-of-band change is the reconciler's find: {event:#?}"
    );
    assert_eq!(event.room.as_ref().unwrap().name, name, "{event:#?}");
    event
}

/// Two real replicas on one Postgres database, in front of one emulator. A
/// starts first and takes the reconciler's turn (a session advisory lock);
/// B serves but waits. A change made in IVS Chat behind the service's back
/// reaches a watcher on B as a RECONCILER event (found by A, heard by B
/// through the shared change log). Then A is SIGKILLed: its lock dies with
/// its connection, B takes the turn, only then, and finds the next
/// out-of-band change, logged as the very next revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_fails_over_when_its_replica_is_killed() {
    let Some(db) = TestDb::postgres("reconciler_fails_over_when_its_replica_is_killed").await
    else {
        return;
    };
    let (_emulator, emulator_url) = common::emulator().await;
    let aws = common::sdk(&emulator_url);
    // In IVS Chat before any replica runs: the first full listing logs it.
    let arn = within(
        "CreateRoom in IVS Chat",
        aws.create_room().name("o-0").send(),
    )
    .await
    .expect("create in the emulator")
    .arn()
    .expect("a created room has an ARN")
    .to_owned();
    let rename = |name: &'static str| {
        let request = aws.update_room().identifier(&arn).name(name);
        async move {
            within("UpdateRoom in IVS Chat", request.send())
                .await
                .expect("update in the emulator");
        }
    };

    let mut a = replica(&db.url, &emulator_url).await;
    a.logged(LEADS).await;
    a.logged("full listing of IVS Chat complete").await;
    let mut b = replica(&db.url, &emulator_url).await;
    let mut client = b.client().await;
    // ListRooms answers once a full listing has completed (A's, here); A
    // then reads the listed room whole.
    let (rooms, revision) = common::load::list_all_whole(&mut client).await;
    assert_eq!(
        rooms.iter().map(|r| r.arn.as_str()).collect::<Vec<_>>(),
        [arn.as_str()]
    );
    assert_eq!(
        revision, 2,
        "CREATED from A's first full listing, then the room read whole"
    );
    let mut stream = watch(&mut client, 0).await;
    let [created, completed] = <[_; 2]>::try_from(events_through(&mut stream, 1, 2).await).unwrap();
    assert!(is(&created, EventType::Created, &arn), "{created:#?}");
    assert!(is(&completed, EventType::Updated, &arn), "{completed:#?}");
    assert!(created.room.as_ref().unwrap().details_pending);
    assert!(!completed.room.as_ref().unwrap().details_pending);
    for event in [&created, &completed] {
        assert_eq!(event.source, EventSource::Reconciler as i32, "{event:#?}");
    }

    rename("o-1").await;
    let first = reconciled_rename(&mut stream, 3, &arn, "o-1").await;

    // One leader at a time: B has not taken the turn while A lives.
    let before_kill = b.logged_so_far();
    assert!(
        !before_kill.iter().any(|line| line.contains(LEADS)),
        "B led while A did: {before_kill:#?}"
    );
    // Down to whole microseconds, as the log's timestamps are.
    let now = SystemTime::now();
    let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let killed_at = now - Duration::from_nanos(u64::from(since_epoch.subsec_nanos() % 1_000));
    a.kill_9().await;

    rename("o-2").await;
    // Lines B wrote before the kill but not yet read would come first here:
    // the first LEADS line must postdate the kill.
    let took_over = b.logged(LEADS).await;
    assert!(
        logged_at(&took_over) >= killed_at,
        "B took the turn before A was killed at {killed_at:?}: {took_over}"
    );
    let second = reconciled_rename(&mut stream, 4, &arn, "o-2").await;
    assert_eq!(
        second.previous, first.room,
        "the second change follows the first: {second:#?}"
    );

    // Nothing in between either: a third change is revision 5, and the
    // cache and its log agree.
    rename("o-3").await;
    reconciled_rename(&mut stream, 5, &arn, "o-3").await;
    let (rooms, revision) = list_all(&mut client).await;
    assert_eq!(revision, 5);
    let mut replay = watch(&mut client, 0).await;
    let log = events_through(&mut replay, 1, revision).await;
    assert!(
        log.iter()
            .all(|e| e.source == EventSource::Reconciler as i32),
        "{log:#?}"
    );
    assert_eq!(fold(&log), rooms);
    assert_eq!(rooms[0].name, "o-3");
}
