//! What every integration test needs: a fresh database (SQLite or Postgres), an
//! emulator, the real server on port 0, and clients for both.
#![allow(dead_code)] // each test file uses its own part

pub mod binary;
pub mod fleet;
pub mod load;
pub mod pg;
pub mod pgbouncer;
pub mod pki;
pub mod proxy;

use std::io::Write as _;
use std::net::SocketAddr;

use clap::Parser as _;
use ivschat_rooms::config::{Cli, Command, ServeConfig};
use ivschat_rooms::domain::{Room, Timestamp};
use ivschat_rooms::emulator::{Emulator, EmulatorConfig};
use ivschat_rooms::grpc::proto::room_service_client::RoomServiceClient;
use sqlx::Connection as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

#[allow(unused_imports)] // not every test file talks gRPC
pub use ivschat_rooms::grpc::proto;

/// The Postgres server to create test databases on, e.g.
/// `postgres://postgres@127.0.0.1:5432/postgres`.
pub const POSTGRES_URL_VAR: &str = "IVSCHAT_ROOMS_TEST_POSTGRES_URL";
/// When set (CI sets it), a missing Postgres fails the tests instead of
/// skipping them.
pub const REQUIRE_POSTGRES_VAR: &str = "IVSCHAT_ROOMS_TEST_REQUIRE_POSTGRES";

/// A database of the test's own, removed when dropped.
pub struct TestDb {
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        TestDb {
            url: format!("sqlite://{}", dir.path().join("cache.db").display()),
            cleanup: Cleanup::Sqlite(dir),
        }
    }

    /// A fresh database on the Postgres server named by
    /// `IVSCHAT_ROOMS_TEST_POSTGRES_URL`; `None`, said loudly, when it is unset.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        let Ok(admin_url) = std::env::var(POSTGRES_URL_VAR) else {
            if std::env::var_os(REQUIRE_POSTGRES_VAR).is_some() {
                panic!("{REQUIRE_POSTGRES_VAR} is set but {POSTGRES_URL_VAR} is not");
            }
            // Written to stderr directly so that the test harness does not
            // swallow it.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED Postgres test {test}: set {POSTGRES_URL_VAR} \
                 (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run it"
            );
            return None;
        };
        let name = format!("ivschat_rooms_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR}={admin_url}: {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let (base, _db) = admin_url
            .split('?')
            .next()
            .and_then(|u| u.rsplit_once('/'))
            .expect("postgres URL with a database");
        Some(TestDb {
            url: format!("{base}/{name}"),
            cleanup: Cleanup::Postgres { admin_url, name },
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Cleanup::Postgres { admin_url, name } = &self.cleanup {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut admin)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs `$case(db)` once on SQLite and once on Postgres, as
/// `$case::sqlite` and `$case::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$case($crate::common::TestDb::sqlite()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) = $crate::common::TestDb::postgres(stringify!($case)).await {
                    super::$case(db).await;
                }
            }
        }
    )*};
}

/// An emulator on a loopback port.
pub async fn emulator() -> (Emulator, String) {
    emulator_with(EmulatorConfig::default()).await
}

/// An emulator configured so, on a loopback port.
pub async fn emulator_with(config: EmulatorConfig) -> (Emulator, String) {
    let emulator = Emulator::new(config).expect("emulator");
    let url = emulator
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("emulator listens");
    (emulator, url)
}

/// The real AWS SDK pointed at an emulator, with retries off.
pub fn sdk(url: &str) -> aws_sdk_ivschat::Client {
    sdk_in(url, "us-east-1")
}

/// Like [`sdk`], signing for `region`, as another AWS client of that region
/// would (the emulator serves the region a request is signed for).
pub fn sdk_in(url: &str, region: &str) -> aws_sdk_ivschat::Client {
    use aws_sdk_ivschat::config::{BehaviorVersion, Credentials, Region, retry::RetryConfig};
    let config = aws_sdk_ivschat::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(url)
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_ivschat::Client::from_conf(config)
}

/// The serve configuration a test server starts with: the given database, the
/// emulator at `emulator_url`, and `extra` flags.
pub fn serve_config(db_url: &str, emulator_url: &str, extra: &[&str]) -> ServeConfig {
    let args = [
        "ivschat-rooms",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--database-url",
        db_url,
        "--upstream",
        "emulator",
        "--emulator-url",
        emulator_url,
        "--upstream-max-attempts",
        "1",
        "--upstream-timeout",
        "5s",
        // No budget to wait for unless a test asks: AWS's 5 calls per
        // second would make most tests slow.
        "--upstream-rate",
        "1000000",
        // No reconciling pass after the startup listing unless a test asks
        // (later flags win), so upstream call counts are the test's own.
        "--reconcile-interval",
        "1h",
        "--resync-interval",
        "1h",
    ];
    let cli = Cli::try_parse_from(args.iter().chain(extra)).expect("test flags parse");
    match cli.into_command() {
        Command::Serve(config) => config,
        Command::Emulator(_) | Command::Watch(_) => unreachable!("serve was asked for"),
    }
}

/// A server on `db` in front of a fresh emulator, its startup listing done.
pub async fn setup(db: &TestDb, extra: &[&str]) -> (TestServer, Emulator, String) {
    let (emulator, url) = emulator().await;
    let mut server = TestServer::start(serve_config(&db.url, &url, extra)).await;
    server.wait_listed().await;
    (server, emulator, url)
}

/// CreateRoom for a room named `name`, everything else IVS Chat's defaults.
pub fn create(name: &str) -> proto::CreateRoomRequest {
    proto::CreateRoomRequest {
        name: name.into(),
        ..Default::default()
    }
}

/// The real server on port 0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: RoomServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(ivschat_rooms::server::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        // The first call is answered once the server serves (the listener is
        // already bound), so this waits for startup without polling.
        let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        if let Err(status) = health {
            let outcome = task.await;
            panic!("test server did not start: {status:?}; server said {outcome:?}");
        }
        TestServer {
            addr,
            client: RoomServiceClient::new(channel),
            stop: Some(stop),
            task,
        }
    }

    /// Waits until the startup listing of IVS Chat has completed (ListRooms
    /// waits for it), so no background upstream call runs after this.
    pub async fn wait_listed(&mut self) {
        self.client
            .list_rooms(proto::ListRoomsRequest::default())
            .await
            .expect("the startup listing completes");
    }

    /// Creates a room named `name` through the server.
    pub async fn create_room(&mut self, name: &str) -> proto::Room {
        self.client
            .create_room(create(name))
            .await
            .expect("create a room")
            .into_inner()
    }

    /// Starts a graceful shutdown, as SIGTERM would, without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the server gracefully (in-flight exchanges with IVS Chat included)
    /// and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .expect("server task")
            .expect("server stops cleanly");
    }

    pub fn channel_uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new connection to the server, for clients of its other services.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.channel_uri())
            .expect("uri")
            .connect()
            .await
            .expect("connect to the test server")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ARN of room `id` in the emulator's default account and region.
pub fn room_arn(id: &str) -> String {
    format!("arn:aws:ivschat:us-east-1:123456789012:room/{id}")
}

/// A plain room with IVS Chat's default limits, for driving the store.
pub fn room(id: &str, update_nanos: i64, name: &str) -> Room {
    Room {
        arn: room_arn(id),
        id: id.into(),
        name: name.into(),
        create_time: Timestamp::from_nanos(1),
        update_time: Timestamp::from_nanos(update_nanos),
        maximum_message_rate_per_second: Room::DEFAULT_MAXIMUM_MESSAGE_RATE_PER_SECOND,
        maximum_message_length: Room::DEFAULT_MAXIMUM_MESSAGE_LENGTH,
        message_review_handler: None,
        tags: Default::default(),
        logging_configuration_identifiers: Vec::new(),
        details_pending: false,
    }
}

/// The most instants of `times` in any window [t, t + 1 s): the rate AWS's
/// per-second limit sees.
pub fn max_per_second<T>(times: &[T]) -> usize
where
    T: Copy + Ord + std::ops::Add<std::time::Duration, Output = T>,
{
    let mut times = times.to_vec();
    times.sort();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + std::time::Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// A request with a deadline, as a gRPC client sets one.
pub fn with_deadline<T>(message: T, deadline: std::time::Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}
