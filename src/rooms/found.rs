//! What the reconciler may do to the cache, in the rooms' turns: read a room
//! a listing showed as new or changed, check one a full listing no longer
//! showed, and record that a full listing has completed. The passes
//! themselves are the reconciler's (`reconciler::passes`).

use super::*;

impl Rooms {
    /// Reads a room a listing showed as new or changed into the cache (as a
    /// RECONCILER change), unless by the time it has the room's turn the cache
    /// already holds that version or a newer one (a request of ours got there
    /// first). Returns whether it called GetRoom.
    pub(crate) async fn examine_listed(
        &self,
        arn: &RoomArn,
        summary: &RoomSummary,
    ) -> Result<bool> {
        // A write of ours (on any replica) between IVS Chat's answer and its
        // cache write holds the turn: once it is ours, that write is cached.
        self.background_turn(arn).await?;
        let turn = self.turn(arn).await?;
        let fetched = async {
            if let Some(c) = self.inner.store.get(arn).await?
                && !c.deleted
                && (c.room.update_time > summary.update_time || summary.shows(&c.room))
            {
                return Ok(false);
            }
            // Gone since it was listed: refresh has forgotten it.
            match self
                .refresh(arn, EventSource::Reconciler, Caller::Background)
                .await
            {
                Ok(_) | Err(Error::NotFound { .. }) => Ok(true),
                Err(e) => Err(e),
            }
        }
        .await;
        turn.release().await;
        fetched
    }

    /// Reads a room a listing put in without its details (the message
    /// limits) whole, in its turn, unless by then the cache holds it whole
    /// or not at all (a request of ours got there first). A room gone from
    /// IVS Chat is forgotten.
    pub(crate) async fn complete_details(&self, arn: &RoomArn) -> Result<()> {
        self.background_turn(arn).await?;
        let turn = self.turn(arn).await?;
        let read = async {
            match self.inner.store.get(arn).await? {
                Some(c) if !c.deleted && c.room.details_pending => {}
                _ => return Ok(()),
            }
            match self
                .refresh(arn, EventSource::Reconciler, Caller::Background)
                .await
            {
                Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        }
        .await;
        turn.release().await;
        read
    }

    /// Waits, before the reconciler takes `arn`'s turn for a GetRoom, until
    /// a background slot of GetRoom is free now: the turn is then held for
    /// about the call's length, not for as long as users keep the budget
    /// busy (users of the room would wait for the turn meanwhile).
    async fn background_turn(&self, arn: &RoomArn) -> Result<()> {
        self.scope("identifier", arn)?
            .ready_for_background(crate::budget::Operation::GetRoom)
            .await;
        Ok(())
    }

    /// Whether a room the cache has never seen may be one a CreateRoom
    /// (of any replica) is about to cache: one is in flight and the room is
    /// recent. Older rooms (created in IVS Chat directly) are never held back.
    pub(crate) async fn may_be_creating(&self, summary: &RoomSummary) -> Result<bool> {
        if summary.create_time.elapsed() >= CREATION_WINDOW {
            return Ok(false);
        }
        if self.inner.creating.load(Ordering::SeqCst) > 0 {
            return Ok(true);
        }
        self.inner.store.creations_in_flight().await
    }

    /// Reads a cached room a complete listing did not show (it may have been
    /// updated while the listing paged, or deleted) in its turn; returns
    /// whether IVS Chat said it is gone (then forgotten, as RECONCILER).
    pub(crate) async fn recheck_unlisted(&self, arn: &RoomArn) -> Result<bool> {
        self.background_turn(arn).await?;
        let turn = self.turn(arn).await?;
        let refreshed = self
            .refresh(arn, EventSource::Reconciler, Caller::Background)
            .await;
        turn.release().await;
        match refreshed {
            Ok(_) => Ok(false),
            Err(Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// A full listing of `region` that started at `started` has completed:
    /// ListRooms may be answered from the cache for it (on every replica,
    /// which read it from the store).
    pub(crate) async fn full_listing_completed(
        &self,
        region: &str,
        started: Timestamp,
    ) -> Result<()> {
        self.inner
            .store
            .set_full_listing_at(region, started)
            .await?;
        self.inner.listed.send_modify(|listed| {
            listed.insert(region.to_owned());
        });
        Ok(())
    }
}
