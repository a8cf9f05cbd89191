//! Writes to a room (update, delete, tag, untag), each in the room's turn.

use super::*;

impl Rooms {
    /// Updates a room; with `expected`, only if its update_time in IVS Chat
    /// is that (else UpdateTimeMismatch, and nothing changes).
    pub async fn update(
        &self,
        identifier: &str,
        patch: RoomPatch,
        expected: Option<Timestamp>,
        caller: Caller,
    ) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        let upstream = self.scope("identifier", &arn)?.clone();
        validate::room_patch(&patch)?;
        self.exchange(|rooms| async move {
            let write = async {
                let asked_at = Timestamp::now();
                let room = rooms
                    .gone_if_not_found(&arn, upstream.update_room(&arn, &patch, caller).await)
                    .await?;
                rooms.keep_ours(room, asked_at).await
            };
            rooms.in_write_turn(&arn, expected, caller, write).await
        })
        .await
    }

    /// Deletes a room; with `expected`, only if its update_time in IVS Chat
    /// is that.
    pub async fn delete(
        &self,
        identifier: &str,
        expected: Option<Timestamp>,
        caller: Caller,
    ) -> Result<()> {
        let arn = RoomArn::parse("identifier", identifier)?;
        let upstream = self.scope("identifier", &arn)?.clone();
        self.exchange(|rooms| async move {
            let write = async {
                rooms
                    .gone_if_not_found(&arn, upstream.delete_room(&arn, caller).await)
                    .await?;
                rooms.forget_ours(&arn).await
            };
            rooms.in_write_turn(&arn, expected, caller, write).await
        })
        .await
    }

    /// Runs `write` in the room's write turn: this process's turn for the
    /// room, then, on Postgres, the turn among replicas. With `expected`, the
    /// room is first read from IVS Chat (not the cache), and `write` runs only
    /// if its update_time is `expected`. The turn keeps writes through this
    /// service from coming between that read and `write`; a writer that
    /// bypasses the service can (IVS Chat has no conditional write).
    pub(super) async fn in_write_turn<T>(
        &self,
        arn: &RoomArn,
        expected: Option<Timestamp>,
        caller: Caller,
        write: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let turn = self.turn(arn).await?;
        let result = async {
            if let Some(expected) = expected {
                // A change found here was made behind this service's back.
                let actual = self
                    .refresh(arn, EventSource::Reconciler, caller)
                    .await?
                    .update_time;
                if actual != expected {
                    return Err(Error::UpdateTimeMismatch { expected, actual });
                }
            }
            write.await
        }
        .await;
        turn.release().await;
        result
    }

    pub async fn tag(
        &self,
        identifier: &str,
        tags: BTreeMap<String, String>,
        caller: Caller,
    ) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        let upstream = self.scope("identifier", &arn)?.clone();
        validate::tags("tags", &tags)?;
        self.exchange(|rooms| async move {
            let write = async {
                rooms
                    .gone_if_not_found(&arn, upstream.tag_room(&arn, &tags, caller).await)
                    .await?;
                rooms
                    .read_tags_back(&arn, caller, |cached| cached.extend(tags.clone()))
                    .await
            };
            rooms.in_write_turn(&arn, None, caller, write).await
        })
        .await
    }

    pub async fn untag(&self, identifier: &str, keys: Vec<String>, caller: Caller) -> Result<Room> {
        let arn = RoomArn::parse("identifier", identifier)?;
        let upstream = self.scope("identifier", &arn)?.clone();
        validate::tag_keys("tagKeys", &keys)?;
        self.exchange(|rooms| async move {
            let write = async {
                rooms
                    .gone_if_not_found(&arn, upstream.untag_room(&arn, &keys, caller).await)
                    .await?;
                rooms
                    .read_tags_back(&arn, caller, |cached| {
                        for key in &keys {
                            cached.remove(key);
                        }
                    })
                    .await
            };
            rooms.in_write_turn(&arn, None, caller, write).await
        })
        .await
    }

    /// After a tag change: reads the room's tags back with
    /// ListTagsForResource (a quota of its own, twice GetRoom's) and applies
    /// them to the cached room, logged as ours; a room the cache does not
    /// hold is read whole with GetRoom. Tagging does not move updateTime, so
    /// the tags are what changed. Call in the room's write turn.
    pub(super) async fn read_tags_back(
        &self,
        arn: &RoomArn,
        caller: Caller,
        ours: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<Room> {
        let asked_at = Timestamp::now();
        let tags = match self.scope("identifier", arn)?.list_tags(arn, caller).await {
            Err(Error::NotFound { .. }) => {
                return self
                    .gone_if_not_found(arn, Err(Error::room_not_found(arn.as_str())))
                    .await;
            }
            Ok(tags) => tags,
            // The change is made, but IVS Chat could not say what the tags
            // are now (its budget, a fault): the cached tags with our change.
            Err(e) => {
                tracing::warn!(error = %e, %arn, "could not read a room's tags back: caching the change made");
                let Some(cached) = self.inner.store.get(arn).await?.filter(|c| !c.deleted) else {
                    return Err(e);
                };
                let mut tags = cached.room.tags;
                ours(&mut tags);
                tags
            }
        };
        match self
            .inner
            .store
            .put_tags(arn, &tags, asked_at, EventSource::Api)
            .await
        {
            Ok(Some(cached)) if !cached.room.details_pending => Ok(cached.room),
            // Not cached, or listed without its details: read it whole.
            Ok(_) => self.refresh(arn, EventSource::Api, caller).await,
            // IVS Chat has tagged the room; acknowledged once logged only.
            Err(e) => Err(unrecorded(arn.as_str(), &e)),
        }
    }
}
