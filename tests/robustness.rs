//! Robustness in the manner of etcd's `tests/robustness`: random traffic
//! through three replicas of the binary (writes of every kind, cached and
//! strong reads, listings, watches, changes made in IVS Chat directly) while
//! a nemesis injects faults at random, one at a time: a replica killed with
//! `kill -9` and started again, a replica's link to Postgres cut silently
//! (behind a proxy that keeps the server's side open, or one that closes it
//! as the server's keepalive would; or just after a cache write took the
//! change log's revision row, the lock every replica's writes need) or reset
//! loudly, the database stopped and started again, and IVS Chat failing,
//! throttling and answering too late.
//!
//! Every client records its history (what it asked, when, what came back),
//! every watcher what it saw; after the heal the histories are checked:
//! - watch streams are ordered, unique, atomic (every watcher saw the same
//!   event at each revision as the log has), bookmarkable (a bookmark never
//!   goes back, and the next event follows it), reliable (no gap across
//!   reconnects) and resumable (each stream resumed right after the last
//!   revision its watcher had, on whichever replica it reached);
//! - every acknowledged write is in the change log, as it was acknowledged
//!   (or followed there by a newer version of its room), and nothing was
//!   acknowledged twice;
//! - a STRONG read never shows a room older than a write acknowledged before
//!   it began, nor a room whose deletion was; every read shows a version IVS
//!   Chat really had;
//! - IVS Chat never received more than AWS's rate of any operation in any
//!   second;
//! - the cache equals IVS Chat, the log replays into the cache, and every
//!   replica's cached reads answer IVS Chat's rooms.
//!
//! Seeded: the traffic's choices and the fault schedule come from
//! `IVSCHAT_ROOMS_ROBUSTNESS_SEED` (random when unset; printed first, so a
//! failure can be replayed). It runs for `IVSCHAT_ROOMS_ROBUSTNESS_SECS`
//! seconds of faults (30 by default: `.ci/run`'s short run; set more for a
//! longer one). The timing of the traffic is the machine's, so a replay
//! repeats the schedule, not every interleaving.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ivschat_rooms::domain::RoomPatch;
use ivschat_rooms::emulator::{
    Emulator, Faults, InjectedError, InjectedFault, Operation, TpsLimit,
};
use proto::watch_rooms_response::Kind;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use common::binary::{Server, WAIT, within};
use common::fleet::{emulator_apart, listed};
use common::load::{
    Client, RealVersions, as_proto, assert_same_rooms, fold, list_all, log_through, upstream_rooms,
};
use common::pg::PrivatePostgres;
use common::proxy::{FaultProxy, REVISION_LOCK, ServerSide};
use common::{max_per_second, proto, with_deadline};

const SEED_VAR: &str = "IVSCHAT_ROOMS_ROBUSTNESS_SEED";
const SECS_VAR: &str = "IVSCHAT_ROOMS_ROBUSTNESS_SECS";

const REPLICAS: usize = 3;
const CLIENTS: usize = 3;
const WATCHERS: usize = 3;
/// Rooms made before the faults begin.
const FIRST_ROOMS: usize = 8;
/// Deletions keep at least this many rooms to work on.
const FEWEST_ROOMS: usize = 4;
/// Every request's deadline.
const DEADLINE: Duration = Duration::from_secs(3);

/// Each replica's flags: a reconciler and bookmarks every second, cached rows
/// confirmed after 2 s, IVS Chat's answers awaited 1 s (the nemesis's slow
/// answers take longer: a call made whose answer is lost).
const FLAGS: &[&str] = &[
    "--reconcile-interval",
    "1s",
    "--bookmark-interval",
    "1s",
    "--max-staleness",
    "2s",
    "--upstream-timeout",
    "1s",
];

/// IVS Chat as AWS runs it: its published rates, over which it throttles.
fn aws() -> Faults {
    Faults {
        tps_limit: Some(TpsLimit::Aws),
        ..Faults::default()
    }
}

/// The replicas' gRPC clients, `None` while one is down. Shared by the
/// traffic, the watchers and the nemesis (which replaces a restarted one's).
#[derive(Clone, Default)]
struct Endpoints(Arc<RwLock<Vec<Option<Client>>>>);

impl Endpoints {
    fn set(&self, replica: usize, client: Option<Client>) {
        let mut endpoints = self.0.write().unwrap();
        if endpoints.len() <= replica {
            endpoints.resize(replica + 1, None);
        }
        endpoints[replica] = client;
    }

    /// A replica that is up, at random (any but `avoid` when another is up).
    fn pick(&self, rng: &mut StdRng, avoid: Option<usize>) -> Option<(usize, Client)> {
        let endpoints = self.0.read().unwrap();
        let up: Vec<usize> = (0..endpoints.len())
            .filter(|&i| endpoints[i].is_some())
            .collect();
        let others: Vec<usize> = up.iter().copied().filter(|&i| Some(i) != avoid).collect();
        let choices = if others.is_empty() { &up } else { &others };
        let replica = *choices.get(rng.random_range(0..choices.len().max(1)))?;
        Some((replica, endpoints[replica].clone()?))
    }

    fn get(&self, replica: usize) -> Client {
        self.0.read().unwrap()[replica].clone().expect("up")
    }
}

/// A client for `server`, connecting on first use.
fn client_of(server: &Server) -> Client {
    Client::new(
        Channel::from_shared(server.url())
            .expect("a URL")
            .connect_lazy(),
    )
}

/// What one request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Op {
    Create,
    Update,
    Tag,
    Untag,
    Delete,
    CachedRead,
    StrongRead,
    List,
    /// A change made in IVS Chat directly, behind the service's back.
    OutOfBand,
}

impl Op {
    fn writes(self) -> bool {
        matches!(
            self,
            Op::Create | Op::Update | Op::Tag | Op::Untag | Op::Delete
        )
    }
}

/// One request of a client's history.
#[derive(Debug, Clone)]
struct Call {
    op: Op,
    arn: String,
    started: Instant,
    ended: Instant,
    /// The room the answer showed (none for a deletion or a listing).
    outcome: Result<Option<proto::Room>, Status>,
}

/// How a request failed: its code, or where the client's side ended it
/// (its deadline ran out, or its transport failed: the replica was killed
/// under it).
fn failure(status: &Status) -> String {
    let mut chain = std::iter::successors(std::error::Error::source(status), |e| e.source());
    match std::error::Error::source(status) {
        Some(_) if chain.any(|e| e.is::<tonic::TimeoutExpired>()) => "ClientDeadline".to_owned(),
        Some(_) => format!("Transport{:?}", status.code()),
        None => format!("{:?}", status.code()),
    }
}

/// Whether a failure is one a client of a service under faults must be
/// ready for: retryable codes, a room deleted meanwhile, its own deadline,
/// or a call that failed in the client's transport.
fn acceptable(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::NotFound
        )
}

/// The rooms the traffic works on.
type Known = Arc<Mutex<Vec<String>>>;

/// One client's requests until `stop`, each through a replica picked at
/// random; returns its history.
fn client(
    id: usize,
    mut rng: StdRng,
    endpoints: Endpoints,
    emulator: Emulator,
    known: Known,
    stop: CancellationToken,
) -> JoinHandle<Vec<Call>> {
    tokio::spawn(async move {
        let mut history = Vec::new();
        for n in 0.. {
            if stop.is_cancelled() {
                break;
            }
            let op = match rng.random_range(0..100) {
                0..10 => Op::Create,
                10..35 => Op::Update,
                35..42 => Op::Tag,
                42..47 => Op::Untag,
                47..52 => Op::Delete,
                52..72 => Op::CachedRead,
                72..84 => Op::StrongRead,
                84..90 => Op::List,
                _ => Op::OutOfBand,
            };
            let arn = {
                let known = known.lock().unwrap();
                known[rng.random_range(0..known.len())].clone()
            };
            if op == Op::Delete && known.lock().unwrap().len() <= FEWEST_ROOMS {
                continue;
            }
            let started = Instant::now();
            let outcome = if op == Op::OutOfBand {
                let patch = RoomPatch {
                    name: Some(format!("oob-{id}-{n}")),
                    ..RoomPatch::default()
                };
                emulator
                    .update_room(&arn, &patch)
                    .map(|room| Some(as_proto(&room)))
                    .map_err(|e| Status::not_found(e.to_string()))
            } else {
                let Some((_, mut replica)) = endpoints.pick(&mut rng, None) else {
                    continue;
                };
                request(&mut replica, op, &arn, id, n, &mut rng).await
            };
            let ended = Instant::now();
            let arn = match (&op, &outcome) {
                (Op::Create, Ok(Some(room))) => {
                    known.lock().unwrap().push(room.arn.clone());
                    room.arn.clone()
                }
                (Op::Delete, Ok(_)) => {
                    known.lock().unwrap().retain(|a| *a != arn);
                    arn
                }
                _ => arn,
            };
            history.push(Call {
                op,
                arn,
                started,
                ended,
                outcome,
            });
            // Paced, as users are: about five requests a second per client.
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..350))).await;
        }
        history
    })
}

/// One request of `op` through `client`.
async fn request(
    client: &mut Client,
    op: Op,
    arn: &str,
    id: usize,
    n: usize,
    rng: &mut StdRng,
) -> Result<Option<proto::Room>, Status> {
    let identifier = arn.to_owned();
    let key = format!("k{}", rng.random_range(0..3));
    let answer = match op {
        Op::Create => client
            .create_room(with_deadline(
                proto::CreateRoomRequest {
                    name: format!("c{id}-{n}"),
                    request_id: format!("robustness-{id}-{n}"),
                    ..Default::default()
                },
                DEADLINE,
            ))
            .await
            .map(tonic::Response::into_inner),
        Op::Update => {
            let mut update = proto::UpdateRoomRequest {
                identifier: identifier.clone(),
                ..Default::default()
            };
            if rng.random_bool(0.5) {
                update.name = Some(format!("u{id}-{n}"));
            } else {
                update.maximum_message_length = Some(rng.random_range(1..=500));
            }
            client
                .update_room(with_deadline(update, DEADLINE))
                .await
                .map(tonic::Response::into_inner)
        }
        Op::Tag => client
            .tag_room(with_deadline(
                proto::TagRoomRequest {
                    identifier: identifier.clone(),
                    tags: [(key, format!("{id}-{n}"))].into(),
                },
                DEADLINE,
            ))
            .await
            .map(tonic::Response::into_inner),
        Op::Untag => client
            .untag_room(with_deadline(
                proto::UntagRoomRequest {
                    identifier: identifier.clone(),
                    tag_keys: vec![key],
                },
                DEADLINE,
            ))
            .await
            .map(tonic::Response::into_inner),
        Op::Delete => {
            return client
                .delete_room(with_deadline(
                    proto::DeleteRoomRequest {
                        identifier: identifier.clone(),
                        ..Default::default()
                    },
                    DEADLINE,
                ))
                .await
                .map(|_| None);
        }
        Op::CachedRead | Op::StrongRead => {
            let consistency = if matches!(op, Op::CachedRead) {
                proto::ReadConsistency::Cached
            } else {
                proto::ReadConsistency::Strong
            };
            let read = proto::GetRoomRequest {
                identifier: identifier.clone(),
                consistency: consistency as i32,
            };
            client
                .get_room(with_deadline(read, DEADLINE))
                .await
                .map(tonic::Response::into_inner)
        }
        Op::List => {
            return client
                .list_rooms(with_deadline(proto::ListRoomsRequest::default(), DEADLINE))
                .await
                .map(|_| None);
        }
        Op::OutOfBand => unreachable!("made in the emulator"),
    };
    answer.map(Some)
}

/// What a watcher saw, in order.
#[derive(Debug, Clone)]
enum Seen {
    /// It opened a stream on `replica`, resuming after `after`.
    Stream {
        replica: usize,
        after: u64,
    },
    Event(Box<proto::RoomEvent>),
    Bookmark(u64),
    /// The stream ended (or could not be opened) so; `expected` when a
    /// watcher must be ready for it (its own hang-up, UNAVAILABLE, or a
    /// failure in its transport: the replica was killed under it).
    Ended {
        how: String,
        expected: bool,
    },
}

fn ended(status: &Status) -> Seen {
    Seen::Ended {
        how: format!("{:?}: {}", status.code(), status.message()),
        expected: status.code() == Code::Unavailable || std::error::Error::source(status).is_some(),
    }
}

/// A watcher of every room from revision 0, on replicas picked at random:
/// it hangs up by itself every few seconds, and whenever its stream fails,
/// and resumes after the last revision it had (by event or bookmark) on
/// another replica; until it has seen `until`'s revision. Records what it
/// saw and checks nothing: the checks come after.
fn watcher(
    mut rng: StdRng,
    endpoints: Endpoints,
    mut until: watch::Receiver<u64>,
) -> JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut last = 0;
        let mut on = None;
        loop {
            if last >= *until.borrow_and_update() {
                return seen;
            }
            let Some((replica, mut client)) = endpoints.pick(&mut rng, on) else {
                until
                    .changed()
                    .await
                    .expect("the test waits for its watchers");
                continue;
            };
            on = Some(replica);
            seen.push(Seen::Stream {
                replica,
                after: last,
            });
            let opened = client
                .watch_rooms(proto::WatchRoomsRequest {
                    after_revision: Some(last),
                    ..Default::default()
                })
                .await;
            let mut stream = match opened {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    seen.push(ended(&status));
                    // A backoff before the next replica.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let hang_up = tokio::time::sleep(Duration::from_millis(rng.random_range(500..5000)));
            tokio::pin!(hang_up);
            loop {
                let message = tokio::select! {
                    changed = until.changed() => {
                        changed.expect("the test waits for its watchers");
                        None
                    }
                    () = &mut hang_up => {
                        seen.push(Seen::Ended { how: "hung up".into(), expected: true });
                        break;
                    }
                    message = stream.message() => Some(message),
                };
                match message {
                    None => {}
                    Some(Ok(Some(proto::WatchRoomsResponse {
                        kind: Some(Kind::Event(event)),
                    }))) => {
                        last = event.revision;
                        seen.push(Seen::Event(Box::new(event)));
                    }
                    Some(Ok(Some(proto::WatchRoomsResponse {
                        kind: Some(Kind::Progress(progress)),
                    }))) => {
                        last = last.max(progress.revision);
                        seen.push(Seen::Bookmark(progress.revision));
                    }
                    Some(Ok(other)) => {
                        seen.push(Seen::Ended {
                            how: format!("a message that is no event or bookmark: {other:?}"),
                            expected: false,
                        });
                        break;
                    }
                    Some(Err(status)) => {
                        seen.push(ended(&status));
                        break;
                    }
                }
                if last >= *until.borrow_and_update() {
                    return seen;
                }
            }
        }
    })
}

/// One fault of the nemesis.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `kill -9` a replica, start it again after `down`.
    Kill { replica: usize, down: Duration },
    /// Blackhole a replica's link to Postgres for `length`: the reconciler's
    /// leader when `leader` (if one leads), else `replica`.
    Silent {
        replica: usize,
        leader: bool,
        server_side: ServerSide,
        length: Duration,
    },
    /// Blackhole a replica's link to Postgres just after its next cache
    /// write took the change log's revision row (the lock every replica's
    /// writes need), with the server's side kept; `pass` after `length`.
    InTransaction { replica: usize, length: Duration },
    /// Reset a replica's connections to Postgres `times` times.
    Loud { replica: usize, times: u32 },
    /// Stop the database, start it again after `down`.
    RestartPostgres { down: Duration },
    /// IVS Chat fails, throttles and answers too late for `length`.
    Upstream { length: Duration },
}

fn draw_fault(rng: &mut StdRng) -> Fault {
    let replica = rng.random_range(0..REPLICAS);
    let secs = |rng: &mut StdRng, from: u64, to: u64| {
        Duration::from_millis(rng.random_range(from * 1000..to * 1000))
    };
    match rng.random_range(0..7) {
        0 => Fault::Kill {
            replica,
            down: secs(rng, 0, 3),
        },
        1 => Fault::Silent {
            replica,
            leader: rng.random_bool(0.5),
            server_side: ServerSide::Kept,
            length: secs(rng, 3, 13),
        },
        2 => Fault::Silent {
            replica,
            leader: rng.random_bool(0.5),
            server_side: ServerSide::CutAfter(secs(rng, 1, 6)),
            length: secs(rng, 3, 13),
        },
        3 => Fault::Loud {
            replica,
            times: rng.random_range(1..4),
        },
        4 => Fault::InTransaction {
            replica,
            length: secs(rng, 3, 13),
        },
        5 => Fault::RestartPostgres {
            down: secs(rng, 1, 5),
        },
        _ => Fault::Upstream {
            length: secs(rng, 2, 7),
        },
    }
}

/// The fleet the nemesis works on.
struct Fleet {
    pg: PrivatePostgres,
    emulator: Emulator,
    emulator_url: String,
    proxies: Vec<FaultProxy>,
    servers: Vec<Option<Server>>,
    endpoints: Endpoints,
    /// `InTransaction` faults injected, and those whose cut began (a write
    /// came through the replica in time).
    in_transaction: (usize, usize),
}

impl Fleet {
    async fn start_replica(&mut self, replica: usize) {
        let url = self.proxies[replica].url_for(&self.pg.url());
        let server = Server::against(&url, &self.emulator_url, FLAGS).await;
        self.endpoints.set(replica, Some(client_of(&server)));
        self.servers[replica] = Some(server);
    }

    /// The replica whose reconciler leads the region, by its lease's holder
    /// (which names the process).
    async fn leader(&self) -> Option<usize> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.pg.url()).await.ok()?;
        // One region served: one lease.
        let holder: String = sqlx::query_scalar("SELECT holder FROM leader_leases")
            .fetch_optional(&mut conn)
            .await
            .ok()??;
        // hostname-pid-nonce
        let pid: u32 = holder.rsplit('-').nth(1)?.parse().ok()?;
        let leader = self
            .servers
            .iter()
            .position(|server| server.as_ref().is_some_and(|s| s.pid() == pid));
        eprintln!("robustness:         the leader is replica {leader:?}");
        leader
    }

    async fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::Kill { replica, down } => {
                self.endpoints.set(replica, None);
                let server = self.servers[replica]
                    .take()
                    .expect("every replica is up between faults");
                server.kill_9().await;
                tokio::time::sleep(down).await;
                self.start_replica(replica).await;
            }
            Fault::Silent {
                replica,
                leader,
                server_side,
                length,
            } => {
                let replica = match leader {
                    true => self.leader().await.unwrap_or(replica),
                    false => replica,
                };
                self.proxies[replica].blackhole(server_side);
                tokio::time::sleep(length).await;
                self.proxies[replica].pass();
            }
            Fault::InTransaction { replica, length } => {
                let proxy = &self.proxies[replica];
                proxy.blackhole_after(REVISION_LOCK, ServerSide::Kept);
                self.in_transaction.0 += 1;
                // The blackhole begins with the replica's next write, if
                // one comes; the cut lasts `length` from then.
                if tokio::time::timeout(length, proxy.blackholed())
                    .await
                    .is_ok()
                {
                    eprintln!("robustness:         cut in a write's transaction");
                    self.in_transaction.1 += 1;
                    tokio::time::sleep(length).await;
                } else {
                    eprintln!("robustness:         no write came");
                }
                proxy.pass();
            }
            Fault::Loud { replica, times } => {
                for _ in 0..times {
                    self.proxies[replica].reset();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            Fault::RestartPostgres { down } => {
                self.pg.stop();
                tokio::time::sleep(down).await;
                self.pg.start_again();
            }
            Fault::Upstream { length } => {
                self.emulator.set_faults(Faults {
                    mix: vec![
                        (InjectedFault::Error(InjectedError::Internal), 0.15),
                        (InjectedFault::Error(InjectedError::Throttling), 0.1),
                        (InjectedFault::Slow(Duration::from_millis(1500)), 0.1),
                    ],
                    ..aws()
                });
                tokio::time::sleep(length).await;
                self.emulator.set_faults(aws());
            }
        }
    }
}

/// The seed: from [`SEED_VAR`], else drawn.
fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(seed) => seed
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR} must be a whole number")),
        Err(_) => rand::rng().random(),
    }
}

/// How long the nemesis injects faults: [`SECS_VAR`], else 30 s.
fn length() -> Duration {
    let secs = std::env::var(SECS_VAR)
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{SECS_VAR} must be a whole number"))
        })
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// CreateRoom of a room named `key`, idempotent by that key: however often
/// it is tried, one room.
async fn create_once(client: &mut Client, key: &str) -> Result<proto::Room, Status> {
    let create = proto::CreateRoomRequest {
        name: key.to_owned(),
        request_id: key.to_owned(),
        ..Default::default()
    };
    client
        .create_room(with_deadline(create, DEADLINE))
        .await
        .map(tonic::Response::into_inner)
}

/// Creates a room through `client` until that works (one room: each try
/// carries the same request_id): the replica serves writes.
async fn serves_writes(client: &mut Client, replica: usize) {
    let mut last = None;
    let served = tokio::time::timeout(WAIT, async {
        loop {
            match create_once(client, &format!("healed-{replica}")).await {
                Ok(_) => return,
                Err(status) => {
                    assert!(
                        acceptable(&status) && status.code() != Code::NotFound,
                        "after the heal: {status:?}"
                    );
                    last = Some(status);
                    // A backoff, as a client retrying would.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    assert!(
        served.is_ok(),
        "replica {replica} does not serve writes {WAIT:?} after the heal: {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_traffic_under_random_faults_keeps_every_promise() {
    if PrivatePostgres::available().is_none() {
        if std::env::var_os(common::REQUIRE_POSTGRES_VAR).is_some() {
            panic!("Postgres's server programs (initdb, pg_ctl) are not installed");
        }
        eprintln!("SKIPPED: no initdb/pg_ctl to run a private Postgres");
        return;
    }
    let seed = seed();
    let length = length();
    eprintln!("robustness: seed {seed}, {length:?} of faults (replay: {SEED_VAR}={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let pg = PrivatePostgres::start();
    let (emulator, emulator_url) = emulator_apart(aws()).await;
    emulator.keep_versions();
    let mut proxies = Vec::new();
    for _ in 0..REPLICAS {
        proxies.push(FaultProxy::before_postgres(&pg.url()).await);
    }
    let mut fleet = Fleet {
        pg,
        emulator: emulator.clone(),
        emulator_url,
        proxies,
        servers: (0..REPLICAS).map(|_| None).collect(),
        endpoints: Endpoints::default(),
        in_transaction: (0, 0),
    };
    for replica in 0..REPLICAS {
        fleet.start_replica(replica).await;
        listed(&mut fleet.endpoints.get(replica)).await;
    }
    let endpoints = fleet.endpoints.clone();

    // The first rooms, made through the service.
    let mut first = endpoints.get(0);
    let mut known = Vec::new();
    for i in 0..FIRST_ROOMS {
        let created = within("a first room", async {
            loop {
                match create_once(&mut first, &format!("first-{i}")).await {
                    Ok(room) => return room,
                    Err(status) if status.code() == Code::ResourceExhausted => {}
                    Err(status) => panic!("CreateRoom: {status:?}"),
                }
            }
        })
        .await;
        known.push(created.arn);
    }
    let known: Known = Arc::new(Mutex::new(known));

    // Traffic and watchers, each with a seed of its own drawn from the run's.
    let stop = CancellationToken::new();
    let (until, watching) = watch::channel(u64::MAX);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            client(
                id,
                StdRng::seed_from_u64(rng.random()),
                endpoints.clone(),
                emulator.clone(),
                known.clone(),
                stop.clone(),
            )
        })
        .collect();
    let watchers: Vec<_> = (0..WATCHERS)
        .map(|_| {
            watcher(
                StdRng::seed_from_u64(rng.random()),
                endpoints.clone(),
                watching.clone(),
            )
        })
        .collect();

    // The nemesis: a healthy while, a fault, and again, for `length`.
    let began = Instant::now();
    let mut schedule = Vec::new();
    while began.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        let fault = draw_fault(&mut rng);
        eprintln!(
            "robustness: {:>5.1} s {fault:?}",
            began.elapsed().as_secs_f64()
        );
        fleet.inject(fault).await;
        schedule.push(fault);
    }
    let faulty_for = began.elapsed();

    // The heal is done (every fault undoes itself); traffic goes on a little,
    // then stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut history = Vec::new();
    for client in clients {
        history.extend(within("a client to stop", client).await.expect("a client"));
    }

    // Recovery without restart: every replica serves writes again.
    for replica in 0..REPLICAS {
        serves_writes(&mut endpoints.get(replica), replica).await;
    }
    // The cache comes to equal IVS Chat by itself (changes made directly,
    // and writes whose answer was lost, found by the reconciler).
    let mut reader = endpoints.get(0);
    let (cached, revision) = within("the cache to equal IVS Chat", async {
        loop {
            let (cached, revision) = list_all(&mut reader).await;
            if cached == upstream_rooms(&emulator) {
                return (cached, revision);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_same_rooms(&cached, &upstream_rooms(&emulator));
    // The log replays into the cache: nothing lost, nothing twice, each
    // event's `previous` the room the log had left.
    let log = log_through(&mut reader, revision).await;
    assert_same_rooms(&fold(&log), &cached);
    // Every replica's cached reads answer IVS Chat's rooms (their memory
    // layers hold nothing else).
    for replica in 0..REPLICAS {
        let mut client = endpoints.get(replica);
        for room in &cached {
            let read = within("a cached read after the heal", async {
                loop {
                    let request = proto::GetRoomRequest {
                        identifier: room.arn.clone(),
                        consistency: proto::ReadConsistency::Cached as i32,
                    };
                    match client.get_room(with_deadline(request, DEADLINE)).await {
                        Ok(read) => return read.into_inner(),
                        Err(status) if status.code() == Code::ResourceExhausted => {}
                        Err(status) => panic!("a cached read after the heal: {status:?}"),
                    }
                }
            })
            .await;
            assert_eq!(
                &read, room,
                "replica {replica}'s cached read after the heal"
            );
        }
    }

    // The watchers catch up to the log's newest revision.
    until.send_replace(revision);
    let mut watched = Vec::new();
    for watcher in watchers {
        watched.push(
            within("a watcher to catch up", watcher)
                .await
                .expect("a watcher"),
        );
    }

    // Every event shows a room as IVS Chat had it.
    let versions = emulator.versions();
    common::load::assert_real_versions(&log, &versions);
    let figures = check(&history, &watched, &log, &RealVersions::of(&versions));

    // IVS Chat never received more than AWS's rate in any second.
    let mut most = Vec::new();
    for op in Operation::ALL {
        let times = emulator.call_times(op);
        let in_one_second = max_per_second(&times);
        let rate = op.aws_rate().get() as usize;
        assert!(
            in_one_second <= rate,
            "{in_one_second} {op} calls reached IVS Chat in one second (AWS allows {rate})"
        );
        most.push(format!("{op} {in_one_second}/{rate}"));
    }
    eprintln!(
        "robustness: seed {seed}; {} faults in {:.0} s ({} of {} cuts in a write's \
         transaction began): {schedule:?}",
        schedule.len(),
        faulty_for.as_secs_f64(),
        fleet.in_transaction.1,
        fleet.in_transaction.0,
    );
    eprintln!("robustness: {figures}");
    eprintln!("robustness: most calls in one second: {}", most.join(", "));
    assert!(!schedule.is_empty(), "the nemesis injected faults");
    drop(fleet);
}

/// A room's update time, comparable.
fn nanos(room: &proto::Room) -> i128 {
    let t = room.update_time.expect("an update time");
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// Checks the histories against the log; returns the figures to print.
fn check(
    history: &[Call],
    watched: &[Vec<Seen>],
    log: &[proto::RoomEvent],
    versions: &RealVersions,
) -> String {
    // Every failure is one a client must be ready for.
    let mut tally: BTreeMap<(Op, String), usize> = BTreeMap::new();
    for call in history {
        let outcome = match &call.outcome {
            Ok(_) => "OK".to_owned(),
            Err(status) => {
                assert!(
                    acceptable(status),
                    "{:?} of {} failed as no client should meet: {status:?}",
                    call.op,
                    call.arn
                );
                // A cached read answers within its deadline, from memory
                // if need be, or says that it cannot; it never runs out its
                // deadline (the client's timeout, found down the error's
                // chain; the server's would be CANCELLED, not acceptable).
                assert!(
                    call.op != Op::CachedRead || failure(status) != "ClientDeadline",
                    "a cached read of {} ran out its deadline: {status:?}",
                    call.arn
                );
                // NOT_FOUND only for a room some client deleted, never for
                // a create.
                if status.code() == Code::NotFound && std::error::Error::source(status).is_none() {
                    assert!(
                        call.op != Op::Create
                            && history.iter().any(|d| d.op == Op::Delete
                                && d.arn == call.arn
                                && d.started < call.ended),
                        "{:?} of {} answered NOT_FOUND, though no client deleted it",
                        call.op,
                        call.arn
                    );
                }
                failure(status)
            }
        };
        *tally.entry((call.op, outcome)).or_default() += 1;
    }
    let acked = |op: Op| {
        tally
            .get(&(op, "OK".to_owned()))
            .copied()
            .unwrap_or_default()
    };
    for op in [Op::Update, Op::CachedRead, Op::StrongRead] {
        assert!(acked(op) > 0, "some {op:?} succeeded: {tally:?}");
    }

    // Every acknowledged write is in the log as acknowledged, or followed
    // there by a newer version of its room (or its deletion).
    let mut events_of: HashMap<&str, Vec<&proto::RoomEvent>> = HashMap::new();
    for event in log {
        events_of
            .entry(event.room.as_ref().unwrap().arn.as_str())
            .or_default()
            .push(event);
    }
    let deleted = |event: &proto::RoomEvent| event.r#type == proto::EventType::Deleted as i32;
    let (mut exact, mut superseded) = (0, 0);
    for call in history.iter().filter(|c| c.op.writes()) {
        let Ok(answer) = &call.outcome else { continue };
        let events = events_of
            .get(call.arn.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        match answer {
            None => assert!(
                events.iter().any(|e| deleted(e)),
                "an acknowledged deletion of {} is not in the log",
                call.arn
            ),
            Some(room) => {
                if events
                    .iter()
                    .any(|e| !deleted(e) && e.room.as_ref() == Some(room))
                {
                    exact += 1;
                } else {
                    let newer = events
                        .iter()
                        .any(|e| deleted(e) || nanos(e.room.as_ref().unwrap()) > nanos(room));
                    assert!(
                        newer,
                        "an acknowledged {:?} is not in the log: {room:#?}",
                        call.op
                    );
                    superseded += 1;
                }
            }
        }
    }
    // Nothing acknowledged twice: one creation per room, in the log once.
    let mut created: HashMap<&str, usize> = HashMap::new();
    for call in history
        .iter()
        .filter(|c| c.op == Op::Create && c.outcome.is_ok())
    {
        *created.entry(call.arn.as_str()).or_default() += 1;
    }
    for (arn, n) in &created {
        assert_eq!(*n, 1, "{arn} was acknowledged as created {n} times");
        let logged = events_of[arn]
            .iter()
            .filter(|e| e.r#type == proto::EventType::Created as i32)
            .count();
        assert_eq!(logged, 1, "{arn} is created {logged} times in the log");
    }

    // Reads show versions IVS Chat had; a STRONG read is never older than
    // a change IVS Chat acknowledged before it began.
    for call in history {
        let (Op::CachedRead | Op::StrongRead, Ok(Some(room))) = (call.op, &call.outcome) else {
            continue;
        };
        if !versions.had(room) {
            let calls: Vec<String> = history
                .iter()
                .filter(|c| c.arn == call.arn)
                .map(|c| {
                    format!(
                        "{:?} {:?}..{:?} {:?}",
                        c.op,
                        c.started,
                        c.ended,
                        c.outcome.as_ref().map(|r| r.as_ref().map(|r| (
                            &r.name,
                            &r.tags,
                            r.update_time
                        )))
                    )
                })
                .collect();
            let events: Vec<String> = log
                .iter()
                .filter(|e| e.room.as_ref().unwrap().arn == call.arn)
                .map(|e| {
                    format!(
                        "{} {:?} {:?}",
                        e.revision,
                        e.source,
                        e.room.as_ref().map(|r| (&r.name, &r.tags, r.update_time))
                    )
                })
                .collect();
            panic!(
                "a {:?} showed a room as IVS Chat never had it: {room:#?}\ncalls:\n{}\nlog:\n{}",
                call.op,
                calls.join("\n"),
                events.join("\n")
            );
        }
        if call.op != Op::StrongRead {
            continue;
        }
        for before in history
            .iter()
            .filter(|b| b.arn == call.arn && b.ended < call.started)
        {
            match (&before.op, &before.outcome) {
                (Op::Delete, Ok(_)) => {
                    panic!(
                        "a STRONG read after {}'s deletion was acknowledged showed it: {room:#?}",
                        call.arn
                    )
                }
                (
                    Op::Create | Op::Update | Op::Tag | Op::Untag | Op::OutOfBand,
                    Ok(Some(written)),
                ) => {
                    assert!(
                        nanos(room) >= nanos(written),
                        "a STRONG read showed {} older than a {:?} acknowledged before it began",
                        call.arn,
                        before.op
                    )
                }
                _ => {}
            }
        }
    }

    // The watchers.
    let by_revision: HashMap<u64, &proto::RoomEvent> =
        log.iter().map(|e| (e.revision, e)).collect();
    let newest = log.last().map_or(0, |e| e.revision);
    let (mut streams, mut moved, mut bookmarks) = (0, 0, 0);
    for (w, seen) in watched.iter().enumerate() {
        let mut last = 0;
        let mut on = None;
        for item in seen {
            match item {
                Seen::Stream { replica, after } => {
                    assert_eq!(
                        *after, last,
                        "watcher {w} resumed right after the last revision it had"
                    );
                    streams += 1;
                    if on.is_some_and(|r| r != *replica) {
                        moved += 1;
                    }
                    on = Some(*replica);
                }
                // Past the log read for the check (a commit after it): out
                // of the window checked.
                Seen::Event(event) if event.revision > newest => break,
                Seen::Bookmark(revision) if *revision > newest => break,
                Seen::Event(event) => {
                    assert_eq!(
                        event.revision,
                        last + 1,
                        "watcher {w}: events in order, each once, none missed (after a bookmark too)"
                    );
                    assert_eq!(
                        Some(&&**event),
                        by_revision.get(&event.revision),
                        "watcher {w} saw the log's event at revision {}",
                        event.revision
                    );
                    last = event.revision;
                }
                Seen::Bookmark(revision) => {
                    assert!(
                        *revision >= last,
                        "watcher {w}: a bookmark at {revision} after revision {last} (newest {newest})"
                    );
                    bookmarks += 1;
                    last = *revision;
                }
                Seen::Ended { how, expected } => assert!(
                    expected,
                    "watcher {w}'s stream ended as a watcher should never meet: {how}"
                ),
            }
        }
        assert_eq!(last, newest, "watcher {w} saw everything");
    }
    assert!(streams > WATCHERS, "the watchers resumed");

    let tally: Vec<String> = tally
        .iter()
        .map(|((op, outcome), n)| format!("{op:?} {outcome} {n}"))
        .collect();
    format!(
        "{} requests ({}); {} acknowledged writes in the log ({exact} as acknowledged, \
         {superseded} followed by a newer version); log of {newest} revisions; {WATCHERS} watchers \
         opened {streams} streams ({moved} resumed on another replica), {bookmarks} bookmarks, no gap",
        history.len(),
        tally.join(", "),
        exact + superseded,
    )
}
