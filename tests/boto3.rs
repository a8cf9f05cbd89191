//! boto3 against the emulator: the Python SDK, with botocore's own copy of the
//! model, must accept the emulator as IVS Chat. Needs python3 with boto3; when
//! missing the test says SKIPPED on stderr, or fails if
//! `IVSCHAT_ROOMS_TEST_REQUIRE_BOTO3` is set (CI sets it).

mod common;

use std::io::Write as _;

/// Creates, reads, updates, lists, tags and deletes a room with boto3, and
/// checks its error shapes, all against the emulator (tests/boto3_conformance.py).
#[tokio::test]
async fn boto3_talks_to_the_emulator() {
    let has_boto3 = std::process::Command::new("python3")
        .args(["-c", "import boto3"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_boto3 {
        if std::env::var_os("IVSCHAT_ROOMS_TEST_REQUIRE_BOTO3").is_some() {
            panic!("IVSCHAT_ROOMS_TEST_REQUIRE_BOTO3 is set but python3 cannot import boto3");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED boto3_talks_to_the_emulator: python3 with boto3 is not installed \
             (pip install boto3)"
        );
        return;
    }
    let (_emulator, url) = common::emulator().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boto3_conformance.py");
    let out = tokio::process::Command::new("python3")
        .args([script, &url])
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "boto3 conformance failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
