//! The balancer as a layer: pick an endpoint, send the request to it
//! through the service below (the endpoint's connection), and feed the
//! outcome back into load and failure accounting.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt};

use super::{EndpointSet, NoEndpoint};
use crate::{
    BoxError,
    body::is_marked_shed,
    config::ConfigHandle,
    deadline::CallExpiry,
    endpoint::{
        ObservedBody, SendTo, dead_dial, header_status, is_endpoint_failure, is_queue_full,
        is_stalled, is_unsent, never_processed, take_unsent,
    },
};

/// How long a call waits for a target's first resolution.
pub(super) const FIRST_RESOLUTION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Addresses an attempt should avoid (earlier attempts of the same call).
#[derive(Clone, Debug, Default)]
pub(crate) struct Exclude(pub(crate) Vec<SocketAddr>);

/// Filled with the endpoint an attempt was sent to: the last one, when a
/// request handed back unsent went on to another.
#[derive(Clone, Debug, Default)]
pub(crate) struct Picked(Arc<Mutex<Option<SocketAddr>>>);

impl Picked {
    /// The endpoint the attempt went to, once picked.
    pub(crate) fn get(&self) -> Option<SocketAddr> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, addr: SocketAddr) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(addr);
    }
}

/// The `grpc-timeout` for `req` sent again now, after it first came in at
/// `entered`: what its header said less the time since, and no more than
/// its call's [`CallExpiry`] leaves. The header alone would tell the new
/// server it has the time the dial and the first connection took too.
fn time_left(req: &http::Request<Body>, entered: Instant) -> Option<Duration> {
    let by_header = crate::deadline::header_timeout(req.headers())
        .map(|sent| sent.saturating_sub(entered.elapsed()));
    let by_expiry = req
        .extensions()
        .get::<CallExpiry>()
        .map(|expiry| expiry.0.saturating_duration_since(Instant::now()));
    match (by_header, by_expiry) {
        (Some(header), Some(expiry)) => Some(header.min(expiry)),
        (header, expiry) => header.or(expiry),
    }
}

/// On a failed (trailers-only) response: the endpoint that sent it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Served(pub(crate) SocketAddr);

/// On a failed (trailers-only) response: every endpoint of the set reported
/// NOT_SERVING when it came back, so another attempt would only add load
/// to what is broken (the layer above stops retrying).
#[derive(Clone, Copy, Debug)]
pub(crate) struct NoneServing;

/// Why an attempt failed below the gRPC layer: the balancer's error, which
/// the retry layer reads (see `retry::RetryLayer`).
#[derive(Debug)]
pub(crate) enum CallError {
    /// No endpoint could take the call.
    NoEndpoint(NoEndpoint),
    /// The connection failed.
    Transport {
        addr: SocketAddr,
        /// The request provably never reached the server (connect failure,
        /// refused stream), so even a non-idempotent call may be retried.
        never_sent: bool,
        source: BoxError,
    },
    /// The per-attempt timeout passed.
    AttemptTimeout(std::time::Duration),
}

impl CallError {
    /// The one mapping of a mesh call failure to a gRPC status.
    pub(crate) fn into_status(self, target: &str) -> tonic::Status {
        match self {
            CallError::NoEndpoint(NoEndpoint::Empty) => tonic::Status::unavailable(format!(
                "no endpoints for {target}: the resolver found none"
            )),
            CallError::NoEndpoint(NoEndpoint::AllUnavailable { total, last_error }) => {
                tonic::Status::unavailable(format!(
                    "all {total} endpoints of {target} failed to connect ({}); retrying them after a backoff",
                    last_error.as_deref().unwrap_or("no detail")
                ))
            }
            // tonic's connection keeps its own timer on `grpc-timeout` and
            // calls its expiry CANCELLED; it is this call's deadline, which
            // gRPC reports as DEADLINE_EXCEEDED.
            CallError::Transport { addr, source, .. } if timed_out(source.as_ref()) => {
                tonic::Status::deadline_exceeded(format!(
                    "{target} endpoint {addr}: no response within the call's deadline"
                ))
            }
            CallError::Transport { addr, source, .. } => {
                let status = tonic::Status::from_error(source);
                tonic::Status::new(
                    status.code(),
                    format!("{target} endpoint {addr}: {}", status.message()),
                )
            }
            CallError::AttemptTimeout(after) => tonic::Status::deadline_exceeded(format!(
                "{target}: attempt got no response within its per-attempt timeout of {after:?}"
            )),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoEndpoint(NoEndpoint::Empty) => write!(f, "no endpoints"),
            CallError::NoEndpoint(NoEndpoint::AllUnavailable { total, .. }) => {
                write!(f, "all {total} endpoints failed to connect")
            }
            CallError::Transport { addr, source, .. } => write!(f, "endpoint {addr}: {source}"),
            CallError::AttemptTimeout(after) => {
                write!(f, "no response within the per-attempt timeout of {after:?}")
            }
        }
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Transport { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// Whether a transport error is tonic's own `grpc-timeout` timer expiring.
pub(crate) fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<tonic::TimeoutExpired>(err).is_some()
}

/// Whether a transport error is its stream reset with CANCEL (by either
/// side): the call's end, not the endpoint's failure.
fn reset_with_cancel(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<h2::Error>(err)
        .is_some_and(|e| e.is_reset() && e.reason() == Some(h2::Reason::CANCEL))
}

/// Whether a trailers-only INTERNAL answer is a server refusing the
/// caller's malformed message: tonic's decoder answers INTERNAL (as the
/// gRPC spec asks) for a bad compression flag, a cut-off frame or bytes
/// that are not the message. That is the caller's fault, not the
/// endpoint's; counted as a failure, any client able to send such bytes
/// (an outside one, behind a shared gateway) could eject healthy replicas.
/// A server gains nothing by sending these texts falsely: any answer that
/// is not a failure code already escapes ejection.
fn refuses_the_request(response: &http::Response<Body>) -> bool {
    const DECODER_REFUSALS: &[&str] = &[
        "failed to decode Protobuf message",
        "protocol error: received message with",
        "Unexpected EOF decoding stream",
        "Error decompressing",
    ];
    tonic::Status::from_header_map(response.headers()).is_some_and(|status| {
        DECODER_REFUSALS
            .iter()
            .any(|m| status.message().starts_with(m))
    })
}

/// Whether a transport error proves the request never reached the server
/// (or never was processed there): a failed connect, a refused stream, a
/// stream above a GOAWAY's last, a request its closed connection never wrote.
fn never_sent(err: &(dyn std::error::Error + 'static)) -> bool {
    is_connect_error(err) || never_processed(err)
}

/// An error and its sources, as one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = err.source();
    }
    text
}

fn is_connect_error(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<tonic::ConnectError>(err).is_some()
}

/// Feeds a call's outcome (`None`: its response broke under it) into the
/// endpoint's failure accounting.
fn account(
    set: &EndpointSet,
    endpoint: &crate::endpoint::Endpoint,
    config: &crate::config::MeshConfig,
    code: Option<Code>,
    started: Instant,
) {
    match code {
        // A RESOURCE_EXHAUSTED not marked as the mesh's shedding is a
        // service refusing a caller (a rate limit, a cap): a caller could
        // provoke those at will, so it says nothing of the endpoint's load.
        Some(code) if !is_endpoint_failure(code) => endpoint.record_success(started),
        _ => set.record_failure(endpoint, &config.outlier_detection),
    }
}

/// Balances each request over the endpoints of a live set.
///
/// # Contract
///
/// - Above: honours the [`Exclude`] extension (addresses to avoid when
///   another endpoint is eligible), fills a [`Picked`] extension with the
///   address chosen, and marks a failed trailers-only response with
///   [`Served`] (and [`NoneServing`] when every endpoint reports
///   NOT_SERVING). Fails with [`CallError`] (never with a status), so the
///   layer above can tell "never sent" from "sent and failed".
/// - Below: the request goes to the inner service with a [`SendTo`]
///   extension naming the chosen endpoint; the inner service sends it on
///   that endpoint's connection (`endpoint::Connection`). Its response or
///   error is what the endpoint's load and failure accounting learn from,
///   except a request the connection hands back unwritten
///   (`endpoint::Unsent`): that one goes once more, to a new pick that
///   avoids the endpoint, and charges nobody.
#[derive(Clone)]
pub(crate) struct BalanceLayer {
    set: Arc<EndpointSet>,
    config: ConfigHandle,
}

impl BalanceLayer {
    /// Over the endpoints of `set`, by the balancing, outlier-detection
    /// and connection policy `config` holds at each call.
    pub(crate) fn new(set: Arc<EndpointSet>, config: ConfigHandle) -> Self {
        Self { set, config }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            inner,
            set: self.set.clone(),
            config: self.config.clone(),
        }
    }
}

/// The service made by [`BalanceLayer`].
#[derive(Clone)]
pub(crate) struct Balance<S> {
    inner: S,
    set: Arc<EndpointSet>,
    config: ConfigHandle,
}

impl<S> Balance<S> {
    /// The endpoints it balances over.
    pub(crate) fn set(&self) -> &Arc<EndpointSet> {
        &self.set
    }

    /// The live policy it balances by.
    pub(crate) fn config(&self) -> &ConfigHandle {
        &self.config
    }
}

impl<S> Service<http::Request<Body>> for Balance<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Self::Response, CallError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per endpoint, judged when one is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let set = self.set.clone();
        let config = self.config.load();
        let inner = self.inner.clone();
        Box::pin(async move {
            let entered = Instant::now();
            // When the attempt leaves: one clock read serves the call's
            // entry, its in-flight age and its latency's start.
            let mut started = entered;
            if !set.is_resolved() {
                // A resolver that cannot answer must not hold calls until their
                // deadline: after a short wait the call fails as "no endpoints".
                let _ = tokio::time::timeout(FIRST_RESOLUTION_WAIT, set.wait_resolved()).await;
                started = Instant::now();
            }
            // A request its connection handed back unwritten goes once
            // more, to a pick that avoids that endpoint (it may be draining).
            let mut resent = false;
            let (endpoint, result, started, now, sharing) = loop {
                let exclude = req
                    .extensions()
                    .get::<Exclude>()
                    .map(|e| e.0.as_slice())
                    .unwrap_or(&[]);
                let endpoint = set
                    .pick(config.lb_policy_for(&set.target), exclude)
                    .map_err(CallError::NoEndpoint)?;
                if let Some(picked) = req.extensions().get::<Picked>() {
                    picked.set(endpoint.addr);
                }
                req.extensions_mut().insert(SendTo(endpoint.clone()));
                let in_flight = endpoint.start_at(started);
                let result = inner.clone().oneshot(req).await;
                let now = Instant::now();
                // Dropped unanswered and late, it raises the endpoint's
                // estimate to its age (a hung endpoint does not look idle).
                let sharing = match &result {
                    Ok(_) => in_flight.answered(),
                    Err(_) => {
                        drop(in_flight);
                        1
                    }
                };
                let result = match result {
                    Ok(response) => Ok(response),
                    Err(err) => Err(err.into()),
                };
                if let Err(err) = &result
                    && (is_queue_full(&**err) || is_unsent(&**err))
                {
                    // Its connection is busy, not broken (every stream in
                    // use, a full queue), or handed the request back (it
                    // closed): load to steer away from, as a shedding answer
                    // is, so a replica that closes with calls queued is not
                    // picked as if light; never a failure that ejects or
                    // backs off, or a caller holding a replica's streams
                    // could get it ejected.
                    endpoint.record_shed(now);
                }
                if let Err(err) = &result
                    && let Some(dial) = dead_dial(&**err)
                    && endpoint.first_report_of_dial(dial)
                {
                    // Its connection closed without answering a call: a
                    // failed dial in all but name, charged once per dial
                    // (the request itself goes elsewhere below).
                    let wait =
                        endpoint.record_connect_failure(now, &config.endpoint, error_chain(&**err));
                    tracing::debug!(target = %set.target, addr = %endpoint.addr, ?wait, "connection closed without answering; backing off: {err}");
                    set.reresolve.notify_one();
                }
                if let Err(err) = &result
                    && !resent
                    && let Some(unsent) = take_unsent(&**err)
                {
                    let left = time_left(&unsent, entered);
                    if left.is_some_and(|left| left < crate::deadline::MIN_ATTEMPT_TIME) {
                        // No time for it to be answered: the call ends with
                        // the hand-back (never sent), as a retry would not go.
                        tracing::debug!(target = %set.target, addr = %endpoint.addr, "a request handed back unsent is not resent: under {:?} left", crate::deadline::MIN_ATTEMPT_TIME);
                        break (endpoint, result, started, now, sharing);
                    }
                    // It never left: nothing to charge the endpoint with,
                    // and no retry spent.
                    tracing::debug!(target = %set.target, addr = %endpoint.addr, "sending a request its connection handed back unsent to another pick: {err}");
                    resent = true;
                    started = now;
                    req = unsent;
                    if let Some(left) = left {
                        req.headers_mut().insert(
                            crate::headers::GRPC_TIMEOUT,
                            crate::deadline::grpc_timeout_header(left),
                        );
                    }
                    match req.extensions_mut().get_mut::<Exclude>() {
                        Some(exclude) => exclude.0.push(endpoint.addr),
                        None => {
                            req.extensions_mut().insert(Exclude(vec![endpoint.addr]));
                        }
                    }
                    continue;
                }
                break (endpoint, result, started, now, sharing);
            };
            let response = match result {
                Ok(response) => response,
                Err(err) => {
                    // Calls that shared one failed dial all get its error;
                    // it is one failure of the endpoint, charged once.
                    let charged = crate::endpoint::failed_dial(&*err)
                        .is_none_or(|dial| endpoint.first_report_of_dial(dial));
                    if charged && is_connect_error(&*err) {
                        let wait = endpoint.record_connect_failure(
                            now,
                            &config.endpoint,
                            error_chain(&*err),
                        );
                        tracing::debug!(target = %set.target, addr = %endpoint.addr, ?wait, "connect failed; backing off: {err}");
                        set.reresolve.notify_one();
                    }
                    // The call's own deadline running out says nothing of
                    // the endpoint (DEADLINE_EXCEEDED in a response is not an
                    // endpoint failure either); only real failures eject.
                    // Nor does a request that never left (handed back a
                    // second time, refused by a busy connection): a
                    // connection that never answered was charged above.
                    // A connection cut for standing still was backed off
                    // above; holding its streams is something a caller can
                    // do, so it does not count toward ejection either.
                    // Nor a stream reset with CANCEL: by this side when
                    // the caller's request body failed (before the server
                    // answered, the usual case for client streaming), or by
                    // the server ending a call it gave up on; a caller able
                    // to break its own uploads could otherwise eject healthy
                    // replicas (as the same reset after the answer's head
                    // charges nobody, below).
                    if charged
                        && !timed_out(&*err)
                        && !is_unsent(&*err)
                        && !is_stalled(&*err)
                        && !reset_with_cancel(&*err)
                    {
                        set.record_failure(&endpoint, &config.outlier_detection);
                    }
                    return Err(CallError::Transport {
                        addr: endpoint.addr,
                        never_sent: never_sent(&*err),
                        source: err,
                    });
                }
            };
            // Not a gRPC server's answer: no status, ended with its headers.
            // A 5xx is the endpoint's failure (a proxy in front with nothing
            // behind it, another server on the port), as Envoy's outlier
            // detection counts it; a 4xx may be the caller's doing (h2
            // answers 431 to oversized headers), so it charges nobody.
            let status = header_status(&response);
            let unanswered = status.is_none() && http_body::Body::is_end_stream(response.body());
            // Body or not: a proxy in front that refuses a caller's token
            // with a page of its own says nothing of the endpoint either
            // (the body below would end without trailers, a broken stream).
            if status.is_none() && response.status().is_client_error() {
                let mut response = response;
                response.extensions_mut().insert(Served(endpoint.addr));
                return Ok(response);
            }
            if unanswered && response.status().is_server_error() {
                set.record_failure(&endpoint, &config.outlier_detection);
                let mut response = response;
                response.extensions_mut().insert(Served(endpoint.addr));
                return Ok(response);
            }
            // A refusal's latency is not a service time: a shedding server
            // answers fast, and would look like the fastest endpoint; nor
            // is a fault rule's made-up abort. Any other error status may
            // show the endpoint slow, never fast: a dying server answers
            // UNAVAILABLE at once (fed to the estimates, it drew twice the
            // calls a penalty alone lets through: meshsim's dying
            // servers), a misconfigured one NOT_FOUND.
            let injected = response.headers().get(crate::fault::FAULT_HEADER)
                == Some(&http::HeaderValue::from_static("abort"));
            if status != Some(Code::ResourceExhausted) && !unanswered && !injected {
                if matches!(status, None | Some(Code::Ok)) {
                    endpoint.observe_rtt(now - started, sharing, now);
                } else {
                    endpoint.observe_at_least(now - started, sharing, now);
                }
            }
            if let Some(code) = status {
                // An abort a server's fault rule made up says nothing of
                // the endpoint's health (a test of the callers, not of it),
                // if the operator trusts this target's servers to say so.
                let excused = config.outlier_detection.trust_injected_faults && injected;
                let callers_fault = code == Code::Internal && refuses_the_request(&response);
                if is_marked_shed(&response) {
                    // Overloaded, not broken: penalised, never ejected.
                    endpoint.record_shed(Instant::now());
                } else if !excused && !callers_fault {
                    account(&set, &endpoint, &config, Some(code), started);
                }
                let mut response = response;
                if code != Code::Ok {
                    response.extensions_mut().insert(Served(endpoint.addr));
                    if set.all_not_serving() {
                        response.extensions_mut().insert(NoneServing);
                    }
                }
                return Ok(response);
            }
            // The call's own references move to the body's report: no
            // clones, each a count written from both cores.
            Ok(response.map(move |body| {
                Body::new(ObservedBody::new(body, move |ended| match ended {
                    Ok(code) => account(&set, &endpoint, &config, Some(code), started),
                    // A stream broken by a lost connection or a protocol
                    // error is the endpoint's failure; one reset with
                    // CANCEL (its caller's request body failed, or the
                    // server gave up on it: grpc-java does at its deadline)
                    // says nothing of the endpoint: a caller able to break
                    // its own streams could otherwise eject healthy
                    // replicas. (A server that resets every call so gains
                    // no more than one answering each with a non-failure
                    // status already does.)
                    Err(code) if is_endpoint_failure(code) => {
                        account(&set, &endpoint, &config, None, started)
                    }
                    Err(_) => {}
                }))
            }))
        })
    }
}
