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
//! draining) or `error` (any other status).
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

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tonic::{Code, Status};

/// Labels of `mesh_fallbacks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    peer: Arc<str>,
    rpc_service: &'static str,
    rpc_method: &'static str,
    reason: &'static str,
}

/// The family, registered with the process's metrics on first use.
fn fallbacks() -> &'static Family<FallbackLabels, Counter> {
    static FAMILY: OnceLock<Family<FallbackLabels, Counter>> = OnceLock::new();
    FAMILY.get_or_init(|| {
        let family = Family::default();
        crate::telemetry::metrics().register(|r| {
            r.register(
                "fallbacks",
                "Calls to an optional dependency answered without it (deadline, unavailable, error)",
                family.clone(),
            )
        });
        family
    })
}

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
}

impl FallbackReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::Deadline => "deadline",
            FallbackReason::Unavailable => "unavailable",
            FallbackReason::Error => "error",
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

/// Calls to one optional dependency, each bounded by a budget.
#[derive(Clone, Debug)]
pub struct Optional {
    peer: Arc<str>,
    budget: Duration,
}

impl Optional {
    /// Calls to `peer` (its name in metrics, as the channel's) that get at
    /// most `budget` each.
    pub fn new(peer: &str, budget: Duration) -> Self {
        Self {
            peer: Arc::from(peer),
            budget,
        }
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
        let fallback = match tokio::time::timeout(self.budget, call).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(status)) => Fallback {
                reason: FallbackReason::of(status.code()),
                status: Some(status),
            },
            Err(_) => Fallback {
                reason: FallbackReason::Deadline,
                status: None,
            },
        };
        let (rpc_service, rpc_method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("unknown", "unknown"));
        fallbacks()
            .get_or_create(&FallbackLabels {
                peer: self.peer.clone(),
                rpc_service,
                rpc_method,
                reason: fallback.reason.as_str(),
            })
            .inc();
        Err(fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/test.optional.v1.Svc/Get";

    fn count(peer: &str, reason: &str) -> u64 {
        fallbacks()
            .get_or_create(&FallbackLabels {
                peer: Arc::from(peer),
                rpc_service: "test.optional.v1.Svc",
                rpc_method: "Get",
                reason: match reason {
                    "deadline" => "deadline",
                    "unavailable" => "unavailable",
                    _ => "error",
                },
            })
            .get()
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
}
