//! A PgBouncer of the test's own (Debian's `pgbouncer`, on a free loopback
//! port, its files in a temporary directory) in front of a Postgres server,
//! in the pool mode a test asks for.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::pg::is_root;
use super::proxy::{postgres_addr, with_address};

/// Set (by `.ci/run`) when PgBouncer must be there: its tests may not skip.
pub const REQUIRE_VAR: &str = "IVSCHAT_ROOMS_TEST_REQUIRE_PGBOUNCER";

/// The PgBouncer program, when this machine has it; without it, a test
/// skips (saying so), or fails when [`REQUIRE_VAR`] is set.
pub fn available() -> Option<&'static Path> {
    let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    if program.is_none() {
        assert!(
            std::env::var_os(REQUIRE_VAR).is_none(),
            "{REQUIRE_VAR} is set but PgBouncer is not installed"
        );
        eprintln!("SKIPPED: no pgbouncer (Debian's pgbouncer)");
    }
    program
}

/// A running PgBouncer; killed when dropped.
pub struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// PgBouncer in `pool_mode` (`session`, `transaction` or `statement`)
    /// in front of the Postgres server that `url` names, trusting every
    /// client (as the server does), every database passed through.
    pub async fn start(url: &str, pool_mode: &str) -> PgBouncer {
        let server = postgres_addr(url);
        let program = available().expect("PgBouncer (Debian's pgbouncer)");
        let dir = tempfile::Builder::new()
            .prefix("ivschat-rooms-pgbouncer")
            .tempdir()
            .expect("temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .unwrap()
            .port();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        let config = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &config,
            format!(
                "[databases]\n* = host={host} port={server_port}\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                 pool_mode = {pool_mode}\n\
                 ignore_startup_parameters = extra_float_digits\n\
                 max_client_conn = 200\ndefault_pool_size = 20\n",
                host = server.ip(),
                server_port = server.port(),
                users = users.display(),
            ),
        )
        .unwrap();
        // Readable by the postgres user, as which it runs when we are root.
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        // PgBouncer refuses to run as root; `-u` switches to the postgres
        // user itself, so the child we kill on drop is PgBouncer.
        let mut command = std::process::Command::new(program);
        if is_root() {
            command.args(["-u", "postgres"]);
        }
        let mut child = command
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        super::binary::within("PgBouncer to listen", async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("PgBouncer exited ({status}) with {}", config.display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        PgBouncer {
            child,
            port,
            _dir: dir,
        }
    }

    /// `url` (postgres://user@host:port/db) through this PgBouncer.
    pub fn url_for(&self, url: &str) -> String {
        with_address(url, SocketAddr::from(([127, 0, 0, 1], self.port)))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
