//! The persistent room cache: the only home of SQL.
//!
//! One set of statements serves SQLite and Postgres through sqlx's `Any`
//! driver: both understand `$N` parameters, `ON CONFLICT ... DO UPDATE ...
//! WHERE`, and BIGINT/TEXT columns. Each backend has its own migrations
//! (`migrations/sqlite`, `migrations/postgres`), run at startup.
//!
//! Architecture invariant: a stored room is only ever replaced by a version
//! whose `update_time` is newer, or equal and observed no earlier (a tag change
//! does not move `updateTime`); a room IVS Chat said is gone (a tombstone) only
//! comes back with an answer to a call that started after that. Each rule is
//! the `WHERE` of one SQL statement, so it holds whatever the interleaving of
//! writers, in one process or many.
//!
//! - `connect.rs`: opening the pools (and their settings), migrations;
//! - `rooms.rs`: the cached rooms (reads, the update-time rule's upserts,
//!   tombstones, listing state);
//! - `log.rs`: the outbox (write transactions, events, commits and their
//!   notifications), the change log's reads and compaction, snapshots;
//! - `locks.rs`: the reconciler's leadership and rooms' turns among replicas;
//! - `requests.rs`: CreateRoom request_ids and creations in flight;
//! - `budget.rs`: the fleet's shared upstream budget;
//! - `health.rs`: the bounds on waiting for the database and on locks a
//!   cut-off session holds; whether the database answers this replica;
//! - `rows.rs`: decoding rows; `error.rs`: sqlx errors as ours.
//!
//! For traces, each transaction (and each read and turn of a request's
//! path) is a span of its own, `cache.put`, `cache.get_at_revision`, ...
//! (`telemetry::traces::SPANS`, with `db.system`): disabled, and free,
//! while traces are off.

mod budget;
mod connect;
mod error;
mod health;
mod locks;
mod log;
mod requests;
mod rooms;
mod rows;

pub use budget::{BudgetPause, Slot};
pub use health::{Away, HELD_LOCK_BOUND, WRITE_STALL_BOUND};
pub use locks::{DEPOSED, Fence, LEASE_TTL, Leadership, RoomLock, fenced};
pub use requests::Claim;

/// The target of the TRACE event logged as each write that has an event
/// commits (field `revision`): what a profile or a benchmark times commits
/// by (P4 measures from it to a watcher's delivery).
pub const COMMITS: &str = "ivschat_rooms::store::commits";

// What the statements of one file use of another's (each file `use super::*`).
use locks::ROOM_TURN_TIMEOUT;
use log::revision_in;
use rooms::get_row;
use rows::{cached_room, columns, event, event_columns, revision_from, room};

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyConnection, AnyPool, Row as _, Transaction};
use tokio::sync::watch;

use crate::domain::{
    Error, EventKind, EventSource, FallbackResult, ListQuery, ListedPage, MessageReviewHandler,
    PageCursor, Result, Room, RoomArn, RoomEvent, Timestamp,
};
use crate::telemetry::traces::SPANS;

/// The Postgres channel a commit with events is announced on (payload: the
/// newest revision), so that replicas sharing the database learn of it.
const EVENTS_CHANNEL: &str = "ivschat_rooms_events";

/// The Postgres channel a throttling pause of the fleet's budget is
/// announced on (`store::budget`), so replicas stop using slots they booked.
const BUDGET_CHANNEL: &str = "ivschat_rooms_budget_pauses";

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Its name in traces (OpenTelemetry's `db.system`).
    fn db_system(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        }
    }
}

/// A cached room and what the cache knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRoom {
    pub room: Room,
    /// When IVS Chat last confirmed this version.
    pub validated_at: Timestamp,
    /// IVS Chat said the room is gone (at `validated_at`).
    pub deleted: bool,
}

/// The cache and its change log. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Postgres: connections that hold rooms' write turns (see
    /// [`Store::lock_room`]), apart from `pool`, so that writes waiting for
    /// IVS Chat while holding a turn cannot starve the cache of connections.
    turns: Option<AnyPool>,
    backend: Backend,
    url: Arc<str>,
    /// The newest revision this process knows to be committed: raised by its
    /// own commits, and on Postgres by other replicas' notifications.
    committed: Arc<watch::Sender<u64>>,
    /// Throttling pauses of the fleet's budget, as replicas announce them.
    pauses: tokio::sync::broadcast::Sender<BudgetPause>,
    /// Whether the database answers this process.
    health: health::SharedHealth,
}

/// Rooms as of one revision of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: u64,
    pub rooms: Vec<Room>,
}

impl Store {}
