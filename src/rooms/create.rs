//! CreateRoom with a request_id (AIP-155): at most one room per request_id
//! within the retention window, across retries, restarts and replicas.
//!
//! The cache database holds a claim per request_id (`store::requests`):
//! - The first call claims it and creates the room, tagged
//!   `REQUEST_ID_TAG = request_id`, renewing the claim's lease while it works
//!   and once more just before sending (a claim it no longer holds stops it).
//!   The room it created is recorded, and answers every retry as the first
//!   call returned it.
//! - A retry while the claim is held waits for it: polling the database, which
//!   is how it hears of another replica's progress.
//! - A claim whose lease ran out (its holder crashed, or its call to IVS Chat
//!   ended without an answer) is taken over after one more lease, in which IVS
//!   Chat's listing shows a room created just before; the new holder looks
//!   there for a room carrying the tag before creating one.
//! - A call IVS Chat certainly refused gives the claim up: the next call
//!   starts afresh. One that may have been carried out (5xx, timeout) ends
//!   the lease instead, so that the next call looks for the room first.
//!
//! Left open: a writer that removes the tag from the room before a crashed
//! creation is recovered, or an IVS Chat listing that lags more than a lease.

use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::budget::Caller;
use crate::domain::validate::{MAX_ROOM_RESULTS, REQUEST_ID_TAG};
use crate::domain::{Error, EventSource, ListQuery, NewRoom, Result, Room, RoomArn, Timestamp};
use crate::store::Claim;
use crate::upstream::Upstream;

use super::Rooms;

/// How often a call waiting for another's claim looks again, at first and
/// at most.
const FIRST_POLL: Duration = Duration::from_millis(20);
const MAX_POLL: Duration = Duration::from_millis(500);

/// How much older than its claim a room carrying the tag may look (clocks of
/// this host and IVS Chat disagreeing).
const CLOCK_MARGIN: Duration = Duration::from_secs(60);

impl Rooms {
    /// Creates the room `request_id` names, or answers with the room it
    /// already created; while another call holds the request_id, waits.
    pub(super) async fn create_once(
        &self,
        request_id: String,
        new: NewRoom,
        upstream: Upstream,
        caller: Caller,
    ) -> Result<Room> {
        let fingerprint = fingerprint(&new);
        let mut poll = FIRST_POLL;
        loop {
            let request = Request {
                request_id: request_id.clone(),
                fingerprint: fingerprint.clone(),
                new: new.clone(),
                upstream: upstream.clone(),
            };
            // In an exchange: a client that gives up cannot leave a claim
            // that nobody works on.
            let tried = self
                .exchange(move |rooms| async move { rooms.try_create(request, caller).await })
                .await?;
            if let Some(room) = tried {
                return Ok(room);
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(MAX_POLL);
        }
    }

    /// One try: the room recorded for the request_id, or the room created
    /// after claiming it (or taking an abandoned claim over); `None` while
    /// another call holds it.
    async fn try_create(&self, request: Request, caller: Caller) -> Result<Option<Room>> {
        let settings = self.inner.settings;
        let store = &self.inner.store;
        let owner = format!("{:032x}", rand::random::<u128>());
        let now = Timestamp::now();
        let lease_until = now.saturating_add(settings.request_id_lease);
        let expired_before = now.saturating_sub(settings.request_id_retention);
        let claim = store
            .claim_request(
                &request.request_id,
                &request.fingerprint,
                &owner,
                now,
                lease_until,
                expired_before,
            )
            .await?;
        let search_since = match claim {
            // The fingerprint leaves the region out, as it did when one
            // region was served (a retry across the upgrade still matches).
            Claim::Done(room)
                if RoomArn::parse("arn", &room.arn)?.region() != request.upstream.region() =>
            {
                return Err(Error::invalid(
                    "request_id",
                    format!(
                        "was used for a room in another region ({}): a retry must send the same request",
                        room.arn
                    ),
                ));
            }
            Claim::Done(room) => return Ok(Some(room)),
            Claim::OtherParameters => {
                return Err(Error::invalid(
                    "request_id",
                    "was used with other parameters: a retry must send the same request",
                ));
            }
            Claim::Won => {
                let store = store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.purge_requests(expired_before).await {
                        tracing::warn!(error = %e, "could not forget expired request_ids");
                    }
                });
                None
            }
            Claim::Held {
                owner: holder,
                lease_until: held_until,
                claimed_at,
            } => {
                // Abandoned: ran out a lease ago, time enough for IVS
                // Chat's listing to show a room its holder created.
                let abandoned_before = now.saturating_sub(settings.request_id_lease);
                let taken = held_until < abandoned_before
                    && store
                        .take_over_request(
                            &request.request_id,
                            &holder,
                            &owner,
                            lease_until,
                            abandoned_before,
                        )
                        .await?;
                if !taken {
                    return Ok(None);
                }
                Some(claimed_at)
            }
        };
        let claim = Held {
            request_id: request.request_id,
            owner,
            new: request.new,
            upstream: request.upstream,
            search_since,
        };
        self.create_claimed(claim, caller).await.map(Some)
    }

    /// Creates the room of a claim this call holds (after looking for it in
    /// IVS Chat, when taken over), renewing the claim while it works.
    async fn create_claimed(&self, claim: Held, caller: Caller) -> Result<Room> {
        let store = &self.inner.store;
        let lease = self.inner.settings.request_id_lease;
        let Held {
            request_id,
            owner,
            new,
            upstream,
            search_since,
        } = claim;
        let renew = |until: Timestamp| store.renew_request(&request_id, &owner, until);
        let heartbeat = async {
            loop {
                tokio::time::sleep(lease / 3).await;
                if let Err(e) = renew(Timestamp::now().saturating_add(lease)).await {
                    tracing::warn!(error = %e, "could not renew a request_id's claim");
                }
            }
        };
        let work = self.creating(async {
            if let Some(since) = search_since {
                match self
                    .find_created(&upstream, &request_id, since, caller)
                    .await
                {
                    Ok(Some(room)) => return Ok(room),
                    Ok(None) => {}
                    Err(e) => {
                        // The next call looks again, a lease from now.
                        if let Err(e) = renew(Timestamp::now()).await {
                            tracing::warn!(error = %e, "could not settle a request_id's claim");
                        }
                        return Err(e);
                    }
                }
            }
            let mut new = new;
            new.tags
                .insert(REQUEST_ID_TAG.to_owned(), request_id.clone());
            let asked_at = Timestamp::now();
            let ready = || async {
                if renew(Timestamp::now().saturating_add(lease)).await? {
                    Ok(())
                } else {
                    Err(Error::Conflict(
                        "another call took this request_id over; retry to get its room".into(),
                    ))
                }
            };
            match upstream.create_room_once(&new, caller, ready).await {
                // Unrecorded, the claim runs out and a retry finds the
                // room by its tag.
                Ok(room) => self.keep_ours(room, asked_at).await,
                Err(failure) => {
                    // The next call looks for the room before creating one,
                    // also after a takeover (a room may exist that the
                    // search missed).
                    let settled = if failure.maybe_carried_out || search_since.is_some() {
                        renew(Timestamp::now()).await.map(drop)
                    } else {
                        store.release_request(&request_id, &owner).await
                    };
                    if let Err(e) = settled {
                        tracing::warn!(error = %e, "could not settle a request_id's claim");
                    }
                    Err(failure.error)
                }
            }
        });
        let room = tokio::select! {
            biased;
            room = work => room?,
            () = heartbeat => unreachable!("the heartbeat never ends"),
        };
        match store.complete_request(&request_id, &owner, &room).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                arn = %room.arn,
                "a request_id's claim was taken over while its room was created"
            ),
            // The claim runs out; the next call finds the room by its tag.
            Err(e) => {
                tracing::warn!(error = %e, arn = %room.arn, "could not record a request_id's room")
            }
        }
        Ok(room)
    }

    /// The room carrying `REQUEST_ID_TAG = request_id`, created no earlier
    /// than `since`, if IVS Chat lists one: it lists newest updateTime first,
    /// so paging stops at rooms older than that.
    async fn find_created(
        &self,
        upstream: &Upstream,
        request_id: &str,
        since: Timestamp,
        caller: Caller,
    ) -> Result<Option<Room>> {
        let oldest = since.saturating_sub(CLOCK_MARGIN);
        let query = ListQuery {
            max_results: Some(MAX_ROOM_RESULTS.max),
            ..ListQuery::default()
        };
        let mut pages = upstream.pages(query, caller);
        while let Some(page) = pages.next().await? {
            let found = page
                .rooms
                .iter()
                .find(|r| r.tags.get(REQUEST_ID_TAG).map(String::as_str) == Some(request_id))
                .map(|r| RoomArn::parse("arn", &r.arn))
                .transpose()?;
            if let Some(arn) = found {
                let turn = self.turn(&arn).await?;
                let found = self.refresh(&arn, EventSource::Api, caller).await;
                turn.release().await;
                return found.map(Some);
            }
            // Newest first: past the claim, the room cannot be further down.
            if page.rooms.last().is_none_or(|r| r.update_time < oldest) {
                break;
            }
        }
        Ok(None)
    }
}

/// A CreateRoom with a request_id.
struct Request {
    request_id: String,
    /// See [`fingerprint`].
    fingerprint: String,
    new: NewRoom,
    /// The IVS Chat of the region the room is created in.
    upstream: Upstream,
}

/// A claim this call holds, and what it is for.
struct Held {
    request_id: String,
    owner: String,
    new: NewRoom,
    upstream: Upstream,
    /// Set when taken over: look in IVS Chat for a room created since.
    search_since: Option<Timestamp>,
}

/// The request's parameters, canonically (field by field, tags sorted),
/// hashed: equal for a faithful retry, different for another request.
fn fingerprint(new: &NewRoom) -> String {
    let canonical = serde_json::json!({
        "name": new.name,
        "maximumMessageRatePerSecond": new.maximum_message_rate_per_second,
        "maximumMessageLength": new.maximum_message_length,
        "messageReviewHandler": new.message_review_handler.as_ref().map(|h| {
            serde_json::json!({ "uri": h.uri, "fallbackResult": h.fallback_result.as_str() })
        }),
        "tags": new.tags,
        "loggingConfigurationIdentifiers": new.logging_configuration_identifiers,
    });
    Sha256::digest(canonical.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn fingerprints_tell_requests_apart() {
        let new = NewRoom {
            name: "a".into(),
            tags: BTreeMap::from([("k".into(), "v".into())]),
            ..NewRoom::default()
        };
        assert_eq!(fingerprint(&new), fingerprint(&new.clone()));
        assert_eq!(fingerprint(&new).len(), 64);
        let mut other = new.clone();
        other.tags.insert("k".into(), "w".into());
        assert_ne!(fingerprint(&new), fingerprint(&other));
        let mut other = new.clone();
        other.maximum_message_length = Some(500);
        assert_ne!(fingerprint(&new), fingerprint(&other));
    }
}
