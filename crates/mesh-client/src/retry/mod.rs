//! Retries and hedging (gRFC A6), guarded by a retry budget.
//!
//! Why a budget and not just `maxAttempts`: when a dependency is down, every
//! caller retrying three times triples the load on it exactly when it can
//! least take it. A budget (retries may add at most 20 %
//! of requests plus 10 per second) lets retries fix sporadic failures while
//! an outage costs at most 1.2× the traffic.
//!
//! What may be retried:
//! - a method declared `IDEMPOTENT` or `NO_SIDE_EFFECTS` in its proto, on a
//!   retryable status (default `UNAVAILABLE`) in a trailers-only response,
//!   on a connection failure, or after a per-attempt timeout;
//! - any method, when the request provably never reached a server (the
//!   connection could not be made, or the stream was refused).
//!
//! Never retried: once response headers have arrived (the call is
//! committed), a client-streaming request, a request body larger than
//! `maxReplayBytes` (it is not kept for replay), or when the call's
//! deadline would leave the attempt under [`MIN_ATTEMPT_TIME`]. `grpc-retry-pushback-ms`
//! from the server overrides the backoff, and a negative one stops retries.
//! Mechanism (the replayable body and the attempt loop) lives here; policy
//! (attempts, backoff, codes, budget) is configuration.
//!
//! [`RetryLayer`] is an ordinary tower layer over any HTTP service that
//! speaks tonic's body; a mesh channel puts it over the balancer, and a
//! user may put it over a plain tonic `Channel` (see
//! `examples/layers_over_a_channel.rs`). Its contract with the layer below
//! is on the type.

pub(crate) mod body;
mod budget;

pub(crate) use budget::Budget;

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use http::HeaderValue;
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt, util::Oneshot};

use crate::{
    BoxError,
    balance::{CallError, Exclude, NoEndpoint, NoneServing, Picked, Served, timed_out},
    config::{ConfigHandle, HedgingPolicy, RetryPolicy},
    deadline::CallExpiry,
    endpoint::header_status,
    methods::{MethodInfo, MethodTable},
    telemetry::metrics::Metrics,
};

type Attempt = Result<http::Response<Body>, BoxError>;

/// (Defined with the deadlines, where the balancer's resend of a request
/// handed back unsent reads it too.)
pub use crate::deadline::MIN_ATTEMPT_TIME;

/// The time left until the call's deadline, if a layer above set one.
fn time_left(parts: &http::request::Parts) -> Option<Duration> {
    parts.extensions.get::<CallExpiry>().map(|expiry| {
        expiry
            .0
            .saturating_duration_since(tokio::time::Instant::now())
    })
}

/// Whether the call still has time for another attempt sent after `wait`.
fn time_for_attempt(parts: &http::request::Parts, wait: Duration) -> bool {
    time_left(parts).is_none_or(|left| left >= wait + MIN_ATTEMPT_TIME)
}

/// The end of a call whose deadline left no time for another attempt:
/// `DEADLINE_EXCEEDED` once it has (about) passed, else the last attempt's.
fn out_of_time(parts: &http::request::Parts, last: Attempt) -> Attempt {
    if time_left(parts).is_some_and(|left| left < MIN_ATTEMPT_TIME) {
        return Err(Box::new(tonic::Status::deadline_exceeded(
            "the call's deadline passed before another attempt could be sent",
        )));
    }
    last
}

/// A request extension that replaces the configured retry policy for one
/// call (a route's `retryPolicy`, set by the router above); hedging and
/// the budget stay as configured.
#[derive(Clone, Debug)]
pub(crate) struct RetryOverride(pub(crate) Arc<RetryPolicy>);

/// Retries and hedges calls to one target by its live config, within a
/// retry budget shared by every service this layer makes.
///
/// # Contract with the service below
///
/// - Each attempt is a fresh request (the body replayed from a buffer)
///   sent with `oneshot` on the call's own clone of the inner service
///   (retries one after another on the same clone, each hedge on a clone
///   of its own), so the inner service must be cheap to clone (and
///   `Send + Sync`, as tonic's `Channel` is); losing hedges are cancelled
///   by dropping their futures.
/// - Requests carry, as extensions, the addresses earlier attempts went to
///   (to avoid) and, for hedges, a slot the service below fills with the
///   address it chose; a failed trailers-only response may carry the
///   address that answered. The mesh's balancer honours all three; a
///   service that ignores them loses only the spreading of attempts.
/// - An error of the balancer's own type says whether the request
///   provably never reached a server (then any method is retried) and
///   whether the call's deadline ran out (then nothing is). Any other
///   error (a plain tonic `Channel`'s) is taken as a transport failure
///   after which the request may have arrived: only idempotent methods
///   are retried. A `tonic::Status` error is classified by its code.
/// - Which methods are idempotent comes from the [`MethodTable`] (the
///   contracts' `idempotency_level`); unknown methods are sent once.
/// - A layer above may replace the retry policy of one call with a
///   `RetryOverride` extension (the mesh's router does, for a route's
///   `retryPolicy`); the extensions of the call are in every attempt.
/// - A [`CallExpiry`] extension (the deadline layer above sets one) makes
///   every attempt after the first carry `grpc-timeout` with the time left
///   until it, not the header the call came with.
/// - Errors leave as `tonic::Status` where the mesh knows what happened,
///   otherwise as the inner service's error.
#[derive(Clone)]
pub struct RetryLayer {
    target: Arc<str>,
    peer: Arc<str>,
    config: ConfigHandle,
    methods: Arc<MethodTable>,
    budget: Arc<Budget>,
    metrics: Metrics,
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// Retries calls to `target` (the key of its policy in the config's
    /// `targets`) by the policy `config` holds at each call, for the
    /// methods `methods` knows. The retry budget is sized from the config
    /// now and shared by every service the layer makes; retries are
    /// counted in the process's default metrics under the peer name
    /// `target` (see [`RetryLayer::named`], [`RetryLayer::metrics`]).
    pub fn new(target: &str, config: ConfigHandle, methods: Arc<MethodTable>) -> Self {
        let budget = config.load().retry_budget.clone();
        Self {
            target: Arc::from(target),
            peer: Arc::from(target),
            config,
            methods,
            budget: Arc::new(Budget::new(
                budget.ttl,
                budget.min_retries_per_second,
                budget.retry_ratio,
            )),
            metrics: crate::telemetry::metrics::metrics().clone(),
        }
    }

    /// Names the target `peer` in metrics and logs.
    pub fn named(mut self, peer: &str) -> Self {
        self.peer = Arc::from(peer);
        self
    }

    /// Counts retries, hedges and spent budgets in `metrics`.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: Arc::new(self.clone()),
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<RetryLayer>,
}

impl<S> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("target", &self.shared.target)
            .finish_non_exhaustive()
    }
}

/// How an attempt ended, for the retry decision.
enum Outcome {
    /// Done: success, or a response whose headers arrived.
    Final,
    /// Failed with this code, before anything was committed.
    Failed {
        code: Code,
        pushback: Pushback,
        never_sent: bool,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum Pushback {
    None,
    After(Duration),
    Stop,
}

fn classify(result: &Attempt) -> Outcome {
    let failed = |code, never_sent| Outcome::Failed {
        code,
        pushback: Pushback::None,
        never_sent,
    };
    let error = match result {
        Ok(response) => {
            return match header_status(response) {
                Some(code) if code != Code::Ok => Outcome::Failed {
                    code,
                    pushback: pushback(response.headers()),
                    never_sent: false,
                },
                // No gRPC answer at all, an HTTP error (a proxy's 503 with
                // nothing behind it): the code gRPC's HTTP mapping gives it,
                // as the caller sees it, retried by that code like any other.
                None if response.status() != http::StatusCode::OK => {
                    failed(crate::body::code_without_status(response.status()), false)
                }
                _ => Outcome::Final,
            };
        }
        Err(error) => error,
    };
    match error.downcast_ref::<CallError>() {
        // The call's deadline is gone: nothing to retry or hedge with.
        Some(CallError::Transport { source, .. }) if timed_out(source.as_ref()) => Outcome::Final,
        Some(CallError::Transport { never_sent, .. }) => failed(Code::Unavailable, *never_sent),
        Some(CallError::NoEndpoint(_)) => failed(Code::Unavailable, true),
        Some(CallError::AttemptTimeout(_)) => failed(Code::DeadlineExceeded, false),
        // Not the balancer's: a plain connection's error, or a status.
        None if timed_out(error.as_ref()) => Outcome::Final,
        None => match error.downcast_ref::<tonic::Status>() {
            Some(status) => failed(status.code(), false),
            None => failed(Code::Unavailable, false),
        },
    }
}

/// The endpoint a failed attempt went to, to avoid it on the next one.
/// Whether the balancer marked a failed answer as coming from a set where
/// no endpoint serves.
fn none_serving(result: &Attempt) -> bool {
    matches!(result, Ok(response) if response.extensions().get::<NoneServing>().is_some())
}

fn served_by(result: &Attempt) -> Option<std::net::SocketAddr> {
    match result {
        Ok(response) => response.extensions().get::<Served>().map(|s| s.0),
        Err(error) => match error.downcast_ref::<CallError>() {
            Some(CallError::Transport { addr, .. }) => Some(*addr),
            _ => None,
        },
    }
}

fn pushback(headers: &http::HeaderMap) -> Pushback {
    match headers
        .get(crate::headers::GRPC_RETRY_PUSHBACK_MS)
        .map(|v| v.to_str().map(str::parse::<i64>))
    {
        None => Pushback::None,
        Some(Ok(Ok(ms))) if ms >= 0 => Pushback::After(Duration::from_millis(ms as u64)),
        // Negative or malformed: the server asks not to retry.
        Some(_) => Pushback::Stop,
    }
}

/// Full-jitter exponential backoff before retry number `retry` (1-based).
fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let exp = policy
        .backoff_multiplier
        .powi(retry.saturating_sub(1).min(30) as i32);
    let cap = policy.initial_backoff.mul_f64(exp).min(policy.max_backoff);
    cap.mul_f64(rand::random::<f64>())
}

impl<S> Retry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// One attempt, nothing buffered or retried, on the call's own clone
    /// of the inner service (no further clone).
    async fn once(self, req: http::Request<Body>) -> Attempt {
        self.inner.oneshot(req).await.map_err(Into::into)
    }

    /// Attempt `number` of a call: a fresh request from the replay copy,
    /// with the headers and extensions that attempt needs, and (when
    /// `track`, for hedges) the slot the balancer fills with where it went.
    fn attempt_request(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        number: u32,
        exclude: &[std::net::SocketAddr],
        per_attempt: Option<Duration>,
        track: bool,
    ) -> (http::Request<Body>, Option<Picked>) {
        let mut req = http::Request::from_parts(
            parts.clone(),
            Body::new(body::ReplayBody::new(body.clone())),
        );
        if number > 1 {
            req.headers_mut().insert(
                crate::headers::GRPC_PREVIOUS_RPC_ATTEMPTS,
                HeaderValue::from(number - 1),
            );
            // The header was the call's whole budget when the deadline
            // layer set it; a later attempt has only what is left, and a
            // server told more would work on past the caller's deadline.
            if per_attempt.is_none()
                && let Some(expiry) = parts.extensions.get::<CallExpiry>()
            {
                req.headers_mut()
                    .insert(crate::headers::GRPC_TIMEOUT, expiry.header_value());
            }
        }
        // A per-attempt timeout shorter than the call's time left is what
        // this attempt has: the server is told that, and stops working
        // when the attempt is abandoned rather than at the call's deadline.
        if let Some(limit) = per_attempt {
            let call_left =
                time_left(parts).or_else(|| crate::deadline::header_timeout(&parts.headers));
            let sent = call_left.map_or(limit, |left| left.min(limit));
            req.headers_mut().insert(
                crate::headers::GRPC_TIMEOUT,
                crate::deadline::grpc_timeout_header(sent),
            );
        }
        // Only hedges read where an attempt went.
        let picked = track.then(Picked::default);
        if let Some(picked) = &picked {
            req.extensions_mut().insert(picked.clone());
        }
        if !exclude.is_empty() {
            req.extensions_mut().insert(Exclude(exclude.to_vec()));
        }
        (req, picked)
    }

    /// A hedge: concurrent with the others, so on a clone of its own.
    fn hedge_attempt(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        number: u32,
        exclude: &[std::net::SocketAddr],
    ) -> (
        AttemptFuture<Oneshot<S, http::Request<Body>>>,
        Option<Picked>,
    ) {
        let (req, picked) = self.attempt_request(parts, body, number, exclude, None, true);
        (
            AttemptFuture::new(self.inner.clone().oneshot(req), None),
            picked,
        )
    }

    async fn retry_loop(
        mut self,
        parts: http::request::Parts,
        body: Bytes,
        idempotent: bool,
        policy: CallRetry,
    ) -> Attempt {
        let policy = policy.get(&self.shared.target, parts.uri.path());
        let mut exclude = Vec::new();
        let mut number = 1;
        loop {
            let per_attempt = policy.per_attempt_recv_timeout;
            let (req, _) =
                self.attempt_request(&parts, &body, number, &exclude, per_attempt, false);
            // Attempts follow one another, so each is sent on the call's
            // own clone of the inner service, borrowed: a clone per
            // attempt was a second copy of the stack below per call.
            let result = AttemptFuture::new((&mut self.inner).oneshot(req), per_attempt).await;
            let Outcome::Failed {
                code,
                pushback,
                never_sent,
            } = classify(&result)
            else {
                return result;
            };
            let retryable = never_sent
                || (idempotent && policy.retryable_status_codes.contains(&code))
                || (idempotent && code == Code::Unavailable && result.is_err());
            if !retryable || number >= policy.max_attempts || pushback == Pushback::Stop {
                return result;
            }
            // Every endpoint says it cannot serve (their database is down):
            // panic mode gave the call one attempt; more would only
            // multiply the outage's latency (two inventory replicas with
            // PostgreSQL blackholed answered in 3 x the 1 s pool timeout,
            // tests/netfaults.rs) and the load on what is broken.
            if none_serving(&result) {
                return result;
            }
            let wait = match pushback {
                Pushback::After(wait) => wait,
                _ => backoff(policy, number),
            };
            // A retry that would leave with under MIN_ATTEMPT_TIME of the
            // deadline is not sent, and spends no budget.
            if !time_for_attempt(&parts, wait) {
                tracing::debug!(target = %self.shared.target, path = parts.uri.path(), ?wait, "no time left before the deadline; not retrying");
                return out_of_time(&parts, result);
            }
            if !self.shared.budget.withdraw() {
                self.shared.metrics.budget_exhausted(&self.shared.peer);
                tracing::debug!(target = %self.shared.target, path = parts.uri.path(), "retry budget exhausted; not retrying");
                return result;
            }
            if let Some(addr) = served_by(&result) {
                exclude.push(addr);
            }
            tracing::debug!(target = %self.shared.target, path = parts.uri.path(), attempt = number + 1, ?wait, ?code, "retrying");
            tokio::time::sleep(wait).await;
            self.shared
                .metrics
                .retry(&self.shared.peer, parts.uri.path(), false);
            number += 1;
        }
    }

    async fn hedge(
        self,
        parts: http::request::Parts,
        body: Bytes,
        policy: HedgingPolicy,
    ) -> Attempt {
        let mut running = FuturesUnordered::new();
        let mut exclude = Vec::new();
        let mut picks: Vec<Picked> = Vec::new();
        let mut sent = 0;
        let mut last = None;
        let mut launch =
            |sent: &mut u32, running: &mut FuturesUnordered<_>, exclude: &mut Vec<_>| {
                exclude.extend(picks.iter().filter_map(Picked::get));
                *sent += 1;
                let (fut, picked) = self.hedge_attempt(&parts, &body, *sent, exclude);
                picks.extend(picked);
                running.push(fut);
            };
        launch(&mut sent, &mut running, &mut exclude);
        // Set by a server's pushback: the next hedge waits until then
        // rather than the hedging delay, or going at once (gRFC A6).
        let mut held_until: Option<tokio::time::Instant> = None;
        loop {
            let more = sent < policy.max_attempts;
            let next_hedge =
                held_until.unwrap_or_else(|| tokio::time::Instant::now() + policy.hedging_delay);
            tokio::select! {
                Some(result) = running.next() => {
                    match classify(&result) {
                        Outcome::Failed { code, pushback, .. }
                            if policy.non_fatal_status_codes.contains(&code) && pushback != Pushback::Stop =>
                        {
                            let none_serving = none_serving(&result);
                            last = Some(result);
                            // Every endpoint NOT_SERVING: no more hedges (as
                            // no more retries); the ones out may still answer.
                            if none_serving {
                                sent = policy.max_attempts;
                                if running.is_empty() {
                                    return last.expect("just set");
                                }
                                continue;
                            }
                            // A non-fatal failure sends the next hedge at
                            // once, if there is time for it; with pushback,
                            // once that has passed.
                            let wait = match pushback {
                                Pushback::After(wait) => Some(wait),
                                _ => None,
                            };
                            if more && !time_for_attempt(&parts, wait.unwrap_or_default()) {
                                sent = policy.max_attempts;
                                if running.is_empty() {
                                    return out_of_time(&parts, last.expect("just set"));
                                }
                            } else if let Some(wait) = wait.filter(|_| more) {
                                match tokio::time::Instant::now().checked_add(wait) {
                                    // The later of two servers' pushbacks.
                                    Some(at) => held_until = held_until.max(Some(at)),
                                    // Past any time the clock can tell: no more.
                                    None => sent = policy.max_attempts,
                                }
                            } else if more && held_until.is_some() {
                                // Held by an earlier answer's pushback: the
                                // next hedge waits for it still.
                            } else if more && self.shared.budget.withdraw() {
                                self.shared.metrics.retry(&self.shared.peer, parts.uri.path(), true);
                                tracing::debug!(target = %self.shared.target, path = parts.uri.path(), attempt = sent + 1, ?code, "hedging after a non-fatal failure");
                                launch(&mut sent, &mut running, &mut exclude);
                            } else if running.is_empty() {
                                return last.expect("just set");
                            }
                        }
                        _ => return result,
                    }
                }
                _ = tokio::time::sleep_until(next_hedge), if more => {
                    held_until = None;
                    if !time_for_attempt(&parts, Duration::ZERO) {
                        // No time for another hedge: the ones out may still answer.
                        sent = policy.max_attempts;
                    } else if self.shared.budget.withdraw() {
                        self.shared.metrics.retry(&self.shared.peer, parts.uri.path(), true);
                        tracing::debug!(target = %self.shared.target, path = parts.uri.path(), attempt = sent + 1, "hedging");
                        launch(&mut sent, &mut running, &mut exclude);
                    } else {
                        self.shared.metrics.budget_exhausted(&self.shared.peer);
                        sent = policy.max_attempts;
                    }
                }
                else => return last.unwrap_or_else(|| Err(Box::new(CallError::NoEndpoint(NoEndpoint::Empty)))),
            }
        }
    }
}

impl<S> Service<http::Request<Body>> for Retry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each attempt waits for its own clone of the inner service.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        let mut req = req;
        // Without the deadline layer above (this layer over a plain
        // channel), the call's own `grpc-timeout` bounds its retries and
        // their waits: a server's pushback could otherwise hold it forever.
        if req.extensions().get::<CallExpiry>().is_none()
            && let Some(timeout) = crate::deadline::header_timeout(req.headers())
            && let Some(at) = tokio::time::Instant::now().checked_add(timeout)
        {
            req.extensions_mut().insert(CallExpiry(at));
        }
        Box::pin(async move {
            let target = this.shared.target.clone();
            let info = this.shared.methods.get(req.uri().path());
            this.shared.budget.deposit();
            let result = match info {
                // Unknown or client-streaming: one attempt, nothing buffered.
                None
                | Some(MethodInfo {
                    client_streaming: true,
                    ..
                }) => this.once(req).await,
                Some(info) => {
                    let config = this.shared.config.load();
                    let hedging = config
                        .call_policy(&target, req.uri().path())
                        .hedging
                        .cloned();
                    let max_replay_bytes = config.max_replay_bytes;
                    // The retry policy is read where it is used, from this
                    // config: a copy of it per call was an allocation.
                    let retry = CallRetry {
                        config,
                        route: req.extensions().get::<RetryOverride>().map(|r| r.0.clone()),
                    };
                    let (parts, body) = req.into_parts();
                    match body::buffer(body, max_replay_bytes).await {
                        Err(status) => return Err(Box::new(status) as BoxError),
                        Ok(body::Buffered::TooLarge(body)) => {
                            this.once(http::Request::from_parts(parts, body)).await
                        }
                        Ok(body::Buffered::Whole(bytes)) => match hedging {
                            Some(hedging) if info.idempotent => {
                                this.hedge(parts, bytes, hedging).await
                            }
                            _ => this.retry_loop(parts, bytes, info.idempotent, retry).await,
                        },
                    }
                }
            };
            // The one mapping of the balancer's failures to a status.
            result.map_err(|e| match e.downcast::<CallError>() {
                Ok(e) => Box::new(e.into_status(&target)) as BoxError,
                Err(e) => e,
            })
        })
    }
}

/// The retry policy of one call: its route's, else the config's for its
/// method.
struct CallRetry {
    config: Arc<crate::config::MeshConfig>,
    route: Option<Arc<RetryPolicy>>,
}

impl CallRetry {
    fn get(&self, target: &str, path: &str) -> &RetryPolicy {
        match &self.route {
            Some(route) => route,
            None => self.config.call_policy(target, path).retry,
        }
    }
}

pin_project_lite::pin_project! {
    /// One attempt: the inner service's response, bounded by the policy's
    /// per-attempt timeout when it sets one. A named future rather than a
    /// boxed one (an allocation per attempt).
    struct AttemptFuture<F> {
        #[pin]
        call: F,
        #[pin]
        limit: Option<tokio::time::Sleep>,
        after: Duration,
    }
}

impl<F> AttemptFuture<F> {
    fn new(call: F, per_attempt: Option<Duration>) -> Self {
        Self {
            call,
            limit: per_attempt.map(tokio::time::sleep),
            after: per_attempt.unwrap_or_default(),
        }
    }
}

impl<F, T, E> std::future::Future for AttemptFuture<F>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.call.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        match this.limit.as_pin_mut().map(|limit| limit.poll(cx)) {
            Some(Poll::Ready(())) => {
                Poll::Ready(Err(Box::new(CallError::AttemptTimeout(*this.after))))
            }
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod layer_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushback_parsing() {
        let mut h = http::HeaderMap::new();
        assert!(matches!(pushback(&h), Pushback::None));
        h.insert("grpc-retry-pushback-ms", "250".parse().unwrap());
        assert!(matches!(pushback(&h), Pushback::After(d) if d == Duration::from_millis(250)));
        h.insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        assert!(matches!(pushback(&h), Pushback::Stop));
        h.insert("grpc-retry-pushback-ms", "soon".parse().unwrap());
        assert!(matches!(pushback(&h), Pushback::Stop));
    }

    #[test]
    fn backoff_is_bounded_by_the_policy() {
        let policy = RetryPolicy::default();
        for retry in 1..10 {
            let cap = policy
                .initial_backoff
                .mul_f64(2f64.powi(retry as i32 - 1))
                .min(policy.max_backoff);
            assert!(backoff(&policy, retry) <= cap);
        }
    }
}
