//! OpenTelemetry traces from the real binary: exported over OTLP/gRPC (to a
//! receiver in the test) when the standard variables name an endpoint, the
//! caller's W3C trace context continued, trace ids in JSON log lines; and
//! none of it when no endpoint is named.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::binary::{BIN, Server, within};
use common::{TestDb, proto};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;

/// The trace and parent span the tests' requests come from.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
const GET_ROOM: &str = "ivschat.rooms.v1.RoomService/GetRoom";

on_both_backends!(a_traced_miss_exports_its_server_upstream_and_cache_spans);

/// A traced GetRoom of a room the cache has never seen continues the
/// caller's trace: a server span named for the method, child of the span
/// sent in `traceparent`; under it the GetRoom attempt sent to IVS Chat and
/// the cache transaction that kept its answer.
async fn a_traced_miss_exports_its_server_upstream_and_cache_spans(db: TestDb) {
    let receiver = Receiver::start().await;
    let (_emulator, emulator_url) = common::emulator().await;
    let server = serve(&db, &emulator_url, &receiver.traced()).await;
    let arn = new_room_behind_the_cache(&server, &emulator_url).await;

    let response = server
        .client()
        .await
        .get_room(traced(get(&arn)))
        .await
        .expect("GetRoom");
    assert_eq!(response.metadata().get("x-cache").unwrap(), "miss");

    let trace = receiver
        .until(
            "the server, attempt and cache spans of the trace",
            |spans| {
                let trace: Vec<Span> = spans
                    .iter()
                    .filter(|s| hex(&s.span.trace_id) == TRACE_ID)
                    .map(|s| s.span.clone())
                    .collect();
                let has = |name: &str| trace.iter().any(|s| s.name == name);
                (has(GET_ROOM) && has("IVSChat/GetRoom") && has("cache.put")).then_some(trace)
            },
        )
        .await;
    let named = |name: &str| trace.iter().find(|s| s.name == name).unwrap();

    let server_span = named(GET_ROOM);
    assert_eq!(hex(&server_span.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(server_span.kind, SpanKind::Server as i32);
    let server_attributes = attributes(server_span);
    assert_eq!(server_attributes["rpc.system"], "grpc");
    assert_eq!(
        server_attributes["rpc.service"],
        "ivschat.rooms.v1.RoomService"
    );
    assert_eq!(server_attributes["rpc.method"], "GetRoom");
    assert_eq!(server_attributes["rpc.grpc.status_code"], "0");

    let attempt = named("IVSChat/GetRoom");
    assert!(descends(attempt, server_span, &trace), "{trace:#?}");
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    let attempt_attributes = attributes(attempt);
    assert_eq!(attempt_attributes["operation"], "GetRoom");
    assert_eq!(attempt_attributes["region"], "us-east-1");
    assert_eq!(attempt_attributes["attempt"], "1");
    assert_eq!(attempt_attributes["outcome"], "ok");
    assert_eq!(attempt_attributes["throttled"], "false");

    let put = named("cache.put");
    assert!(descends(put, server_span, &trace), "{trace:#?}");
    let backend = if db.url.starts_with("postgres") {
        "postgresql"
    } else {
        "sqlite"
    };
    assert_eq!(attributes(put)["db.system"], backend);

    let services = receiver.services();
    assert_eq!(services, ["ivschat-rooms-test"], "OTEL_SERVICE_NAME");
    let (status, log) = server.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
}

/// While traces are exported, a JSON log line logged in a request's span
/// carries the trace id and the span id (hex) of that span.
#[tokio::test]
async fn json_log_lines_carry_trace_and_span_ids_while_tracing() {
    let receiver = Receiver::start().await;
    let db = TestDb::sqlite();
    let (_emulator, emulator_url) = common::emulator().await;
    let server = serve(&db, &emulator_url, &receiver.traced()).await;
    let arn = new_room_behind_the_cache(&server, &emulator_url).await;
    server
        .client()
        .await
        .get_room(traced(get(&arn)))
        .await
        .expect("GetRoom");
    let server_span = receiver
        .until("the server span", |spans| {
            spans
                .iter()
                .find(|s| hex(&s.span.trace_id) == TRACE_ID && s.span.name == GET_ROOM)
                .map(|s| s.span.clone())
        })
        .await;

    let (status, log) = server.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
    let access = access_line(&log);
    assert_eq!(access["trace_id"], TRACE_ID, "{access}");
    assert_eq!(access["span_id"], hex(&server_span.span_id), "{access}");
    // Lines outside any span have none.
    let serving = json_lines(&log)
        .into_iter()
        .find(|line| line["fields"]["message"] == "serving ivschat.rooms.v1.RoomService")
        .expect("the serving line");
    assert!(serving.get("trace_id").is_none(), "{serving}");
}

/// Every span still unexported when the server stops (SIGTERM) is exported
/// before it exits.
#[tokio::test]
async fn spans_are_exported_on_shutdown() {
    let receiver = Receiver::start().await;
    let db = TestDb::sqlite();
    let (_emulator, emulator_url) = common::emulator().await;
    let mut env = receiver.traced();
    // No batch leaves on its own during the test.
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "600000".into()));
    let server = serve(&db, &emulator_url, &env).await;
    let arn = new_room_behind_the_cache(&server, &emulator_url).await;
    server
        .client()
        .await
        .get_room(traced(get(&arn)))
        .await
        .expect("GetRoom");
    assert!(
        receiver.spans().is_empty(),
        "nothing before the batch delay"
    );

    let (status, log) = server.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
    let spans = receiver.spans();
    assert!(
        spans
            .iter()
            .any(|s| hex(&s.trace_id) == TRACE_ID && s.name == GET_ROOM),
        "{spans:#?}"
    );
}

/// Without OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
/// nothing is exported, even with other OTEL_* variables set and a
/// `traceparent` sent: no log line has trace ids, and the access span is
/// not made a server span (no tracing layer: nothing done on the request's
/// path for traces).
#[tokio::test]
async fn without_an_endpoint_nothing_is_traced() {
    let receiver = Receiver::start().await;
    let db = TestDb::sqlite();
    let (_emulator, emulator_url) = common::emulator().await;
    let env: Vec<(&str, String)> = receiver
        .traced()
        .into_iter()
        .filter(|(name, _)| *name != "OTEL_EXPORTER_OTLP_ENDPOINT")
        // Endpoints of other signals do not turn traces on.
        .chain([
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.url.clone()),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", receiver.url.clone()),
        ])
        .collect();
    let server = serve(&db, &emulator_url, &env).await;
    let arn = new_room_behind_the_cache(&server, &emulator_url).await;
    server
        .client()
        .await
        .get_room(traced(get(&arn)))
        .await
        .expect("GetRoom");

    let (status, log) = server.terminate().await;
    assert!(status.success(), "exit {status:?}: {log:#?}");
    for line in json_lines(&log) {
        assert!(line.get("trace_id").is_none(), "{line}");
        assert!(line.get("span_id").is_none(), "{line}");
    }
    let access = access_line(&log);
    assert!(access["span"].get("otel.name").is_none(), "{access}");
    assert!(receiver.spans().is_empty(), "{:#?}", receiver.spans());
}

/// `ivschat-rooms serve` in front of the emulator at `emulator_url`, caching
/// in `db`, logging JSON (access log included), with `env` (and no OTEL_*
/// variable of the test's own). The reconciler lists once, at startup.
async fn serve(db: &TestDb, emulator_url: &str, env: &[(&str, String)]) -> Server {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream", "emulator"])
        .args(["--emulator-url", emulator_url, "--database-url", &db.url])
        .args(["--log-format", "json"])
        .args(["--reconcile-interval", "1h", "--resync-interval", "1h"]);
    command.envs(env.iter().map(|(name, value)| (name, value)));
    Server::spawn(command).await
}

/// A room created in IVS Chat directly, after the server's startup listing
/// (and no other pass comes): the cache has never seen it, so a GetRoom of it
/// is a miss.
async fn new_room_behind_the_cache(server: &Server, emulator_url: &str) -> String {
    server
        .client()
        .await
        .list_rooms(proto::ListRoomsRequest::default())
        .await
        .expect("the startup listing completes");
    common::sdk(emulator_url)
        .create_room()
        .name("traced")
        .send()
        .await
        .expect("create a room in the emulator")
        .arn
        .expect("an ARN")
}

fn get(arn: &str) -> proto::GetRoomRequest {
    proto::GetRoomRequest {
        identifier: arn.into(),
        ..Default::default()
    }
}

/// `message` sent from span [`PARENT_SPAN_ID`] of trace [`TRACE_ID`], sampled.
fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    request
}

/// Whether `span` is `ancestor`'s child, or a child's child, and so on, in
/// `trace`.
fn descends(span: &Span, ancestor: &Span, trace: &[Span]) -> bool {
    let mut parent = span.parent_span_id.clone();
    while !parent.is_empty() {
        if parent == ancestor.span_id {
            return true;
        }
        match trace.iter().find(|s| s.span_id == parent) {
            Some(up) => parent = up.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

/// A span's attributes, their values as text.
fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn json_lines(log: &[String]) -> Vec<serde_json::Value> {
    log.iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The access log's line for the GetRoom.
fn access_line(log: &[String]) -> serde_json::Value {
    json_lines(log)
        .into_iter()
        .find(|line| {
            line["target"] == "ivschat_rooms::access"
                && line["span"]["method"] == format!("/{GET_ROOM}")
        })
        .unwrap_or_else(|| panic!("no access line for GetRoom: {log:#?}"))
}

/// A span as exported, with the service that exported it.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    span: Span,
}

/// An OTLP/gRPC trace receiver on a loopback port, keeping every span.
struct Receiver {
    url: String,
    collector: Collector,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                spans.extend(scope_spans.spans.into_iter().map(|span| Exported {
                    service: service.clone(),
                    span,
                }));
            }
        }
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let collector = Collector::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        Receiver {
            url,
            collector,
            _stop: stop,
        }
    }

    /// The variables that export traces here: every span sampled, batches
    /// sent every 100 ms.
    fn traced(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.url.clone()),
            ("OTEL_SERVICE_NAME", "ivschat-rooms-test".into()),
            ("OTEL_TRACES_SAMPLER", "always_on".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ]
    }

    /// The spans received so far.
    fn spans(&self) -> Vec<Span> {
        let spans = self.collector.spans.lock().unwrap();
        spans.iter().map(|s| s.span.clone()).collect()
    }

    /// The services that exported spans here.
    fn services(&self) -> Vec<String> {
        let spans = self.collector.spans.lock().unwrap();
        let mut services: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
        services.sort();
        services.dedup();
        services
    }

    /// Waits until `found` finds what it looks for among the spans received.
    async fn until<T>(&self, what: &str, found: impl Fn(&[Exported]) -> Option<T>) -> T {
        within(what, async {
            loop {
                let arrived = self.collector.arrived.notified();
                tokio::pin!(arrived);
                // Registered before looking, so no export slips between.
                arrived.as_mut().enable();
                if let Some(found) = found(&self.collector.spans.lock().unwrap()) {
                    return found;
                }
                arrived.await;
            }
        })
        .await
    }
}
