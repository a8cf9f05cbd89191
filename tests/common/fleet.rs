//! A fleet of replicas of the binary on one database, in front of an
//! emulator that times every call as it arrives.

use std::net::SocketAddr;

use ivschat_rooms::emulator::{Emulator, EmulatorConfig, Faults};
use tonic::Code;

use super::binary::{Server, within};
use super::load::Client;
use super::proto;

/// An emulator with `faults` on a loopback port, served by a runtime of its
/// own: it times calls when they arrive, and the test's load generators
/// must not delay that.
pub async fn emulator_apart(faults: Faults) -> (Emulator, String) {
    let emulator = Emulator::new(EmulatorConfig {
        faults,
        ..EmulatorConfig::default()
    })
    .expect("emulator");
    let (serving, url) = tokio::sync::oneshot::channel::<String>();
    let serve = emulator.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the emulator's runtime");
        runtime.block_on(async move {
            let url = serve
                .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("emulator listens");
            let _ = serving.send(url);
            std::future::pending::<()>().await
        });
    });
    (emulator, url.await.expect("the emulator's address"))
}

/// Replicas of the binary on one database, each with `flags`, every one
/// serving ListRooms (the first full listing is in).
pub async fn replicas(n: usize, db: &str, emulator_url: &str, flags: &[&str]) -> Vec<Server> {
    let mut servers = Vec::new();
    for _ in 0..n {
        servers.push(Server::against(db, emulator_url, flags).await);
    }
    for server in &servers {
        listed(&mut server.client().await).await;
    }
    servers
}

/// Waits for ListRooms to be served (the first full listing is in).
pub async fn listed(client: &mut Client) {
    within("the first full listing", async {
        loop {
            match client.list_rooms(proto::ListRoomsRequest::default()).await {
                Ok(_) => return,
                Err(status) if status.code() == Code::Unavailable => {}
                Err(status) => panic!("ListRooms: {status:?}"),
            }
        }
    })
    .await;
}
