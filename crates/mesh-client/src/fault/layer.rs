//! The client's fault injection layer: delays and aborts a share of calls
//! by the [`FaultPolicy`] of the route that chose them.
//!
//! # Where it sits, and why
//!
//! Below the retry layer and above the balancer (`retry → fault →
//! balance`), so that:
//!
//! - an injected abort is an attempt the retry layer sees fail like any
//!   other: aborts of idempotent methods with a retryable status are
//!   retried within the retry budget, and each retry rolls the dice again
//!   (20 % aborts with 3 attempts leave 0.8 % of calls failed). Those
//!   retries withdraw from the real budget, on purpose: an injected abort
//!   never reached a server, but the experiment is to see the callers as
//!   a real failure would leave them, budget exhaustion included; a free
//!   retry would show a chaos test a resilience the real outage would not
//!   have;
//! - no endpoint ever sees an aborted attempt, so none is charged with it
//!   (no failure penalty, no outlier ejection): the balancer is never
//!   called. The response carries [`FAULT_HEADER`] and the
//!   [`InjectedFault`] extension for layers above that keep their own
//!   accounts;
//! - an injected delay counts against the call's deadline, which the
//!   deadline layer above set as `grpc-timeout`: a delay longer than what
//!   is left ends the attempt with `DEADLINE_EXCEEDED` when the deadline
//!   runs out, not after the whole delay.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{
    TryFutureExt,
    future::{BoxFuture, Either, ErrInto},
};
use http::HeaderValue;
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt};

pub use super::FAULT_HEADER;
use super::FaultPolicy;
use crate::{BoxError, telemetry::metrics::Metrics};

/// Request extension: the fault policy of the route the router chose for
/// this call. It takes precedence over a policy given to the layer.
#[derive(Clone, Debug)]
pub struct RouteFault(pub Arc<FaultPolicy>);

/// Response extension on an injected abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectedFault {
    /// The status the call was aborted with.
    pub code: Code,
}

/// Whether a call falls in the `percentage` % picked for a fault.
pub(crate) fn roll(percentage: f64) -> bool {
    percentage > 0.0 && rand::random::<f64>() * 100.0 < percentage
}

/// A trailers-only answer with `code`, marked as injected.
pub(crate) fn abort_response(code: Code, why: &str) -> http::Response<Body> {
    let mut response =
        tonic::Status::new(code, format!("fault injected by the mesh: {why}")).into_http::<Body>();
    response
        .headers_mut()
        .insert(FAULT_HEADER, HeaderValue::from_static("abort"));
    response.extensions_mut().insert(InjectedFault { code });
    response
}

/// The deadline-bounded delay: `Err` with `DEADLINE_EXCEEDED` once the
/// call's `budget` is spent if the delay is longer.
pub(crate) async fn delay_within(
    delay: Duration,
    budget: Option<Duration>,
) -> Result<(), tonic::Status> {
    match budget {
        Some(budget) if budget <= delay => {
            tokio::time::sleep(budget).await;
            Err(tonic::Status::deadline_exceeded(format!(
                "the call's deadline of {budget:?} ran out during a fault-injected delay of {delay:?}"
            )))
        }
        _ => {
            tokio::time::sleep(delay).await;
            Ok(())
        }
    }
}

/// Client layer injecting faults, by the [`RouteFault`] of each call or a
/// fixed policy.
///
/// # Contract
///
/// - A call with neither a [`RouteFault`] nor a fixed policy passes through
///   untouched (one extension lookup).
/// - Delay and abort are decided independently per call (per attempt, under
///   a retry layer).
/// - A delayed call waits, then goes to the inner service (readiness is
///   asked for after the delay); an aborted call never reaches it.
/// - Faults are counted in `mesh_client_faults_injected_total{peer,kind}`.
#[derive(Clone, Debug)]
pub struct FaultLayer {
    fixed: Option<Arc<FaultPolicy>>,
    peer: Arc<str>,
    metrics: Metrics,
}

impl FaultLayer {
    /// Faults only where a call carries a [`RouteFault`]; counted under
    /// `peer` in `metrics`.
    pub fn new(peer: &str, metrics: Metrics) -> Self {
        Self {
            fixed: None,
            peer: Arc::from(peer),
            metrics,
        }
    }

    /// Faults by `policy` for calls without a [`RouteFault`] of their own.
    pub fn with_policy(mut self, policy: FaultPolicy) -> Self {
        self.fixed = Some(Arc::new(policy));
        self
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fault {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// The service made by [`FaultLayer`].
#[derive(Clone, Debug)]
pub struct Fault<S> {
    inner: S,
    // One count to clone, not three: a retry layer above clones the stack
    // below it for every call.
    layer: Arc<FaultLayer>,
}

impl<S> Service<http::Request<Body>> for Fault<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Either<
        ErrInto<S::Future, BoxError>,
        BoxFuture<'static, Result<http::Response<Body>, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let policy = match req.extensions().get::<RouteFault>() {
            Some(route) => Some(route.0.clone()),
            None => self.layer.fixed.clone(),
        };
        let Some(policy) = policy else {
            return Either::Left(self.inner.call(req).err_into());
        };
        let delay = policy
            .delay
            .as_ref()
            .filter(|d| roll(d.percentage))
            .map(|d| d.fixed_delay);
        let abort = policy
            .abort
            .as_ref()
            .filter(|a| roll(a.percentage))
            .map(|a| a.grpc_status);
        if delay.is_none() && abort.is_none() {
            return Either::Left(self.inner.call(req).err_into());
        }
        // The readied service is left in place for the next caller; this
        // call asks a clone for readiness once its delay is over.
        let inner = self.inner.clone();
        let (peer, metrics) = (self.layer.peer.clone(), self.layer.metrics.clone());
        let budget = crate::deadline::header_timeout(req.headers());
        Either::Right(Box::pin(async move {
            if let Some(delay) = delay {
                metrics.client_fault(&peer, "delay");
                delay_within(delay, budget).await?;
            }
            if let Some(code) = abort {
                metrics.client_fault(&peer, "abort");
                return Ok(abort_response(code, "abort"));
            }
            inner.oneshot(req).await.map_err(Into::into)
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;
    use tower_test::mock;

    use super::*;
    use crate::{
        config::{ConfigHandle, MeshConfig},
        endpoint::header_status,
        fault::{AbortFault, DelayFault},
        methods::{MethodInfo, MethodTable},
        retry::RetryLayer,
    };

    type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

    fn request(path: &str, timeout: Option<&'static str>) -> http::Request<Body> {
        let mut req = http::Request::builder()
            .uri(path)
            .body(Body::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"\0\0\0\0\0"),
            )))
            .unwrap();
        if let Some(t) = timeout {
            req.headers_mut()
                .insert("grpc-timeout", HeaderValue::from_static(t));
        }
        req
    }

    fn abort(percentage: f64, code: Code) -> FaultPolicy {
        FaultPolicy {
            delay: None,
            abort: Some(AbortFault {
                percentage,
                grpc_status: code,
            }),
        }
    }

    fn delay(percentage: f64, ms: u64) -> FaultPolicy {
        FaultPolicy {
            delay: Some(DelayFault {
                percentage,
                fixed_delay: Duration::from_millis(ms),
            }),
            abort: None,
        }
    }

    fn count(metrics: &Metrics, labels: &str) -> u64 {
        metrics.sum_of("mesh_client_faults_injected_total", labels)
    }

    fn layer(
        metrics: &Metrics,
    ) -> (
        Fault<mock::Mock<http::Request<Body>, http::Response<Body>>>,
        Handle,
    ) {
        let (mock, handle) = mock::pair();
        (FaultLayer::new("inv", metrics.clone()).layer(mock), handle)
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_answers_at_once_marked_and_the_inner_service_never_sees_it() {
        let metrics = Metrics::new();
        let (svc, mut handle) = layer(&metrics);
        let mut req = request("/t.S/Get", None);
        req.extensions_mut()
            .insert(RouteFault(Arc::new(abort(100.0, Code::Unavailable))));
        let response = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(header_status(&response), Some(Code::Unavailable));
        assert_eq!(response.headers()[FAULT_HEADER], "abort");
        assert_eq!(
            response.extensions().get::<InjectedFault>(),
            Some(&InjectedFault {
                code: Code::Unavailable
            })
        );
        assert_eq!(count(&metrics, "kind=\"abort\""), 1);
        assert_eq!(count(&metrics, "peer=\"inv\""), 1);

        // Without a RouteFault (and no fixed policy) the call goes through.
        let call = tokio::spawn(svc.oneshot(request("/t.S/Get", None)));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(http::Response::new(Body::empty()));
        let response = call.await.unwrap().unwrap();
        assert_eq!(header_status(&response), None);
        assert_eq!(count(&metrics, ""), 1, "nothing more injected");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_call_then_sends_it() {
        let metrics = Metrics::new();
        let (mock, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let svc = FaultLayer::new("inv", metrics.clone())
            .with_policy(delay(100.0, 200))
            .layer(mock);
        let started = Instant::now();
        let call = tokio::spawn(svc.oneshot(request("/t.S/Get", Some("1S"))));
        let (_, answer) = handle.next_request().await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        answer.send_response(http::Response::new(Body::empty()));
        assert!(call.await.unwrap().is_ok());
        assert_eq!(count(&metrics, "kind=\"delay\""), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_longer_than_the_deadline_ends_deadline_exceeded_at_the_deadline() {
        let metrics = Metrics::new();
        let (svc, mut handle) = layer(&metrics);
        let mut req = request("/t.S/Get", Some("100m"));
        req.extensions_mut()
            .insert(RouteFault(Arc::new(delay(100.0, 200))));
        let started = Instant::now();
        let err = svc.oneshot(req).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(
            status.message().contains("fault-injected delay"),
            "{status}"
        );
        assert!(
            !matches!(
                tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await,
                Ok(Some(_))
            ),
            "the call was never sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_fault_overrides_the_fixed_policy_and_zero_percent_never_fires() {
        let metrics = Metrics::new();
        let (mock, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let svc = FaultLayer::new("inv", metrics.clone())
            .with_policy(abort(100.0, Code::Internal))
            .layer(mock);
        for _ in 0..50 {
            let mut req = request("/t.S/Get", None);
            req.extensions_mut()
                .insert(RouteFault(Arc::new(abort(0.0, Code::Internal))));
            let call = tokio::spawn(svc.clone().oneshot(req));
            let (_, answer) = handle.next_request().await.unwrap();
            answer.send_response(http::Response::new(Body::empty()));
            assert_eq!(header_status(&call.await.unwrap().unwrap()), None);
        }
        let response = svc.oneshot(request("/t.S/Get", None)).await.unwrap();
        assert_eq!(header_status(&response), Some(Code::Internal));
        assert_eq!(count(&metrics, ""), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_of_calls_is_aborted() {
        // 4,000 calls at 20 %: within 6 sigma (sigma = 25.3) of 800.
        let metrics = Metrics::new();
        let (mock, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let answer = tokio::spawn(async move {
            while let Some((_, send)) = handle.next_request().await {
                send.send_response(http::Response::new(Body::empty()));
            }
        });
        let svc = FaultLayer::new("inv", metrics.clone())
            .with_policy(abort(20.0, Code::Unavailable))
            .layer(mock);
        let mut aborted = 0;
        for _ in 0..4000 {
            let response = svc
                .clone()
                .oneshot(request("/t.S/Get", None))
                .await
                .unwrap();
            aborted += usize::from(header_status(&response) == Some(Code::Unavailable));
        }
        drop(svc);
        answer.await.unwrap();
        assert!((648..=952).contains(&aborted), "{aborted} of 4000 aborted");
        assert_eq!(count(&metrics, "kind=\"abort\""), aborted as u64);
    }

    /// `/t.S/Get` (idempotent) and `/t.S/Put` (not).
    fn get_and_put() -> MethodTable {
        let mut table = MethodTable::default();
        for (path, idempotent) in [("/t.S/Get", true), ("/t.S/Put", false)] {
            table.insert(
                path,
                MethodInfo {
                    idempotent,
                    client_streaming: false,
                },
            );
        }
        table
    }

    fn series(metrics: &Metrics, name: &str, labels: &str) -> u64 {
        metrics.sum_of(name, labels)
    }

    #[tokio::test(start_paused = true)]
    async fn injected_aborts_are_retried_from_the_real_budget_and_can_exhaust_it() {
        let table = get_and_put();
        // One retry in reserve, one more per second, none earned by requests.
        let config = ConfigHandle::new(
            MeshConfig::from_json(
                r#"{"retryPolicy":{"maxAttempts":2},
                    "retryBudget":{"retryRatio":0.0,"minRetriesPerSecond":1,"ttl":"1s"}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let metrics = Metrics::new();
        let (mock, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let chaos = tower::ServiceBuilder::new()
            .layer(RetryLayer::new("t", config, Arc::new(table)).metrics(metrics.clone()))
            .layer(
                FaultLayer::new("t", metrics.clone()).with_policy(abort(100.0, Code::Unavailable)),
            )
            .service(mock);
        // The first call's abort is retried (and aborted again): the reserve is spent.
        let response = chaos
            .clone()
            .oneshot(request("/t.S/Get", None))
            .await
            .unwrap();
        assert_eq!(header_status(&response), Some(Code::Unavailable));
        assert_eq!(
            series(&metrics, "mesh_retries_total", "rpc_method=\"Get\""),
            1
        );
        // The next abort finds the budget empty, as a real failure would.
        let response = chaos.oneshot(request("/t.S/Get", None)).await.unwrap();
        assert_eq!(header_status(&response), Some(Code::Unavailable));
        assert_eq!(
            series(&metrics, "mesh_retry_budget_exhausted_total", "peer=\"t\""),
            1,
            "injected aborts drain the budget real retries draw on"
        );
        assert_eq!(
            series(&metrics, "mesh_retries_total", "rpc_method=\"Get\""),
            1
        );
        assert!(
            !matches!(
                tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await,
                Ok(Some(_))
            ),
            "no attempt reached the endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn aborts_on_an_idempotent_method_are_retried_by_the_layer_above() {
        // retry → fault (every first attempt aborted) → mock.
        let table = get_and_put();
        let config = ConfigHandle::new(MeshConfig::default()).unwrap();
        let metrics = Metrics::new();
        let (mock, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new("t", config, Arc::new(table)).metrics(metrics.clone()))
            .layer(FaultLayer::new("inv", metrics.clone()))
            .service(mock);
        // The route's policy rides on the request's extensions into every
        // attempt: each is rolled (and here aborted) afresh.
        let mut req = request("/t.S/Get", None);
        req.extensions_mut()
            .insert(RouteFault(Arc::new(abort(100.0, Code::Unavailable))));
        let response = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(
            header_status(&response),
            Some(Code::Unavailable),
            "every attempt aborted: the last abort is the answer"
        );
        assert_eq!(count(&metrics, "kind=\"abort\""), 3, "three attempts");
        assert!(
            !matches!(
                tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await,
                Ok(Some(_))
            ),
            "no attempt reached the endpoint"
        );

        // A method not declared idempotent is not retried after an abort.
        let mut req = request("/t.S/Put", None);
        req.extensions_mut()
            .insert(RouteFault(Arc::new(abort(100.0, Code::Unavailable))));
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(header_status(&response), Some(Code::Unavailable));
        assert_eq!(count(&metrics, "kind=\"abort\""), 4);
    }
}
