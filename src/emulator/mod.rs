//! An Amazon IVS Chat emulator for the room API, speaking the service's
//! rest-json protocol closely enough that `aws-sdk-ivschat` and boto3 cannot
//! tell it from AWS: same paths and methods, same JSON, same error shapes (the
//! `x-amzn-ErrorType` header and body), same constraints (the shared table in
//! `domain::validate`).
//!
//! One emulator plays every region, as AWS's regional endpoints separate
//! them: each request's region is the one its SigV4 signature names
//! (`regions.rs`); rooms, ARNs, faults, TPS limits and call counts are per
//! region, and one state file holds every region's rooms.
//!
//! Architecture invariant: the emulator shares only `domain` with the service.
//! The service reaches it exactly as it reaches AWS, through the SDK.

mod faults;
mod http;
mod regions;
mod state;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

pub use crate::domain::Operation;
pub use faults::{Faults, InjectedError, InjectedFault, TpsLimit};

use crate::domain::{Result, Room, RoomPatch};
use faults::ActiveFaults;
use state::State;

/// How to run an emulator.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The region of a request whose signature names none (every region
    /// signed for is served).
    pub region: String,
    pub account_id: String,
    /// Keep rooms in this file (created if missing) so a restart keeps them.
    pub state_file: Option<PathBuf>,
    pub faults: Faults,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            region: "us-east-1".into(),
            account_id: "123456789012".into(),
            state_file: None,
            faults: Faults::default(),
        }
    }
}

/// A running or runnable emulator. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

struct Shared {
    /// The region of requests whose signature names none.
    default_region: String,
    state: Mutex<State>,
    faults: RwLock<FaultsInForce>,
    /// Calls per region, each region's counted apart.
    calls: RwLock<HashMap<String, Arc<RegionCalls>>>,
    call_made: Notify,
    /// Operations whose responses wait for a `HeldResponses` to be released.
    held: Mutex<HashMap<Operation, watch::Receiver<bool>>>,
}

/// The faults of every region: `default`'s, each region with limiters of its
/// own (AWS's quotas are per region), unless set for that region alone.
struct FaultsInForce {
    default: Faults,
    by_region: HashMap<String, Arc<ActiveFaults>>,
}

/// One region's calls.
#[derive(Default)]
struct RegionCalls {
    counts: [AtomicU64; Operation::ALL.len()],
    /// When the newest calls of each operation arrived (in the order they
    /// were handled), at most `CALL_TIMES_KEPT` per operation.
    times: Mutex<[VecDeque<Instant>; Operation::ALL.len()]>,
}

/// How many call times [`Emulator::call_times`] keeps per operation: the newest
/// ones, so a long-running emulator's log stays bounded (a few MiB at most).
pub const CALL_TIMES_KEPT: usize = 100_000;

/// Responses of one operation held back until this is released or dropped:
/// the operation has happened, its answer has not arrived. Lets tests order
/// a race by events instead of by latency.
pub struct HeldResponses {
    emulator: Emulator,
    op: Operation,
    release: watch::Sender<bool>,
}

impl HeldResponses {
    pub fn release(self) {}
}

impl Drop for HeldResponses {
    fn drop(&mut self) {
        self.emulator
            .shared
            .held
            .lock()
            .expect("held lock")
            .remove(&self.op);
        self.release.send_replace(true);
    }
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> anyhow::Result<Emulator> {
        anyhow::ensure!(
            regions::is_region(&config.region),
            "{:?} is not a region name (lowercase letters, digits and dashes)",
            config.region
        );
        let state = State::open(&config.account_id, config.state_file.as_deref())?;
        Ok(Emulator {
            shared: Arc::new(Shared {
                default_region: config.region,
                state: Mutex::new(state),
                faults: RwLock::new(FaultsInForce {
                    default: config.faults,
                    by_region: HashMap::new(),
                }),
                calls: RwLock::default(),
                call_made: Notify::new(),
                held: Mutex::default(),
            }),
        })
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt as _;
        // Small responses go out at once, not after the client's delayed ACK.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        });
        axum::serve(listener, http::router(self))
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Binds `addr` (port 0 for any), serves in a background task for as long as
    /// the runtime lives, and returns the endpoint URL to give the SDK.
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<String> {
        let (url, _task) = self.spawn_until(addr, std::future::pending()).await?;
        Ok(url)
    }

    /// Like [`Emulator::spawn`], but stops when `shutdown` completes; the task
    /// ends once the server has.
    pub async fn spawn_until(
        &self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<(String, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let emulator = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = emulator.serve(listener, shutdown).await {
                tracing::error!(error = %e, "emulator stopped");
            }
        });
        Ok((format!("http://{local}"), task))
    }

    /// Replaces the faults in force in every region (each region keeps TPS
    /// limits of its own).
    pub fn set_faults(&self, faults: Faults) {
        let mut in_force = self.shared.faults.write().expect("faults lock");
        in_force.default = faults;
        in_force.by_region.clear();
    }

    /// Replaces the faults in force in `region` alone, until the next
    /// [`Emulator::set_faults`].
    pub fn set_region_faults(&self, region: &str, faults: Faults) {
        let mut in_force = self.shared.faults.write().expect("faults lock");
        in_force
            .by_region
            .insert(region.to_owned(), Arc::new(ActiveFaults::new(faults)));
    }

    /// The faults in force in every region not set apart.
    pub fn faults(&self) -> Faults {
        self.shared
            .faults
            .read()
            .expect("faults lock")
            .default
            .clone()
    }

    /// The region of requests whose signature names none.
    pub fn default_region(&self) -> &str {
        &self.shared.default_region
    }

    /// Holds back every response to `op` (from now on) until the returned
    /// value is released or dropped.
    pub fn hold_responses(&self, op: Operation) -> HeldResponses {
        let (release, released) = watch::channel(false);
        self.shared
            .held
            .lock()
            .expect("held lock")
            .insert(op, released);
        HeldResponses {
            emulator: self.clone(),
            op,
            release,
        }
    }

    /// Waits while responses to `op` are held.
    async fn wait_if_held(&self, op: Operation) {
        let held = self
            .shared
            .held
            .lock()
            .expect("held lock")
            .get(&op)
            .cloned();
        if let Some(mut released) = held {
            // An error means the sender is gone, which releases too.
            let _ = released.wait_for(|released| *released).await;
        }
    }

    /// How many requests for `op` have been handled in every region (the
    /// operation has happened, or was refused), throttled and failed ones
    /// included. Counted before any latency or hold delays the response.
    pub fn calls(&self, op: Operation) -> u64 {
        self.regions_calls()
            .iter()
            .map(|calls| calls.counts[op.index()].load(Ordering::SeqCst))
            .sum()
    }

    /// Like [`Emulator::calls`], in `region` alone.
    pub fn calls_in(&self, region: &str, op: Operation) -> u64 {
        self.region_calls(region).counts[op.index()].load(Ordering::SeqCst)
    }

    /// When the requests for `op` counted by [`Emulator::calls`] were handled,
    /// oldest first: the newest [`CALL_TIMES_KEPT`] per region since the last
    /// [`Emulator::clear_call_times`]. For measuring the rate at which a
    /// client calls, as AWS's per-operation limit sees it.
    pub fn call_times(&self, op: Operation) -> Vec<Instant> {
        let mut times: Vec<Instant> = self
            .regions_calls()
            .iter()
            .flat_map(|calls| calls.times.lock().expect("call times lock")[op.index()].clone())
            .collect();
        times.sort();
        times
    }

    /// Like [`Emulator::call_times`], in `region` alone: what that region's
    /// quota sees.
    pub fn call_times_in(&self, region: &str, op: Operation) -> Vec<Instant> {
        self.region_calls(region)
            .times
            .lock()
            .expect("call times lock")[op.index()]
        .iter()
        .copied()
        .collect()
    }

    /// Forgets the call times recorded so far (the counts stay).
    pub fn clear_call_times(&self) {
        for calls in self.regions_calls() {
            for times in calls.times.lock().expect("call times lock").iter_mut() {
                times.clear();
            }
        }
    }

    fn regions_calls(&self) -> Vec<Arc<RegionCalls>> {
        let calls = self.shared.calls.read().expect("calls lock");
        calls.values().cloned().collect()
    }

    fn region_calls(&self, region: &str) -> Arc<RegionCalls> {
        if let Some(calls) = self.shared.calls.read().expect("calls lock").get(region) {
            return calls.clone();
        }
        let mut calls = self.shared.calls.write().expect("calls lock");
        calls.entry(region.to_owned()).or_default().clone()
    }

    /// Waits until at least `n` requests for `op` have been handled.
    pub async fn wait_for_calls(&self, op: Operation, n: u64) {
        loop {
            let notified = self.shared.call_made.notified();
            if self.calls(op) >= n {
                return;
            }
            notified.await;
        }
    }

    /// Every room of every region, for tests that compare the service's
    /// cache with "AWS".
    pub fn rooms(&self) -> Vec<Room> {
        self.state().rooms()
    }

    /// Every room of `region`.
    pub fn rooms_in(&self, region: &str) -> Vec<Room> {
        let rooms = self.state().rooms();
        rooms
            .into_iter()
            .filter(|room| {
                crate::domain::RoomArn::parse("arn", &room.arn)
                    .is_ok_and(|arn| arn.region() == region)
            })
            .collect()
    }

    /// From now on, keeps every version each room takes (created, updated,
    /// tagged, untagged), starting with the rooms as they are: for tests that
    /// check the service never shows a room as IVS Chat never had it. Off by
    /// default (the list only grows).
    pub fn keep_versions(&self) {
        self.state().keep_versions();
    }

    /// Every version kept since [`Emulator::keep_versions`], oldest first.
    pub fn versions(&self) -> Vec<Room> {
        self.state().versions()
    }

    /// Updates a room directly, as another AWS client would (in the ARN's
    /// region): for tests of changes made behind the service's back.
    pub fn update_room(&self, arn: &str, patch: &RoomPatch) -> Result<Room> {
        let region = crate::domain::RoomArn::parse("identifier", arn)?;
        self.state().update(region.region(), arn, patch)
    }

    /// Deletes a room directly, as another AWS client would.
    pub fn delete_room(&self, arn: &str) -> Result<()> {
        let region = crate::domain::RoomArn::parse("identifier", arn)?;
        self.state().delete(region.region(), arn)
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("emulator state lock")
    }

    /// The faults in force in `region`, with that region's limiters.
    fn active_faults(&self, region: &str) -> Arc<ActiveFaults> {
        if let Some(active) = self
            .shared
            .faults
            .read()
            .expect("faults lock")
            .by_region
            .get(region)
        {
            return active.clone();
        }
        let mut in_force = self.shared.faults.write().expect("faults lock");
        let default = in_force.default.clone();
        in_force
            .by_region
            .entry(region.to_owned())
            .or_insert_with(|| Arc::new(ActiveFaults::new(default)))
            .clone()
    }

    fn record_call(&self, region: &str, op: Operation, arrived: Instant) {
        let calls = self.region_calls(region);
        {
            let mut times = calls.times.lock().expect("call times lock");
            let times = &mut times[op.index()];
            if times.len() == CALL_TIMES_KEPT {
                times.pop_front();
            }
            times.push_back(arrived);
        }
        calls.counts[op.index()].fetch_add(1, Ordering::SeqCst);
        self.shared.call_made.notify_waiters();
    }
}
