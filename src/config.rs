//! Command-line and environment configuration: every flag is also an
//! `IVSCHAT_ROOMS_*` environment variable; durations read like `1s`, `500ms`.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::budget::Operation;
use crate::emulator::{InjectedError, InjectedFault, TpsLimit};

#[derive(Debug, Parser)]
#[command(
    name = "ivschat-rooms",
    version,
    about = "A gRPC service in front of Amazon IVS Chat's room API, with a persistent cache",
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand, `serve` runs with these.
    #[command(flatten)]
    pub serve: ServeConfig,
}

impl Cli {
    /// The subcommand to run; a bare `ivschat-rooms` serves.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

#[derive(Debug, Subcommand)]
// One value per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve RoomService over gRPC (the default).
    Serve(ServeConfig),
    /// Run the IVS Chat emulator alone, for tests that need a stand-in AWS.
    Emulator(EmulatorArgs),
    /// Print room changes from a running server, one per line; resumes by
    /// itself after a disconnect.
    Watch(WatchArgs),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the service sends IVS Chat calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamKind {
    /// An emulator started in-process on a loopback port: no AWS account needed.
    Embedded,
    /// AWS, configured by the standard chain (environment, profile, IMDS);
    /// AWS_ENDPOINT_URL_IVSCHAT overrides the endpoint.
    Aws,
    /// An emulator already running at --emulator-url.
    Emulator,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to serve gRPC on.
    #[arg(long, env = "IVSCHAT_ROOMS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Bearer tokens clients must send (`authorization: Bearer TOKEN`): one
    /// per line, `TOKEN readonly` for reads and watches only. Without it there
    /// is no authentication: anyone who reaches the port may call everything.
    #[arg(long, env = "IVSCHAT_ROOMS_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Require clients to present a certificate signed by this CA (PEM):
    /// mutual TLS. Needs --tls-cert.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Largest request message accepted, in bytes (the largest valid
    /// CreateRoom is under 100 KiB); larger ones are refused before decoding.
    #[arg(long, env = "IVSCHAT_ROOMS_MAX_REQUEST_SIZE", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_request_size: u32,

    /// Concurrent calls (streams) per HTTP/2 connection; a client queues
    /// calls past it.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub max_concurrent_streams: u32,

    /// Watch streams this process serves at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "IVSCHAT_ROOMS_MAX_WATCHERS", default_value_t = 100_000)]
    pub max_watchers: usize,

    /// HTTP/2 keepalive: a ping to an idle connection this often; a peer that
    /// does not answer within --keepalive-timeout is disconnected.
    #[arg(long, env = "IVSCHAT_ROOMS_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered.
    #[arg(long, env = "IVSCHAT_ROOMS_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Close connections this old (HTTP/2 GOAWAY), so clients spread over
    /// replicas again; watch streams on them end with UNAVAILABLE and resume
    /// on a new connection. Off by default.
    #[arg(long, env = "IVSCHAT_ROOMS_MAX_CONNECTION_AGE", value_parser = humantime::parse_duration)]
    pub max_connection_age: Option<Duration>,

    /// After --max-connection-age (and its GOAWAY), the watch streams of the
    /// connection end half way through this, for clients to resume them on
    /// a new connection; other calls in flight finish.
    #[arg(long, env = "IVSCHAT_ROOMS_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub max_connection_age_grace: Duration,

    /// Address to serve Prometheus metrics on (`GET /metrics`).
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,

    /// Log lines for people (`text`) or one JSON object per line (`json`).
    #[arg(long, env = "IVSCHAT_ROOMS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Turn gRPC server reflection off (grpcurl then needs the proto files).
    #[arg(long, env = "IVSCHAT_ROOMS_NO_REFLECTION", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub no_reflection: bool,

    /// The cache database: `sqlite://PATH` (created if missing) or
    /// `postgres://USER@HOST/DB`. Default: a SQLite file in --data-dir.
    #[arg(long, env = "IVSCHAT_ROOMS_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Directory for the default SQLite cache and the embedded emulator's state.
    #[arg(long, env = "IVSCHAT_ROOMS_DATA_DIR", default_value = ".ivschat-rooms")]
    pub data_dir: PathBuf,

    /// Where IVS Chat calls go.
    #[arg(long, env = "IVSCHAT_ROOMS_UPSTREAM", value_enum, default_value_t = UpstreamKind::Embedded)]
    pub upstream: UpstreamKind,

    /// The emulator's URL, with --upstream emulator.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_EMULATOR_URL",
        required_if_eq("upstream", "emulator")
    )]
    pub emulator_url: Option<String>,

    /// The region the embedded emulator, or the one at --emulator-url, plays
    /// when --regions names none.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_EMULATOR_REGION",
        default_value = "us-east-1",
        value_parser = region
    )]
    pub emulator_region: String,

    /// The IVS Chat regions served, comma-separated; the first is where a
    /// CreateRoom that names no region goes. Default: the region of
    /// aws-config's chain with --upstream aws, --emulator-region otherwise.
    #[arg(long, env = "IVSCHAT_ROOMS_REGIONS", value_delimiter = ',', value_parser = region)]
    pub regions: Vec<String>,

    /// Time limit for one attempt of an IVS Chat call.
    #[arg(long, env = "IVSCHAT_ROOMS_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,

    /// Attempts per IVS Chat call, the first included: throttling, 5xx,
    /// timeouts and connection failures are retried with backoff, each
    /// attempt within the budget.
    #[arg(long, env = "IVSCHAT_ROOMS_UPSTREAM_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub upstream_max_attempts: u32,

    /// IVS Chat calls per second allowed for every operation. Default: AWS's
    /// published rate of each (5 for room calls, 10 for tag calls, per
    /// account and region), shared by every replica on one Postgres cache.
    #[arg(long, env = "IVSCHAT_ROOMS_UPSTREAM_RATE")]
    pub upstream_rate: Option<NonZeroU32>,

    /// A rate for one operation instead of --upstream-rate, as
    /// `Operation=RATE` (e.g. `GetRoom=3`); repeat for several.
    #[arg(long = "upstream-operation-rate", env = "IVSCHAT_ROOMS_UPSTREAM_OPERATION_RATES",
          value_delimiter = ',', value_parser = operation_rate)]
    pub upstream_operation_rates: Vec<(Operation, NonZeroU32)>,

    /// How long a request without a deadline waits for its turn in the
    /// budget before RESOURCE_EXHAUSTED (a request's own deadline applies
    /// when it has one).
    #[arg(long, env = "IVSCHAT_ROOMS_UPSTREAM_MAX_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub upstream_max_wait: Duration,

    /// How long a cached room confirmed by IVS Chat is served without asking
    /// again (READ_CONSISTENCY_CACHED). The reconciler's full listings come
    /// often enough to confirm every room within it, while IVS Chat's listing
    /// rate allows (about 250 rooms per second of it).
    #[arg(long, env = "IVSCHAT_ROOMS_MAX_STALENESS", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_staleness: Duration,

    /// While IVS Chat is down or throttling, cached reads are answered from
    /// rooms confirmed up to this long ago (past --max-staleness, marked
    /// `x-cache: stale`); `0s` turns this off.
    #[arg(long, env = "IVSCHAT_ROOMS_STALE_IF_ERROR", default_value = "1h", value_parser = humantime::parse_duration)]
    pub stale_if_error: Duration,

    /// How long a CreateRoom request_id is remembered: a retry within this
    /// returns the room the first call created.
    #[arg(long, env = "IVSCHAT_ROOMS_REQUEST_ID_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub request_id_retention: Duration,

    /// How long a CreateRoom's claim on its request_id holds unless renewed;
    /// must exceed --upstream-timeout. After a crash mid-creation, a retry
    /// waits up to twice this, then finds the room by its tag.
    #[arg(long, env = "IVSCHAT_ROOMS_REQUEST_ID_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_id_lease: Duration,

    /// How many cached rooms each process also keeps in memory, for cached
    /// reads without SQL (`0` turns the memory layer off).
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_MEMORY_CACHE_ROOMS",
        default_value_t = 200_000
    )]
    pub memory_cache_rooms: usize,

    /// How long ListRooms waits for the first full listing of IVS Chat before
    /// answering UNAVAILABLE.
    #[arg(long, env = "IVSCHAT_ROOMS_LISTING_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub listing_wait: Duration,

    /// On SIGINT/SIGTERM, how long health reports NOT_SERVING before the
    /// server stops accepting (for load balancers to take it out first).
    #[arg(long, env = "IVSCHAT_ROOMS_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// On SIGINT/SIGTERM, how long in-flight requests may take before the
    /// server stops anyway.
    #[arg(long, env = "IVSCHAT_ROOMS_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// How often the reconciler looks for rooms changed in IVS Chat behind
    /// this service's back (one ListRooms call, plus a GetRoom per changed room).
    #[arg(long, env = "IVSCHAT_ROOMS_RECONCILE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,

    /// How often, at most apart, the reconciler lists every room, to find
    /// rooms deleted or created in IVS Chat and tag-only changes (more often
    /// when --max-staleness needs it).
    #[arg(long, env = "IVSCHAT_ROOMS_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,

    /// How often an idle WatchRooms stream gets a progress bookmark.
    #[arg(long, env = "IVSCHAT_ROOMS_BOOKMARK_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub bookmark_interval: Duration,

    /// How many of the newest change events are kept for watchers to resume
    /// from (at least 1).
    #[arg(long, env = "IVSCHAT_ROOMS_EVENT_RETENTION_COUNT", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub event_retention_count: u64,

    /// Change events older than this are compacted away, newest excepted
    /// (`0s`: keep by count only).
    #[arg(long, env = "IVSCHAT_ROOMS_EVENT_RETENTION_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub event_retention_age: Duration,

    /// How many of the newest change events each process keeps in memory for
    /// watchers; a watcher further behind reads the database.
    #[arg(long, env = "IVSCHAT_ROOMS_EVENT_RING_CAPACITY", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub event_ring_capacity: u64,

    /// How often each process re-reads the change log even without a
    /// notification. New events normally arrive at once (this process's
    /// commits, other replicas' Postgres NOTIFY); this only bounds the delay
    /// after a lost notification.
    #[arg(long, env = "IVSCHAT_ROOMS_EVENT_POLL_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub event_poll_interval: Duration,

    /// How often compaction of the change log runs.
    #[arg(long, env = "IVSCHAT_ROOMS_COMPACTION_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub compaction_interval: Duration,
}

impl ServeConfig {
    /// The regions served as configured: empty with --upstream aws and no
    /// --regions (aws-config's chain names the one region then).
    pub fn configured_regions(&self) -> anyhow::Result<Vec<String>> {
        for (i, region) in self.regions.iter().enumerate() {
            anyhow::ensure!(
                !self.regions[..i].contains(region),
                "--regions names {region} twice"
            );
        }
        Ok(match (self.regions.is_empty(), self.upstream) {
            (false, _) => self.regions.clone(),
            (true, UpstreamKind::Aws) => Vec::new(),
            (true, _) => vec![self.emulator_region.clone()],
        })
    }

    /// The cache URL, defaulting to a SQLite file in the data directory.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("rooms.db").display()))
    }

    /// Where the embedded emulator keeps its rooms: beside the cache, so that
    /// after a restart the cache and its upstream still agree.
    pub fn embedded_state_file(&self) -> PathBuf {
        let url = self.database_url();
        let sqlite_path = url
            .strip_prefix("sqlite:")
            .map(|rest| rest.trim_start_matches("//"))
            .map(|rest| rest.split('?').next().unwrap_or_default())
            .filter(|path| !path.is_empty() && *path != ":memory:");
        match sqlite_path {
            Some(path) => PathBuf::from(format!("{path}.emulator.json")),
            None => self.data_dir.join("emulator.json"),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct EmulatorArgs {
    /// Address to serve the IVS Chat API on.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_EMULATOR_LISTEN",
        default_value = "127.0.0.1:4566"
    )]
    pub listen: SocketAddr,

    /// Keep rooms in this file so a restart keeps them (default: in memory).
    #[arg(long, env = "IVSCHAT_ROOMS_EMULATOR_STATE")]
    pub state: Option<PathBuf>,

    /// The region of a request whose signature names none. Every region a
    /// request is signed for (its SigV4 credential scope) is served, each
    /// with rooms, ARNs and TPS limits of its own.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_EMULATOR_REGION",
        default_value = "us-east-1",
        value_parser = region
    )]
    pub region: String,

    /// Account in the ARNs handed out.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_EMULATOR_ACCOUNT_ID",
        default_value = "123456789012"
    )]
    pub account_id: String,

    /// Added to every response.
    #[arg(long, env = "IVSCHAT_ROOMS_EMULATOR_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,

    /// Fraction of requests (0 to 1) answered with --error instead.
    #[arg(long, env = "IVSCHAT_ROOMS_EMULATOR_ERROR_RATE", default_value_t = 0.0, value_parser = fraction)]
    pub error_rate: f64,

    /// The error injected at --error-rate.
    #[arg(long, env = "IVSCHAT_ROOMS_EMULATOR_ERROR", value_enum, default_value_t = InjectedError::Internal)]
    pub error: InjectedError,

    /// One more fault and the fraction of requests (0 to 1) that draw it:
    /// `ERROR=RATE` (ERROR as for --error) or `slow:DURATION=RATE` (the
    /// operation happens, its answer comes DURATION late). Repeat, or
    /// comma-separate in the variable, for a mix; a request draws at most one
    /// fault (--error-rate's included).
    #[arg(long = "fault", env = "IVSCHAT_ROOMS_EMULATOR_FAULTS", value_name = "FAULT=RATE",
          value_delimiter = ',', value_parser = fault_rate)]
    pub faults: Vec<(InjectedFault, f64)>,

    /// Calls per second allowed per operation: `aws` for AWS's published
    /// rates (5 for room calls, 10 for tag calls), or one number for every
    /// operation; over it, ThrottlingException. Default: no limit.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_EMULATOR_TPS_LIMIT",
        value_name = "aws|RATE"
    )]
    pub tps_limit: Option<TpsLimit>,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// The server to watch.
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,

    /// Start after this revision (every later event, in order) instead of now.
    #[arg(long, conflicts_with = "snapshot")]
    pub after_revision: Option<u64>,

    /// Trust this CA (PEM) for an `https://` server, instead of none.
    #[arg(long, env = "IVSCHAT_ROOMS_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// A client certificate and key (PEM, concatenated) for a server that
    /// wants one (--tls-client-ca).
    #[arg(
        long,
        env = "IVSCHAT_ROOMS_TLS_IDENTITY",
        value_name = "FILE",
        requires = "tls_ca"
    )]
    pub tls_identity: Option<PathBuf>,

    /// The bearer token to send, when the server wants one (--auth-tokens).
    #[arg(long, env = "IVSCHAT_ROOMS_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// Print every matching room first (as SNAPSHOT lines), then changes.
    /// Only rooms of these regions, comma-separated (default: every region
    /// the server serves).
    #[arg(long, value_delimiter = ',', value_parser = region)]
    pub regions: Vec<String>,

    #[arg(long)]
    pub snapshot: bool,

    /// One JSON object per line, for jq.
    #[arg(long)]
    pub json: bool,

    /// Only these rooms (ARNs); all rooms when none are given.
    #[arg(value_name = "ROOM_ARN")]
    pub rooms: Vec<String>,
}

/// A value that must not reach logs: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

fn operation_rate(s: &str) -> Result<(Operation, NonZeroU32), String> {
    let (op, rate) = s
        .split_once('=')
        .ok_or_else(|| format!("expected Operation=RATE, got {s}"))?;
    let rate = rate
        .parse()
        .map_err(|_| format!("the rate must be a whole number above 0, got {rate}"))?;
    Ok((op.parse()?, rate))
}

fn fault_rate(s: &str) -> Result<(InjectedFault, f64), String> {
    let (fault, rate) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected FAULT=RATE, got {s}"))?;
    let fault = match fault.strip_prefix("slow:") {
        Some(by) => {
            InjectedFault::Slow(humantime::parse_duration(by).map_err(|e| format!("{by}: {e}"))?)
        }
        None => InjectedFault::Error(clap::ValueEnum::from_str(fault, true)?),
    };
    Ok((fault, fraction(rate)?))
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("must be a number from 0 to 1, got {s}")),
    }
}

/// A region name: lowercase letters, digits and dashes, as in `us-east-1`.
fn region(s: &str) -> Result<String, String> {
    let s = s.trim();
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a region name (lowercase letters, digits and dashes, as in us-east-1)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("ivschat-rooms").chain(args.iter().copied()))
            .expect("arguments parse")
            .into_command()
    }

    #[test]
    fn bare_invocation_serves_with_defaults() {
        let Command::Serve(c) = parse(&[]) else {
            panic!("expected serve")
        };
        assert_eq!(c.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(c.upstream, UpstreamKind::Embedded);
        assert_eq!(c.database_url(), "sqlite://.ivschat-rooms/rooms.db");
        assert_eq!(
            c.embedded_state_file(),
            PathBuf::from(".ivschat-rooms/rooms.db.emulator.json")
        );
    }

    #[test]
    fn regions_default_to_the_one_region_played_or_configured() {
        let Command::Serve(c) = parse(&[]) else {
            panic!("expected serve")
        };
        assert_eq!(c.configured_regions().unwrap(), ["us-east-1"]);
        let Command::Serve(c) = parse(&["--emulator-region", "eu-west-1"]) else {
            panic!("expected serve")
        };
        assert_eq!(c.configured_regions().unwrap(), ["eu-west-1"]);
        // With AWS, aws-config's chain names it.
        let Command::Serve(c) = parse(&["--upstream", "aws"]) else {
            panic!("expected serve")
        };
        assert!(c.configured_regions().unwrap().is_empty());
        let Command::Serve(c) = parse(&["--upstream", "aws", "--regions", "eu-west-1,us-west-2"])
        else {
            panic!("expected serve")
        };
        assert_eq!(c.configured_regions().unwrap(), ["eu-west-1", "us-west-2"]);
        let Command::Serve(c) = parse(&["--regions", "eu-west-1,eu-west-1"]) else {
            panic!("expected serve")
        };
        let err = c.configured_regions().unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
        let err = Cli::try_parse_from(["ivschat-rooms", "--regions", "us-east-1,US_WEST"])
            .expect_err("a bad region name is refused")
            .to_string();
        assert!(err.contains("US_WEST") && err.contains("region"), "{err}");
    }

    #[test]
    fn security_flags_and_redacted_token() {
        let Command::Serve(c) = parse(&[]) else {
            panic!("expected serve")
        };
        assert_eq!((c.auth_tokens, c.no_reflection), (None, false));
        let Command::Serve(c) = parse(&["--auth-tokens", "/etc/tokens", "--no-reflection"]) else {
            panic!("expected serve")
        };
        assert_eq!(c.auth_tokens, Some(PathBuf::from("/etc/tokens")));
        assert!(c.no_reflection);
        let Command::Watch(w) = parse(&["watch", "--token", "s3cr3t"]) else {
            panic!("expected watch")
        };
        assert_eq!(w.token.as_ref().map(Secret::expose), Some("s3cr3t"));
        assert!(!format!("{w:?}").contains("s3cr3t"));
    }

    #[test]
    fn tls_files_come_together() {
        let Command::Serve(c) = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]) else {
            panic!("expected serve")
        };
        assert_eq!(c.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(c.tls_key, Some(PathBuf::from("k.pem")));
        for alone in [
            &["--tls-cert", "c.pem"][..],
            &["--tls-key", "k.pem"],
            &["--tls-client-ca", "ca.pem"],
        ] {
            let args = std::iter::once("ivschat-rooms").chain(alone.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{alone:?} alone");
        }
    }

    #[test]
    fn durations_read_as_humantime() {
        let Command::Serve(c) = parse(&[
            "serve",
            "--upstream-timeout",
            "1500ms",
            "--max-staleness",
            "2m",
        ]) else {
            panic!("expected serve")
        };
        assert_eq!(c.upstream_timeout, Duration::from_millis(1500));
        assert_eq!(c.max_staleness, Duration::from_secs(120));
    }

    #[test]
    fn operation_rates_parse() {
        let Command::Serve(c) = parse(&[
            "--upstream-operation-rate",
            "GetRoom=3",
            "--upstream-operation-rate",
            "ListRooms=1,UpdateRoom=2",
        ]) else {
            panic!("expected serve")
        };
        let three = NonZeroU32::new(3).unwrap();
        assert_eq!(c.upstream_operation_rates[0], (Operation::GetRoom, three));
        assert_eq!(c.upstream_operation_rates.len(), 3);
        assert_eq!(c.upstream_rate, None, "AWS's published rates by default");
        for bad in ["GetRoom", "GetRoom=0", "Nope=1", "GetRoom=x"] {
            assert!(
                Cli::try_parse_from(["ivschat-rooms", "--upstream-operation-rate", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn emulator_faults_parse_into_a_mix() {
        let Command::Emulator(e) = parse(&[
            "emulator",
            "--fault",
            "internal=0.1",
            "--fault",
            "throttling=0.1,slow:6s=0.1",
        ]) else {
            panic!("expected emulator")
        };
        assert_eq!(
            e.faults,
            [
                (InjectedFault::Error(InjectedError::Internal), 0.1),
                (InjectedFault::Error(InjectedError::Throttling), 0.1),
                (InjectedFault::Slow(Duration::from_secs(6)), 0.1),
            ]
        );
        for bad in ["internal", "internal=2", "nope=0.1", "slow:soon=0.1"] {
            assert!(
                Cli::try_parse_from(["ivschat-rooms", "emulator", "--fault", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn emulator_upstream_needs_a_url() {
        assert!(Cli::try_parse_from(["ivschat-rooms", "--upstream", "emulator"]).is_err());
        assert!(Cli::try_parse_from(["ivschat-rooms", "emulator", "--error-rate", "1.5"]).is_err());
    }

    #[test]
    fn postgres_cache_keeps_emulator_state_in_data_dir() {
        let Command::Serve(c) = parse(&[
            "--database-url",
            "postgres://postgres@localhost/x",
            "--data-dir",
            "/d",
        ]) else {
            panic!("expected serve")
        };
        assert_eq!(c.embedded_state_file(), PathBuf::from("/d/emulator.json"));
    }
}
