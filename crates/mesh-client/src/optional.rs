//! Optional dependencies: calls whose failure must not fail the caller.
//!
//! A service that only enriches an answer (recommendations beside a cart,
//! a banner, a personalisation) is asked within a small budget, and when
//! it is slow, failing, ejected or absent the caller answers without it.
//! [`Optional::call`] resolves within the budget, to the answer or to a
//! [`Fallback`] that says why, counted in
//! `mesh_fallbacks_total{peer, rpc_service, rpc_method, reason}` with
//! `reason` one of `deadline` (the budget or the call's deadline ran out),
//! `unavailable` (no endpoint would take it: refused, ejected, unhealthy,
//! draining), `error` (any other status) or `open` (not asked: the
//! breaker is open, below).
//!
//! The budget is a wall-clock bound on the whole call, not only on its
//! response headers: the future is dropped when it runs out, which cancels
//! the stream. Pair it with the target's mesh config, so the mesh spends no
//! more than the budget and never amplifies the dependency's trouble:
//!
//! ```json
//! { "targets": { "dns:///recommendations.shop.svc.cluster.local:50051": {
//!     "timeout": "50ms", "maxTimeout": "50ms",
//!     "retryPolicy": { "maxAttempts": 1 } } } }
//! ```
//!
//! (no `hedgingPolicy`: hedging is off unless set).
//!
//! A dependency that keeps failing would still cost every caller its whole
//! budget (a hung or slow one, whose calls end at the deadline, is never
//! ejected by the mesh: a caller's deadline says nothing of the endpoint).
//! [`Optional::with_breaker`] adds a circuit breaker: after a run of
//! fallbacks the dependency is not asked at all for a while (`reason`
//! `open`, answered at once), then one call probes it, and an answer
//! closes the breaker again.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use tonic::{Code, Status};

use crate::telemetry::metrics::Metrics;

/// Why an optional call was given up on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// The budget, or the call's own deadline, ran out.
    Deadline,
    /// No endpoint would take the call (refused, ejected, unhealthy,
    /// draining, resolving to nothing).
    Unavailable,
    /// The dependency answered with another error status.
    Error,
    /// The breaker is open: the dependency failed too often lately and
    /// was not asked (see [`Optional::with_breaker`]).
    Open,
}

impl FallbackReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::Deadline => "deadline",
            FallbackReason::Unavailable => "unavailable",
            FallbackReason::Error => "error",
            FallbackReason::Open => "open",
        }
    }

    fn of(code: Code) -> Self {
        match code {
            Code::DeadlineExceeded => FallbackReason::Deadline,
            Code::Unavailable => FallbackReason::Unavailable,
            _ => FallbackReason::Error,
        }
    }
}

/// An optional call that was given up on: answer without it.
#[derive(Clone, Debug)]
pub struct Fallback {
    /// Why.
    pub reason: FallbackReason,
    /// The status the call failed with (`None` when the budget ran out
    /// first), for the caller's log; never for an outside caller, since
    /// mesh messages name addresses and identities.
    pub status: Option<Status>,
}

/// Calls to one optional dependency, each bounded by a budget. Clones
/// share one breaker.
#[derive(Clone, Debug)]
pub struct Optional {
    peer: Arc<str>,
    budget: Duration,
    metrics: Metrics,
    breaker: Option<Arc<Breaker>>,
}

/// A circuit breaker over consecutive fallbacks.
#[derive(Debug)]
struct Breaker {
    open_after: u32,
    open_for: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    /// Fallbacks in a row.
    failures: u32,
    /// Not asked before this.
    open_until: Option<Instant>,
    /// A probe in flight since then (one at a time; a probe whose caller
    /// went away stops counting after a budget).
    probe_since: Option<Instant>,
}

impl Breaker {
    /// Whether to ask the dependency now.
    fn admit(&self, budget: Duration) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().expect("breaker lock");
        match state.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) => {
                let probing = state
                    .probe_since
                    .is_some_and(|since| now < since + budget + budget);
                if probing {
                    return false;
                }
                state.probe_since = Some(now);
                true
            }
        }
    }

    fn record(&self, ok: bool) {
        let mut state = self.state.lock().expect("breaker lock");
        if ok {
            *state = BreakerState::default();
            return;
        }
        state.failures = state.failures.saturating_add(1);
        let probe_failed = state.probe_since.take().is_some();
        if probe_failed || state.failures >= self.open_after {
            state.open_until = Some(Instant::now() + self.open_for);
        }
    }
}

impl Optional {
    /// Calls to `peer` (its name in metrics, as the channel's) that get at
    /// most `budget` each.
    pub fn new(peer: &str, budget: Duration) -> Self {
        Self {
            peer: Arc::from(peer),
            budget,
            metrics: crate::telemetry::metrics().clone(),
            breaker: None,
        }
    }

    /// Counts fallbacks in `metrics` instead of the process default (pass
    /// the calling mesh's, `Mesh::metrics`, when it has its own).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Adds a circuit breaker: after `open_after` fallbacks in a row the
    /// dependency is not asked for `open_for` (calls fall back at once,
    /// `reason="open"`); then one call probes it, and an answer closes the
    /// breaker (a failed probe opens it for another `open_for`).
    pub fn with_breaker(mut self, open_after: u32, open_for: Duration) -> Self {
        self.breaker = Some(Arc::new(Breaker {
            open_after: open_after.max(1),
            open_for,
            state: Mutex::default(),
        }));
        self
    }

    /// The budget of each call; also the deadline to give the request, so
    /// the callee stops working for a caller that gave up.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Runs `call` (a call of `path`, `/package.Service/Method`: a constant
    /// of the contract, so metric labels stay bounded) within the budget:
    /// its answer, or why there is none (counted).
    pub async fn call<T, F>(&self, path: &'static str, call: F) -> Result<T, Fallback>
    where
        F: Future<Output = Result<T, Status>>,
    {
        if let Some(breaker) = &self.breaker
            && !breaker.admit(self.budget)
        {
            return Err(self.count(
                path,
                Fallback {
                    reason: FallbackReason::Open,
                    status: None,
                },
            ));
        }
        let fallback = match tokio::time::timeout(self.budget, call).await {
            Ok(Ok(answer)) => {
                if let Some(breaker) = &self.breaker {
                    breaker.record(true);
                }
                return Ok(answer);
            }
            Ok(Err(status)) => Fallback {
                reason: FallbackReason::of(status.code()),
                status: Some(status),
            },
            Err(_) => Fallback {
                reason: FallbackReason::Deadline,
                status: None,
            },
        };
        // A refusal of the request itself says nothing of the
        // dependency's health: one client sending bad input through a
        // shared caller must not open the breaker for everyone.
        let callers_fault = fallback.status.as_ref().is_some_and(|s| {
            matches!(
                s.code(),
                Code::InvalidArgument | Code::OutOfRange | Code::NotFound | Code::AlreadyExists
            )
        });
        if let Some(breaker) = &self.breaker
            && !callers_fault
        {
            breaker.record(false);
        }
        Err(self.count(path, fallback))
    }

    /// Counts `fallback` in `mesh_fallbacks_total` and hands it back.
    fn count(&self, path: &'static str, fallback: Fallback) -> Fallback {
        let (rpc_service, rpc_method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("unknown", "unknown"));
        self.metrics.fallback(
            &self.peer,
            rpc_service,
            rpc_method,
            fallback.reason.as_str(),
        );
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/test.optional.v1.Svc/Get";

    fn count(peer: &str, reason: &str) -> u64 {
        crate::telemetry::metrics().fallback_count(
            peer,
            "test.optional.v1.Svc",
            "Get",
            match reason {
                "deadline" => "deadline",
                "unavailable" => "unavailable",
                "open" => "open",
                _ => "error",
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_falls_back_at_the_budget_and_is_counted() {
        let optional = Optional::new("slow-peer", Duration::from_millis(50));
        let started = tokio::time::Instant::now();
        let result = optional
            .call(PATH, async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok::<_, Status>(1)
            })
            .await;
        let fallback = result.unwrap_err();
        assert_eq!(fallback.reason, FallbackReason::Deadline);
        assert!(fallback.status.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert_eq!(count("slow-peer", "deadline"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_fall_back_by_code_and_answers_pass() {
        let optional = Optional::new("bad-peer", Duration::from_millis(50));
        for (status, reason) in [
            (Status::unavailable("gone"), FallbackReason::Unavailable),
            (Status::deadline_exceeded("late"), FallbackReason::Deadline),
            (Status::internal("bug"), FallbackReason::Error),
        ] {
            let fallback = optional
                .call(PATH, async { Err::<(), _>(status) })
                .await
                .unwrap_err();
            assert_eq!(fallback.reason, reason);
        }
        assert_eq!(optional.call(PATH, async { Ok(7) }).await.unwrap(), 7);
        assert_eq!(count("bad-peer", "unavailable"), 1);
        assert_eq!(count("bad-peer", "deadline"), 1);
        assert_eq!(count("bad-peer", "error"), 1);
        let text = crate::telemetry::metrics().encode();
        assert!(
            text.contains(r#"mesh_fallbacks_total{peer="bad-peer",rpc_service="test.optional.v1.Svc",rpc_method="Get",reason="error"} 1"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_after_a_run_of_fallbacks_and_a_probe_closes_it() {
        let optional = Optional::new("flaky-peer", Duration::from_millis(50))
            .with_breaker(3, Duration::from_secs(1));
        for _ in 0..3 {
            let fallback = optional
                .call(PATH, async { Err::<(), _>(Status::unavailable("down")) })
                .await
                .unwrap_err();
            assert_eq!(fallback.reason, FallbackReason::Unavailable);
        }
        // Open: answered at once, the dependency not asked (the future is
        // never polled), and every clone shares the breaker.
        let clone = optional.clone();
        let started = Instant::now();
        let fallback = clone
            .call(PATH, async {
                panic!("asked while the breaker is open");
                #[allow(unreachable_code)]
                Ok::<(), Status>(())
            })
            .await
            .unwrap_err();
        assert_eq!(fallback.reason, FallbackReason::Open);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(count("flaky-peer", "open"), 1);
        // After open_for, one probe; its failure opens the breaker again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let probe = optional
            .call(PATH, async {
                Err::<(), _>(Status::unavailable("still down"))
            })
            .await
            .unwrap_err();
        assert_eq!(probe.reason, FallbackReason::Unavailable);
        assert_eq!(
            optional
                .call(PATH, async { Ok(1) })
                .await
                .unwrap_err()
                .reason,
            FallbackReason::Open
        );
        // A successful probe closes it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(optional.call(PATH, async { Ok(2) }).await.unwrap(), 2);
        assert_eq!(optional.call(PATH, async { Ok(3) }).await.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_bad_request_falls_back_without_opening_the_breaker() {
        let optional = Optional::new("picky-peer", Duration::from_millis(50))
            .with_breaker(2, Duration::from_secs(60));
        for _ in 0..10 {
            let fallback = optional
                .call(PATH, async {
                    Err::<(), _>(Status::invalid_argument("product_ids[0]: bad"))
                })
                .await
                .unwrap_err();
            assert_eq!(fallback.reason, FallbackReason::Error);
        }
        assert_eq!(count("picky-peer", "error"), 10);
        // Still closed: the next caller is asked and answered.
        assert_eq!(optional.call(PATH, async { Ok(7) }).await.unwrap(), 7);
        // A dependency's own failure still opens it.
        for _ in 0..2 {
            let _ = optional
                .call(PATH, async { Err::<(), _>(Status::internal("boom")) })
                .await;
        }
        assert_eq!(
            optional
                .call(PATH, async { Ok(8) })
                .await
                .unwrap_err()
                .reason,
            FallbackReason::Open
        );
    }
}
