//! Rooms' turns: this process's per-room lock, then on Postgres the turn
//! among replicas.

use super::*;

impl Rooms {
    /// The room's turn: this process's, then (on Postgres) the turn among
    /// replicas. Every read of the room from IVS Chat that may change the
    /// cache, and every write, runs in it, so none lands between another's
    /// answer and its cache write, on any replica: a change is logged by
    /// whoever made it.
    pub(super) async fn turn(&self, arn: &RoomArn) -> Result<RoomTurn<'_>> {
        let local = self.inner.locks.lock(arn).await;
        let replicas = self.inner.store.lock_room(arn).await?;
        Ok(RoomTurn {
            _local: local,
            replicas,
        })
    }
}

/// One async lock per room, created on demand and dropped when unused.
#[derive(Default)]
pub(super) struct RoomLocks {
    locks: Mutex<HashMap<RoomArn, Arc<tokio::sync::Mutex<()>>>>,
}

/// A room's turn in this process and among replicas; see [`Rooms::turn`].
pub(super) struct RoomTurn<'a> {
    _local: Turn<'a>,
    replicas: RoomLock,
}

impl RoomTurn<'_> {
    /// Ends the turn among replicas, then this process's.
    pub(super) async fn release(self) {
        self.replicas.release().await;
    }
}

pub(super) struct Turn<'a> {
    locks: &'a RoomLocks,
    arn: RoomArn,
    guard: Option<OwnedMutexGuard<()>>,
}

impl RoomLocks {
    pub(super) async fn lock(&self, arn: &RoomArn) -> Turn<'_> {
        let lock = self
            .locks
            .lock()
            .expect("room locks")
            .entry(arn.clone())
            .or_default()
            .clone();
        Turn {
            locks: self,
            arn: arn.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().expect("room locks");
        // Only the map holds it: nobody holds or awaits this room's turn.
        if locks
            .get(&self.arn)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.arn);
        }
    }
}
