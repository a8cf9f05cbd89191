//! What a replica does when the network between it and Postgres fails: packets
//! dropped silently (a partition, every socket left open), connections reset
//! loudly, and the heal. The faults are played by a loopback proxy
//! (`common::proxy::FaultProxy`) between the replica and Postgres; its own
//! tests are at the bottom of this file.

mod common;

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
}
