//! CreateRoom request_ids (AIP-155): which request created which room.
//!
//! A row is a claim on a request_id. Its owner (one attempt of one process)
//! holds it until `lease_until` and renews it while it works; once the room
//! exists the row records it, and from then on answers every retry. A claim
//! whose owner stopped renewing can be taken over by a retry, which first
//! looks in IVS Chat for the room the owner may have created. Each step is one
//! conditional statement, so replicas sharing the database agree on who owns
//! a request_id whatever the interleaving.

use anyhow::Context as _;
use sqlx::Row as _;

use crate::domain::{Result, Room, Timestamp};

use super::Store;

/// What a request_id's row says to a caller that tried to claim it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the claim: it may create the room.
    Won,
    /// The room was created: as the first CreateRoom returned it.
    Done(Room),
    /// Another attempt holds (or held) the claim.
    Held {
        owner: String,
        lease_until: Timestamp,
        /// When the request_id was first claimed: a room it created is no older.
        claimed_at: Timestamp,
    },
    /// The request_id was used with other parameters.
    OtherParameters,
}

impl Store {
    /// Claims `request_id` for `owner` until `lease_until`, unless it is
    /// claimed already: a row claimed before `expired_before` is forgotten
    /// (past the retention window) and claimed afresh.
    pub async fn claim_request(
        &self,
        request_id: &str,
        fingerprint: &str,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        expired_before: Timestamp,
    ) -> Result<Claim> {
        self.bounded(async {
            // A row released between the two statements: claim again.
            loop {
                let won = sqlx::query(
                    "INSERT INTO create_requests \
                   (request_id, fingerprint, claimed_at, owner, lease_until, arn, room) \
                 VALUES ($1, $2, $3, $4, $5, NULL, NULL) \
                 ON CONFLICT (request_id) DO UPDATE SET \
                   fingerprint = excluded.fingerprint, claimed_at = excluded.claimed_at, \
                   owner = excluded.owner, lease_until = excluded.lease_until, \
                   arn = NULL, room = NULL \
                 WHERE create_requests.claimed_at < $6 \
                 RETURNING request_id",
                )
                .bind(request_id)
                .bind(fingerprint)
                .bind(now.as_nanos())
                .bind(owner)
                .bind(lease_until.as_nanos())
                .bind(expired_before.as_nanos())
                .fetch_optional(&self.pool)
                .await?;
                if won.is_some() {
                    return Ok(Claim::Won);
                }
                let row = sqlx::query(
                    "SELECT fingerprint, claimed_at, owner, lease_until, room \
                 FROM create_requests WHERE request_id = $1",
                )
                .bind(request_id)
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { continue };
                if row.try_get::<String, _>(0)? != fingerprint {
                    return Ok(Claim::OtherParameters);
                }
                if let Some(room) = row.try_get::<Option<String>, _>(4)? {
                    let room =
                        serde_json::from_str(&room).context("corrupt room in create_requests")?;
                    return Ok(Claim::Done(room));
                }
                return Ok(Claim::Held {
                    owner: row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
                    lease_until: Timestamp::from_nanos(
                        row.try_get::<Option<i64>, _>(3)?.unwrap_or_default(),
                    ),
                    claimed_at: Timestamp::from_nanos(row.try_get(1)?),
                });
            }
        })
        .await
    }

    /// Takes over a claim from `from`, whose lease ended before
    /// `expired_before`, for `owner` until `lease_until`. Whether it did.
    pub async fn take_over_request(
        &self,
        request_id: &str,
        from: &str,
        owner: &str,
        lease_until: Timestamp,
        expired_before: Timestamp,
    ) -> Result<bool> {
        self.bounded(async {
            let result = sqlx::query(
                "UPDATE create_requests SET owner = $3, lease_until = $4 \
             WHERE request_id = $1 AND owner = $2 AND room IS NULL AND lease_until < $5",
            )
            .bind(request_id)
            .bind(from)
            .bind(owner)
            .bind(lease_until.as_nanos())
            .bind(expired_before.as_nanos())
            .execute(&self.pool)
            .await?;
            Ok(result.rows_affected() == 1)
        })
        .await
    }

    /// Extends (or, with an earlier time, shortens) `owner`'s claim to
    /// `lease_until`. Whether `owner` still held it.
    pub async fn renew_request(
        &self,
        request_id: &str,
        owner: &str,
        lease_until: Timestamp,
    ) -> Result<bool> {
        self.bounded(async {
            let result = sqlx::query(
                "UPDATE create_requests SET lease_until = $3 \
             WHERE request_id = $1 AND owner = $2 AND room IS NULL",
            )
            .bind(request_id)
            .bind(owner)
            .bind(lease_until.as_nanos())
            .execute(&self.pool)
            .await?;
            Ok(result.rows_affected() == 1)
        })
        .await
    }

    /// Records that `owner`'s request created `room` (as returned to it).
    /// Whether `owner` still held the claim.
    pub async fn complete_request(
        &self,
        request_id: &str,
        owner: &str,
        room: &Room,
    ) -> Result<bool> {
        self.bounded(async {
            let result = sqlx::query(
                "UPDATE create_requests SET arn = $3, room = $4, lease_until = NULL \
             WHERE request_id = $1 AND owner = $2 AND room IS NULL",
            )
            .bind(request_id)
            .bind(owner)
            .bind(room.arn.as_str())
            .bind(serde_json::to_string(room).context("could not encode a room")?)
            .execute(&self.pool)
            .await?;
            Ok(result.rows_affected() == 1)
        })
        .await
    }

    /// Gives up `owner`'s claim: no room was created, the next attempt
    /// starts afresh.
    pub async fn release_request(&self, request_id: &str, owner: &str) -> Result<()> {
        self.bounded(async {
            sqlx::query(
                "DELETE FROM create_requests WHERE request_id = $1 AND owner = $2 AND room IS NULL",
            )
            .bind(request_id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Forgets request_ids first claimed before `before`. How many.
    pub async fn purge_requests(&self, before: Timestamp) -> Result<u64> {
        self.bounded(async {
            let result = sqlx::query("DELETE FROM create_requests WHERE claimed_at < $1")
                .bind(before.as_nanos())
                .execute(&self.pool)
                .await?;
            Ok(result.rows_affected())
        })
        .await
    }
}

/// CreateRoom calls in flight on any replica sharing the database (Postgres;
/// a SQLite cache serves one process, which counts its own): see
/// `creations_in_flight` in the migrations.
impl Store {
    /// Records a CreateRoom about to be sent, for at most `lasts`; returns
    /// its mark (`None` on SQLite).
    pub async fn begin_creation(&self, lasts: std::time::Duration) -> Result<Option<String>> {
        self.bounded(async {
            if !self.is_shared() {
                return Ok(None);
            }
            let id = format!("{:032x}", rand::random::<u128>());
            sqlx::query(concat!(
                "INSERT INTO creations_in_flight (id, until) VALUES ($1, ",
                super::budget::db_now!(),
                " + $2)"
            ))
            .bind(&id)
            .bind(i64::try_from(lasts.as_nanos()).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
            Ok(Some(id))
        })
        .await
    }

    /// The CreateRoom of `mark` is over (its room cached, or it failed);
    /// marks a crash left behind that ran out go too. Retried for a while
    /// when the database is away: a mark left standing holds new rooms back
    /// from the reconciler until it runs out.
    pub async fn end_creation(&self, mark: Option<String>) {
        let Some(id) = mark else { return };
        let mut backoff = std::time::Duration::from_millis(100);
        let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ended = sqlx::query(concat!(
                "DELETE FROM creations_in_flight WHERE id = $1 OR until < ",
                super::budget::db_now!()
            ))
            .bind(&id)
            .execute(&self.pool)
            .await;
            match ended {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() + backoff < give_up => {
                    tracing::debug!(error = %e, "could not record the end of a CreateRoom yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                }
                Err(e) => {
                    // It runs out by itself.
                    tracing::warn!(error = %e, "could not record the end of a CreateRoom");
                    return;
                }
            }
        }
    }

    /// Whether a CreateRoom may be in flight on another replica.
    pub async fn creations_in_flight(&self) -> Result<bool> {
        self.bounded(async {
            if !self.is_shared() {
                return Ok(false);
            }
            let any: bool = sqlx::query_scalar(concat!(
                "SELECT EXISTS (SELECT 1 FROM creations_in_flight WHERE until > ",
                super::budget::db_now!(),
                ")"
            ))
            .fetch_one(&self.pool)
            .await?;
            Ok(any)
        })
        .await
    }
}
