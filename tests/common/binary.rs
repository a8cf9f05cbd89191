//! The real `ivschat-rooms` binary as a child process: started, its log read
//! line by line, stopped with SIGTERM or SIGKILL.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use ivschat_rooms::grpc::proto::room_service_client::RoomServiceClient;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_ivschat-rooms");

/// How long any one awaited thing may take before the test fails instead of
/// hanging.
pub const WAIT: Duration = Duration::from_secs(30);

pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// A running `ivschat-rooms serve`.
pub struct Server {
    child: Child,
    pub address: String,
    /// Where `/metrics` is served.
    pub metrics_address: String,
    /// Log lines logged before the "serving" line, not yet looked at.
    backlog: VecDeque<String>,
    /// Log lines after those; read continuously so the server never blocks
    /// on a full pipe.
    log: mpsc::UnboundedReceiver<String>,
}

impl Server {
    /// `ivschat-rooms serve --upstream embedded` on a data directory,
    /// listening on `listen`.
    pub async fn start(listen: &str, data_dir: &Path, flags: &[&str]) -> Server {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", listen, "--upstream", "embedded"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(flags);
        Server::spawn(command).await
    }

    /// Starts `command` (the binary, with its arguments) and waits for its
    /// "serving" log line, which names the address actually bound. Earlier
    /// lines are kept for [`Server::logged`]: the reconciler starts before
    /// the server serves, so its lines may come first.
    pub async fn spawn(mut command: Command) -> Server {
        // The caller's RUST_LOG and OTEL_* only, not those the tests run
        // with (an exporter configured for the developer's collector).
        let own: Vec<_> = command
            .as_std()
            .get_envs()
            .map(|(k, _)| k.to_owned())
            .collect();
        for (name, _) in std::env::vars_os() {
            let inherited = name == "RUST_LOG" || name.to_string_lossy().starts_with("OTEL_");
            if inherited && !own.contains(&name) {
                command.env_remove(name);
            }
        }
        let mut child = command
            // Tests run side by side: no fixed metrics port (a flag wins).
            .env("IVSCHAT_ROOMS_METRICS_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the binary");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, mut log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut backlog = VecDeque::new();
        let address = within("the server to serve", async {
            loop {
                let line = log
                    .recv()
                    .await
                    .unwrap_or_else(|| panic!("the binary exited before serving: {backlog:#?}"));
                let serving = line.contains("serving ivschat.rooms.v1.RoomService");
                backlog.push_back(line.clone());
                if serving {
                    break line;
                }
            }
        })
        .await;
        Server {
            child,
            address: field(&address, "address").expect("the serving line names its address"),
            metrics_address: field(&address, "metrics")
                .expect("the serving line names the metrics address"),
            backlog,
            log,
        }
    }

    /// `ivschat-rooms serve` on port 0, caching in `database_url`, in front
    /// of the emulator at `emulator_url` (which outlives the server: kill it,
    /// start another, and the upstream is as it was). No access log: these
    /// servers are for load.
    pub async fn against(database_url: &str, emulator_url: &str, flags: &[&str]) -> Server {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--upstream", "emulator"])
            .args([
                "--emulator-url",
                emulator_url,
                "--database-url",
                database_url,
            ])
            .args(flags)
            .env("RUST_LOG", "info,ivschat_rooms::access=off");
        Server::spawn(command).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The server's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }

    /// The sum of the samples of metric `name` whose labels include every
    /// one of `labels`, from `/metrics` now (0 when there is none yet).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let url = format!("http://{}/metrics", self.metrics_address);
        let text = within("/metrics", async {
            reqwest::get(&url).await?.error_for_status()?.text().await
        })
        .await
        .expect("GET /metrics");
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
                    && labels
                        .iter()
                        .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub async fn client(&self) -> RoomServiceClient<Channel> {
        within("a connection", RoomServiceClient::connect(self.url()))
            .await
            .expect("connect")
    }

    /// Waits for a log line containing `needle`.
    pub async fn logged(&mut self, needle: &str) -> String {
        within(&format!("the log line {needle:?}"), async {
            loop {
                let line = self
                    .next_line()
                    .await
                    .unwrap_or_else(|| panic!("the server exited before logging {needle:?}"));
                if line.contains(needle) {
                    return line;
                }
            }
        })
        .await
    }

    /// The next log line not yet looked at; `None` once the server has exited
    /// and every line has been.
    pub async fn next_line(&mut self) -> Option<String> {
        match self.backlog.pop_front() {
            Some(line) => Some(line),
            None => self.log.recv().await,
        }
    }

    /// The log lines not yet looked at that have been read so far, without
    /// waiting for more.
    pub fn logged_so_far(&mut self) -> Vec<String> {
        let mut lines: Vec<String> = self.backlog.drain(..).collect();
        while let Ok(line) = self.log.try_recv() {
            lines.push(line);
        }
        lines
    }

    /// Sends SIGTERM; returns the exit status and every log line not yet
    /// looked at, to the last.
    pub async fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().expect("running").to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(killed.success());
        let mut log = Vec::new();
        within("the server's log to end", async {
            while let Some(line) = self.next_line().await {
                log.push(line);
            }
        })
        .await;
        let status = within("the server to exit", self.child.wait())
            .await
            .unwrap();
        (status, log)
    }

    /// `kill -9`: no shutdown handler runs, nothing is drained or flushed.
    pub async fn kill_9(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let status = within("the killed server to exit", self.child.wait())
            .await
            .unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
}

/// A field of a log line: text (`name=value`) or JSON (`"fields":{...}`).
fn field(line: &str, name: &str) -> Option<String> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        return json["fields"][name].as_str().map(str::to_owned);
    }
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(prefix.as_str()))
        .map(str::to_owned)
}
