//! `ivschat-rooms watch`: a WatchRooms client for people, printing one line
//! per event and resuming by itself after a disconnect.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::proto;
use super::proto::room_service_client::RoomServiceClient;
use super::proto::watch_rooms_response::Kind;
use crate::config::WatchArgs;

/// Watches until the server refuses for good (e.g. OUT_OF_RANGE), printing
/// to `out`. Disconnects and UNAVAILABLE are retried with backoff, resuming
/// after the last revision printed (or bookmarked).
pub async fn watch(args: WatchArgs, mut out: impl Write) -> anyhow::Result<()> {
    let mut endpoint = Channel::from_shared(args.server.clone())
        .with_context(|| format!("invalid server URL {}", args.server))?;
    if let Some(ca) = &args.tls_ca {
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("could not read {}", path.display()))
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some(identity) = &args.tls_identity {
            let pem = read(identity)?;
            tls = tls.identity(Identity::from_pem(&pem, &pem));
        }
        endpoint = endpoint.tls_config(tls).context("could not set up TLS")?;
    }
    let channel = endpoint.connect_lazy();
    let mut client = RoomServiceClient::new(channel);
    let authorization = match &args.token {
        Some(token) => Some(
            tonic::metadata::MetadataValue::try_from(format!("Bearer {}", token.expose()))
                .context("the token is not a valid header value")?,
        ),
        None => None,
    };
    let mut last = args.after_revision;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut request = tonic::Request::new(proto::WatchRoomsRequest {
            identifiers: args.rooms.clone(),
            after_revision: last,
            // Once anything was seen, a resume continues the stream instead.
            include_snapshot: args.snapshot && last.is_none(),
            regions: args.regions.clone(),
        });
        if let Some(authorization) = &authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        let status = match client.watch_rooms(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            backoff = Duration::from_millis(100);
                            if let Some(line) = render(message, args.json, &mut last) {
                                writeln!(out, "{line}")?;
                                out.flush()?;
                            }
                        }
                        Ok(None) => {
                            break tonic::Status::unavailable("the server ended the stream");
                        }
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        match status.code() {
            // A lost connection or a server going away: resume. Anything else
            // (a bad request, OUT_OF_RANGE, an internal error) is for a person.
            Code::Unavailable | Code::Unknown | Code::Cancelled => {
                tracing::warn!(
                    error = status.message(),
                    resume_after = ?last,
                    retry_in = ?backoff,
                    "watch interrupted; resuming"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            _ => anyhow::bail!("the server refused the watch: {status}"),
        }
    }
}

/// The line for one message, if it gets one; records the revision reached.
fn render(
    message: proto::WatchRoomsResponse,
    json: bool,
    last: &mut Option<u64>,
) -> Option<String> {
    match message.kind? {
        Kind::Progress(progress) => {
            *last = Some(progress.revision);
            // Bookmarks only move the resume point; the end of a snapshot is news.
            progress.snapshot_complete.then(|| {
                if json {
                    json!({ "type": "SNAPSHOT_COMPLETE", "revision": progress.revision })
                        .to_string()
                } else {
                    format!("{} SNAPSHOT_COMPLETE", progress.revision)
                }
            })
        }
        Kind::Event(event) => {
            if event.revision > 0 {
                *last = Some(event.revision);
            }
            let kind = proto::EventType::try_from(event.r#type)
                .map(|t| t.as_str_name().trim_start_matches("EVENT_TYPE_"))
                .unwrap_or("UNKNOWN");
            let source = proto::EventSource::try_from(event.source)
                .map(|s| s.as_str_name().trim_start_matches("EVENT_SOURCE_"))
                .unwrap_or("UNKNOWN");
            let room = event.room.unwrap_or_default();
            Some(if json {
                let mut line = json!({
                    "revision": event.revision,
                    "type": kind,
                    "arn": room.arn,
                    "room": room_json(&room),
                });
                if let Some(previous) = &event.previous {
                    line["previous"] = room_json(previous);
                }
                if event.source != 0 {
                    line["source"] = json!(source);
                    line["changed_fields"] = json!(event.changed_fields);
                    line["observed_at"] = json!(event.observed_at.map(rfc3339));
                }
                line.to_string()
            } else {
                let mut line = format!("{} {kind} {} name={}", event.revision, room.arn, room.name);
                if !event.changed_fields.is_empty() {
                    line.push_str(&format!(" changed={}", event.changed_fields.join(",")));
                }
                if event.source != 0 {
                    line.push_str(&format!(" source={source}"));
                }
                line
            })
        }
    }
}

fn room_json(room: &proto::Room) -> Value {
    json!({
        "arn": room.arn,
        "id": room.id,
        "name": room.name,
        "create_time": room.create_time.map(rfc3339),
        "update_time": room.update_time.map(rfc3339),
        "maximum_message_rate_per_second": room.maximum_message_rate_per_second,
        "maximum_message_length": room.maximum_message_length,
        "message_review_handler": room.message_review_handler.as_ref().map(|h| json!({
            "uri": h.uri,
            "fallback_result": proto::FallbackResult::try_from(h.fallback_result)
                .map(|f| f.as_str_name().trim_start_matches("FALLBACK_RESULT_"))
                .unwrap_or("UNKNOWN"),
        })),
        "tags": room.tags,
        "logging_configuration_identifiers": room.logging_configuration_identifiers,
    })
}

fn rfc3339(t: prost_types::Timestamp) -> String {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    crate::domain::Timestamp::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX)).to_string()
}
