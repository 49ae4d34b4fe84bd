//! The per-call telemetry layers: a span per RPC (OpenTelemetry's RPC
//! conventions), W3C trace context in and out of gRPC metadata, and the
//! golden metrics of [`super::metrics`].

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Status as SpanStatus, TraceContextExt},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::{CallSeries, Direction, Metrics, RouteLabels};
use crate::{
    BoxError,
    body::{ObservedBody, ReleasedAt, code_without_status, header_status},
    methods::RpcPath,
    route::Routed,
    tls::io::PeerInfo,
};

/// Distinct paths one layer keeps series for; calls beyond are labelled
/// `unknown`, so no caller can grow the metrics without bound.
pub(super) const MAX_PATHS: usize = 1024;

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Series per path for one peer (client side) or per caller and path
/// (server side), created on first use.
struct SeriesCache {
    metrics: Metrics,
    direction: Direction,
    // peer → path → series.
    map: RwLock<HashMap<Box<str>, HashMap<Box<str>, Arc<CallSeries>>>>,
    // (route, backend) → path → series, for routed client calls.
    routed: RwLock<HashMap<(Arc<str>, Arc<str>), HashMap<Box<str>, Arc<CallSeries>>>>,
    paths: usize,
}

impl SeriesCache {
    fn new(metrics: Metrics, direction: Direction) -> Self {
        Self {
            metrics,
            direction,
            map: RwLock::default(),
            routed: RwLock::default(),
            paths: 0,
        }
    }

    /// The series of a routed call: as [`SeriesCache::get`], with the
    /// route's and backend's labels. Both come from the config, so their
    /// number is bounded by it; the paths share [`MAX_PATHS`].
    fn get_routed(&self, peer: &Arc<str>, path: &str, routed: &Routed) -> Arc<CallSeries> {
        let key = (routed.name().clone(), routed.backend().clone());
        if let Some(series) = self
            .routed
            .read()
            .expect("series lock")
            .get(&key)
            .and_then(|m| m.get(path))
        {
            return series.clone();
        }
        let mut map = self.routed.write().expect("series lock");
        let total: usize = map.values().map(HashMap::len).sum();
        if total >= MAX_PATHS {
            return self.get(peer, path);
        }
        let rpc = if path.is_empty() {
            RpcPath::unknown()
        } else {
            RpcPath::parse(path)
        };
        map.entry(key.clone())
            .or_default()
            .entry(path.into())
            .or_insert_with(|| {
                Arc::new(CallSeries::new(
                    &self.metrics,
                    self.direction,
                    peer.clone(),
                    &rpc,
                    RouteLabels(Some(key)),
                ))
            })
            .clone()
    }

    fn get(&self, peer: &str, path: &str) -> Arc<CallSeries> {
        if let Some(series) = self
            .map
            .read()
            .expect("series lock")
            .get(peer)
            .and_then(|m| m.get(path))
        {
            return series.clone();
        }
        let mut map = self.map.write().expect("series lock");
        let total: usize = map.values().map(HashMap::len).sum();
        let (peer_key, path_key, rpc) = if total >= MAX_PATHS + self.paths {
            ("unknown", "", RpcPath::unknown())
        } else if path.is_empty() {
            (peer, "", RpcPath::unknown())
        } else {
            (peer, path, RpcPath::parse(path))
        };
        map.entry(peer_key.into())
            .or_default()
            .entry(path_key.into())
            .or_insert_with(|| {
                Arc::new(CallSeries::new(
                    &self.metrics,
                    self.direction,
                    Arc::from(peer_key),
                    &rpc,
                    RouteLabels::default(),
                ))
            })
            .clone()
    }
}

/// Client layer: the outermost of a mesh channel.
#[derive(Clone)]
pub(crate) struct ClientTelemetryLayer {
    peer: Arc<str>,
    target: Arc<str>,
    cache: Arc<SeriesCache>,
}

impl ClientTelemetryLayer {
    /// Calls to `target`, named `peer` in metrics and spans, recorded
    /// into `metrics`.
    pub(crate) fn new(peer: Arc<str>, target: Arc<str>, metrics: Metrics) -> Self {
        Self {
            peer,
            target,
            cache: Arc::new(SeriesCache::new(metrics, Direction::Outbound)),
        }
    }
}

impl<S> Layer<S> for ClientTelemetryLayer {
    type Service = ClientTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientTelemetry {
            inner,
            layer: self.clone(),
            last: None,
        }
    }
}

/// The service made by [`ClientTelemetryLayer`].
pub(crate) struct ClientTelemetry<S> {
    inner: S,
    layer: ClientTelemetryLayer,
    /// The series of this copy's last call without a route: a caller
    /// mostly calls one method over and over, and a hit skips the shared
    /// cache's lock and two string hashes. A clone starts without one
    /// (cloning stays as cheap as it was).
    last: Option<Arc<CallSeries>>,
}

impl<S: Clone> Clone for ClientTelemetry<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
            last: None,
        }
    }
}

impl<S> Service<http::Request<Body>> for ClientTelemetry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = TelemetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let routed = req.extensions().get::<Routed>();
        let series = match routed {
            Some(routed) => self
                .layer
                .cache
                .get_routed(&self.layer.peer, req.uri().path(), routed),
            None => {
                let path = req.uri().path();
                match &self.last {
                    Some(last) if last.is_for(&self.layer.peer, path) => last.clone(),
                    _ => {
                        let series = self.layer.cache.get(&self.layer.peer, path);
                        self.last = Some(series.clone());
                        series
                    }
                }
            }
        };
        let span = call_span(|| {
            tracing::info_span!(
                target: "mesh_client::rpc",
                "grpc.client",
                otel.name = series.span_name(),
                otel.kind = "client",
                trace_id = Empty,
            )
        });
        if !span.is_disabled() {
            set_rpc_attributes(&span, &series);
            span.set_attribute("server.address", self.layer.target.to_string());
            span.set_attribute("mesh.peer", self.layer.peer.to_string());
            if let Some(routed) = routed {
                span.set_attribute("mesh.route", routed.name().to_string());
                span.set_attribute("mesh.backend", routed.backend().to_string());
            }
            let cx = span.context();
            record_trace_id(&span, &cx);
            TraceContextPropagator::new()
                .inject_context(&cx, &mut HeaderInjector(req.headers_mut()));
        }
        let fut = span.in_scope(|| self.inner.call(req));
        TelemetryFuture::new(fut, series, span, Side::Client)
    }
}

/// Server layer: the outermost of a mesh server.
#[derive(Clone)]
pub(crate) struct ServerTelemetryLayer {
    known: Arc<HashSet<String>>,
    cache: Arc<SeriesCache>,
    trust_trace_context: bool,
}

impl ServerTelemetryLayer {
    /// Labels calls by path only for `known` paths (the server's methods);
    /// anything else a client sends is `unknown`.
    /// With `trust_trace_context` false, inbound `traceparent` is ignored
    /// and every call starts a trace (for servers that face the outside).
    /// Calls are recorded into `metrics`.
    pub(crate) fn new(
        known: Arc<HashSet<String>>,
        trust_trace_context: bool,
        metrics: Metrics,
    ) -> Self {
        let mut cache = SeriesCache::new(metrics, Direction::Inbound);
        cache.paths = known.len();
        Self {
            known,
            cache: Arc::new(cache),
            trust_trace_context,
        }
    }
}

impl<S> Layer<S> for ServerTelemetryLayer {
    type Service = ServerTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTelemetry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`ServerTelemetryLayer`].
#[derive(Clone)]
pub(crate) struct ServerTelemetry<S> {
    inner: S,
    layer: ServerTelemetryLayer,
}

impl<S, B> Service<http::Request<B>> for ServerTelemetry<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = TelemetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let caller = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.as_ref())
            .map(|id| id.as_str());
        let path = req.uri().path();
        let path = if self.layer.known.contains(path) {
            path
        } else {
            ""
        };
        let series = self.layer.cache.get(caller.unwrap_or("unknown"), path);
        let span = call_span(|| {
            tracing::info_span!(
                target: "mesh_client::rpc",
                "grpc.server",
                otel.name = series.span_name(),
                otel.kind = "server",
                trace_id = Empty,
            )
        });
        if !span.is_disabled() {
            if self.layer.trust_trace_context {
                let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
                // Fails only if the span was already entered, which it was not.
                let _ = span.set_parent(parent);
            }
            set_rpc_attributes(&span, &series);
            if let Some(caller) = caller {
                span.set_attribute("client.identity", caller.to_owned());
            }
            record_trace_id(&span, &span.context());
        }
        let fut = span.in_scope(|| self.inner.call(req));
        TelemetryFuture::new(fut, series, span, Side::Server)
    }
}

/// A call's span, made only once some subscriber exists. With no
/// subscriber ever set, a span can only reach the `log` crate, and with
/// `tracing`'s `log` feature on (sqlx turns it on for the whole build) a
/// disabled span then still records its fields and asks `log` on creation
/// and on every enter and exit: about 0.2 µs a call in `meshbench`'s
/// profile (it sets no subscriber) for a record nobody keeps. An app with
/// only a `log` logger loses the span's lifecycle lines.
fn call_span(make: impl FnOnce() -> Span) -> Span {
    // tracing's own macros elide their `log` path with this check.
    if tracing::dispatcher::has_been_set() {
        make()
    } else {
        Span::none()
    }
}

fn set_rpc_attributes(span: &Span, series: &CallSeries) {
    span.set_attribute("rpc.system", "grpc");
    // The series' own strings, shared: no copy per call.
    span.set_attribute(
        "rpc.service",
        opentelemetry::StringValue::from(series.labels.rpc_service_shared()),
    );
    span.set_attribute(
        "rpc.method",
        opentelemetry::StringValue::from(series.labels.rpc_method_shared()),
    );
}

fn record_trace_id(span: &Span, cx: &opentelemetry::Context) {
    let trace_id = cx.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// One call being measured; finishing it (or dropping it unfinished, which
/// is a cancellation) records its outcome exactly once.
struct CallRecord {
    series: Arc<CallSeries>,
    span: Span,
    start: Instant,
    side: Side,
    done: bool,
    /// When the mesh releases the response's body unread (a call marked
    /// `deadline::ReleaseUnread`): dropped after then, the call ended at
    /// its deadline, not by the caller's choice.
    released_at: Option<Instant>,
}

impl CallRecord {
    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.series.finished(code, self.start.elapsed());
        if !self.span.is_disabled() {
            self.span
                .set_attribute("rpc.grpc.status_code", i64::from(code as i32));
            // OpenTelemetry: every non-OK code is a client error; servers
            // report only codes that mean the server failed.
            let error = match self.side {
                Side::Client => code != Code::Ok,
                Side::Server => matches!(
                    code,
                    Code::Unknown
                        | Code::DeadlineExceeded
                        | Code::Unimplemented
                        | Code::Internal
                        | Code::Unavailable
                        | Code::DataLoss
                ),
            };
            if error {
                self.span
                    .set_status(SpanStatus::error(super::metrics::code_name(code)));
            }
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let code = match self.released_at {
            Some(at) if Instant::now() >= at => Code::DeadlineExceeded,
            _ => Code::Cancelled,
        };
        self.record(code);
    }
}

pin_project! {
    /// Response future of the telemetry layers.
    pub(crate) struct TelemetryFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        record: Option<CallRecord>,
    }
}

impl<F> TelemetryFuture<F> {
    fn new(inner: F, series: Arc<CallSeries>, span: Span, side: Side) -> Self {
        series.started();
        Self {
            inner: inner.instrument(span.clone()),
            record: Some(CallRecord {
                series,
                span,
                start: Instant::now(),
                side,
                done: false,
                released_at: None,
            }),
        }
    }
}

impl<F, E> Future for TelemetryFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result,
        };
        let mut record = this.record.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(response) => match header_status(&response) {
                Some(code) => {
                    record.finish(code);
                    Ok(response)
                }
                // Ended with its headers and no status (not a gRPC
                // server's answer): what the caller's tonic will report.
                // Wrapped, the body would be dropped as empty unread and
                // the call counted CANCELLED.
                None if record.side == Side::Client
                    && http_body::Body::is_end_stream(response.body()) =>
                {
                    record.finish(code_without_status(response.status()));
                    Ok(response)
                }
                None => {
                    // Client side only: a proxy's server passes the
                    // extension on, and its own caller's reset is its own.
                    // A stream ending without trailers counts as what the
                    // caller's tonic reports for it (by the HTTP status).
                    let missing = match record.side {
                        Side::Client => {
                            record.released_at =
                                response.extensions().get::<ReleasedAt>().map(|r| r.0);
                            code_without_status(response.status())
                        }
                        Side::Server => Code::Internal,
                    };
                    Ok(response.map(|body| {
                        Body::new(ObservedBody::ending_without_trailers_as(
                            body,
                            missing,
                            move |ended| record.finish(ended.unwrap_or_else(|broken| broken)),
                        ))
                    }))
                }
            },
            Err(e) => {
                let e = e.into();
                let default = record_side_default(&record);
                record.finish(error_code(&*e, default));
                Err(e)
            }
        })
    }
}

fn record_side_default(record: &CallRecord) -> Code {
    match record.side {
        // A client error without a status is a transport failure.
        Side::Client => Code::Unavailable,
        Side::Server => Code::Unknown,
    }
}

/// The gRPC code an error stands for, as tonic will report it.
fn error_code(error: &(dyn std::error::Error + 'static), default: Code) -> Code {
    if let Some(status) = crate::caused_by::<tonic::Status>(error) {
        return status.code();
    }
    if crate::caused_by::<tower::load_shed::error::Overloaded>(error).is_some() {
        return Code::ResourceExhausted;
    }
    default
}
