//! The server's call layers ([`super::call_layers`], as `serve` stacks
//! them) over a `tower-test` mock or a handler that reports what it sees,
//! with tokio's clock paused: which layer answers first, what the handler
//! inherits as its deadline, and what telemetry records for each outcome.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Service, ServiceExt};
use tower_test::mock;

use super::{SHED_HEADER, ServerConfig, call_layers};
use crate::{
    BoxError,
    authz::{AuthorizationPolicy, REFUSED_BY_HEADER, layer::PolicySource},
    body::{header_status, trailers_only},
    telemetry::metrics::Metrics,
    tls::io::PeerInfo,
};

const GET: &str = "/t.S/Get";
const ORDERS: &str = "spiffe://shop.test/ns/shop/sa/orders";
const STRANGER: &str = "spiffe://shop.test/ns/shop/sa/stranger";

type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

fn known() -> Arc<HashSet<String>> {
    Arc::new([GET.to_owned()].into())
}

/// Only `orders` may call `t.S/Get`.
fn policy() -> PolicySource {
    let policy: AuthorizationPolicy = serde_json::from_str(&format!(
        r#"{{"rules":[{{"callers":["{ORDERS}"],"methods":["t.S/Get"]}}]}}"#
    ))
    .unwrap();
    policy.validate().unwrap();
    PolicySource::Fixed(Some(Arc::new(policy)))
}

fn call(caller: &str, timeout: Option<&str>) -> http::Request<Body> {
    let mut req = http::Request::builder()
        .uri(GET)
        .header("x-spiffe-id", ORDERS)
        .body(Body::empty())
        .unwrap();
    if let Some(t) = timeout {
        req.headers_mut().insert("grpc-timeout", t.parse().unwrap());
    }
    req.extensions_mut().insert(PeerInfo {
        remote_addr: None,
        identity: Some(caller.parse().unwrap()),
        tls: true,
    });
    req
}

fn ok() -> http::Response<Body> {
    trailers_only(Code::Ok)
}

/// The responses counted for `caller` with `code`.
fn responses(metrics: &Metrics, caller: &str, code: &str) -> u64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("mesh_responses_total{") && l.contains("direction=\"inbound\""))
        .filter(|l| l.contains(&format!("peer=\"{caller}\"")))
        .filter(|l| l.contains(&format!("grpc_code=\"{code}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn denials(metrics: &Metrics, caller: &str) -> u64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("mesh_authorization_denials_total{"))
        .filter(|l| l.contains(&format!("caller=\"{caller}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The stack over a mock, with a concurrency limit of `limit`.
fn stack(
    limit: usize,
    metrics: &Metrics,
) -> (
    impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static,
    Handle,
) {
    let (mock, handle) = mock::pair();
    let config = ServerConfig {
        concurrency_limit: limit,
        ..ServerConfig::default()
    };
    let svc = call_layers(&config, known(), policy(), metrics.clone()).service(mock);
    (svc, handle)
}

/// One allowed call, answered OK by the service below.
async fn served<S>(svc: S, handle: &mut Handle)
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let pending = tokio::spawn(svc.oneshot(call(ORDERS, None)));
    let (_, answer) = handle.next_request().await.unwrap();
    answer.send_response(ok());
    assert_eq!(code_of(pending.await.unwrap()), Code::Ok);
}

/// The code a call ended with: its trailers-only status, or its error's.
fn code_of(result: Result<http::Response<Body>, BoxError>) -> Code {
    match result {
        Ok(response) => header_status(&response).expect("a trailers-only answer"),
        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => Code::ResourceExhausted,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_denied_call_is_answered_by_authorization_counted_by_telemetry_and_never_served() {
    let metrics = Metrics::new();
    let (svc, mut handle) = stack(8, &metrics);
    let denied = svc.clone().oneshot(call(STRANGER, None)).await.unwrap();
    assert_eq!(header_status(&denied), Some(Code::PermissionDenied));
    assert_eq!(denied.headers()[REFUSED_BY_HEADER], "authorization");
    let message = denied.headers()["grpc-message"].to_str().unwrap();
    assert!(
        message.contains(STRANGER) && message.contains("t.S/Get"),
        "{message}"
    );
    assert_eq!(responses(&metrics, STRANGER, "PERMISSION_DENIED"), 1);
    assert_eq!(denials(&metrics, STRANGER), 1);
    let next = tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await;
    assert!(next.is_err(), "the service never saw the denied call");

    // An allowed caller is served, and a claimed identity never reaches
    // the service.
    let served = tokio::spawn(svc.oneshot(call(ORDERS, None)));
    let (req, answer) = handle.next_request().await.unwrap();
    assert!(
        req.headers().get("x-spiffe-id").is_none(),
        "claimed identity stripped"
    );
    answer.send_response(ok());
    assert_eq!(code_of(served.await.unwrap()), Code::Ok);
    assert_eq!(responses(&metrics, ORDERS, "OK"), 1);
}

#[tokio::test(start_paused = true)]
async fn at_the_concurrency_limit_calls_are_shed_at_once_but_denials_stay_denials() {
    let metrics = Metrics::new();
    let (svc, mut handle) = stack(1, &metrics);
    let first = tokio::spawn(svc.clone().oneshot(call(ORDERS, None)));
    let (_, answer) = handle.next_request().await.unwrap();

    // The one permit is taken: the next allowed call is shed, not queued.
    let start = Instant::now();
    let shed = svc.clone().oneshot(call(ORDERS, None)).await;
    // Marked as the mesh's own shedding: the callers' balancers penalise
    // only that kind of RESOURCE_EXHAUSTED.
    assert_eq!(
        shed.as_ref()
            .ok()
            .and_then(|r| r.headers().get(SHED_HEADER)),
        Some(&http::HeaderValue::from_static("1"))
    );
    assert_eq!(code_of(shed), Code::ResourceExhausted);
    assert_eq!(start.elapsed(), Duration::ZERO, "shed at once, no queueing");
    assert_eq!(responses(&metrics, ORDERS, "RESOURCE_EXHAUSTED"), 1);
    // Authorization comes before shedding: a stranger learns nothing
    // about the server's load.
    let denied = svc.clone().oneshot(call(STRANGER, None)).await;
    assert_eq!(code_of(denied), Code::PermissionDenied);

    // The service's own answer cannot carry the mark (a status passed on
    // from an upstream that shed, say).
    let mut passed_on = trailers_only(Code::ResourceExhausted);
    passed_on
        .headers_mut()
        .insert(SHED_HEADER, http::HeaderValue::from_static("1"));
    answer.send_response(passed_on);
    let passed_on = first.await.unwrap().unwrap();
    assert_eq!(header_status(&passed_on), Some(Code::ResourceExhausted));
    assert!(passed_on.headers().get(SHED_HEADER).is_none(), "unmarked");
    // The permit is back: the next call is served.
    served(svc, &mut handle).await;
    assert_eq!(responses(&metrics, ORDERS, "OK"), 1);
    assert_eq!(responses(&metrics, ORDERS, "RESOURCE_EXHAUSTED"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_handler_past_the_callers_deadline_is_cancelled_and_answered_deadline_exceeded() {
    let metrics = Metrics::new();
    let (svc, mut handle) = stack(1, &metrics);
    let start = Instant::now();
    let pending = tokio::spawn(svc.clone().oneshot(call(ORDERS, Some("2S"))));
    let (_, answer) = handle.next_request().await.unwrap();
    let response = pending.await.unwrap().unwrap();
    assert_eq!(header_status(&response), Some(Code::DeadlineExceeded));
    // 1 ms early, so this answer and not tonic's own timer is the one sent.
    assert_eq!(start.elapsed(), Duration::from_millis(1999));
    drop(answer);
    assert_eq!(responses(&metrics, ORDERS, "DEADLINE_EXCEEDED"), 1);
    // Its concurrency permit went with it.
    served(svc, &mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn the_handler_inherits_the_callers_deadline_cut_to_the_servers_maximum() {
    let config = ServerConfig {
        max_inbound_deadline: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    // The handler answers with what is left of its inherited deadline.
    let handler = tower::service_fn(|_req: http::Request<Body>| async {
        let left = crate::deadline::remaining()
            .map(|d| d.as_millis().to_string())
            .unwrap_or_else(|| "none".into());
        let mut response = ok();
        response
            .headers_mut()
            .insert("left-ms", left.parse().unwrap());
        Ok::<_, BoxError>(response)
    });
    let svc = call_layers(&config, known(), policy(), Metrics::new()).service(handler);
    let left = |timeout| {
        let svc = svc.clone();
        async move {
            let response = svc.oneshot(call(ORDERS, timeout)).await.unwrap();
            response.headers()["left-ms"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(left(Some("1500m")).await, "1500");
    assert_eq!(
        left(Some("99999999H")).await,
        "30000",
        "cut for propagation"
    );
    assert_eq!(left(None).await, "none", "no deadline invented");
}
