//! The retry layer driven step by step: a `tower-test` mock below it
//! answers each attempt, and tokio's clock is paused, so backoffs, pushback
//! and hedging delays are exact and nothing sleeps for real.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

use super::RetryLayer;
use crate::{
    BoxError,
    balance::CallError,
    config::{ConfigHandle, MeshConfig},
    endpoint::header_status,
    methods::{MethodInfo, MethodTable},
    telemetry::metrics::Metrics,
};

type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

const GET: &str = "/t.S/Get";
const PUT: &str = "/t.S/Put";

fn methods() -> Arc<MethodTable> {
    let mut table = MethodTable::default();
    let info = |idempotent| MethodInfo {
        idempotent,
        client_streaming: false,
    };
    table.insert(GET, info(true));
    table.insert(PUT, info(false));
    Arc::new(table)
}

fn config(json: &str) -> ConfigHandle {
    ConfigHandle::new(MeshConfig::from_json(json).unwrap()).unwrap()
}

fn request(path: &str) -> http::Request<Body> {
    http::Request::builder()
        .uri(path)
        .body(Body::new(http_body_util::Full::new(
            bytes::Bytes::from_static(b"\0\0\0\0\0"),
        )))
        .unwrap()
}

fn status(code: Code, headers: &[(&'static str, &'static str)]) -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from(code as i32));
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(*name, http::HeaderValue::from_static(value));
    }
    response
}

/// A response whose headers arrived without a status: committed.
fn ok() -> http::Response<Body> {
    http::Response::new(Body::empty())
}

/// An HTTP answer with no gRPC status at all (a proxy's error page).
fn bare(status: u16) -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
}

/// The value of the series `name` whose labels include `labels`, 0 if none.
fn count(metrics: &Metrics, name: &str, labels: &str) -> u64 {
    metrics.sum_of(name, labels)
}

/// Retry over a fresh mock, recording into its own metrics.
fn retry(
    json: &str,
) -> (
    super::Retry<mock::Mock<http::Request<Body>, http::Response<Body>>>,
    Handle,
    Metrics,
) {
    let metrics = Metrics::new();
    let (mock, handle) = mock::pair();
    let layer = RetryLayer::new("t", config(json), methods()).metrics(metrics.clone());
    (layer.layer(mock), handle, metrics)
}

/// No request reaches the mock for a minute (of paused time), or the
/// service holding the mock is gone (then none can).
async fn nothing_more(handle: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await;
    if let Ok(next @ Some(_)) = &next {
        panic!(
            "an attempt too many was sent: {:?}",
            next.as_ref()
                .map(|(r, _)| (r.uri().clone(), r.headers().clone()))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_idempotent_call_is_retried_on_a_retryable_code_and_nothing_else_is() {
    let (svc, mut handle, metrics) = retry(r#"{"retryPolicy":{"maxAttempts":3}}"#);
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (first, answer) = handle.next_request().await.unwrap();
    assert!(first.headers().get("grpc-previous-rpc-attempts").is_none());
    answer.send_response(status(Code::Unavailable, &[]));
    let (second, answer) = handle.next_request().await.unwrap();
    assert_eq!(second.headers()["grpc-previous-rpc-attempts"], "1");
    answer.send_response(ok());
    let response = call.await.unwrap().unwrap();
    assert_eq!(header_status(&response), None, "the retry's answer");
    assert_eq!(
        count(&metrics, "mesh_retries_total", "rpc_method=\"Get\""),
        1
    );

    // UNAVAILABLE from a method not declared idempotent is final.
    let call = tokio::spawn(svc.clone().oneshot(request(PUT)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(Code::Unavailable, &[]));
    let response = call.await.unwrap().unwrap();
    assert_eq!(header_status(&response), Some(Code::Unavailable));
    nothing_more(&mut handle).await;

    // A code not in retryableStatusCodes is final, idempotent or not.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(Code::Internal, &[]));
    let response = call.await.unwrap().unwrap();
    assert_eq!(header_status(&response), Some(Code::Internal));
    nothing_more(&mut handle).await;

    // At most maxAttempts, then the last answer.
    let call = tokio::spawn(svc.oneshot(request(GET)));
    for _ in 0..3 {
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(status(Code::Unavailable, &[]));
    }
    let response = call.await.unwrap().unwrap();
    assert_eq!(header_status(&response), Some(Code::Unavailable));
    nothing_more(&mut handle).await;
    assert_eq!(
        count(&metrics, "mesh_retries_total", "rpc_method=\"Get\""),
        3
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_never_left_is_retried_for_any_method_one_that_may_have_is_not() {
    let (svc, mut handle, _) = retry("{}");
    let addr: std::net::SocketAddr = "127.0.0.1:7".parse().unwrap();
    let call = tokio::spawn(svc.clone().oneshot(request(PUT)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_error(CallError::Transport {
        addr,
        never_sent: true,
        source: "connection refused".into(),
    });
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(ok());
    assert!(call.await.unwrap().is_ok());

    // Sent, then the connection broke: a mutation may have happened.
    let call = tokio::spawn(svc.oneshot(request(PUT)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_error(CallError::Transport {
        addr,
        never_sent: false,
        source: "connection reset".into(),
    });
    let error = call.await.unwrap().unwrap_err();
    let status = error.downcast::<tonic::Status>().expect("a status");
    assert!(status.message().contains("127.0.0.1:7"), "{status}");
    nothing_more(&mut handle).await;
}

/// Answers the next attempt with UNAVAILABLE.
async fn fail_next(handle: &mut Handle) {
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(Code::Unavailable, &[]));
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_budget_stops_retries_until_it_refills() {
    // One retry in reserve, one more per second, none earned by requests.
    let (svc, mut handle, metrics) =
        retry(r#"{"retryBudget":{"retryRatio":0.0,"minRetriesPerSecond":1,"ttl":"1s"}}"#);
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    fail_next(&mut handle).await;
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());

    // The reserve is spent: the failure is returned, and counted.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    fail_next(&mut handle).await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(header_status(&response), Some(Code::Unavailable));
    nothing_more(&mut handle).await;
    assert_eq!(
        count(&metrics, "mesh_retry_budget_exhausted_total", "peer=\"t\""),
        1
    );

    // A second later (the wait above was a minute) there is one again.
    let call = tokio::spawn(svc.oneshot(request(GET)));
    fail_next(&mut handle).await;
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());
}

#[tokio::test(start_paused = true)]
async fn pushback_sets_the_wait_and_a_negative_one_stops_retrying() {
    let (svc, mut handle, _) = retry(r#"{"retryPolicy":{"maxAttempts":3}}"#);
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    let sent = Instant::now();
    answer.send_response(status(
        Code::Unavailable,
        &[("grpc-retry-pushback-ms", "3000")],
    ));
    let (_, answer) = handle.next_request().await.unwrap();
    // Exactly the server's wait, not the policy's 50 ms jittered backoff.
    assert_eq!(sent.elapsed(), Duration::from_millis(3000));
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());

    for stop in ["-1", "soon"] {
        let call = tokio::spawn(svc.clone().oneshot(request(GET)));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(status(
            Code::Unavailable,
            &[("grpc-retry-pushback-ms", stop)],
        ));
        let response = call.await.unwrap().unwrap();
        assert_eq!(header_status(&response), Some(Code::Unavailable), "{stop}");
        nothing_more(&mut handle).await;
    }
}

/// A wrapper counting attempts whose response futures were dropped before
/// they finished (cancelled).
#[derive(Clone)]
struct CountCancelled<S> {
    inner: S,
    cancelled: Arc<AtomicUsize>,
}

struct Armed(Option<Arc<AtomicUsize>>);

impl Armed {
    /// The attempt finished: not a cancellation.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl<S> Service<http::Request<Body>> for CountCancelled<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let mut armed = Armed(Some(self.cancelled.clone()));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            armed.disarm();
            result
        })
    }
}

#[tokio::test(start_paused = true)]
async fn hedges_go_out_after_each_delay_and_the_losers_are_cancelled() {
    let (mock, mut handle) = mock::pair();
    let cancelled = Arc::new(AtomicUsize::new(0));
    let metrics = Metrics::new();
    let svc = RetryLayer::new(
        "t",
        config(r#"{"hedgingPolicy":{"maxAttempts":3,"hedgingDelay":"100ms"}}"#),
        methods(),
    )
    .metrics(metrics.clone())
    .layer(CountCancelled {
        inner: mock,
        cancelled: cancelled.clone(),
    });
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(request(GET)));
    let mut answers = Vec::new();
    for (attempt, at) in [(None, 0), (Some("1"), 100), (Some("2"), 200)] {
        let (req, answer) = handle.next_request().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(at));
        assert_eq!(
            req.headers()
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap()),
            attempt
        );
        answers.push(answer);
    }
    nothing_more(&mut handle).await;
    // The second attempt answers first: it wins, the others are dropped.
    answers.remove(1).send_response(ok());
    let response = call.await.unwrap().unwrap();
    assert!(header_status(&response).is_none());
    assert_eq!(cancelled.load(Ordering::SeqCst), 2, "both losers cancelled");
    assert_eq!(
        count(&metrics, "mesh_hedges_total", "rpc_method=\"Get\""),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_non_fatal_answer_sends_the_next_hedge_at_once_and_a_fatal_one_ends_the_call() {
    let (svc, mut handle, _) = retry(r#"{"hedgingPolicy":{"maxAttempts":3,"hedgingDelay":"1s"}}"#);
    let start = Instant::now();
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(Code::Unavailable, &[]));
    let (_, answer) = handle.next_request().await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "not after the delay");
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());

    let call = tokio::spawn(svc.oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(Code::InvalidArgument, &[]));
    let response = call.await.unwrap().unwrap();
    assert_eq!(header_status(&response), Some(Code::InvalidArgument));
    nothing_more(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_non_fatal_answer_with_pushback_holds_the_next_hedge_until_then() {
    let (svc, mut handle, _) = retry(r#"{"hedgingPolicy":{"maxAttempts":3,"hedgingDelay":"1s"}}"#);
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(
        Code::Unavailable,
        &[("grpc-retry-pushback-ms", "500")],
    ));
    let (_, answer) = handle.next_request().await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(500),
        "after the pushback, not at once nor after the delay"
    );
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_pushback_holds_the_next_hedge_through_a_later_failure_without_one() {
    let (svc, mut handle, _) = retry(r#"{"hedgingPolicy":{"maxAttempts":4,"hedgingDelay":"1s"}}"#);
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(request(GET)));
    let (_, first) = handle.next_request().await.unwrap();
    let (_, second) = handle.next_request().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    first.send_response(status(
        Code::Unavailable,
        &[("grpc-retry-pushback-ms", "50")],
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    second.send_response(status(Code::Unavailable, &[]));
    let (_, third) = handle.next_request().await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(1050),
        "held by the first answer's pushback, not sent at once"
    );
    let (_, fourth) = handle.next_request().await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(2050),
        "the hedging delay after the held hedge"
    );
    fourth.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());
    drop(third);
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_layer_the_calls_grpc_timeout_bounds_a_servers_pushback() {
    let (svc, mut handle, _) =
        retry(r#"{"retryPolicy":{"maxAttempts":3,"retryableStatusCodes":["UNAVAILABLE"]}}"#);
    let start = Instant::now();
    let mut req = request(GET);
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("1S"));
    let call = tokio::spawn(svc.oneshot(req));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(
        Code::Unavailable,
        &[("grpc-retry-pushback-ms", "9223372036854775807")],
    ));
    let response = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("the call ends within its grpc-timeout")
        .unwrap()
        .unwrap();
    assert_eq!(header_status(&response), Some(Code::Unavailable));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "no wait for the pushback"
    );
    nothing_more(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_reloaded_policy_applies_from_the_next_call() {
    let (mock, mut handle) = mock::pair();
    let live = config(r#"{"retryPolicy":{"maxAttempts":1}}"#);
    let svc = RetryLayer::new("t", live.clone(), methods()).layer(mock);
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(Code::Unavailable, &[]));
    assert_eq!(
        header_status(&call.await.unwrap().unwrap()),
        Some(Code::Unavailable)
    );
    nothing_more(&mut handle).await;

    live.reload(MeshConfig::from_json(r#"{"retryPolicy":{"maxAttempts":2}}"#).unwrap())
        .unwrap();
    let call = tokio::spawn(svc.oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(status(Code::Unavailable, &[]));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_per_attempt_timeout_retries_and_the_calls_own_expiry_does_not() {
    let (svc, mut handle, _) = retry(
        r#"{"retryPolicy":{"maxAttempts":2,"perAttemptRecvTimeout":"1s",
                  "retryableStatusCodes":["UNAVAILABLE","DEADLINE_EXCEEDED"]}}"#,
    );
    let start = Instant::now();
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, _silent) = handle.next_request().await.unwrap();
    let (_, answer) = handle.next_request().await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "after the timeout"
    );
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());

    // tonic's own grpc-timeout timer: the call's deadline, nothing to retry.
    let call = tokio::spawn(svc.oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_error(CallError::Transport {
        addr: "127.0.0.1:7".parse().unwrap(),
        never_sent: false,
        source: Box::new(tonic::TimeoutExpired(())),
    });
    let status = call
        .await
        .unwrap()
        .unwrap_err()
        .downcast::<tonic::Status>()
        .unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    nothing_more(&mut handle).await;
}

/// The `grpc-timeout` an attempt was sent with.
fn sent_timeout(req: &http::Request<Body>) -> Duration {
    crate::deadline::decode_grpc_timeout(req.headers()["grpc-timeout"].to_str().unwrap()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn retries_and_hedges_are_sent_with_the_time_left_not_the_original_timeout() {
    use crate::deadline::DeadlineLayer;
    let deadline = DeadlineLayer::new(Duration::from_secs(10));
    let with_timeout = |path| {
        let mut req = request(path);
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("2S"));
        req
    };

    // A retry after 500 ms of a failing first attempt.
    let (retrying, mut handle, _) = retry(r#"{"retryPolicy":{"maxAttempts":2}}"#);
    let svc = deadline.layer(retrying);
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(with_timeout(GET)));
    let (first, answer) = handle.next_request().await.unwrap();
    assert_eq!(sent_timeout(&first), Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    answer.send_response(status(Code::Unavailable, &[]));
    let (second, answer) = handle.next_request().await.unwrap();
    let (left, elapsed) = (sent_timeout(&second), start.elapsed());
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(
        left <= Duration::from_secs(2) - elapsed
            && left + elapsed + Duration::from_millis(1) >= Duration::from_secs(2),
        "the retry was told {left:?} with {elapsed:?} of 2 s gone"
    );
    answer.send_response(ok());
    call.await.unwrap().unwrap();

    // Hedges 300 ms and 600 ms in.
    let (mock, mut handle) = mock::pair();
    let svc = deadline.layer(
        RetryLayer::new(
            "t",
            config(r#"{"hedgingPolicy":{"maxAttempts":3,"hedgingDelay":"300ms"}}"#),
            methods(),
        )
        .layer(mock),
    );
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(with_timeout(GET)));
    let mut answers = Vec::new();
    for at in [0, 300, 600] {
        let (req, answer) = handle.next_request().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(at));
        assert_eq!(
            sent_timeout(&req),
            Duration::from_millis(2000 - at),
            "attempt sent {at} ms in"
        );
        answers.push(answer);
    }
    answers.remove(2).send_response(ok());
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_retry_with_no_time_left_is_not_sent_and_spends_no_budget() {
    use crate::deadline::DeadlineLayer;
    use futures::FutureExt;
    // One retry in reserve (and at most one banked), none earned by requests.
    let (retrying, mut handle, _) = retry(
        r#"{"retryPolicy":{"maxAttempts":3},
            "retryBudget":{"retryRatio":0.0,"minRetriesPerSecond":1,"ttl":"1s"}}"#,
    );
    let svc = DeadlineLayer::new(Duration::from_secs(10)).layer(retrying);
    let with_timeout = |path| {
        let mut req = request(path);
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("2S"));
        req
    };

    // The first attempt fails 0.5 ms before the call's deadline, asking
    // for a retry at once: it would go out as `grpc-timeout: 500u`.
    let call = tokio::spawn(svc.clone().oneshot(with_timeout(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    tokio::time::advance(Duration::from_micros(1_999_500)).await;
    answer.send_response(status(
        Code::Unavailable,
        &[("grpc-retry-pushback-ms", "0")],
    ));
    let status = call
        .await
        .unwrap()
        .unwrap_err()
        .downcast::<tonic::Status>()
        .unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    let sent = handle.next_request().now_or_never().flatten();
    assert!(
        sent.is_none(),
        "a retry was sent with {:?}",
        sent.map(|(r, _)| r.headers().get("grpc-timeout").cloned())
    );

    // The budget's one retry is still there for a call with time left.
    let call = tokio::spawn(svc.oneshot(with_timeout(GET)));
    fail_next(&mut handle).await;
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());
}

#[tokio::test(start_paused = true)]
async fn each_attempt_tells_the_server_the_smaller_of_its_per_attempt_timeout_and_the_time_left() {
    use crate::deadline::DeadlineLayer;
    let (retrying, mut handle, _) = retry(
        r#"{"retryPolicy":{"maxAttempts":3,"perAttemptRecvTimeout":"500ms",
                  "initialBackoff":"1ms","maxBackoff":"1ms",
                  "retryableStatusCodes":["UNAVAILABLE","DEADLINE_EXCEEDED"]}}"#,
    );
    let svc = DeadlineLayer::new(Duration::from_secs(10)).layer(retrying);
    let mut req = request(GET);
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("1200m"));
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(req));
    // 1.2 s for the call, 500 ms per attempt: the first two attempts are
    // told 500 ms, the third only what is left of the call (under 200 ms).
    let (first, _silent) = handle.next_request().await.unwrap();
    assert_eq!(sent_timeout(&first), Duration::from_millis(500));
    let (second, _silent) = handle.next_request().await.unwrap();
    assert_eq!(sent_timeout(&second), Duration::from_millis(500));
    let (third, answer) = handle.next_request().await.unwrap();
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(
        sent_timeout(&third) <= Duration::from_millis(1200) - elapsed,
        "told {:?} with {elapsed:?} of 1.2 s gone",
        sent_timeout(&third)
    );
    answer.send_response(ok());
    assert!(header_status(&call.await.unwrap().unwrap()).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_bare_http_error_is_retried_by_the_code_grpc_maps_it_to() {
    let (svc, mut handle, metrics) = retry(r#"{"retryPolicy":{"maxAttempts":3}}"#);
    // 503 is UNAVAILABLE: an idempotent call goes again, and its retry's
    // answer is the call's.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(bare(503));
    let (second, answer) = tokio::time::timeout(Duration::from_secs(60), handle.next_request())
        .await
        .expect("the 503 is retried")
        .unwrap();
    assert_eq!(second.headers()["grpc-previous-rpc-attempts"], "1");
    answer.send_response(status(Code::Ok, &[]));
    let response = call.await.unwrap().unwrap();
    assert_eq!(header_status(&response), Some(Code::Ok));
    assert_eq!(count(&metrics, "mesh_retries_total", ""), 1);

    // 404 is UNIMPLEMENTED, not retryable: the answer stands.
    let call = tokio::spawn(svc.clone().oneshot(request(GET)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(bare(404));
    assert_eq!(call.await.unwrap().unwrap().status(), 404);

    // A call that may have arrived is not sent twice for a 503 either.
    let call = tokio::spawn(svc.clone().oneshot(request(PUT)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(bare(503));
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    nothing_more(&mut handle).await;
}
