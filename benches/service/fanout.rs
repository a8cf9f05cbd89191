//! P4: one change fanned out to many watchers, beside etcd, a bare tonic
//! broadcast and an h2 writer (the same broadcast on the h2 crate alone),
//! side by side in one run.
//!
//! The watchers live in a child process of their own (this binary with
//! `--watchers`), as real watchers do: the measuring process holds only the
//! servers (the service and its emulator; the bare broadcast server) and the
//! client that makes the change. etcd is a process of its own (Debian's
//! `etcd-server`, started on free loopback ports with a temporary data
//! directory). Every watcher is one gRPC stream, opened by the same tonic
//! client code whatever it watches, with decoders that only tell a change from
//! the stream's first message.
//!
//! A watcher process talks to the measure over its stdin and stdout, one line
//! each way per step: it prints `ready` once every stream has its first
//! message; to `arm` it answers `armed`, then, once every stream has the next
//! change, `arrived <first> <p99> <last> <cpu> <observed>`: wall-clock
//! nanoseconds (both processes read the same clock), the CPU its threads used
//! since `arm`, and the change's `observed_at` when it decodes events (0
//! otherwise). The measure takes the wall clock just before it makes the
//! change, so each latency is arrival minus that.

use std::convert::Infallible;
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt as _};
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _, Bytes};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::{Notify, Semaphore};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{BoxFuture, Service as TowerService, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use ivschat_rooms::grpc::proto;

use super::{CLIENT_THREADS, connect_many, fail};

/// What a watcher process watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The service's WatchRooms.
    Service,
    /// etcd's Watch, one watch (of one key) per stream.
    Etcd,
    /// The bare broadcast server's WatchRooms.
    Bare,
    /// The same broadcast from a server on the h2 crate alone, one writer
    /// task per connection: what the per-connection writer could reach.
    Writer,
}

impl Target {
    pub const ALL: [Target; 4] = [Target::Service, Target::Etcd, Target::Bare, Target::Writer];

    pub fn name(self) -> &'static str {
        match self {
            Target::Service => "service",
            Target::Etcd => "etcd",
            Target::Bare => "bare",
            Target::Writer => "writer",
        }
    }

    fn parse(name: &str) -> Target {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("unknown watch target {name}"))
    }
}

/// The key every etcd watcher watches and the measure puts.
const ETCD_KEY: &[u8] = b"p4";

fn wall_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos() as u64
}

// ---------------------------------------------------------------------------
// The watcher process
// ---------------------------------------------------------------------------

/// `--watchers <target> <uri> <count> <connections> <decode 0|1>`: opens
/// `count` streams over `connections` connections and answers the measure
/// (see the module's doc) until its stdin ends.
pub fn watchers_main(args: &[String]) -> ExitCode {
    let [target, uri, count, connections, decode] = args else {
        panic!("--watchers <target> <uri> <count> <connections> <decode>, not {args:?}");
    };
    let target = Target::parse(target);
    let count: usize = count.parse().expect("a watcher count");
    let connections: usize = connections.parse().expect("a connection count");
    let decode = decode == "1";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(CLIENT_THREADS)
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let channels = connect_many(uri, connections).await;
        let arrivals = Arrivals::open(target, &channels, count, decode).await;
        println!("ready");
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.expect("read stdin") {
            match line.as_str() {
                "arm" => {
                    let cpu = process_cpu("self");
                    arrivals.waiting.store(count, Ordering::SeqCst);
                    println!("armed");
                    tokio::time::timeout(Duration::from_secs(60), arrivals.all_arrived.notified())
                        .await
                        .unwrap_or_else(|_| {
                            fail(&format!(
                                "{} of {count} {} watchers did not get the change in 60 s",
                                arrivals.waiting.load(Ordering::SeqCst),
                                target.name()
                            ))
                        });
                    let cpu = process_cpu("self").saturating_sub(cpu);
                    let mut at: Vec<u64> = arrivals
                        .at
                        .iter()
                        .map(|a| a.load(Ordering::Relaxed))
                        .collect();
                    at.sort_unstable();
                    let p99 = at[(at.len() * 99).div_ceil(100).saturating_sub(1)];
                    println!(
                        "arrived {} {} {} {} {}",
                        at[0],
                        p99,
                        at[at.len() - 1],
                        cpu.as_nanos(),
                        arrivals.observed.load(Ordering::Relaxed)
                    );
                }
                "quit" => break,
                other => panic!("unknown watcher command {other:?}"),
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::SUCCESS
}

/// What arrived on a watch stream, told without decoding it (or, asked to
/// decode, with the event's `observed_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    /// A change; its `observed_at` in wall-clock nanoseconds when decoded.
    Change(u64),
    /// The stream's first message: WatchRooms' progress, etcd's `created`.
    Established,
    Other,
}

/// The arrival of the current change on each stream.
struct Arrivals {
    /// Per stream, when the change arrived (wall-clock nanoseconds).
    at: Vec<AtomicU64>,
    waiting: AtomicUsize,
    all_arrived: Notify,
    established: AtomicUsize,
    all_established: Notify,
    observed: AtomicU64,
}

impl Arrivals {
    /// Opens `count` streams spread over `channels` (at most 256 opening at
    /// once) and waits until each has its first message.
    async fn open(
        target: Target,
        channels: &[Channel],
        count: usize,
        decode: bool,
    ) -> Arc<Arrivals> {
        let arrivals = Arc::new(Arrivals {
            at: (0..count).map(|_| AtomicU64::new(0)).collect(),
            waiting: AtomicUsize::new(0),
            all_arrived: Notify::new(),
            established: AtomicUsize::new(0),
            all_established: Notify::new(),
            observed: AtomicU64::new(0),
        });
        let opening = Arc::new(Semaphore::new(256));
        for i in 0..count {
            let channel = channels[i % channels.len()].clone();
            let arrivals = arrivals.clone();
            let opening = opening.clone();
            tokio::spawn(async move {
                let permit = opening.acquire_owned().await.expect("semaphore");
                let mut stream = match target {
                    Target::Service | Target::Bare | Target::Writer => {
                        watch_rooms(channel, decode).await
                    }
                    Target::Etcd => etcd_watch(channel).await,
                };
                let first = stream.message().await;
                if !matches!(first, Ok(Some(Notice::Established))) {
                    fail(&format!("{target:?} watch {i} began with {first:?}"));
                }
                drop(permit);
                if arrivals.established.fetch_add(1, Ordering::SeqCst) + 1 == count {
                    arrivals.all_established.notify_one();
                }
                loop {
                    match stream.message().await {
                        Ok(Some(Notice::Change(observed))) => {
                            arrivals.at[i].store(wall_nanos(), Ordering::Relaxed);
                            if observed != 0 {
                                arrivals.observed.store(observed, Ordering::Relaxed);
                            }
                            if arrivals.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
                                arrivals.all_arrived.notify_one();
                            }
                        }
                        Ok(Some(_)) => {}
                        other => fail(&format!("{target:?} watch {i} ended: {other:?}")),
                    }
                }
            });
        }
        if arrivals.established.load(Ordering::SeqCst) < count {
            tokio::time::timeout(
                Duration::from_secs(120),
                arrivals.all_established.notified(),
            )
            .await
            .unwrap_or_else(|_| {
                fail(&format!(
                    "only {} of {count} {target:?} watches established in 120 s",
                    arrivals.established.load(Ordering::SeqCst)
                ))
            });
        }
        arrivals
    }
}

/// WatchRooms from now on, every room (the service's or the bare server's).
async fn watch_rooms(channel: Channel, decode: bool) -> Streaming<Notice> {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        fail(&format!("channel not ready for WatchRooms: {e}"));
    }
    let path = PathAndQuery::from_static("/ivschat.rooms.v1.RoomService/WatchRooms");
    let codec = NoticeCodec::new(NoticeDecoder::WatchRooms { decode });
    match grpc
        .server_streaming(
            Request::new(proto::WatchRoomsRequest::default()),
            path,
            codec,
        )
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => fail(&format!("WatchRooms refused: {status:?}")),
    }
}

/// etcd's Watch of [`ETCD_KEY`] from now on: one watch on its own stream.
async fn etcd_watch(channel: Channel) -> Streaming<Notice> {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        fail(&format!("channel not ready for etcd's Watch: {e}"));
    }
    let create = etcd::WatchRequest {
        create_request: Some(etcd::WatchCreateRequest {
            key: ETCD_KEY.to_vec(),
        }),
    };
    // The request stream stays open: closing it would end the watch.
    let requests = futures::stream::once(async move { create }).chain(futures::stream::pending());
    let path = PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let codec = NoticeCodec::new(NoticeDecoder::Etcd);
    match grpc.streaming(Request::new(requests), path, codec).await {
        Ok(response) => response.into_inner(),
        Err(status) => fail(&format!("etcd's Watch refused: {status:?}")),
    }
}

/// Encodes a watch request with prost, decodes [`Notice`]s; small buffers,
/// as a watcher that holds many streams would keep.
struct NoticeCodec<T> {
    decoder: NoticeDecoder,
    request: std::marker::PhantomData<T>,
}

impl<T> NoticeCodec<T> {
    fn new(decoder: NoticeDecoder) -> NoticeCodec<T> {
        NoticeCodec {
            decoder,
            request: std::marker::PhantomData,
        }
    }
}

struct ProstRequestEncoder<T>(std::marker::PhantomData<T>);

#[derive(Clone, Copy)]
enum NoticeDecoder {
    /// WatchRoomsResponse: `event` is field 1, `progress` field 2 (both
    /// length-delimited), so the first byte tells them apart.
    WatchRooms { decode: bool },
    /// etcd's WatchResponse: `created` (field 3) on the first, `events`
    /// (field 11) on a change.
    Etcd,
}

impl<T: prost::Message + Send + 'static> Codec for NoticeCodec<T> {
    type Encode = T;
    type Decode = Notice;
    type Encoder = ProstRequestEncoder<T>;
    type Decoder = NoticeDecoder;

    fn encoder(&mut self) -> ProstRequestEncoder<T> {
        ProstRequestEncoder(std::marker::PhantomData)
    }

    fn decoder(&mut self) -> NoticeDecoder {
        self.decoder
    }
}

impl<T: prost::Message> Encoder for ProstRequestEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encode a watch request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(128, 32 * 1024)
    }
}

impl Decoder for NoticeDecoder {
    type Item = Notice;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Notice>, Status> {
        let notice = match *self {
            NoticeDecoder::WatchRooms { decode: false } => match src.chunk().first() {
                Some(0x0a) => Notice::Change(0),
                Some(0x12) => Notice::Established,
                _ => Notice::Other,
            },
            NoticeDecoder::WatchRooms { decode: true } => {
                let response = proto::WatchRoomsResponse::decode(&mut *src)
                    .map_err(|e| Status::internal(format!("decode WatchRoomsResponse: {e}")))?;
                match response.kind {
                    Some(proto::watch_rooms_response::Kind::Event(event)) => {
                        let observed = event
                            .observed_at
                            .map_or(0, |t| t.seconds as u64 * 1_000_000_000 + t.nanos as u64);
                        Notice::Change(observed)
                    }
                    Some(proto::watch_rooms_response::Kind::Progress(_)) => Notice::Established,
                    None => Notice::Other,
                }
            }
            NoticeDecoder::Etcd => {
                let response = etcd::WatchNotice::decode(&mut *src)
                    .map_err(|e| Status::internal(format!("decode etcd's WatchResponse: {e}")))?;
                if !response.events.is_empty() {
                    Notice::Change(0)
                } else if response.created {
                    Notice::Established
                } else {
                    Notice::Other
                }
            }
        };
        src.advance(src.remaining());
        Ok(Some(notice))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(1024, 32 * 1024)
    }
}

/// CPU time used so far by all threads of process `pid` ("self" for this
/// one), from Linux's schedstat (nanoseconds).
pub fn process_cpu(pid: &str) -> Duration {
    threads_cpu(pid, |_| true)
}

/// CPU time used so far by the live threads of process `pid` whose name
/// (`comm`) `keep` accepts.
pub fn threads_cpu(pid: &str, keep: impl Fn(&str) -> bool) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| keep(name.trim_end()))
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .sum()
}

// ---------------------------------------------------------------------------
// The measure's side of a watcher process
// ---------------------------------------------------------------------------

/// A watcher process, ready.
pub struct WatcherProcess {
    pub target: Target,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// One change as a watcher process saw it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// After the change was made: the first, the p99 and the last arrival.
    pub first: Duration,
    pub p99: Duration,
    pub last: Duration,
    /// CPU the watcher process used.
    pub watcher_cpu: Duration,
    /// From the event's `observed_at` (inside the cache transaction, before
    /// its commit) to the first arrival, when the process decodes events.
    pub from_observed: Option<Duration>,
    /// When the first arrived, in wall-clock nanoseconds.
    pub first_at: u64,
}

impl Delivery {
    /// The p99 arrival counted from the service's cache commit (the newest
    /// commit [`CommitClock`] heard before the first arrival), as etcd's is
    /// counted from its Put: the upstream call before the commit is not the
    /// watch system's. None when no commit was heard.
    pub fn p99_from_commit(&self) -> Option<Duration> {
        let commit = CommitClock::last_before(self.first_at)?;
        Some(Duration::from_nanos(self.first_at - commit) + self.p99.saturating_sub(self.first))
    }
}

impl WatcherProcess {
    /// Starts a process with `count` watchers of `target` at `uri` over
    /// `connections` connections and waits until every stream is open.
    pub async fn start(
        target: Target,
        uri: &str,
        count: usize,
        connections: usize,
        decode: bool,
    ) -> WatcherProcess {
        let exe = std::env::current_exe().expect("path of this bench binary");
        let mut child = tokio::process::Command::new(exe)
            .args([
                "--watchers",
                target.name(),
                uri,
                &count.to_string(),
                &connections.to_string(),
                if decode { "1" } else { "0" },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a watcher process");
        let stdin = child.stdin.take().expect("the watchers' stdin");
        let lines = BufReader::new(child.stdout.take().expect("the watchers' stdout")).lines();
        let mut process = WatcherProcess {
            target,
            child,
            stdin,
            lines,
        };
        process.expect_line("ready").await;
        process
    }

    async fn next_line(&mut self) -> String {
        match self.lines.next_line().await {
            Ok(Some(line)) => line,
            other => panic!("the {:?} watcher process ended: {other:?}", self.target),
        }
    }

    async fn expect_line(&mut self, expected: &str) {
        let line = self.next_line().await;
        assert_eq!(line, expected, "from the {:?} watcher process", self.target);
    }

    /// Arms the watchers, makes the change with `change` (the wall clock is
    /// read just before it starts) and returns how it arrived.
    pub async fn deliver<F: Future<Output = ()>>(&mut self, change: F) -> Delivery {
        self.stdin
            .write_all(b"arm\n")
            .await
            .expect("write to the watchers");
        self.stdin.flush().await.expect("flush to the watchers");
        self.expect_line("armed").await;
        let made = wall_nanos();
        change.await;
        let line = self.next_line().await;
        let fields: Vec<u64> = line
            .strip_prefix("arrived ")
            .unwrap_or_else(|| panic!("not an arrival: {line}"))
            .split(' ')
            .map(|n| n.parse().expect("a number"))
            .collect();
        let [first, p99, last, cpu, observed] = fields[..] else {
            panic!("not an arrival: {line}")
        };
        let after = |at: u64| Duration::from_nanos(at.saturating_sub(made));
        Delivery {
            first: after(first),
            p99: after(p99),
            last: after(last),
            watcher_cpu: Duration::from_nanos(cpu),
            from_observed: (observed != 0)
                .then(|| Duration::from_nanos(first.saturating_sub(observed))),
            first_at: first,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

// ---------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------

/// The subset of etcd's API v3 (`etcdserverpb`, `mvccpb`) the measure uses,
/// with etcd's field numbers.
mod etcd {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// PutResponse; its fields are not read.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {}

    /// WatchRequest's `create_request` (field 1 of its oneof).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchRequest {
        #[prost(message, optional, tag = "1")]
        pub create_request: Option<WatchCreateRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchCreateRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
    }

    /// WatchResponse: `created` and the `events` (whose content is skipped).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchNotice {
        #[prost(bool, tag = "3")]
        pub created: bool,
        #[prost(message, repeated, tag = "11")]
        pub events: Vec<Event>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {}
}

/// An etcd server of the measure's own: free loopback ports, a temporary
/// data directory, killed when dropped.
pub struct Etcd {
    process: std::process::Child,
    pub uri: String,
    client: Channel,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `etcd` from PATH and waits until it takes a put; None when
    /// there is no `etcd`.
    pub async fn start() -> Option<Etcd> {
        let found = std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
        if !found {
            return None;
        }
        let dir = tempfile::tempdir().expect("a data directory for etcd");
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let (client_port, peer_port) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd's log file");
        let process = std::process::Command::new("etcd")
            .args([
                "--name=bench",
                &format!("--data-dir={}", dir.path().join("data").display()),
                &format!("--listen-client-urls={client_url}"),
                &format!("--advertise-client-urls={client_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=bench={peer_url}"),
                "--logger=zap",
                "--log-outputs=stderr",
                "--log-level=error",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log file"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        // Connected lazily: etcd is not listening yet.
        let client = tonic::transport::Endpoint::from_shared(client_url.clone())
            .expect("etcd's URI")
            .tcp_nodelay(true)
            .connect_lazy();
        let mut etcd = Etcd {
            process,
            uri: client_url,
            client,
            dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout(Duration::from_secs(1), etcd.try_put(b"")).await {
                Ok(Ok(())) => return Some(etcd),
                _ if tokio::time::Instant::now() > deadline => {
                    let log = std::fs::read_to_string(etcd.dir.path().join("etcd.log"));
                    panic!("etcd did not take a put in 30 s; its log: {log:?}");
                }
                _ => {
                    if let Ok(Some(status)) = etcd.process.try_wait() {
                        let log = std::fs::read_to_string(etcd.dir.path().join("etcd.log"));
                        panic!("etcd exited ({status}); its log: {log:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    pub fn pid(&self) -> String {
        self.process.id().to_string()
    }

    async fn try_put(&mut self, value: &[u8]) -> Result<(), Status> {
        let mut grpc = tonic::client::Grpc::new(self.client.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let put = etcd::PutRequest {
            key: ETCD_KEY.to_vec(),
            value: value.to_vec(),
        };
        let codec = tonic_prost::ProstCodec::<etcd::PutRequest, etcd::PutResponse>::default();
        grpc.unary(
            Request::new(put),
            PathAndQuery::from_static("/etcdserverpb.KV/Put"),
            codec,
        )
        .await
        .map(drop)
    }

    /// Puts `value` at the watched key.
    pub async fn put(&mut self, value: &[u8]) {
        self.try_put(value).await.expect("a put to etcd");
    }

    /// etcd's version line, for the record.
    pub fn version() -> String {
        std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.lines().next().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

// ---------------------------------------------------------------------------
// The bare broadcast: the floor of this gRPC stack
// ---------------------------------------------------------------------------

/// The least a tonic server can do to fan a change out: WatchRooms streams
/// that each send a pre-encoded progress, then every message given to
/// [`BareBroadcast::send`], pre-encoded once (a tokio broadcast channel).
#[derive(Clone)]
pub struct BareBroadcast {
    events: tokio::sync::broadcast::Sender<Bytes>,
    progress: Bytes,
}

impl BareBroadcast {
    pub fn new(progress: Bytes) -> BareBroadcast {
        BareBroadcast {
            events: tokio::sync::broadcast::channel(16).0,
            progress,
        }
    }

    /// Sends `message` (an encoded WatchRoomsResponse) to every stream.
    pub fn send(&self, message: Bytes) {
        let _ = self.events.send(message);
    }
}

impl NamedService for BareBroadcast {
    const NAME: &'static str = "ivschat.rooms.v1.RoomService";
}

impl TowerService<http::Request<tonic::body::Body>> for BareBroadcast {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(Grpc::new(RawCodec).server_streaming(this, request).await) })
    }
}

type RawStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

impl ServerStreamingService<()> for BareBroadcast {
    type Response = Bytes;
    type ResponseStream = RawStream;
    type Future = std::future::Ready<Result<Response<RawStream>, Status>>;

    fn call(&mut self, _request: Request<()>) -> Self::Future {
        // Subscribed before the progress goes out: nothing sent after it is
        // missed.
        let events = self.events.subscribe();
        let later = futures::stream::unfold(events, |mut events| async move {
            events
                .recv()
                .await
                .ok()
                .map(|message| (Ok(message), events))
        });
        let stream =
            futures::stream::once(std::future::ready(Ok(self.progress.clone()))).chain(later);
        std::future::ready(Ok(Response::new(Box::pin(stream))))
    }
}

/// Sends bytes as they are; reads requests without looking at them.
struct RawCodec;
struct RawEncoder;
struct IgnoreDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = IgnoreDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> IgnoreDecoder {
        IgnoreDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for IgnoreDecoder {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// Serves `broadcast` on a loopback port (TCP_NODELAY, as the service) until
/// the returned sender is dropped or sent; returns its URI.
pub async fn serve_bare(broadcast: BareBroadcast) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("local address");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok::<_, std::io::Error>(conn)
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(broadcast)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.await;
            }),
    );
    (format!("http://{addr}"), stop)
}

/// The floor of a per-connection writer: `broadcast` served with the h2 crate
/// alone (no hyper, no tonic). One task per connection answers each stream
/// with the progress message, then writes every broadcast message to all of
/// its streams (h2 buffers the frames; the same task's next poll of the
/// connection writes them together). Not how the service works today: what
/// driving h2 ourselves for WatchRooms could reach.
pub async fn serve_writer(broadcast: BareBroadcast) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("local address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let accept = async {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let _ = conn.set_nodelay(true);
                tokio::spawn(write_connection(conn, broadcast.clone()));
            }
        };
        tokio::select! {
            _ = stopped => {}
            () = accept => {}
        }
    });
    (format!("http://{addr}"), stop)
}

/// One connection of [`serve_writer`].
async fn write_connection(io: tokio::net::TcpStream, broadcast: BareBroadcast) {
    let Ok(mut connection) = h2::server::handshake(io).await else {
        return;
    };
    let mut events = broadcast.events.subscribe();
    let progress = grpc_frame(&broadcast.progress);
    let mut streams: Vec<h2::SendStream<Bytes>> = Vec::new();
    loop {
        tokio::select! {
            request = connection.accept() => {
                let Some(Ok((_request, mut respond))) = request else {
                    return;
                };
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .expect("a response head");
                if let Ok(mut stream) = respond.send_response(response, false) {
                    let _ = stream.send_data(progress.clone(), false);
                    streams.push(stream);
                }
            }
            message = events.recv() => {
                let Ok(message) = message else {
                    return;
                };
                let framed = grpc_frame(&message);
                streams.retain_mut(|stream| stream.send_data(framed.clone(), false).is_ok());
            }
        }
    }
}

/// `message` with gRPC's length prefix (uncompressed).
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(
        &u32::try_from(message.len())
            .expect("a small message")
            .to_be_bytes(),
    );
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// The encoded WatchRoomsResponse messages of a change to `room` and of a
/// progress: what the bare server sends, and the size of etcd's value.
pub fn encoded_messages(room: &proto::Room) -> (Bytes, Bytes) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970");
    let event = proto::WatchRoomsResponse {
        kind: Some(proto::watch_rooms_response::Kind::Event(proto::RoomEvent {
            revision: 2,
            r#type: proto::EventType::Updated as i32,
            room: Some(room.clone()),
            previous: Some(room.clone()),
            changed_fields: vec!["name".to_owned()],
            source: proto::EventSource::Api as i32,
            observed_at: Some(prost_types::Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
            }),
        })),
    };
    let progress = proto::WatchRoomsResponse {
        kind: Some(proto::watch_rooms_response::Kind::Progress(
            proto::Progress {
                revision: 1,
                snapshot_complete: false,
            },
        )),
    };
    (
        Bytes::from(event.encode_to_vec()),
        Bytes::from(progress.encode_to_vec()),
    )
}

// ---------------------------------------------------------------------------
// When the service's cache commits
// ---------------------------------------------------------------------------

/// Wall-clock nanoseconds of the service's recent commits (the store's
/// TRACE event on target `store::COMMITS`), newest last.
static COMMITS: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

/// A tracing layer that notes when each of the service's writes commits.
pub struct CommitClock;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CommitClock {
    fn on_event(
        &self,
        _event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut commits = COMMITS.lock().expect("commits");
        if commits.len() >= 1024 {
            commits.drain(..512);
        }
        commits.push(wall_nanos());
    }
}

impl CommitClock {
    /// Installs the layer as this process's subscriber, hearing only the
    /// commit events (every other callsite is disabled, as in a service that
    /// logs at INFO).
    pub fn install() {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let only_commits = tracing_subscriber::filter::Targets::new()
            .with_target(ivschat_rooms::store::COMMITS, tracing::Level::TRACE);
        tracing_subscriber::registry()
            .with(CommitClock.with_filter(only_commits))
            .init();
    }

    /// The newest commit before `at` (wall-clock nanoseconds), if heard.
    pub fn last_before(at: u64) -> Option<u64> {
        let commits = COMMITS.lock().expect("commits");
        commits.iter().rev().copied().find(|&commit| commit <= at)
    }
}
