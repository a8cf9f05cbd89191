//! One IVS Chat (one region's endpoint) through the real SDK: the calls, their
//! attempts through the budget, and the conversions of what they answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ivschat::Client;
use aws_sdk_ivschat::config::http::HttpResponse;
use aws_sdk_ivschat::config::{Credentials, Region};
use aws_sdk_ivschat::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ivschat::types;
use aws_smithy_types::DateTime;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::errors::{ValidationFields, throttling, transient};
use crate::budget::{Budget, Caller, Operation};
use crate::domain::{
    Error, FallbackResult, ListQuery, ListedPage, MessageReviewHandler, NewRoom, Result, Room,
    RoomArn, RoomPatch, RoomSummary, Timestamp,
};
use crate::telemetry::{self, traces};

/// A call that failed, and whether IVS Chat may have carried it out all the
/// same (this or an earlier attempt got a 5xx, no answer in time, a lost
/// connection).
#[derive(Debug)]
pub struct SendFailure {
    pub error: Error,
    pub maybe_carried_out: bool,
}

/// Retries and timeouts for every call upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// One attempt.
    pub timeout: Duration,
    /// Attempts per call, the first included (1 disables retries).
    pub max_attempts: u32,
}

/// The first retry waits about this long; each later one twice as long as
/// the one before, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Upstream {
    client: Client,
    region: Arc<str>,
    budget: Arc<dyn Budget>,
    max_attempts: u32,
}

/// Makes the budget of a region's calls, once the region is known.
pub type BudgetFor<'a> = &'a (dyn Fn(&str) -> Arc<dyn Budget> + Send + Sync);

impl Upstream {
    /// AWS in each of `regions` (the one region of aws-config's chain when
    /// empty), configured by aws-config's standard chain: environment,
    /// profile, IMDS; `AWS_ENDPOINT_URL_IVSCHAT` / `AWS_ENDPOINT_URL`
    /// override the endpoint of every region, and each client signs for its
    /// own. A region's calls spend `budget`'s for it.
    pub async fn aws(
        settings: UpstreamSettings,
        regions: &[String],
        budget: BudgetFor<'_>,
    ) -> anyhow::Result<Vec<Upstream>> {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeout_config(&settings))
            .load()
            .await;
        let regions = if regions.is_empty() {
            // Without a region every call would fail; say so now.
            let region = shared
                .region()
                .context("no AWS region configured: set --regions, AWS_REGION or a region in the AWS profile")?
                .to_string();
            vec![region]
        } else {
            regions.to_vec()
        };
        Ok(regions
            .iter()
            .map(|region| {
                let config = aws_sdk_ivschat::config::Builder::from(&shared)
                    .region(Region::new(region.clone()))
                    .build();
                Upstream::new(Client::from_conf(config), region, budget(region), &settings)
            })
            .collect())
    }

    /// An IVS Chat at `endpoint_url` that takes any credentials (the
    /// emulator); its calls spend `budget`.
    pub fn at_endpoint(
        endpoint_url: &str,
        region: &str,
        settings: UpstreamSettings,
        budget: Arc<dyn Budget>,
    ) -> Upstream {
        let config = aws_sdk_ivschat::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .credentials_provider(Credentials::new(
                "emulator", "emulator", None, None, "emulator",
            ))
            .endpoint_url(endpoint_url)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeout_config(&settings))
            .build();
        Upstream::new(Client::from_conf(config), region, budget, &settings)
    }

    fn new(
        client: Client,
        region: &str,
        budget: Arc<dyn Budget>,
        settings: &UpstreamSettings,
    ) -> Upstream {
        Upstream {
            client,
            region: region.into(),
            budget,
            max_attempts: settings.max_attempts.max(1),
        }
    }

    /// Waits until background work could be given a slot of `op` now: see
    /// [`Budget::ready_for_background`].
    pub async fn ready_for_background(&self, op: Operation) {
        self.budget.ready_for_background(op).await;
    }

    /// The region whose IVS Chat this is.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Sends one call through the budget, retrying throttling and transient
    /// failures (5xx, timeouts, connection failures) with backoff, within the
    /// caller's deadline.
    async fn call<T, E, Fut>(
        &self,
        op: Operation,
        caller: Caller,
        send: impl Fn() -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + ValidationFields + std::error::Error + Send + Sync + 'static,
    {
        self.attempts(op, caller, true, || std::future::ready(Ok(())), send)
            .await
            .map_err(|failure| failure.error)
    }

    /// [`Upstream::call`]'s loop. Before each send, once the budget has given
    /// a token, `ready` may still stop the call. Transient failures are
    /// retried only with `retry_transient`: a call that failed so may have
    /// been carried out.
    async fn attempts<T, E, Fut, Ready>(
        &self,
        op: Operation,
        caller: Caller,
        retry_transient: bool,
        ready: impl Fn() -> Ready,
        send: impl Fn() -> Fut,
    ) -> Result<T, SendFailure>
    where
        Ready: Future<Output = Result<()>>,
        Fut: Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + ValidationFields + std::error::Error + Send + Sync + 'static,
    {
        let mut backoff = FIRST_BACKOFF;
        let mut unanswered_before = false;
        for attempt in 1.. {
            // For traces only: the attempt, from its wait for the budget to
            // IVS Chat's answer (disabled, and free, while traces are off).
            let span = tracing::info_span!(
                target: traces::SPANS,
                "upstream.attempt",
                otel.name = %format_args!("IVSChat/{op}"),
                otel.kind = "client",
                operation = %op,
                region = %self.region,
                attempt,
                outcome = Empty,
                throttled = Empty,
                otel.status_code = Empty,
            );
            let sent = async {
                self.budget.acquire(op, caller).await?;
                ready().await?;
                metrics::counter!(
                    telemetry::UPSTREAM_CALLS,
                    "operation" => op.to_string(),
                    "region" => self.region.to_string(),
                )
                .increment(1);
                Ok(send().await)
            }
            .instrument(span.clone())
            .await;
            let err = match sent {
                Ok(Ok(out)) => {
                    span.record("outcome", "ok");
                    span.record("throttled", false);
                    self.budget.succeeded(op).await;
                    return Ok(out);
                }
                Err(error) => {
                    span.record("outcome", "not_sent");
                    span.record("otel.status_code", "error");
                    return Err(SendFailure {
                        error,
                        maybe_carried_out: unanswered_before,
                    });
                }
                Ok(Err(err)) => err,
            };
            let throttled = throttling(&err);
            span.record("throttled", throttled);
            let mut pause = None;
            if throttled {
                metrics::counter!(
                    telemetry::UPSTREAM_THROTTLES,
                    "operation" => op.to_string(),
                    "region" => self.region.to_string(),
                )
                .increment(1);
                pause = Some(self.budget.throttled(op).await);
            }
            let wait = backoff.mul_f64(rand::random_range(0.5..1.0));
            let in_time = match caller {
                Caller::User {
                    deadline: Some(deadline),
                } => tokio::time::Instant::now() + wait < deadline,
                _ => true,
            };
            let transient = transient(&err);
            span.record(
                "outcome",
                match (throttled, transient) {
                    (true, _) => "throttled",
                    (false, true) => "transient",
                    (false, false) => "error",
                },
            );
            span.record("otel.status_code", "error");
            let retry = throttled || (transient && retry_transient);
            if attempt >= self.max_attempts || !retry || !in_time {
                let error = Error::from(err);
                return Err(SendFailure {
                    // Throttled: a retry can succeed once the pause is over.
                    error: match pause {
                        Some(pause) => error.retry_after(pause),
                        None => error,
                    },
                    maybe_carried_out: transient || unanswered_before,
                });
            }
            unanswered_before |= transient;
            tracing::debug!(operation = %op, attempt, ?wait, "retrying an IVS Chat call");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        unreachable!("the attempts loop returns")
    }

    pub async fn create_room(&self, new: &NewRoom, caller: Caller) -> Result<Room> {
        let out = self
            .call(Operation::CreateRoom, caller, || {
                self.create_room_request(new).send()
            })
            .await?;
        room_from_output!(out)
    }

    /// CreateRoom for a creation that must not happen twice: `ready` is
    /// asked, once the budget has given a token, just before each send; a
    /// throttled call is retried, one that may have been carried out (a 5xx,
    /// no answer in time, a lost connection) is not, and its failure says so.
    pub async fn create_room_once<Ready>(
        &self,
        new: &NewRoom,
        caller: Caller,
        ready: impl Fn() -> Ready,
    ) -> Result<Room, SendFailure>
    where
        Ready: Future<Output = Result<()>>,
    {
        let out = self
            .attempts(Operation::CreateRoom, caller, false, ready, || {
                self.create_room_request(new).send()
            })
            .await?;
        // An answer without a room: created, but unreadable.
        let room = || room_from_output!(out);
        room().map_err(|error| SendFailure {
            error,
            maybe_carried_out: true,
        })
    }

    fn create_room_request(
        &self,
        new: &NewRoom,
    ) -> aws_sdk_ivschat::operation::create_room::builders::CreateRoomFluentBuilder {
        self.client
            .create_room()
            .name(&new.name)
            .set_maximum_message_rate_per_second(new.maximum_message_rate_per_second)
            .set_maximum_message_length(new.maximum_message_length)
            .set_message_review_handler(new.message_review_handler.as_ref().map(to_sdk_handler))
            .set_tags(Some(new.tags.clone().into_iter().collect()))
            .set_logging_configuration_identifiers(Some(
                new.logging_configuration_identifiers.clone(),
            ))
    }

    pub async fn get_room(&self, arn: &RoomArn, caller: Caller) -> Result<Room> {
        let out = self
            .call(Operation::GetRoom, caller, || {
                self.client.get_room().identifier(arn.as_str()).send()
            })
            .await?;
        room_from_output!(out)
    }

    pub async fn update_room(
        &self,
        arn: &RoomArn,
        patch: &RoomPatch,
        caller: Caller,
    ) -> Result<Room> {
        let out = self
            .call(Operation::UpdateRoom, caller, || {
                self.client
                    .update_room()
                    .identifier(arn.as_str())
                    .set_name(patch.name.clone())
                    .set_maximum_message_rate_per_second(patch.maximum_message_rate_per_second)
                    .set_maximum_message_length(patch.maximum_message_length)
                    .set_message_review_handler(
                        patch.message_review_handler.as_ref().map(to_sdk_handler),
                    )
                    .set_logging_configuration_identifiers(
                        patch.logging_configuration_identifiers.clone(),
                    )
                    .send()
            })
            .await?;
        room_from_output!(out)
    }

    /// DeleteRoom. A retry that finds the room gone after an attempt went
    /// unanswered counts as done: that attempt may have deleted it.
    pub async fn delete_room(&self, arn: &RoomArn, caller: Caller) -> Result<()> {
        let sent = self
            .attempts(
                Operation::DeleteRoom,
                caller,
                true,
                || std::future::ready(Ok(())),
                || self.client.delete_room().identifier(arn.as_str()).send(),
            )
            .await;
        match sent {
            Ok(_)
            | Err(SendFailure {
                error: Error::NotFound { .. },
                maybe_carried_out: true,
            }) => Ok(()),
            Err(failure) => Err(failure.error),
        }
    }

    pub async fn list_rooms(
        &self,
        query: &ListQuery,
        caller: Caller,
    ) -> Result<ListedPage<RoomSummary>> {
        let out = self
            .call(Operation::ListRooms, caller, || {
                self.client
                    .list_rooms()
                    .set_name(query.name.clone())
                    .set_message_review_handler_uri(query.message_review_handler_uri.clone())
                    .set_logging_configuration_identifier(
                        query.logging_configuration_identifier.clone(),
                    )
                    .set_max_results(query.max_results)
                    .set_next_token(query.next_token.clone())
                    .send()
            })
            .await?;
        let rooms = out
            .rooms()
            .iter()
            .map(|s| {
                Ok(RoomSummary {
                    arn: required("arn", s.arn())?.to_owned(),
                    id: required("id", s.id())?.to_owned(),
                    name: s.name().unwrap_or_default().to_owned(),
                    create_time: timestamp(required("createTime", s.create_time())?),
                    update_time: timestamp(required("updateTime", s.update_time())?),
                    message_review_handler: from_sdk_handler(s.message_review_handler()),
                    tags: s
                        .tags()
                        .map(|t| t.clone().into_iter().collect())
                        .unwrap_or_default(),
                    logging_configuration_identifiers: s
                        .logging_configuration_identifiers()
                        .to_vec(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(ListedPage {
            rooms,
            next_token: out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }

    /// IVS Chat's listing for `query` (newest updateTime first), page by
    /// page, each page one ListRooms call as `caller`: the one paging loop
    /// of the reconciler's passes and of the search for a created room.
    pub fn pages(&self, query: ListQuery, caller: Caller) -> Pages<'_> {
        Pages {
            upstream: self,
            query,
            caller,
            done: false,
        }
    }

    pub async fn tag_room(
        &self,
        arn: &RoomArn,
        tags: &BTreeMap<String, String>,
        caller: Caller,
    ) -> Result<()> {
        self.call(Operation::TagResource, caller, || {
            self.client
                .tag_resource()
                .resource_arn(arn.as_str())
                .set_tags(Some(tags.clone().into_iter().collect()))
                .send()
        })
        .await?;
        Ok(())
    }

    pub async fn untag_room(&self, arn: &RoomArn, keys: &[String], caller: Caller) -> Result<()> {
        self.call(Operation::UntagResource, caller, || {
            self.client
                .untag_resource()
                .resource_arn(arn.as_str())
                .set_tag_keys(Some(keys.to_vec()))
                .send()
        })
        .await?;
        Ok(())
    }

    /// The room's tags, read with ListTagsForResource (a quota of its own,
    /// 10 per second, apart from GetRoom's 5).
    pub async fn list_tags(
        &self,
        arn: &RoomArn,
        caller: Caller,
    ) -> Result<BTreeMap<String, String>> {
        let out = self
            .call(Operation::ListTagsForResource, caller, || {
                self.client
                    .list_tags_for_resource()
                    .resource_arn(arn.as_str())
                    .send()
            })
            .await?;
        Ok(out.tags.into_iter().collect())
    }
}

/// The pages of one listing; see [`Upstream::pages`].
pub struct Pages<'a> {
    upstream: &'a Upstream,
    query: ListQuery,
    caller: Caller,
    done: bool,
}

impl Pages<'_> {
    /// The next page, or `None` after the last one.
    pub async fn next(&mut self) -> Result<Option<ListedPage<RoomSummary>>> {
        if self.done {
            return Ok(None);
        }
        let page = self.upstream.list_rooms(&self.query, self.caller).await?;
        match &page.next_token {
            Some(token) => self.query.next_token = Some(token.clone()),
            None => self.done = true,
        }
        Ok(Some(page))
    }
}

fn timeout_config(settings: &UpstreamSettings) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
        .operation_timeout(settings.timeout)
        .build()
}

/// GetRoom, CreateRoom and UpdateRoom answer with the same members.
macro_rules! room_from_output {
    ($out:expr) => {{
        let out = $out;
        Ok::<Room, Error>(Room {
            arn: required("arn", out.arn)?,
            id: required("id", out.id)?,
            name: out.name.unwrap_or_default(),
            create_time: timestamp(&required("createTime", out.create_time)?),
            update_time: timestamp(&required("updateTime", out.update_time)?),
            maximum_message_rate_per_second: out
                .maximum_message_rate_per_second
                .unwrap_or(Room::DEFAULT_MAXIMUM_MESSAGE_RATE_PER_SECOND),
            maximum_message_length: out
                .maximum_message_length
                .unwrap_or(Room::DEFAULT_MAXIMUM_MESSAGE_LENGTH),
            message_review_handler: from_sdk_handler(out.message_review_handler.as_ref()),
            tags: out.tags.unwrap_or_default().into_iter().collect(),
            logging_configuration_identifiers: out
                .logging_configuration_identifiers
                .unwrap_or_default(),
            details_pending: false,
        })
    }};
}
use room_from_output;

fn required<T>(member: &str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| {
        Error::Internal(anyhow::anyhow!(
            "IVS Chat answered without the required member {member}"
        ))
    })
}

fn timestamp(t: &DateTime) -> Timestamp {
    Timestamp::from_nanos(i64::try_from(t.as_nanos()).unwrap_or(i64::MAX))
}

fn to_sdk_handler(h: &MessageReviewHandler) -> types::MessageReviewHandler {
    types::MessageReviewHandler::builder()
        .uri(&h.uri)
        .fallback_result(match h.fallback_result {
            FallbackResult::Allow => types::FallbackResult::Allow,
            FallbackResult::Deny => types::FallbackResult::Deny,
        })
        .build()
}

/// A handler with an empty uri is no handler.
fn from_sdk_handler(h: Option<&types::MessageReviewHandler>) -> Option<MessageReviewHandler> {
    let h = h?;
    let uri = h.uri().filter(|u| !u.is_empty())?;
    Some(MessageReviewHandler {
        uri: uri.to_owned(),
        fallback_result: match h.fallback_result() {
            Some(types::FallbackResult::Deny) => FallbackResult::Deny,
            _ => FallbackResult::Allow,
        },
    })
}
