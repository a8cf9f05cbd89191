//! The hot layer: cached rows in memory, in front of the store, kept exact.
//!
//! A cached GetRoom should cost what a bare gRPC call costs, which a SQL
//! query per read does not allow. So each process keeps rows it has read (and,
//! at startup, every row) in a map, and keeps it exact with the change log:
//!
//! - The feed's tailer applies every event, in revision order, from this
//!   process and (through Postgres notifications) from other replicas, by
//!   dropping the room's entry; `through` is the newest revision applied.
//! - A row is filled in only with the revision it was read at, in the same
//!   read transaction, and only if no event after that revision has been
//!   applied yet (else it may already be out of date).
//! - A read is answered from memory only while `through` has reached the
//!   newest revision this process knows committed. Until the tailer catches
//!   up with a commit (its own, or one a replica announced), reads go to SQL.
//!
//! So an entry is never older than the store as far as this process knows.
//!
//! Beside the entries, the layer keeps each room's *last known* row: the row
//! as the newest applied event left it (each event carries it whole, with
//! when IVS Chat confirmed it) or as last filled in. It never answers a
//! normal read (another replica's commit may be on its way); it answers only
//! while the database does not answer this replica, marked stale, so that a
//! room changed recently is still readable then.
//! Each entry is a [`HotRow`]: the row with room for one value derived from
//! it, where the gRPC edge keeps the room's encoding, made by the first read
//! that answers with it. A changed row is a new entry, so what was derived
//! from the old one is never sent for it.
//! Changes without an event (IVS Chat confirming a row, `validated_at`) do not
//! reach the map: an entry can only look older than it is, and a read that
//! finds it too old to serve asks SQL, which refills it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::domain::{Derived, EventKind, Result, RoomArn, RoomEvent};
use crate::store::{CachedRoom, Store};

/// The in-memory rows. Cheap to clone; clones share the map.
#[derive(Clone)]
pub struct HotRooms {
    inner: Arc<Inner>,
}

struct Inner {
    /// At most this many rows are held (0: the layer is off).
    capacity: usize,
    state: RwLock<State>,
    /// The newest revision known committed (the store's).
    committed: watch::Receiver<u64>,
}

/// A row as memory holds and hands it out (it derefs to the
/// [`CachedRoom`]).
pub type HotRow = Derived<CachedRoom>;

#[derive(Default)]
struct State {
    /// Every event up to this revision has been applied.
    through: u64,
    rooms: HashMap<RoomArn, Arc<HotRow>>,
    /// Each room's row as the newest applied event (or fill) left it.
    known: HashMap<RoomArn, Arc<HotRow>>,
}

impl HotRooms {
    /// An empty layer holding at most `capacity` rows, as of revision
    /// `through`; `committed` is the store's newest committed revision.
    fn new(capacity: usize, through: u64, committed: watch::Receiver<u64>) -> HotRooms {
        HotRooms {
            inner: Arc::new(Inner {
                capacity,
                state: RwLock::new(State {
                    through,
                    rooms: HashMap::new(),
                    known: HashMap::new(),
                }),
                committed,
            }),
        }
    }

    /// A layer filled with up to `capacity` rows of `store` (0: off), as of
    /// one revision: the feed applies the events after it.
    pub async fn load(store: &Store, capacity: usize) -> Result<HotRooms> {
        let (rows, revision) = store.rows_at_revision(capacity).await?;
        let hot = HotRooms::new(capacity, revision, store.committed());
        hot.fill_all(rows, revision);
        Ok(hot)
    }

    /// A layer that holds nothing: every read goes to the store.
    pub fn off() -> HotRooms {
        HotRooms::new(0, 0, watch::channel(0).1)
    }

    /// Every event up to this revision has been applied.
    pub fn through(&self) -> u64 {
        self.inner.state.read().expect("hot rooms").through
    }

    /// The row for `arn`, if held and the layer is up to date with every
    /// commit this process knows of.
    pub fn get(&self, arn: &RoomArn) -> Option<Arc<HotRow>> {
        let committed = *self.inner.committed.borrow();
        let state = self.inner.state.read().expect("hot rooms");
        if state.through < committed {
            return None;
        }
        state.rooms.get(arn).cloned()
    }

    /// Holds `row`, read from the store at revision `as_of`, unless an event
    /// after `as_of` has already been applied (the row may be out of date) or
    /// the layer is full. Returns the row as held (or as it would have been).
    pub fn fill(&self, arn: &RoomArn, row: CachedRoom, as_of: u64) -> Arc<HotRow> {
        let row = Arc::new(Derived::new(row));
        let mut state = self.inner.state.write().expect("hot rooms");
        if state.through > as_of {
            return row;
        }
        if state.rooms.len() >= self.inner.capacity && !state.rooms.contains_key(arn) {
            return row;
        }
        state.rooms.insert(arn.clone(), row.clone());
        state.known.insert(arn.clone(), row.clone());
        row
    }

    /// Holds rows read at revision `as_of` (at startup), as many as fit.
    fn fill_all(&self, rows: impl IntoIterator<Item = CachedRoom>, as_of: u64) {
        let mut state = self.inner.state.write().expect("hot rooms");
        if state.through > as_of {
            return;
        }
        for row in rows {
            if state.rooms.len() >= self.inner.capacity {
                break;
            }
            if let Ok(arn) = RoomArn::parse("arn", &row.room.arn) {
                let row = Arc::new(Derived::new(row));
                state.known.insert(arn.clone(), row.clone());
                state.rooms.insert(arn, row);
            }
        }
    }

    /// Applies events `after + 1 ..` in order: the rooms they touch are
    /// dropped (their last known rows become the events'). A gap (events compacted before this process read them) drops
    /// everything.
    pub fn apply<'a>(&self, after: u64, events: impl IntoIterator<Item = &'a RoomEvent>) {
        let mut state = self.inner.state.write().expect("hot rooms");
        let mut expected = after + 1;
        for event in events {
            if event.revision != expected {
                state.rooms.clear();
                state.known.clear();
            }
            expected = event.revision + 1;
            if let Ok(arn) = RoomArn::parse("arn", &event.room.arn) {
                state.rooms.remove(&arn);
                match event.validated_at {
                    Some(validated_at)
                        if state.known.contains_key(&arn)
                            || state.known.len() < self.inner.capacity =>
                    {
                        let row = CachedRoom {
                            room: event.room.clone(),
                            validated_at,
                            deleted: event.kind == EventKind::Deleted,
                        };
                        state.known.insert(arn, Arc::new(Derived::new(row)));
                    }
                    // An event logged before events carried their row's
                    // confirmation: nothing known of the row after it.
                    _ => {
                        state.known.remove(&arn);
                    }
                }
            }
            state.through = state.through.max(event.revision);
        }
    }

    /// The room's row as the newest event this process applied (or the
    /// last fill) left it, whether or not the layer is up to date: for
    /// answering, marked stale, while the database does not answer.
    pub fn last_known(&self, arn: &RoomArn) -> Option<Arc<HotRow>> {
        self.inner
            .state
            .read()
            .expect("hot rooms")
            .known
            .get(arn)
            .cloned()
    }

    /// How many rows are held.
    pub fn len(&self) -> usize {
        self.inner.state.read().expect("hot rooms").rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the layer holds anything at all (capacity above zero).
    pub fn enabled(&self) -> bool {
        self.inner.capacity > 0
    }
}
