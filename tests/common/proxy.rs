//! A loopback TCP proxy that plays network faults between a replica and
//! Postgres: a silent partition (packets dropped, no RST, every socket kept
//! open), a loud reset, and the heal. Real sockets fail in ways a mock store
//! cannot: a client blocked on a read that never returns, a server that never
//! learns its client is gone.
//!
//! Each accepted connection is one task. Its two copy directions read from
//! their source only while the link passes, so during a blackhole bytes wait
//! in kernel buffers (or in the proxy, if a read had just completed) and are
//! delivered, in order, on heal: what TCP retransmission does after a
//! partition.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The first statement of every cache write transaction (it takes the change
/// log's revision row), for `blackhole_after`: a replica cut off just after
/// it holds the lock every other replica's writes need.
pub const REVISION_LOCK: &[u8] = b"SET value = value WHERE key = 'revision'";

/// A fault-injecting TCP proxy on a loopback port in front of one upstream
/// server; dropping it stops the proxy and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    link: Arc<watch::Sender<Link>>,
    trigger: Arc<Trigger>,
    open: Arc<AtomicUsize>,
    acceptor: JoinHandle<()>,
}

/// What the server's side of a connection does during a blackhole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerSide {
    /// The proxy keeps its connection to the server open during a blackhole, as HAProxy,
    /// PgBouncer or a cloud SQL proxy would (they answer the server's keepalives): the
    /// server never notices the client is gone.
    Kept,
    /// Plays the server's own TCP keepalive noticing a silent peer: `after` this long in a
    /// blackhole, the proxy closes its connection to the server (so Postgres ends that
    /// session and frees its locks) while the client side stays open and silent.
    CutAfter(Duration),
}

/// A blackhole armed to begin just after a client executes a statement.
struct Trigger {
    armed: std::sync::Mutex<Option<Armed>>,
    link: Arc<watch::Sender<Link>>,
}

struct Armed {
    /// Bytes of the statement's text.
    needle: Vec<u8>,
    server_side: ServerSide,
}

impl Trigger {
    /// A write that executed `executed` (statements' texts) was just
    /// forwarded to the server: when one of them is the armed statement,
    /// the blackhole begins (the server has it, the client hears nothing
    /// more).
    fn check(&self, executed: &[Vec<u8>]) {
        let mut armed = self.armed.lock().expect("trigger");
        let Some(a) = armed.as_ref() else {
            return;
        };
        let hit = executed.iter().any(|text| {
            text.windows(a.needle.len())
                .any(|w| w == a.needle.as_slice())
        });
        if hit {
            let server_side = a.server_side;
            *armed = None;
            blackhole(&self.link, server_side);
        }
    }
}

/// Reads a client's side of the Postgres protocol as it goes through, to
/// tell which statements each write executes: a simple query's text, or the
/// text a Bind's prepared statement was parsed from (sqlx parses a statement
/// once per connection and then only binds it by name).
#[derive(Default)]
struct Statements {
    /// Bytes of a message not yet whole.
    pending: Vec<u8>,
    /// The startup (and any SSL or GSS request before it) is done: every
    /// message from now on starts with its type byte.
    started: bool,
    /// Prepared statements by name (`""`: the unnamed one).
    prepared: HashMap<Vec<u8>, Vec<u8>>,
    /// The stream could not be read as the protocol (TLS, or a length no
    /// message has): nothing more is read from it.
    lost: bool,
}

/// The longest message read; anything longer means the stream is not read
/// right (the tests' statements are short).
const LONGEST_MESSAGE: usize = 64 << 20;

impl Statements {
    /// The texts of the statements that `sent` (the next bytes the client
    /// sent) executes.
    fn executed(&mut self, sent: &[u8]) -> Vec<Vec<u8>> {
        if self.lost {
            return Vec::new();
        }
        self.pending.extend_from_slice(sent);
        let mut executed = Vec::new();
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            let (header, typed) = if self.started { (5, true) } else { (4, false) };
            if rest.len() < header {
                break;
            }
            let length_at = usize::from(typed);
            let length = u32::from_be_bytes(rest[length_at..length_at + 4].try_into().unwrap());
            let whole = length as usize + length_at;
            // A length counts itself (and an untyped message's code).
            if whole < header + usize::from(!typed) * 4 || whole > LONGEST_MESSAGE {
                self.lost = true;
                self.pending = Vec::new();
                return executed;
            }
            if rest.len() < whole {
                break;
            }
            let message = &rest[..whole];
            if typed {
                let body = &message[5..];
                match message[0] {
                    b'Q' => executed.push(cstring(body, 0).0.to_vec()),
                    b'P' => {
                        let (name, next) = cstring(body, 0);
                        let (text, _) = cstring(body, next);
                        self.prepared.insert(name.to_vec(), text.to_vec());
                    }
                    // Close of a prepared statement.
                    b'C' if body.first() == Some(&b'S') => {
                        self.prepared.remove(cstring(body, 1).0);
                    }
                    b'B' => {
                        let (_portal, next) = cstring(body, 0);
                        let (name, _) = cstring(body, next);
                        if let Some(text) = self.prepared.get(name) {
                            executed.push(text.clone());
                        }
                    }
                    _ => {}
                }
            } else {
                // SSLRequest and GSSENCRequest (code 1234.5679 and .5680)
                // are answered by one byte and followed by the startup;
                // anything else is the startup itself.
                let code = message
                    .get(4..8)
                    .map(|c| u32::from_be_bytes(c.try_into().unwrap()));
                self.started = !matches!(code, Some(80877103 | 80877104));
            }
            at += whole;
        }
        self.pending.drain(..at);
        executed
    }
}

/// The NUL-terminated string at `from` in `body`, and where the next field
/// begins.
fn cstring(body: &[u8], from: usize) -> (&[u8], usize) {
    let rest = body.get(from..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    (&rest[..end], from + end + 1)
}

fn blackhole(link: &watch::Sender<Link>, server_side: ServerSide) {
    link.send_modify(|link| {
        let since = match link.mode {
            Mode::Blackhole { since, .. } => since,
            Mode::Pass => Instant::now(),
        };
        link.mode = Mode::Blackhole { server_side, since };
    });
}

/// The state every connection task watches.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Link {
    mode: Mode,
    /// How many times `reset` was called: a connection that saw a lower count
    /// when it was accepted is to be reset.
    resets: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Pass,
    /// `since` dates the start of the blackhole, so that `CutAfter` counts
    /// from it even for a connection whose task looked later.
    Blackhole {
        server_side: ServerSide,
        since: Instant,
    },
}

/// How a connection's relaying ended.
enum End {
    /// Both directions closed normally, or the proxy is gone.
    Closed,
    /// `reset` was called, or a side failed: RST both sides.
    Reset,
    /// A `CutAfter` blackhole lasted long enough: close the server side only.
    Cut,
}

impl FaultProxy {
    /// A proxy to `upstream` listening on 127.0.0.1:0, passing traffic.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local address");
        let (link, watching) = watch::channel(Link {
            mode: Mode::Pass,
            resets: 0,
        });
        let open = Arc::new(AtomicUsize::new(0));
        let link = Arc::new(link);
        let trigger = Arc::new(Trigger {
            armed: std::sync::Mutex::new(None),
            link: link.clone(),
        });
        let acceptor = tokio::spawn(accept(
            listener,
            upstream,
            watching,
            open.clone(),
            trigger.clone(),
        ));
        FaultProxy {
            addr,
            link,
            trigger,
            open,
            acceptor,
        }
    }

    /// A proxy in front of the Postgres server that `url` names.
    pub async fn before_postgres(url: &str) -> FaultProxy {
        FaultProxy::start(postgres_addr(url)).await
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` (postgres://user@host:port/db?params) with host:port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        with_address(url, self.addr)
    }

    /// Forward both ways. Bytes held during a blackhole are delivered now (as TCP
    /// retransmission would after a partition heals); a connection whose server side was cut
    /// meanwhile gets its client side reset (RST: what the client's retransmission meets).
    /// A blackhole armed by `blackhole_after` and not begun is disarmed.
    pub fn pass(&self) {
        *self.trigger.armed.lock().expect("trigger") = None;
        self.link.send_modify(|link| link.mode = Mode::Pass);
    }

    /// Silently drop the link: nothing is forwarded either way and every socket stays open;
    /// new connections are accepted but nothing is forwarded on them (and they are not
    /// connected upstream) until `pass`.
    pub fn blackhole(&self, server_side: ServerSide) {
        blackhole(&self.link, server_side);
    }

    /// Arms a blackhole that begins just after a client (on any connection)
    /// executes a statement whose text contains `statement`: the server gets
    /// the execution, then nothing more goes either way. What a replica cut
    /// off just after it sent a statement meets. The proxy reads the
    /// protocol to know a prepared statement's text when only its name is
    /// sent (plaintext connections: the tests' Postgres has no TLS).
    pub fn blackhole_after(&self, statement: &[u8], server_side: ServerSide) {
        assert!(!statement.is_empty(), "a statement to wait for");
        *self.trigger.armed.lock().expect("trigger") = Some(Armed {
            needle: statement.to_vec(),
            server_side,
        });
    }

    /// Waits until the link is blackholed (by `blackhole` or an armed
    /// `blackhole_after`).
    pub async fn blackholed(&self) {
        let mut link = self.link.subscribe();
        let _ = link
            .wait_for(|l| matches!(l.mode, Mode::Blackhole { .. }))
            .await;
    }

    /// Loud failure: every current connection is closed with RST (SO_LINGER 0) on both sides
    /// at once; the mode is then `pass` for new connections.
    pub fn reset(&self) {
        self.link.send_modify(|link| {
            link.resets += 1;
            link.mode = Mode::Pass;
        });
    }

    /// Connections currently open through the proxy (client sides).
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The acceptor owns the connection tasks (a JoinSet): aborting it
        // drops the listener and aborts them all, closing their sockets.
        self.acceptor.abort();
    }
}

/// Decrements the open-connection count when a connection task ends, however
/// it ends (aborted included).
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    link: watch::Receiver<Link>,
    open: Arc<AtomicUsize>,
    trigger: Arc<Trigger>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // An accept error is about one connection (it went away
                // before we took it): keep listening.
                let Ok((client, _)) = accepted else { continue };
                open.fetch_add(1, Ordering::SeqCst);
                let guard = Open(open.clone());
                let link = link.clone();
                let trigger = trigger.clone();
                connections.spawn(async move {
                    let _guard = guard;
                    relay(client, upstream, link, &trigger).await;
                });
            }
            // Reaps finished tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One connection, from accept to close.
async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mut link: watch::Receiver<Link>,
    trigger: &Trigger,
) {
    let resets = link.borrow().resets;
    // A blackholed link forwards nothing, not even the connection itself.
    let state = until(&mut link, |l| l.resets != resets || l.mode == Mode::Pass).await;
    if state.resets != resets {
        return rst(client);
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        // What the client would meet if the server refused it.
        return rst(client);
    };
    let mut client = client;
    // Small writes (Postgres's messages) go out at once, as without a proxy.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let (mut control, mut up, mut down) = (link.clone(), link.clone(), link.clone());
        let directions = async {
            tokio::try_join!(
                pump(client_read, server_write, &mut up, Some(trigger)),
                pump(server_read, client_write, &mut down, None),
            )
        };
        tokio::select! {
            // A fault wins over data ready in the same poll: after `reset`
            // the mode is Pass, and held bytes must not leak out first.
            biased;
            end = fault(&mut control, resets) => end,
            done = directions => match done {
                Ok(_) => End::Closed,
                // One side failed: the other meets the same loud failure.
                Err(_) => End::Reset,
            },
        }
    };
    match end {
        End::Closed => {}
        End::Reset => {
            rst(server);
            rst(client);
        }
        End::Cut => {
            // A FIN: the server's session ends and Postgres frees its locks.
            drop(server);
            // The client stays open and silent until the partition heals;
            // its retransmission then meets a peer that has forgotten it.
            until(&mut link, |l| l.resets != resets || l.mode == Mode::Pass).await;
            rst(client);
        }
    }
}

/// Copies `from` to `to`, reading only while the link passes; bytes (or an
/// EOF) read just as a blackhole began are held and delivered on `pass`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    link: &mut watch::Receiver<Link>,
    trigger: Option<&Trigger>,
) -> std::io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    let mut statements = Statements::default();
    loop {
        until(link, |l| l.mode == Mode::Pass).await;
        let n = tokio::select! {
            biased;
            // Reading is cancel-safe: nothing was taken from the socket.
            _ = until(link, |l| l.mode != Mode::Pass) => continue,
            n = from.read(&mut buf) => n?,
        };
        if n == 0 {
            until(link, |l| l.mode == Mode::Pass).await;
            // Half-close, as the peer did: the other direction carries on.
            return to.shutdown().await;
        }
        let mut written = 0;
        while written < n {
            until(link, |l| l.mode == Mode::Pass).await;
            // Writing piecewise, so a blackhole that begins mid-write stops it.
            tokio::select! {
                biased;
                _ = until(link, |l| l.mode != Mode::Pass) => {}
                w = to.write(&buf[written..n]) => written += w?,
            }
        }
        if let Some(trigger) = trigger {
            trigger.check(&statements.executed(&buf[..n]));
        }
    }
}

/// Waits for the connection's fault: a reset, or a `CutAfter` blackhole that
/// has lasted its time.
async fn fault(link: &mut watch::Receiver<Link>, resets: u64) -> End {
    loop {
        let state = *link.borrow_and_update();
        if state.resets != resets {
            return End::Reset;
        }
        let cut_at = match state.mode {
            Mode::Blackhole {
                server_side: ServerSide::CutAfter(after),
                since,
            } => Some(since + after),
            _ => None,
        };
        let cut = async {
            match cut_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // A heal that comes with the deadline wins: re-read the state.
            biased;
            changed = link.changed() => if changed.is_err() {
                return End::Closed;
            },
            () = cut => return End::Cut,
        }
    }
}

/// The link's state once it satisfies `ok`. Never returns once the proxy is
/// gone: its tasks are being aborted then.
async fn until(link: &mut watch::Receiver<Link>, ok: impl FnMut(&Link) -> bool) -> Link {
    // The copy is taken at once: the borrowed state locks the channel.
    let state = link.wait_for(ok).await.map(|state| *state);
    match state {
        Ok(state) => state,
        Err(_) => std::future::pending().await,
    }
}

/// Closes `stream` with an RST rather than a FIN.
fn rst(stream: TcpStream) {
    // SO_LINGER 0 does not block on close (a nonzero linger would).
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Where the Postgres server of `url` (postgres://user@host:port/db) listens.
pub fn postgres_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("a URL").1;
    let authority = rest.split(['/', '?']).next().expect("an authority");
    let host_port = authority.rsplit('@').next().expect("host and port");
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    host_port
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("a numeric host and port")
}

/// `url` (scheme://user@host:port/db?params) with host:port replaced by `addr`.
pub fn with_address(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    // The user (and password) end at the last '@' of the authority.
    let user = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{scheme}://{user}{addr}{tail}")
}
