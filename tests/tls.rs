//! TLS on the gRPC port (`--tls-cert`, `--tls-key`) and mutual TLS
//! (`--tls-client-ca`), with certificates made for the test.

mod common;

use std::path::PathBuf;

use common::pki::{Pki, ca, leaf};
use common::{TestDb, create, emulator, proto, serve_config};
use proto::room_service_client::RoomServiceClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The real server on port 0 with `flags`; stops when dropped.
struct Server {
    port: u16,
    _stop: oneshot::Sender<()>,
    _db: TestDb,
    _emulator: ivschat_rooms::emulator::Emulator,
}

async fn start(flags: &[&str]) -> Server {
    let db = TestDb::sqlite();
    let (emulator, url) = emulator().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(ivschat_rooms::server::run(
        serve_config(&db.url, &url, flags),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        port,
        _stop: stop,
        _db: db,
        _emulator: emulator,
    }
}

/// A client trusting `ca`, presenting `identity` if given.
async fn client(
    server: &Server,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<RoomServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", server.port))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(RoomServiceClient::new(channel))
}

async fn create_room(
    client: Result<RoomServiceClient<Channel>, tonic::transport::Error>,
) -> Result<proto::Room, String> {
    let mut client = client.map_err(|e| format!("connect: {e:?}"))?;
    client
        .create_room(create("over-tls"))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| format!("{status:?}"))
}

/// With a certificate and key, the port speaks TLS only: a client trusting
/// the CA is served, a plaintext client is not.
#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca_and_refuses_plaintext() {
    let pki = Pki::new();
    let flags = pki.server_flags();
    let server = start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;

    let room = create_room(client(&server, &pki.ca, None).await)
        .await
        .expect("served over TLS");
    assert_eq!(room.name, "over-tls");

    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect_lazy();
    let refused = RoomServiceClient::new(plaintext)
        .create_room(create("plaintext"))
        .await;
    assert!(refused.is_err(), "plaintext was served: {refused:?}");

    let other_ca = ca().pem();
    let untrusted = create_room(client(&server, &other_ca, None).await).await;
    assert!(untrusted.is_err(), "a client trusting another CA went on");
}

/// With --tls-client-ca, only clients presenting a certificate signed by
/// that CA are served.
#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let mut flags = pki.server_flags();
    flags.extend(["--tls-client-ca".into(), pki.path("ca.pem")]);
    let server = start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;

    let room = create_room(client(&server, &pki.ca, Some(&pki.client)).await)
        .await
        .expect("a client certificate from the CA is served");
    assert_eq!(room.name, "over-tls");

    let anonymous = create_room(client(&server, &pki.ca, None).await).await;
    assert!(anonymous.is_err(), "served without a client certificate");

    let stranger = leaf(&["stranger"], &ca());
    let foreign = create_room(client(&server, &pki.ca, Some(&stranger)).await).await;
    assert!(foreign.is_err(), "served a certificate from another CA");
}

/// A missing certificate file stops the server at startup, naming it.
#[tokio::test]
async fn missing_certificate_files_fail_at_startup() {
    let db = TestDb::sqlite();
    let (_emulator, url) = emulator().await;
    let missing = PathBuf::from("/nonexistent/server.pem");
    let config = serve_config(
        &db.url,
        &url,
        &[
            "--tls-cert",
            missing.to_str().unwrap(),
            "--tls-key",
            "/nonexistent/server.key",
        ],
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = ivschat_rooms::server::run(config, listener, std::future::pending())
        .await
        .expect_err("no certificate to serve with");
    let message = format!("{error:#}");
    assert!(message.contains("/nonexistent/server.pem"), "{message}");
}
