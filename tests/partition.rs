//! What a replica does when the network between it and Postgres fails: packets
//! dropped silently (a partition, every socket left open), connections reset
//! loudly, and the heal. The faults are played by a loopback proxy
//! (`common::proxy::FaultProxy`) between the replica and Postgres; its own
//! tests are at the bottom of this file.

mod common;

use std::time::Duration;

use common::binary::within;
use common::load::{assert_same_rooms, fold, list_all, log_through, upstream_rooms};
use common::pgbouncer::PgBouncer;
use common::proxy::{FaultProxy, REVISION_LOCK, ServerSide};
use common::{TestDb, TestServer, emulator, proto, serve_config, with_deadline};
use ivschat_rooms::domain::{Operation, RoomPatch};
use ivschat_rooms::store::{HELD_LOCK_BOUND, LEASE_TTL, Store};
use proto::watch_rooms_response::Kind;
use tokio::time::Instant;
use tonic::Code;

/// The reconciler's takeover goal: a leader cut off is replaced within this.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

/// Beyond [`HELD_LOCK_BOUND`], what a healthy replica's write may take on a
/// loaded machine (its own statements, the turn, IVS Chat).
const STALL_SLACK: Duration = Duration::from_secs(4);

fn rename(arn: &str, name: &str) -> proto::UpdateRoomRequest {
    proto::UpdateRoomRequest {
        identifier: arn.to_owned(),
        name: Some(name.to_owned()),
        ..Default::default()
    }
}

fn cached(arn: &str) -> proto::GetRoomRequest {
    proto::GetRoomRequest {
        identifier: arn.to_owned(),
        consistency: proto::ReadConsistency::Cached as i32,
    }
}

/// Renames `arn` through `server` until a rename succeeds: the replica
/// serves writes again. Returns how long that took.
async fn serves_writes_again(server: &mut TestServer, arn: &str) -> Duration {
    let started = Instant::now();
    within("the replica serving writes again", async {
        for attempt in 0.. {
            let renamed = server
                .client
                .update_room(with_deadline(
                    rename(arn, &format!("after-the-heal-{attempt}")),
                    Duration::from_secs(15),
                ))
                .await;
            match renamed {
                Ok(_) => return,
                Err(status) => assert!(
                    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "only UNAVAILABLE while the replica recovers: {status:?}"
                ),
            }
        }
    })
    .await;
    started.elapsed()
}

/// The next event on `stream` whose room is named `name`.
async fn event_naming(
    stream: &mut tonic::Streaming<proto::WatchRoomsResponse>,
    name: &str,
) -> proto::RoomEvent {
    within(&format!("an event naming {name:?}"), async {
        loop {
            match stream.message().await {
                Ok(Some(proto::WatchRoomsResponse {
                    kind: Some(Kind::Event(event)),
                })) if event.room.as_ref().is_some_and(|r| r.name == name) => return event,
                Ok(Some(_)) => {}
                other => panic!("the watch stream ended: {other:?}"),
            }
        }
    })
    .await
}

/// After the heal: the cache (through `server`) equals IVS Chat, and the
/// change log, replayed, gives the cache: nothing lost, nothing twice.
async fn cache_and_log_equal_ivs_chat(
    server: &mut TestServer,
    emulator: &ivschat_rooms::emulator::Emulator,
) {
    let (rooms, revision) = list_all(&mut server.client).await;
    assert_same_rooms(&rooms, &upstream_rooms(emulator));
    let log = log_through(&mut server.client, revision).await;
    assert_same_rooms(&fold(&log), &rooms);
}

/// A replica on `db` that leads (started first, reconciling every second),
/// then one that reaches `db` through `proxy`; each with its first listing
/// done.
async fn leader_and_replica_behind(
    proxy: &FaultProxy,
    db: &TestDb,
    emulator_url: &str,
) -> (TestServer, TestServer) {
    let mut leader = TestServer::start(serve_config(
        &db.url,
        emulator_url,
        &["--reconcile-interval", "1s"],
    ))
    .await;
    leader.wait_listed().await;
    let mut behind =
        TestServer::start(serve_config(&proxy.url_for(&db.url), emulator_url, &[])).await;
    behind.wait_listed().await;
    (leader, behind)
}

/// Behind PgBouncer: session pooling works (each client keeps its server
/// session); transaction pooling, which would lose the service's LISTEN and
/// session settings, is refused at startup, before any migration runs, with
/// a message that names the cause and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_that_loses_sessions_is_refused_at_startup() {
    if common::pgbouncer::available().is_none() {
        return;
    }
    let Some(db) = TestDb::postgres("pooler").await else {
        return;
    };
    let session = PgBouncer::start(&db.url, "session").await;
    let store = Store::open(&session.url_for(&db.url))
        .await
        .expect("session pooling keeps sessions: the service starts");
    assert_eq!(store.revision().await.expect("and serves"), 0);
    store.close().await;

    let other = TestDb::postgres("pooler_transaction").await.unwrap();
    let transaction = PgBouncer::start(&other.url, "transaction").await;
    let refused = Store::open(&transaction.url_for(&other.url))
        .await
        .err()
        .expect("transaction pooling is refused");
    let message = format!("{refused:#}");
    assert!(
        message.contains("did not deliver a notification")
            && message.contains("pool_mode=transaction")
            && message.contains("session pooling"),
        "{message}"
    );
    // Refused before the migrations ran: nothing was made in the database.
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&other.url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(tables, 0, "no migration ran through the refused pooler");
}

/// The newest generation of `region`'s reconciler lease.
async fn lease_generation(url: &str, region: &str) -> i64 {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT generation FROM leader_leases WHERE scope = $1")
        .bind(region)
        .fetch_one(&mut conn)
        .await
        .expect("a lease")
}

/// A replica cut off silently just after its cache write took the change
/// log's revision row (behind a proxy that keeps the server's side open, so
/// Postgres's keepalives never notice) holds up the other replica's writes
/// for at most HELD_LOCK_BOUND: Postgres ends the idle transaction. The
/// cut-off replica's write, made in IVS Chat, is refused UNAVAILABLE saying
/// so; the reconciler records it; after the heal the replica serves again
/// and the cache and the log equal IVS Chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cut_off_in_its_transaction_holds_the_others_up_at_most_the_bound() {
    let Some(db) = TestDb::postgres("a_writer_cut_off_in_its_transaction").await else {
        return;
    };
    let (emulator, url) = emulator().await;
    let proxy = FaultProxy::before_postgres(&db.url).await;
    // B first: it leads, so A's reconciler writes nothing.
    let (mut b, mut a) = leader_and_replica_behind(&proxy, &db, &url).await;
    let cut = b.create_room("cut").await;
    let healthy = b.create_room("healthy").await;
    let mut cut_watch = b
        .client
        .watch_rooms(proto::WatchRoomsRequest {
            identifiers: vec![cut.arn.clone()],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();

    // Cut just after A's next write executes the revision row's lock.
    proxy.blackhole_after(REVISION_LOCK, ServerSide::Kept);
    let a_write = tokio::spawn({
        let mut client = a.client.clone();
        let arn = cut.arn.clone();
        async move {
            client
                .update_room(with_deadline(
                    rename(&arn, "made-while-cut-off"),
                    Duration::from_secs(60),
                ))
                .await
        }
    });
    within("A's write taking the revision row", proxy.blackholed()).await;

    let mut longest = Duration::ZERO;
    for i in 0..5 {
        let started = Instant::now();
        b.client
            .update_room(with_deadline(
                rename(&healthy.arn, &format!("healthy-{i}")),
                Duration::from_secs(30),
            ))
            .await
            .expect("the healthy replica's writes succeed");
        longest = longest.max(started.elapsed());
    }
    eprintln!(
        "FIGURE longest stall of the healthy replica's writes: {:.2} s (bound {} s)",
        longest.as_secs_f64(),
        HELD_LOCK_BOUND.as_secs()
    );
    assert!(
        longest <= HELD_LOCK_BOUND + STALL_SLACK,
        "a cut-off writer held the healthy replica's writes {longest:?}"
    );

    let refused = a_write
        .await
        .unwrap()
        .expect_err("a write that could not be recorded is not acknowledged");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("IVS Chat made the change"),
        "the refusal says the change was made: {refused:?}"
    );
    assert_eq!(emulator.calls(Operation::UpdateRoom), 6);

    // The reconciler records what IVS Chat has.
    let settled = event_naming(&mut cut_watch, "made-while-cut-off").await;
    assert_eq!(settled.source, proto::EventSource::Reconciler as i32);

    proxy.pass();
    let recovery = serves_writes_again(&mut a, &healthy.arn).await;
    eprintln!(
        "FIGURE the cut-off replica served writes again {:.2} s after the heal",
        recovery.as_secs_f64()
    );
    cache_and_log_equal_ivs_chat(&mut a, &emulator).await;
    cache_and_log_equal_ivs_chat(&mut b, &emulator).await;
}

/// The leader cut off silently is replaced within TAKEOVER_BOUND: its lease
/// runs out unrenewed and the other replica takes it (a new generation),
/// whether or not a proxy between the leader and Postgres hides the cut from
/// Postgres; the new leader finds a change made behind the service's back.
async fn the_leader_cut_off_silently_is_replaced(server_side: ServerSide) {
    let Some(db) = TestDb::postgres("the_leader_cut_off_silently_is_replaced").await else {
        return;
    };
    let (emulator, url) = emulator().await;
    let proxy = FaultProxy::before_postgres(&db.url).await;
    let fast = ["--reconcile-interval", "1s"];
    // A first: it leads.
    let mut a = TestServer::start(serve_config(&proxy.url_for(&db.url), &url, &fast)).await;
    a.wait_listed().await;
    let mut b = TestServer::start(serve_config(&db.url, &url, &fast)).await;
    b.wait_listed().await;
    let room = b.create_room("led").await;
    let before = lease_generation(&db.url, "us-east-1").await;
    let mut watch = b
        .client
        .watch_rooms(proto::WatchRoomsRequest {
            identifiers: vec![room.arn.clone()],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();

    let cut_at = Instant::now();
    proxy.blackhole(server_side);
    emulator
        .update_room(
            &room.arn,
            &RoomPatch {
                name: Some("renamed-behind-our-back".into()),
                ..Default::default()
            },
        )
        .expect("rename in IVS Chat");
    let found = event_naming(&mut watch, "renamed-behind-our-back").await;
    let takeover = cut_at.elapsed();
    assert_eq!(found.source, proto::EventSource::Reconciler as i32);
    let after = lease_generation(&db.url, "us-east-1").await;
    assert!(
        after > before,
        "another replica took the lease ({before} -> {after})"
    );
    eprintln!(
        "FIGURE takeover ({server_side:?}): the new leader's first change in {:.2} s (lease {} s, goal {} s)",
        takeover.as_secs_f64(),
        LEASE_TTL.as_secs(),
        TAKEOVER_BOUND.as_secs()
    );
    assert!(
        takeover <= TAKEOVER_BOUND,
        "the cut-off leader was replaced only after {takeover:?}"
    );
    // The healthy replica writes meanwhile.
    b.client
        .update_room(rename(&room.arn, "written-through-the-new-leader"))
        .await
        .expect("writes go on");

    proxy.pass();
    serves_writes_again(&mut a, &room.arn).await;
    // The deposed leader does not take the lease back while it is held.
    assert_eq!(lease_generation(&db.url, "us-east-1").await, after);
    cache_and_log_equal_ivs_chat(&mut a, &emulator).await;
}

/// Behind a proxy that answers keepalives (HAProxy, PgBouncer, a cloud SQL
/// proxy): Postgres never notices; the lease moves anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_cut_off_behind_a_proxy_is_replaced() {
    the_leader_cut_off_silently_is_replaced(ServerSide::Kept).await;
}

/// Without a proxy: Postgres ends the leader's sessions when its keepalives
/// go unanswered (played here after 11 s, the sessions' keepalive settings);
/// the lease does not wait for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_cut_off_without_a_proxy_is_replaced() {
    the_leader_cut_off_silently_is_replaced(ServerSide::CutAfter(Duration::from_secs(11))).await;
}

/// Cached reads on a replica cut off from Postgres answer within their
/// deadline: from memory (rooms changed recently included, marked stale)
/// when it holds the row; at once UNAVAILABLE naming the database when it
/// holds none. It sends IVS Chat nothing meanwhile (the budget and the
/// rooms' turns are in the database: fail closed). After the heal it serves
/// again, and the cache and log equal IVS Chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_on_a_cut_off_replica_answer_within_their_deadline() {
    let Some(db) = TestDb::postgres("cached_reads_on_a_cut_off_replica").await else {
        return;
    };
    let (emulator, url) = emulator().await;
    let proxy = FaultProxy::before_postgres(&db.url).await;
    let (mut b, mut a) = leader_and_replica_behind(&proxy, &db, &url).await;
    // A replica without a memory layer: nothing to answer from.
    let mut c = TestServer::start(serve_config(
        &proxy.url_for(&db.url),
        &url,
        &["--memory-cache-rooms", "0"],
    ))
    .await;
    c.wait_listed().await;

    // A learns of every change through its tailer only (no read through it
    // refills its memory): what a room changed recently looks like.
    let mut a_watch = a
        .client
        .watch_rooms(proto::WatchRoomsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut rooms = Vec::new();
    for i in 0..8 {
        rooms.push(b.create_room(&format!("room-{i}")).await);
    }
    // Half of them changed recently, on the other replica.
    for room in rooms.iter_mut().take(4) {
        *room = b
            .client
            .update_room(rename(&room.arn, &format!("{}-renamed", room.name)))
            .await
            .expect("rename")
            .into_inner();
    }
    // A has applied every change (its watchers see them).
    for room in rooms.iter().take(4) {
        event_naming(&mut a_watch, &room.name).await;
    }
    let updates_before = emulator.calls(Operation::UpdateRoom);

    proxy.blackhole(ServerSide::Kept);
    let deadline = Duration::from_secs(2);
    let (mut asked, mut answered) = (0, 0);
    for _round in 0..3 {
        for room in &rooms {
            asked += 1;
            let started = Instant::now();
            let read = a
                .client
                .get_room(with_deadline(cached(&room.arn), deadline))
                .await
                .unwrap_or_else(|status| {
                    panic!("a cached read on the cut-off replica: {status:?}")
                });
            assert!(started.elapsed() < deadline);
            let cache = read
                .metadata()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            assert!(
                matches!(cache.as_deref(), Some("hit" | "stale")),
                "{cache:?}"
            );
            assert_eq!(read.into_inner().name, room.name, "the newest version");
            answered += 1;
        }
    }
    // No row in memory: refused at once, saying why (after the first read
    // finds the database gone, well within its deadline too).
    for room in &rooms {
        let started = Instant::now();
        let refused = c
            .client
            .get_room(with_deadline(cached(&room.arn), deadline))
            .await
            .expect_err("no row to answer with");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("cache database"), "{refused:?}");
        assert!(started.elapsed() < deadline);
    }
    let refused = c
        .client
        .get_room(with_deadline(cached(&rooms[0].arn), deadline))
        .await
        .expect_err("still no row");
    assert!(
        refused.message().contains("has not answered this replica"),
        "once the database is known away, the refusal says so at once: {refused:?}"
    );
    // A write through the cut-off replica sends IVS Chat nothing.
    let write = a
        .client
        .update_room(with_deadline(
            rename(&rooms[5].arn, "asked-while-cut-off"),
            Duration::from_secs(3),
        ))
        .await
        .expect_err("no write while cut off");
    assert!(
        // Cancelled: the client's own timer ran out first.
        matches!(
            write.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ),
        "{write:?}"
    );
    assert_eq!(emulator.calls(Operation::UpdateRoom), updates_before);
    eprintln!("FIGURE cached reads answered on the cut-off replica: {answered} of {asked}");

    proxy.pass();
    serves_writes_again(&mut a, &rooms[6].arn).await;
    let after_heal = a
        .client
        .get_room(cached(&rooms[6].arn))
        .await
        .expect("read");
    assert_eq!(
        after_heal
            .metadata()
            .get("x-cache")
            .and_then(|v| v.to_str().ok()),
        Some("hit")
    );
    cache_and_log_equal_ivs_chat(&mut a, &emulator).await;
    cache_and_log_equal_ivs_chat(&mut c, &emulator).await;
}

/// A loud failure (every connection to Postgres reset) while writes go on
/// through the replica: writes fail only UNAVAILABLE meanwhile, the replica
/// recovers by itself, and every acknowledged write is in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_under_writes_lose_nothing() {
    let Some(db) = TestDb::postgres("connections_reset_under_writes").await else {
        return;
    };
    let (emulator, url) = emulator().await;
    let proxy = FaultProxy::before_postgres(&db.url).await;
    let (_leader, mut a) = leader_and_replica_behind(&proxy, &db, &url).await;
    let room = a.create_room("reset").await;
    let mut acknowledged = Vec::new();
    for i in 0..12 {
        if i % 4 == 2 {
            proxy.reset();
        }
        let name = format!("write-{i}");
        match a
            .client
            .update_room(with_deadline(
                rename(&room.arn, &name),
                Duration::from_secs(20),
            ))
            .await
        {
            Ok(_) => acknowledged.push(name),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
    }
    assert!(!acknowledged.is_empty(), "writes go on between the resets");
    let (_, revision) = list_all(&mut a.client).await;
    let log = log_through(&mut a.client, revision).await;
    for name in &acknowledged {
        assert!(
            log.iter()
                .any(|e| e.room.as_ref().is_some_and(|r| &r.name == name)),
            "the acknowledged write {name:?} is in the log"
        );
    }
    serves_writes_again(&mut a, &room.arn).await;
    cache_and_log_equal_ivs_chat(&mut a, &emulator).await;
}

/// The fault proxy's own behaviour, against plain loopback sockets.
mod proxy_harness {
    use std::io::ErrorKind;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::{Instant, timeout};

    use crate::common::proxy::{FaultProxy, ServerSide};

    /// How long "nothing arrives" is watched for.
    const QUIET: Duration = Duration::from_millis(300);
    /// An upper bound for what must happen promptly (generous for slow CI).
    const PROMPT: Duration = Duration::from_secs(5);

    /// A proxy in front of a fresh listener, one connection through it, and
    /// that connection's two ends: (proxy, listener, client, server).
    async fn connected() -> (FaultProxy, TcpListener, TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy = FaultProxy::start(listener.local_addr().expect("address")).await;
        let (client, server) = connect(&proxy, &listener).await;
        (proxy, listener, client, server)
    }

    /// A new connection through `proxy` and the server's end of it.
    async fn connect(proxy: &FaultProxy, listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(proxy.addr()).await.expect("connect");
        let (server, _) = timeout(PROMPT, listener.accept())
            .await
            .expect("the proxy connects upstream promptly")
            .expect("accept");
        (client, server)
    }

    /// Reads exactly `len` bytes, promptly.
    async fn read(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        timeout(PROMPT, stream.read_exact(&mut buf))
            .await
            .expect("bytes arrive promptly")
            .expect("read");
        buf
    }

    /// Asserts that nothing (no bytes, no EOF, no error) arrives on `stream`
    /// for a while.
    async fn quiet(stream: &mut TcpStream, side: &str) {
        let mut buf = [0; 64];
        let read = timeout(QUIET, stream.read(&mut buf)).await;
        assert!(read.is_err(), "the {side} side saw {read:?}, not silence");
    }

    /// What a read on `stream` ends with, promptly: `Ok(0)` (EOF) or an error.
    async fn ending(stream: &mut TcpStream) -> std::io::Result<usize> {
        let mut buf = [0; 64];
        timeout(PROMPT, stream.read(&mut buf))
            .await
            .expect("the connection ends promptly")
    }

    /// Asserts that `read` is a connection reset (an RST, not a FIN).
    fn assert_reset(read: std::io::Result<usize>, side: &str) {
        match read {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("the {side} side saw {other:?}, not a connection reset"),
        }
    }

    /// Passing, bytes are forwarded both ways and the connection is counted.
    #[tokio::test]
    async fn pass_forwards_both_ways() {
        let (proxy, _listener, mut client, mut server) = connected().await;
        client.write_all(b"ping").await.unwrap();
        assert_eq!(read(&mut server, 4).await, b"ping");
        server.write_all(b"pong").await.unwrap();
        assert_eq!(read(&mut client, 4).await, b"pong");
        assert_eq!(proxy.connections(), 1);
    }

    /// A blackhole forwards nothing either way while both sockets stay open
    /// (no EOF, no error); after `pass` the held bytes arrive, in order.
    #[tokio::test]
    async fn blackhole_holds_bytes_until_pass() {
        let (proxy, _listener, mut client, mut server) = connected().await;
        client.write_all(b"before ").await.unwrap();
        assert_eq!(read(&mut server, 7).await, b"before ");

        proxy.blackhole(ServerSide::Kept);
        client.write_all(b"one ").await.unwrap();
        client.write_all(b"two").await.unwrap();
        server.write_all(b"three ").await.unwrap();
        server.write_all(b"four").await.unwrap();
        quiet(&mut server, "server").await;
        quiet(&mut client, "client").await;
        assert_eq!(proxy.connections(), 1);

        proxy.pass();
        assert_eq!(read(&mut server, 7).await, b"one two");
        assert_eq!(read(&mut client, 10).await, b"three four");
    }

    /// A connection made during a blackhole is accepted, but not connected
    /// upstream and not forwarded on, until `pass`.
    #[tokio::test]
    async fn blackhole_holds_new_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = FaultProxy::start(listener.local_addr().unwrap()).await;
        proxy.blackhole(ServerSide::Kept);
        let mut client = TcpStream::connect(proxy.addr()).await.expect("accepted");
        client.write_all(b"hello").await.unwrap();
        let accepted = timeout(QUIET, listener.accept()).await;
        assert!(accepted.is_err(), "connected upstream during a blackhole");

        proxy.pass();
        let (mut server, _) = timeout(PROMPT, listener.accept()).await.unwrap().unwrap();
        assert_eq!(read(&mut server, 5).await, b"hello");
    }

    /// `reset` makes both sides see a connection reset at once, and a new
    /// connection afterwards works.
    #[tokio::test]
    async fn reset_is_loud_on_both_sides() {
        let (proxy, listener, mut client, mut server) = connected().await;
        client.write_all(b"up").await.unwrap();
        assert_eq!(read(&mut server, 2).await, b"up");

        proxy.reset();
        assert_reset(ending(&mut client).await, "client");
        assert_reset(ending(&mut server).await, "server");

        let (mut client, mut server) = connect(&proxy, &listener).await;
        client.write_all(b"again").await.unwrap();
        assert_eq!(read(&mut server, 5).await, b"again");
        server.write_all(b"back").await.unwrap();
        assert_eq!(read(&mut client, 4).await, b"back");
    }

    /// `CutAfter(d)`: after d the server side sees EOF while the client side
    /// sees nothing until `pass`, and then a reset.
    #[tokio::test]
    async fn cut_after_closes_the_server_side_only() {
        let (proxy, _listener, mut client, mut server) = connected().await;
        client.write_all(b"up").await.unwrap();
        assert_eq!(read(&mut server, 2).await, b"up");

        let after = Duration::from_millis(200);
        let start = Instant::now();
        proxy.blackhole(ServerSide::CutAfter(after));
        let read = ending(&mut server).await;
        assert!(
            matches!(read, Ok(0)),
            "the server side saw {read:?}, not EOF"
        );
        assert!(start.elapsed() >= after, "cut after {:?}", start.elapsed());
        quiet(&mut client, "client").await;
        assert_eq!(proxy.connections(), 1, "the client side stays open");

        proxy.pass();
        assert_reset(ending(&mut client).await, "client");
    }

    /// `Kept`: the server side sees no EOF during the blackhole, and traffic
    /// resumes after `pass`.
    #[tokio::test]
    async fn kept_keeps_the_server_side() {
        let (proxy, _listener, mut client, mut server) = connected().await;
        proxy.blackhole(ServerSide::Kept);
        quiet(&mut server, "server").await;
        quiet(&mut client, "client").await;

        proxy.pass();
        client.write_all(b"still").await.unwrap();
        assert_eq!(read(&mut server, 5).await, b"still");
        server.write_all(b"here").await.unwrap();
        assert_eq!(read(&mut client, 4).await, b"here");
    }

    /// Dropping the proxy closes its connections and stops listening.
    #[tokio::test]
    async fn drop_closes_everything() {
        let (proxy, _listener, mut client, mut server) = connected().await;
        let addr = proxy.addr();
        drop(proxy);
        assert!(matches!(ending(&mut client).await, Ok(0)));
        assert!(matches!(ending(&mut server).await, Ok(0)));
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    /// `url_for` swaps the host and port and keeps the rest of the URL.
    #[tokio::test]
    async fn url_for_rewrites_host_and_port() {
        let proxy = FaultProxy::start(([127, 0, 0, 1], 5432).into()).await;
        let addr = proxy.addr();
        assert_eq!(
            proxy.url_for("postgres://postgres@127.0.0.1:5432/db?x=1"),
            format!("postgres://postgres@{addr}/db?x=1")
        );
        assert_eq!(
            proxy.url_for("postgres://127.0.0.1:5432/db"),
            format!("postgres://{addr}/db")
        );
    }

    /// `blackhole_after` a statement begins with its execution, also when
    /// the connection prepared it earlier and now only binds it by name (as
    /// sqlx does from a statement's second use), and not before: preparing
    /// it, or running other statements, passes.
    #[tokio::test]
    async fn blackhole_after_a_statement_knows_prepared_statements() {
        use sqlx::Connection as _;
        let Some(db) = crate::common::TestDb::postgres("blackhole_after_prepared").await else {
            return;
        };
        let proxy = FaultProxy::before_postgres(&db.url).await;
        let mut conn = sqlx::PgConnection::connect(&proxy.url_for(&db.url))
            .await
            .expect("connect through the proxy");
        let marked = "SELECT 1 AS marked_statement";
        // Prepared and executed once, before the trigger is armed.
        sqlx::query(marked)
            .execute(&mut conn)
            .await
            .expect("first use");
        proxy.blackhole_after(b"marked_statement", ServerSide::Kept);
        sqlx::query("SELECT 2")
            .execute(&mut conn)
            .await
            .expect("another statement passes");
        // Second use: a Bind naming the statement, no text on the wire. The
        // server gets it; its answer never comes back.
        let (answer, began) = tokio::join!(
            timeout(QUIET, sqlx::query(marked).execute(&mut conn)),
            timeout(PROMPT, proxy.blackholed()),
        );
        began.expect("the blackhole begins with the statement's execution");
        assert!(answer.is_err(), "nothing comes back after it: {answer:?}");
        proxy.pass();
    }
}
