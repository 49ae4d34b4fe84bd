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
//! committed), a client-streaming request, or a request body larger than
//! `maxReplayBytes` (it is not kept for replay). `grpc-retry-pushback-ms`
//! from the server overrides the backoff, and a negative one stops retries.
//! Mechanism (the replayable body and the attempt loop) lives here; policy
//! (attempts, backoff, codes, budget) is configuration.

mod body;
mod budget;

pub(crate) use budget::Budget;

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use http::HeaderValue;
use tonic::{Code, body::Body};
use tower::Service;

use crate::{
    BoxError,
    balance::{Balancer, CallError, Exclude, Picked, Served},
    config::ConfigHandle,
    config::{HedgingPolicy, RetryPolicy},
    endpoint::header_status,
    methods::MethodTable,
    telemetry::metrics::Metrics,
};

type Attempt = Result<http::Response<Body>, CallError>;

/// The retrying, hedging service above the balancer.
#[derive(Clone)]
pub(crate) struct Retry {
    pub(crate) inner: Balancer,
    pub(crate) config: ConfigHandle,
    pub(crate) methods: Arc<MethodTable>,
    pub(crate) budget: Arc<Budget>,
    pub(crate) metrics: Metrics,
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
    match result {
        Ok(response) => match header_status(response) {
            Some(code) if code != Code::Ok => Outcome::Failed {
                code,
                pushback: pushback(response.headers()),
                never_sent: false,
            },
            _ => Outcome::Final,
        },
        // The call's deadline is gone: nothing to retry or hedge with.
        Err(CallError::Transport { source, .. }) if crate::balance::timed_out(source.as_ref()) => {
            Outcome::Final
        }
        Err(CallError::Transport { never_sent, .. }) => Outcome::Failed {
            code: Code::Unavailable,
            pushback: Pushback::None,
            never_sent: *never_sent,
        },
        Err(CallError::NoEndpoint(_)) => Outcome::Failed {
            code: Code::Unavailable,
            pushback: Pushback::None,
            never_sent: true,
        },
        Err(CallError::AttemptTimeout(_)) => Outcome::Failed {
            code: Code::DeadlineExceeded,
            pushback: Pushback::None,
            never_sent: false,
        },
    }
}

/// The endpoint a failed attempt went to, to avoid it on the next one.
fn served_by(result: &Attempt) -> Option<std::net::SocketAddr> {
    match result {
        Ok(response) => response.extensions().get::<Served>().map(|s| s.0),
        Err(CallError::Transport { addr, .. }) => Some(*addr),
        Err(_) => None,
    }
}

fn pushback(headers: &http::HeaderMap) -> Pushback {
    match headers
        .get("grpc-retry-pushback-ms")
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

impl Retry {
    fn attempt(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        number: u32,
        exclude: &[std::net::SocketAddr],
        per_attempt: Option<Duration>,
        track: bool,
    ) -> (BoxFuture<'static, Attempt>, Picked) {
        let mut req = http::Request::from_parts(
            parts.clone(),
            Body::new(http_body_util::Full::new(body.clone())),
        );
        if number > 1 {
            req.headers_mut()
                .insert("grpc-previous-rpc-attempts", HeaderValue::from(number - 1));
        }
        let picked = Picked::default();
        if track {
            req.extensions_mut().insert(picked.clone());
        }
        if !exclude.is_empty() {
            req.extensions_mut().insert(Exclude(exclude.to_vec()));
        }
        let call = self.inner.clone().call(req);
        let fut = match per_attempt {
            Some(limit) => async move {
                tokio::time::timeout(limit, call)
                    .await
                    .unwrap_or(Err(CallError::AttemptTimeout(limit)))
            }
            .boxed(),
            None => call,
        };
        (fut, picked)
    }

    async fn retry_loop(
        self,
        parts: http::request::Parts,
        body: Bytes,
        idempotent: bool,
        policy: RetryPolicy,
    ) -> Attempt {
        let mut exclude = Vec::new();
        let mut number = 1;
        loop {
            let (fut, _) = self.attempt(
                &parts,
                &body,
                number,
                &exclude,
                policy.per_attempt_recv_timeout,
                false,
            );
            let result = fut.await;
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
            if !self.budget.withdraw() {
                self.metrics.budget_exhausted(&self.inner.set.peer);
                tracing::debug!(target = %self.inner.set.target, path = parts.uri.path(), "retry budget exhausted; not retrying");
                return result;
            }
            if let Some(addr) = served_by(&result) {
                exclude.push(addr);
            }
            let wait = match pushback {
                Pushback::After(wait) => wait,
                _ => backoff(&policy, number),
            };
            tracing::debug!(target = %self.inner.set.target, path = parts.uri.path(), attempt = number + 1, ?wait, ?code, "retrying");
            tokio::time::sleep(wait).await;
            self.metrics
                .retry(&self.inner.set.peer, parts.uri.path(), false);
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
                exclude.extend(picks.iter().filter_map(|p: &Picked| p.0.get().copied()));
                *sent += 1;
                let (fut, picked) = self.attempt(&parts, &body, *sent, exclude, None, true);
                picks.push(picked);
                running.push(fut);
            };
        launch(&mut sent, &mut running, &mut exclude);
        loop {
            let more = sent < policy.max_attempts;
            tokio::select! {
                Some(result) = running.next() => {
                    match classify(&result) {
                        Outcome::Failed { code, pushback, .. }
                            if policy.non_fatal_status_codes.contains(&code) && pushback != Pushback::Stop =>
                        {
                            last = Some(result);
                            // A non-fatal failure sends the next hedge at once.
                            if more && self.budget.withdraw() {
                                self.metrics.retry(&self.inner.set.peer, parts.uri.path(), true);
                                tracing::debug!(target = %self.inner.set.target, path = parts.uri.path(), attempt = sent + 1, ?code, "hedging after a non-fatal failure");
                                launch(&mut sent, &mut running, &mut exclude);
                            } else if running.is_empty() {
                                return last.expect("just set");
                            }
                        }
                        _ => return result,
                    }
                }
                _ = tokio::time::sleep(policy.hedging_delay), if more => {
                    if self.budget.withdraw() {
                        self.metrics.retry(&self.inner.set.peer, parts.uri.path(), true);
                        tracing::debug!(target = %self.inner.set.target, path = parts.uri.path(), attempt = sent + 1, "hedging");
                        launch(&mut sent, &mut running, &mut exclude);
                    } else {
                        self.metrics.budget_exhausted(&self.inner.set.peer);
                        sent = policy.max_attempts;
                    }
                }
                else => return last.unwrap_or(Err(CallError::NoEndpoint(crate::balance::NoEndpoint::Empty))),
            }
        }
    }
}

impl Service<http::Request<Body>> for Retry {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        let target = self.inner.set.target.clone();
        Box::pin(async move {
            let info = this.methods.get(req.uri().path());
            this.budget.deposit();
            let result = match info {
                // Unknown or client-streaming: one attempt, nothing buffered.
                None
                | Some(crate::methods::MethodInfo {
                    client_streaming: true,
                    ..
                }) => this.inner.clone().call(req).await,
                Some(info) => {
                    let config = this.config.load();
                    let policy = config.call_policy(&target, req.uri().path());
                    let (retry, hedging) = (policy.retry.clone(), policy.hedging.cloned());
                    let (parts, body) = req.into_parts();
                    match body::buffer(body, config.max_replay_bytes).await {
                        Err(status) => return Err(Box::new(status) as BoxError),
                        Ok(body::Buffered::TooLarge(body)) => {
                            this.inner
                                .clone()
                                .call(http::Request::from_parts(parts, body))
                                .await
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
            result.map_err(|e| Box::new(e.into_status(&target)) as BoxError)
        })
    }
}

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
