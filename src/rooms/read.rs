//! Reads: a cached room while fresh, else one GetRoom per room for
//! concurrent readers (a flight), stale rows while IVS Chat cannot be asked;
//! and ListRooms from the cache.

use super::*;

/// A GetRoom of one room under way, shared by every reader that joins it.
pub(super) struct Flight {
    id: u64,
    /// Whether it asks IVS Chat whatever the cache holds.
    strong: bool,
    /// Whether it has (about to have) sent its call: a STRONG read that
    /// arrives later must not take its answer.
    sent: Arc<AtomicBool>,
    answer: Shared<BoxFuture<'static, Arc<Result<Room>>>>,
}

impl Rooms {
    /// A room, from the cache when it is fresh enough for `consistency`,
    /// otherwise from IVS Chat (one call shared by concurrent readers).
    pub async fn get(&self, identifier: &str, consistency: Consistency, caller: Caller) -> Read {
        let arn = match RoomArn::parse("identifier", identifier)
            .and_then(|arn| self.scope("identifier", &arn).map(|_| arn))
        {
            Ok(arn) => arn,
            Err(e) => return Read::failed(e),
        };
        // A cached read with a deadline is answered by it: what the cache (or
        // memory) holds, when IVS Chat or the database cannot answer in time.
        let deadline = match (consistency, caller) {
            (Consistency::Cached, Caller::User { deadline }) => deadline,
            _ => None,
        };
        let answer_by = deadline.map(|d| {
            let now = tokio::time::Instant::now();
            let margin = (d.saturating_duration_since(now) / 10).max(ANSWER_MARGIN);
            d.checked_sub(margin).unwrap_or(now).max(now)
        });
        // Whether there is something to answer with if IVS Chat cannot be
        // asked in time; only then is waiting for it cut short.
        let mut fallback = false;
        if consistency == Consistency::Cached {
            // Known away: memory answers at once, or nothing does (a read
            // through needs the database too, for the room's turn).
            if let Some(away) = self.inner.store.away() {
                return self.answer_from_memory(&arn, &away.describe());
            }
            match by(answer_by, self.cached(&arn)).await {
                Ok(Some(row)) if self.is_fresh(&row) => {
                    return Read {
                        cache: Some(CacheInfo::of(CacheStatus::Hit, &row)),
                        answer: cached_answer(row),
                    };
                }
                Ok(row) => fallback = row.is_some_and(|row| self.may_serve_stale(&row)),
                // The database did not answer: memory answers, or nothing.
                Err(Error::Unavailable { message, .. }) => {
                    self.inner.store.suspect(&message);
                    return self.answer_from_memory(&arn, &message);
                }
                Err(e) => return Read::failed(e),
            }
        }
        let fetch = self.fetch(&arn, consistency, caller);
        let fetched = by(answer_by.filter(|_| fallback), fetch).await;
        match fetched {
            Err(e) if consistency == Consistency::Cached && unanswerable_upstream(&e) => {
                // Anything the cache still holds, within the hard limit, beats
                // no answer; looked for by `answer_by`, so that the answer
                // from memory still reaches the caller in time.
                if let Some((row, status)) = self.last_known(&arn, answer_by).await
                    && self.may_serve_stale(&row)
                {
                    return Read {
                        cache: Some(CacheInfo::of(status, &row)),
                        answer: cached_answer(row),
                    };
                }
                Read {
                    answer: Err(e),
                    cache: Some(CacheInfo::MISS),
                }
            }
            answer => Read {
                answer: answer.map(Answer::Fetched),
                cache: Some(CacheInfo::MISS),
            },
        }
    }

    /// A cached read while the database does not answer this replica
    /// (`cause`): the row memory holds, marked stale whatever its age (other
    /// replicas' changes cannot reach this one meanwhile), within
    /// `--stale-if-error`; otherwise UNAVAILABLE at once, saying why.
    fn answer_from_memory(&self, arn: &RoomArn, cause: &str) -> Read {
        match self.inner.hot.last_known(arn) {
            Some(row) if self.may_serve_stale(&row) => Read {
                cache: Some(CacheInfo::of(CacheStatus::Stale, &row)),
                answer: cached_answer(row),
            },
            _ => Read {
                answer: Err(Error::unavailable(format!(
                    "{cause}, and this replica holds no copy of the room in memory \
                     recent enough to answer with"
                ))),
                cache: Some(CacheInfo::MISS),
            },
        }
    }

    /// Reads the room from IVS Chat into the cache, or joins a read of it
    /// already under way: any, for a cached read; for a STRONG read, a STRONG
    /// one that has not sent its call yet (so the answer is IVS Chat's as of
    /// after this request arrived).
    pub(super) async fn fetch(
        &self,
        arn: &RoomArn,
        consistency: Consistency,
        caller: Caller,
    ) -> Result<Room> {
        let strong = consistency == Consistency::Strong;
        let answer = {
            let mut flights = self.inner.flights.lock().expect("flights");
            match flights.get(arn) {
                Some(f) if !strong || (f.strong && !f.sent.load(Ordering::SeqCst)) => {
                    f.answer.clone()
                }
                _ => {
                    let id = self.inner.next_flight.fetch_add(1, Ordering::Relaxed);
                    let sent = Arc::new(AtomicBool::new(false));
                    let answer = self.fly(arn.clone(), id, strong, sent.clone(), caller);
                    flights.insert(
                        arn.clone(),
                        Flight {
                            id,
                            strong,
                            sent,
                            answer: answer.clone(),
                        },
                    );
                    answer
                }
            }
        };
        match &*answer.await {
            Ok(room) => Ok(room.clone()),
            Err(e) => Err(e.duplicate()),
        }
    }

    /// Starts flight `id`: a GetRoom of `arn` in an exchange of its own, with
    /// the room's turn; a non-strong flight first looks whether whoever had
    /// the turn before filled the cache.
    pub(super) fn fly(
        &self,
        arn: RoomArn,
        id: u64,
        strong: bool,
        sent: Arc<AtomicBool>,
        caller: Caller,
    ) -> Shared<BoxFuture<'static, Arc<Result<Room>>>> {
        let rooms = self.clone();
        let flight = async move {
            let answer = async {
                // Across replicas too: a flight of this room on another
                // replica (or a write) fills the cache before this one
                // looks at it, so concurrent cold reads of the room cost
                // one GetRoom for the whole fleet.
                let turn = rooms.turn(&arn).await?;
                let read = async {
                    if !strong
                        && let Some(row) = rooms.cached(&arn).await?
                        && rooms.is_fresh(&row)
                    {
                        return cached_answer(row).map(Answer::into_room);
                    }
                    sent.store(true, Ordering::SeqCst);
                    // A change found here was made behind this service's back.
                    rooms.refresh(&arn, EventSource::Reconciler, caller).await
                }
                .await;
                turn.release().await;
                read
            }
            .await;
            let mut flights = rooms.inner.flights.lock().expect("flights");
            if flights.get(&arn).is_some_and(|f| f.id == id) {
                flights.remove(&arn);
            }
            Arc::new(answer)
        };
        // In the trace of the request that started it, when traces are on.
        let task = self
            .inner
            .exchanges
            .spawn(flight.instrument(telemetry::traces::task_span()));
        async move {
            task.await.unwrap_or_else(|e| {
                Arc::new(Err(Error::Internal(anyhow::anyhow!(
                    "an exchange with IVS Chat failed: {e}"
                ))))
            })
        }
        .boxed()
        .shared()
    }

    /// A page of cached rooms of `region` (empty: of every region served,
    /// merged newest first, one paging token across them) and the change-log
    /// revision it reflects; waits (boundedly) for the first full listing of
    /// each region listed, which may be another replica's. Its age is the
    /// oldest confirmation on the page (of the oldest last full listing, for
    /// an empty page).
    pub async fn list(&self, query: ListQuery, region: &str) -> Result<Listing> {
        let regions: Vec<String> = if region.is_empty() {
            self.inner.upstreams.regions().map(str::to_owned).collect()
        } else {
            vec![
                self.inner
                    .upstreams
                    .of_region("region", region)?
                    .region()
                    .to_owned(),
            ]
        };
        validate::list_query(&query)?;
        let unlisted = |listed: &BTreeSet<String>| -> Vec<String> {
            regions
                .iter()
                .filter(|r| !listed.contains(*r))
                .cloned()
                .collect()
        };
        let wait = async {
            let mut listed = self.inner.listed.subscribe();
            let mut recheck = tokio::time::interval(LISTED_RECHECK);
            loop {
                let missing = unlisted(&listed.borrow_and_update());
                if missing.is_empty() {
                    return Ok(());
                }
                tokio::select! {
                    _ = listed.changed() => {}
                    _ = recheck.tick() => {
                        // The reconciler may run on another replica.
                        for region in missing {
                            if self.inner.store.full_listing_at(&region).await?.is_some() {
                                self.inner.listed.send_modify(|listed| {
                                    listed.insert(region);
                                });
                            }
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(self.inner.settings.listing_wait, wait).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let missing = unlisted(&self.inner.listed.borrow()).join(", ");
                return Err(Error::unavailable(format!(
                    "the cache is still being filled by a first full listing of IVS Chat in {missing}"
                ))
                .retry_after(LISTING_RETRY));
            }
        }
        // Only the regions served: a region no longer served leaves its rows.
        let only: Vec<&str> = regions.iter().map(String::as_str).collect();
        let (page, revision, validated_at) = self.inner.store.list(&query, &only).await?;
        let validated_at = match validated_at {
            Some(at) => Some(at),
            None => {
                let mut listed_at = Vec::new();
                for region in &regions {
                    listed_at.extend(self.inner.store.full_listing_at(region).await?);
                }
                listed_at.into_iter().min()
            }
        };
        Ok(Listing {
            page,
            revision,
            cache: CacheInfo {
                status: CacheStatus::Hit,
                age: validated_at.map(Timestamp::elapsed).unwrap_or_default(),
            },
        })
    }

    /// The cached row for `arn`: from memory when it holds one fresh enough
    /// to serve, otherwise from SQL (which memory then holds).
    pub(super) async fn cached(&self, arn: &RoomArn) -> Result<Option<Arc<HotRow>>> {
        let hot = &self.inner.hot;
        if let Some(row) = hot.get(arn)
            && self.is_fresh(&row)
        {
            return Ok(Some(row));
        }
        let (row, as_of) = self.inner.store.get_at_revision(arn).await?;
        Ok(row.map(|row| hot.fill(arn, row, as_of)))
    }

    /// The newest row this process can find for `arn` by `deadline`, and
    /// how fresh to call it: the cache's (a hit while fresh), or, while the
    /// database cannot answer in time, the one in memory (never older than
    /// a commit this process knows of; stale, as another replica's change
    /// may not have reached it).
    pub(super) async fn last_known(
        &self,
        arn: &RoomArn,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<(Arc<HotRow>, CacheStatus)> {
        match by(deadline, self.cached(arn)).await {
            Ok(row) => row.map(|row| {
                let status = if self.is_fresh(&row) {
                    CacheStatus::Hit
                } else {
                    CacheStatus::Stale
                };
                (row, status)
            }),
            // Not the hot layer's `get`: a change drops the room from it
            // until a read fills it again, and this read could not.
            Err(_) => self
                .inner
                .hot
                .last_known(arn)
                .map(|row| (row, CacheStatus::Stale)),
        }
    }

    /// Whether `row` may answer while IVS Chat cannot be asked.
    pub(super) fn may_serve_stale(&self, row: &CachedRoom) -> bool {
        answerable(row) && row.validated_at.elapsed() <= self.inner.settings.stale_if_error
    }

    /// Whether `row` answers a cached read without asking IVS Chat.
    pub(super) fn is_fresh(&self, row: &CachedRoom) -> bool {
        answerable(row) && row.validated_at.elapsed() <= self.inner.settings.max_staleness
    }
}

/// Whether `row` can answer a GetRoom at all: a room whose details are
/// pending (listed, not yet read whole) cannot; its tombstone can.
fn answerable(row: &CachedRoom) -> bool {
    row.deleted || !row.room.details_pending
}

/// A cached row's answer: NOT_FOUND for a tombstone.
fn cached_answer(row: Arc<HotRow>) -> Result<Answer> {
    if row.deleted {
        Err(Error::room_not_found(&row.room.arn))
    } else {
        Ok(Answer::Cached(row))
    }
}

/// The retry hint of a ListRooms refused while a first listing fills the
/// cache: a listing takes in 250 rooms a second, so most accounts' are done
/// within seconds.
const LISTING_RETRY: Duration = Duration::from_secs(1);

/// How long before its deadline, at least, a cached read gives up on IVS
/// Chat and the database, to answer from what it has.
pub(super) const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// `work`, or UNAVAILABLE if it has not finished by `at` (if given); the
/// work itself goes on where it runs in an exchange.
pub(super) async fn by<T>(
    at: Option<tokio::time::Instant>,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    match at {
        Some(at) => tokio::time::timeout_at(at, work).await.unwrap_or_else(|_| {
            Err(Error::unavailable(
                "neither IVS Chat nor the cache database answered before the request's deadline",
            ))
        }),
        None => work.await,
    }
}

/// IVS Chat could not be asked: down, throttling, or the budget could not
/// serve the call in time.
pub(super) fn unanswerable_upstream(e: &Error) -> bool {
    matches!(
        e,
        Error::Unavailable { .. } | Error::ResourceExhausted { .. }
    )
}
