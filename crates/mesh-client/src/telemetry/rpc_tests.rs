//! The client and server telemetry layers driven step by step: a
//! `tower-test` mock (or a `service_fn` that looks at its span) below them,
//! tokio's clock paused so latencies are exact, a registry per test, and a
//! real OpenTelemetry tracer whose finished spans a test reads back.

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use opentelemetry::trace::{SpanId, SpanKind, Status as SpanStatus, TraceContextExt, TraceId};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SdkTracerProvider, SpanData, SpanProcessor},
};
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use super::{
    metrics::Metrics,
    rpc::{ClientTelemetryLayer, ServerTelemetryLayer},
};
use crate::{BoxError, body::trailers_only, tls::io::PeerInfo};

const GET: &str = "/t.S/Get";
/// A W3C traceparent as an upstream caller would send it.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

/// Collects every finished span.
#[derive(Clone, Debug, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Spans {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl Spans {
    fn named(&self, name: &str) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }
}

/// Spans and the subscriber making them, for this thread (tokio tests run
/// on a current-thread runtime, so spawned tasks see it too).
fn tracing() -> (Spans, tracing::subscriber::DefaultGuard) {
    use opentelemetry::trace::TracerProvider as _;
    let spans = Spans::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    (spans, tracing::subscriber::set_default(subscriber))
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn request(path: &str) -> http::Request<Body> {
    http::Request::builder()
        .uri(path)
        .body(Body::empty())
        .unwrap()
}

/// A response whose body ends in trailers with `code` (a normal call).
fn answered(code: Code) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(code as i32));
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    http::Response::new(Body::new(http_body_util::StreamBody::new(
        futures::stream::iter(frames),
    )))
}

/// The value of the one series `name{labels..}`; `None` if there is none.
fn series(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = metrics.encode();
    let found: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {labels:?} matches {found:?} in\n{text}"
    );
    found.first().copied()
}

/// The client layer for peer `inv` over a mock, recording into `metrics`.
fn client(
    metrics: &Metrics,
) -> (
    impl Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError, Future: Send>
    + Clone
    + Send
    + 'static,
    Handle,
) {
    let (mock, handle) = mock::pair();
    let layer = ClientTelemetryLayer::new("inv".into(), "static:///inv".into(), metrics.clone());
    (layer.layer(mock), handle)
}

/// The labels of outbound `t.S/Get` calls to `inv`.
const OUT_GET: [(&str, &str); 4] = [
    ("direction", "outbound"),
    ("peer", "inv"),
    ("rpc_service", "t.S"),
    ("rpc_method", "Get"),
];

/// `labels` and one more.
fn with(
    labels: &[(&'static str, &'static str)],
    more: (&'static str, &'static str),
) -> Vec<(&'static str, &'static str)> {
    let mut all = labels.to_vec();
    all.push(more);
    all
}

/// Responses of outbound `t.S/Get` calls to `inv` that ended with `code`.
fn get_responses(metrics: &Metrics, code: &'static str) -> Option<f64> {
    series(
        metrics,
        "mesh_responses_total",
        &with(&OUT_GET, ("grpc_code", code)),
    )
}

#[tokio::test(start_paused = true)]
async fn a_client_call_is_counted_when_its_trailers_arrive_with_its_code_and_latency() {
    let metrics = Metrics::new();
    let (svc, mut handle) = client(&metrics);
    let call = tokio::spawn(svc.oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    assert_eq!(series(&metrics, "mesh_requests_total", &OUT_GET), Some(1.0));
    assert_eq!(
        series(&metrics, "mesh_in_flight_requests", &OUT_GET),
        Some(1.0)
    );
    tokio::time::advance(Duration::from_millis(3)).await;
    answer.send_response(answered(Code::Ok));
    let response = call.await.unwrap().unwrap();
    // Headers are not the end of a call: its trailers are.
    assert_eq!(
        series(&metrics, "mesh_in_flight_requests", &OUT_GET),
        Some(1.0)
    );
    assert_eq!(get_responses(&metrics, "OK"), None);
    tokio::time::advance(Duration::from_millis(2)).await;
    response.into_body().collect().await.unwrap();
    assert_eq!(get_responses(&metrics, "OK"), Some(1.0));
    assert_eq!(
        series(&metrics, "mesh_in_flight_requests", &OUT_GET),
        Some(0.0)
    );
    let sum = series(&metrics, "mesh_response_latency_seconds_sum", &OUT_GET).unwrap();
    assert!((sum - 0.005).abs() < 1e-9, "latency to the trailers: {sum}");
    let bucket = |le| {
        series(
            &metrics,
            "mesh_response_latency_seconds_bucket",
            &with(&OUT_GET, ("le", le)),
        )
    };
    assert_eq!(bucket("0.0025"), Some(0.0));
    assert_eq!(bucket("0.005"), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn client_failures_are_counted_by_the_code_the_caller_sees() {
    let metrics = Metrics::new();
    let (svc, mut handle) = client(&metrics);

    // A trailers-only answer counts at once, before any body is read.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(trailers_only(Code::NotFound));
    let _unread = call.await.unwrap().unwrap();
    assert_eq!(get_responses(&metrics, "NOT_FOUND"), Some(1.0));

    // An error carrying a status counts as that status...
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_error(tonic::Status::deadline_exceeded("too slow"));
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(
        err.downcast::<tonic::Status>().unwrap().code(),
        Code::DeadlineExceeded
    );
    assert_eq!(get_responses(&metrics, "DEADLINE_EXCEEDED"), Some(1.0));

    // ...one without (a broken connection) as UNAVAILABLE, as tonic reports it.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    call.await.unwrap().unwrap_err();
    assert_eq!(get_responses(&metrics, "UNAVAILABLE"), Some(1.0));

    // A body that ends without trailers is a broken stream: UNKNOWN, as
    // tonic reports a 200 that never said its status.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(http::Response::new(Body::new(http_body_util::Full::new(
        Bytes::from_static(b"\0\0\0\0\0"),
    ))));
    call.await
        .unwrap()
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(get_responses(&metrics, "UNKNOWN"), Some(1.0));

    // Not a gRPC server's answer (no status, ended with its headers): by
    // its HTTP status, counted at once, not CANCELLED when dropped unread.
    // (UNAVAILABLE: the broken connection above was the first.)
    for (http, code, count) in [
        (http::StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", 2.0),
        (http::StatusCode::NOT_FOUND, "UNIMPLEMENTED", 1.0),
    ] {
        let call = tokio::spawn(svc.clone().oneshot(request(GET)));
        let (_, answer) = handle.next_request().await.unwrap();
        let mut response = http::Response::new(Body::empty());
        *response.status_mut() = http;
        answer.send_response(response);
        drop(call.await.unwrap().unwrap());
        assert_eq!(get_responses(&metrics, code), Some(count), "{http}");
    }
    assert_eq!(get_responses(&metrics, "CANCELLED"), None);

    assert_eq!(series(&metrics, "mesh_requests_total", &OUT_GET), Some(6.0));
    assert_eq!(
        series(&metrics, "mesh_in_flight_requests", &OUT_GET),
        Some(0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_breaks_after_its_headers_counts_as_the_code_the_caller_sees() {
    let metrics = Metrics::new();
    let (svc, mut handle) = client(&metrics);
    // The connection lost under a streaming answer: the endpoint's body
    // fails with UNAVAILABLE, which tonic hands the caller as it is.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    let frames = vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
        Err(tonic::Status::unavailable("connection lost")),
    ];
    answer.send_response(http::Response::new(Body::new(
        http_body_util::StreamBody::new(futures::stream::iter(frames)),
    )));
    let body = call.await.unwrap().unwrap().into_body().collect().await;
    assert_eq!(body.unwrap_err().code(), Code::Unavailable);
    assert_eq!(get_responses(&metrics, "UNAVAILABLE"), Some(1.0));
    assert_eq!(get_responses(&metrics, "UNKNOWN"), None);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_client_call_is_counted_once_as_cancelled() {
    let metrics = Metrics::new();
    let (mut svc, mut handle) = client(&metrics);

    // Given up on before the answer: the future is dropped.
    svc.ready().await.unwrap();
    let pending = svc.call(request(GET));
    let (_, answer) = handle.next_request().await.unwrap();
    drop(pending);
    assert_eq!(get_responses(&metrics, "CANCELLED"), Some(1.0));
    // An answer after that changes nothing.
    answer.send_response(trailers_only(Code::Ok));
    assert_eq!(get_responses(&metrics, "OK"), None);

    // Given up on mid-stream: the body is dropped before its trailers.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(answered(Code::Ok));
    let mut body = call.await.unwrap().unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    assert_eq!(get_responses(&metrics, "CANCELLED"), Some(2.0));
    assert_eq!(
        series(&metrics, "mesh_in_flight_requests", &OUT_GET),
        Some(0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_call_sends_a_traceparent_of_its_own_span_in_the_callers_trace() {
    let (spans, _guard) = tracing();
    let metrics = Metrics::new();
    let (svc, mut handle) = client(&metrics);

    let parent = tracing::info_span!("handler");
    let parent_cx = parent.context();
    let caller_trace = parent_cx.span().span_context().trace_id();
    assert_ne!(
        caller_trace,
        TraceId::INVALID,
        "the test's tracer makes spans"
    );
    let call = {
        let _entered = parent.enter();
        tokio::spawn(tracing::Instrument::in_current_span(
            svc.clone().oneshot(request(GET)),
        ))
    };
    let (sent, answer) = handle.next_request().await.unwrap();
    let traceparent = sent.headers()["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "W3C version: {traceparent}");
    assert_eq!(parts[1], caller_trace.to_string(), "the caller's trace");
    assert_ne!(
        parts[2],
        parent_cx.span().span_context().span_id().to_string(),
        "a span of its own"
    );
    assert_eq!(parts[3], "01", "sampled: {traceparent}");
    answer.send_response(trailers_only(Code::Unavailable));
    call.await.unwrap().unwrap();

    let span = spans
        .named("t.S/Get")
        .pop()
        .expect("the client span was exported");
    assert_eq!(span.span_kind, SpanKind::Client);
    assert_eq!(span.span_context.trace_id(), caller_trace);
    assert_eq!(
        span.span_context.span_id().to_string(),
        parts[2],
        "the span the traceparent names"
    );
    assert_eq!(
        span.parent_span_id,
        parent_cx.span().span_context().span_id()
    );
    assert_eq!(attribute(&span, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attribute(&span, "rpc.service").as_deref(), Some("t.S"));
    assert_eq!(attribute(&span, "rpc.method").as_deref(), Some("Get"));
    assert_eq!(attribute(&span, "mesh.peer").as_deref(), Some("inv"));
    assert_eq!(
        attribute(&span, "server.address").as_deref(),
        Some("static:///inv")
    );
    assert_eq!(
        attribute(&span, "rpc.grpc.status_code").as_deref(),
        Some("14")
    );
    // Every non-OK code is an error on the client side.
    assert_eq!(span.status, SpanStatus::error("UNAVAILABLE"));

    // Outside any span a call starts a trace of its own.
    let call = tokio::spawn(svc.oneshot(request(GET)));
    let (sent, answer) = handle.next_request().await.unwrap();
    let traceparent = sent.headers()["traceparent"].to_str().unwrap().to_owned();
    let trace = traceparent.split('-').nth(1).unwrap().to_owned();
    assert_ne!(trace, caller_trace.to_string());
    assert_ne!(trace, TraceId::INVALID.to_string());
    answer.send_response(trailers_only(Code::Ok));
    call.await.unwrap().unwrap();
}

/// A server telemetry layer over a handler that reports the trace context
/// its call runs in, as `(trace id, span id)` in response headers.
fn server(
    metrics: &Metrics,
    trust: bool,
) -> impl Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError> + Clone {
    let known: HashSet<String> = [GET.to_owned()].into();
    let handler = tower::service_fn(|req: http::Request<Body>| async move {
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let ids = span.span_context();
        let mut response = match req.uri().path() {
            "/t.S/Fail" => trailers_only(Code::Internal),
            _ => trailers_only(Code::Ok),
        };
        let headers = response.headers_mut();
        headers.insert("trace", ids.trace_id().to_string().parse().unwrap());
        headers.insert("span", ids.span_id().to_string().parse().unwrap());
        if req.uri().path() == "/t.S/Shed" {
            return Err::<http::Response<Body>, BoxError>(Box::new(
                tower::load_shed::error::Overloaded::new(),
            ));
        }
        if req.uri().path() == "/t.S/Broken" {
            return Err("handler failed".into());
        }
        Ok(response)
    });
    ServerTelemetryLayer::new(Arc::new(known), trust, metrics.clone()).layer(handler)
}

fn from_caller(path: &str, caller: Option<&str>) -> http::Request<Body> {
    let mut req = request(path);
    req.headers_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{PARENT}-01").parse().unwrap(),
    );
    req.extensions_mut().insert(PeerInfo {
        remote_addr: None,
        identity: caller.map(|c| c.parse().unwrap()),
        tls: caller.is_some(),
    });
    req
}

#[tokio::test(start_paused = true)]
async fn a_server_that_trusts_trace_context_continues_the_callers_trace() {
    let (spans, _guard) = tracing();
    let metrics = Metrics::new();
    let caller = "spiffe://shop.test/ns/shop/sa/orders";
    let response = server(&metrics, true)
        .oneshot(from_caller(GET, Some(caller)))
        .await
        .unwrap();
    assert_eq!(
        response.headers()["trace"],
        TRACE,
        "the handler runs in the caller's trace"
    );
    assert_ne!(response.headers()["span"], PARENT, "in a span of its own");

    let span = spans
        .named("t.S/Get")
        .pop()
        .expect("the server span was exported");
    assert_eq!(span.span_kind, SpanKind::Server);
    assert_eq!(span.span_context.trace_id().to_string(), TRACE);
    assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT).unwrap());
    assert!(span.parent_span_is_remote);
    assert_eq!(attribute(&span, "client.identity").as_deref(), Some(caller));
    assert_eq!(
        attribute(&span, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    assert_eq!(span.status, SpanStatus::Unset);

    let labels = [
        ("direction", "inbound"),
        ("peer", caller),
        ("rpc_service", "t.S"),
        ("rpc_method", "Get"),
        ("grpc_code", "OK"),
    ];
    assert_eq!(series(&metrics, "mesh_responses_total", &labels), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn a_server_facing_the_outside_starts_a_trace_whatever_the_caller_sends() {
    let (spans, _guard) = tracing();
    let metrics = Metrics::new();
    let response = server(&metrics, false)
        .oneshot(from_caller(GET, None))
        .await
        .unwrap();
    let trace = response.headers()["trace"].to_str().unwrap().to_owned();
    assert_ne!(trace, TRACE, "an outsider does not pick the trace id");
    assert_ne!(trace, TraceId::INVALID.to_string(), "a trace is started");
    let span = spans.named("t.S/Get").pop().unwrap();
    assert_eq!(span.parent_span_id, SpanId::INVALID, "a root span");
    assert_eq!(attribute(&span, "client.identity"), None);
}

#[tokio::test(start_paused = true)]
async fn server_outcomes_are_labelled_by_known_method_and_only_server_faults_are_span_errors() {
    let (spans, _guard) = tracing();
    let metrics = Metrics::new();
    let svc = server(&metrics, true);
    let inbound = |method, code| {
        vec![
            ("direction", "inbound"),
            ("peer", "unknown"),
            ("rpc_service", "unknown"),
            ("rpc_method", method),
            ("grpc_code", code),
        ]
    };

    // A path the server does not serve is `unknown`, whatever the caller sent.
    svc.clone()
        .oneshot(from_caller("/t.S/Fail", None))
        .await
        .unwrap();
    assert_eq!(
        series(
            &metrics,
            "mesh_responses_total",
            &inbound("unknown", "INTERNAL")
        ),
        Some(1.0)
    );
    let failed = spans.named("unknown/unknown").pop().unwrap();
    assert_eq!(
        failed.status,
        SpanStatus::error("INTERNAL"),
        "a server fault"
    );

    // Shedding counts as RESOURCE_EXHAUSTED (what tonic answers for it),
    // an error without a status as UNKNOWN (tonic's default).
    let err = svc
        .clone()
        .oneshot(from_caller("/t.S/Shed", None))
        .await
        .unwrap_err();
    assert!(err.is::<tower::load_shed::error::Overloaded>());
    assert_eq!(
        series(
            &metrics,
            "mesh_responses_total",
            &inbound("unknown", "RESOURCE_EXHAUSTED")
        ),
        Some(1.0)
    );
    svc.clone()
        .oneshot(from_caller("/t.S/Broken", None))
        .await
        .unwrap_err();
    assert_eq!(
        series(
            &metrics,
            "mesh_responses_total",
            &inbound("unknown", "UNKNOWN")
        ),
        Some(1.0)
    );
    let statuses: Vec<SpanStatus> = spans
        .named("unknown/unknown")
        .into_iter()
        .map(|s| s.status)
        .collect();
    assert_eq!(
        statuses,
        [
            SpanStatus::error("INTERNAL"),
            SpanStatus::Unset,
            SpanStatus::error("UNKNOWN"),
        ],
        "RESOURCE_EXHAUSTED is the caller's to handle; UNKNOWN is a server fault"
    );
}

#[tokio::test(start_paused = true)]
async fn client_series_stop_growing_at_the_path_bound() {
    let metrics = Metrics::new();
    let (svc, mut handle) = client(&metrics);
    for i in 0..super::rpc::MAX_PATHS + 5 {
        let call = tokio::spawn(svc.clone().oneshot(request(&format!("/t.S/M{i}"))));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(trailers_only(Code::Ok));
        call.await.unwrap().unwrap();
    }
    let text = metrics.encode();
    let methods: HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("mesh_requests_total{"))
        .filter_map(|l| l.split("rpc_method=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        methods.len(),
        super::rpc::MAX_PATHS + 1,
        "the bound plus `unknown`"
    );
    assert_eq!(
        series(
            &metrics,
            "mesh_requests_total",
            &[("peer", "unknown"), ("rpc_method", "unknown")]
        ),
        Some(5.0),
        "calls past the bound are counted, as unknown"
    );
}

/// One copy of the client stack keeps the series of its last method (to
/// skip the shared cache): switching methods, or to a path that is no
/// method, must still count each call under its own labels.
#[tokio::test(start_paused = true)]
async fn one_copy_of_the_stack_calling_several_methods_counts_each_under_its_own() {
    let metrics = Metrics::new();
    let (mut svc, mut handle) = client(&metrics);
    for path in [
        "/t.S/Get", "/t.S/Put", "/t.S/Get", "/bad", "/t.S/Get", "/t.S/Put",
    ] {
        // The same service value every time, as a tonic client drives it.
        svc.ready().await.unwrap();
        let call = tokio::spawn(svc.call(request(path)));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(trailers_only(Code::Ok));
        call.await.unwrap().unwrap();
    }
    let requests = |method| {
        series(
            &metrics,
            "mesh_requests_total",
            &[
                ("peer", "inv"),
                ("rpc_service", "t.S"),
                ("rpc_method", method),
            ],
        )
    };
    assert_eq!(requests("Get"), Some(3.0));
    assert_eq!(requests("Put"), Some(2.0));
    assert_eq!(
        series(
            &metrics,
            "mesh_requests_total",
            &[("peer", "inv"), ("rpc_method", "unknown")]
        ),
        Some(1.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_released_at_its_deadline_and_dropped_unread_counts_as_deadline_exceeded() {
    use futures::StreamExt;
    let metrics = Metrics::new();
    let (mock, mut handle) = mock::pair();
    let layer = ClientTelemetryLayer::new("inv".into(), "static:///inv".into(), metrics.clone());
    let svc = layer.layer(crate::body::BodyDeadlineLayer.layer(mock));
    // A stream that sends one message and then nothing, ever.
    let endless = || {
        let frames = futures::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
            Bytes::from_static(b"\0\0\0\0\0"),
        ))])
        .chain(futures::stream::pending());
        http::Response::new(Body::new(http_body_util::StreamBody::new(frames)))
    };
    let released = |timeout: &'static str| {
        let mut req = request(GET);
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static(timeout));
        req.extensions_mut().insert(crate::deadline::ReleaseUnread);
        req
    };

    // Dropped unread once its deadline released it: the deadline ended it.
    let call = tokio::spawn(svc.clone().oneshot(released("1S")));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(endless());
    let mut body = call.await.unwrap().unwrap().into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(body);
    assert_eq!(get_responses(&metrics, "DEADLINE_EXCEEDED"), Some(1.0));
    assert_eq!(get_responses(&metrics, "CANCELLED"), None);

    // Dropped before its deadline: the caller gave up.
    let call = tokio::spawn(svc.clone().oneshot(released("10S")));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(endless());
    let body = call.await.unwrap().unwrap().into_body();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(body);
    assert_eq!(get_responses(&metrics, "CANCELLED"), Some(1.0));
    assert_eq!(get_responses(&metrics, "DEADLINE_EXCEEDED"), Some(1.0));
}
