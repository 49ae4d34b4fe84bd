//! The balance layer driven step by step: a `tower-test` mock stands for
//! the endpoints' connections (each request names its endpoint in a
//! `SendTo` extension), round robin makes the picks predictable, and
//! tokio's clock is paused, so ejection times are exact.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Layer, ServiceExt, discover::Change};
use tower_test::mock;

use super::{BalanceLayer, CallError, EndpointSet, Exclude, NoEndpoint, Picked, Served};
use crate::{
    body::trailers_only,
    config::{ConfigHandle, MeshConfig},
    endpoint::{SendTo, header_status},
    telemetry::metrics::Metrics,
};

type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;
type Balanced = super::service::Balance<mock::Mock<http::Request<Body>, http::Response<Body>>>;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A set of endpoints on ports 1..=n (connections never made).
async fn set_of(n: u16, metrics: &Metrics) -> Arc<EndpointSet> {
    let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), metrics.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for port in 1..=n {
        tx.send(Change::Insert(addr(port), ())).await.unwrap();
    }
    drop(tx);
    set.clone()
        .follow(
            rx,
            std::sync::Arc::new(crate::endpoint::ClientConn::tcp_for_tests),
            false,
        )
        .await;
    set
}

/// A set of the real servers at `addrs`, reached over plain TCP.
async fn set_over_tcp(addrs: &[SocketAddr]) -> Arc<EndpointSet> {
    let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), Metrics::new());
    let (tx, rx) = tokio::sync::mpsc::channel(addrs.len().max(1));
    for at in addrs {
        tx.send(Change::Insert(*at, ())).await.unwrap();
    }
    drop(tx);
    set.clone()
        .follow(
            rx,
            Arc::new(crate::endpoint::ClientConn::tcp_for_tests),
            false,
        )
        .await;
    set
}

fn balanced(set: &Arc<EndpointSet>) -> (Balanced, Handle) {
    balanced_by(set, "round_robin")
}

/// Balanced by `policy`, ejecting after 2 failures in a row for 5 s.
fn balanced_by(set: &Arc<EndpointSet>, policy: &str) -> (Balanced, Handle) {
    let (mock, handle) = mock::pair();
    (
        BalanceLayer::new(set.clone(), ejecting_after_two(policy)).layer(mock),
        handle,
    )
}

/// Balancing by `policy`, ejecting after 2 failures in a row for 5 s.
fn ejecting_after_two(policy: &str) -> ConfigHandle {
    ConfigHandle::new(
        MeshConfig::from_json(&format!(
            r#"{{"loadBalancingPolicy":"{policy}",
                "outlierDetection":{{"consecutiveFailures":2,"baseEjectionTime":"5s"}}}}"#,
        ))
        .unwrap(),
    )
    .unwrap()
}

fn request() -> http::Request<Body> {
    http::Request::builder()
        .uri("/t.S/Get")
        .body(Body::empty())
        .unwrap()
}

/// Sends one call; the endpoint on port `failing` answers UNAVAILABLE,
/// the others OK (both trailers-only, so the outcome is known at once).
/// Returns the port the call went to.
async fn call(svc: &Balanced, handle: &mut Handle, failing: u16) -> u16 {
    let call = tokio::spawn(svc.clone().oneshot(request()));
    let (req, answer) = handle.next_request().await.unwrap();
    let port = req
        .extensions()
        .get::<SendTo>()
        .expect("an endpoint")
        .0
        .addr
        .port();
    answer.send_response(trailers_only(if port == failing {
        Code::Unavailable
    } else {
        Code::Ok
    }));
    let response = call.await.unwrap().unwrap();
    if port == failing {
        assert_eq!(header_status(&response), Some(Code::Unavailable));
        assert_eq!(
            response.extensions().get::<Served>().map(|s| s.0),
            Some(addr(port))
        );
    } else {
        assert!(response.extensions().get::<Served>().is_none());
    }
    port
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_failing_in_a_row_is_ejected_for_the_ejection_time_then_readmitted() {
    let metrics = Metrics::new();
    let set = set_of(2, &metrics).await;
    let (svc, mut handle) = balanced(&set);
    // Round robin alternates; port 1 fails twice in a row and is ejected.
    let mut ports = Vec::new();
    for _ in 0..4 {
        ports.push(call(&svc, &mut handle, 1).await);
    }
    assert_eq!(ports.iter().filter(|p| **p == 1).count(), 2, "{ports:?}");
    let ejected_at = Instant::now();
    for _ in 0..6 {
        assert_eq!(call(&svc, &mut handle, 1).await, 2, "ejected: no calls");
    }
    assert!(
        metrics
            .encode()
            .contains("mesh_endpoint_ejections_total{peer=\"t\"} 1")
    );
    assert!(
        metrics
            .encode()
            .contains("mesh_endpoints{peer=\"t\",state=\"ejected\"} 1")
    );

    // One millisecond short of the ejection time it is still out...
    tokio::time::advance(Duration::from_secs(5) - Duration::from_millis(1)).await;
    for _ in 0..4 {
        assert_eq!(call(&svc, &mut handle, 1).await, 2);
    }
    // ...and back at the ejection time.
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(ejected_at.elapsed(), Duration::from_secs(5));
    let mut ports = Vec::new();
    for _ in 0..4 {
        ports.push(call(&svc, &mut handle, 0).await);
    }
    assert_eq!(
        ports.iter().filter(|p| **p == 1).count(),
        2,
        "readmitted: {ports:?}"
    );

    // Readmitted, a success forgives one ejection: the next is 5 s again.
    let mut failures = 0;
    while failures < 2 {
        if call(&svc, &mut handle, 1).await == 1 {
            failures += 1;
        }
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    let mut to_one = 0;
    for _ in 0..4 {
        if call(&svc, &mut handle, 1).await == 1 {
            to_one += 1;
        }
    }
    // Back after 5 s and failing again at once, without a success between:
    // the next ejection is twice as long.
    assert_eq!(to_one, 2, "readmitted after 5 s, then ejected again");
    tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
    for _ in 0..4 {
        assert_eq!(call(&svc, &mut handle, 0).await, 2, "ejected for 10 s");
    }
    tokio::time::advance(Duration::from_millis(1)).await;
    let mut ports = Vec::new();
    for _ in 0..4 {
        ports.push(call(&svc, &mut handle, 0).await);
    }
    assert!(ports.contains(&1), "readmitted after 10 s: {ports:?}");
}

#[tokio::test(start_paused = true)]
async fn exclusions_are_honoured_and_the_pick_is_reported() {
    let set = set_of(3, &Metrics::new()).await;
    let (svc, mut handle) = balanced(&set);
    for _ in 0..6 {
        let picked = Picked::default();
        let mut req = request();
        req.extensions_mut().insert(Exclude(vec![addr(1), addr(3)]));
        req.extensions_mut().insert(picked.clone());
        let call = tokio::spawn(svc.clone().oneshot(req));
        let (req, answer) = handle.next_request().await.unwrap();
        assert_eq!(req.extensions().get::<SendTo>().unwrap().0.addr, addr(2));
        answer.send_response(http::Response::new(Body::empty()));
        call.await.unwrap().unwrap();
        assert_eq!(picked.get(), Some(addr(2)));
    }
}

#[tokio::test(start_paused = true)]
async fn a_transport_failure_names_the_endpoint_and_counts_toward_ejection() {
    let set = set_of(1, &Metrics::new()).await;
    let (svc, mut handle) = balanced(&set);
    for _ in 0..2 {
        let call = tokio::spawn(svc.clone().oneshot(request()));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_error("connection reset");
        match call.await.unwrap() {
            Err(CallError::Transport {
                addr: at,
                never_sent,
                ..
            }) => {
                assert_eq!(at, addr(1));
                assert!(!never_sent);
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
    assert!(set.snapshot()[0].is_ejected(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_target_that_never_resolves_fails_after_the_first_resolution_wait() {
    let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), Metrics::new());
    let (svc, mut handle) = balanced(&set);
    let start = Instant::now();
    let result = svc.clone().oneshot(request()).await;
    assert!(matches!(
        result,
        Err(CallError::NoEndpoint(NoEndpoint::Empty))
    ));
    assert_eq!(start.elapsed(), super::service::FIRST_RESOLUTION_WAIT);
    let next = tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await;
    assert!(next.is_err(), "nothing sent");
}

/// A set of one endpoint whose real connection's dials all fail, and the
/// balancer over it.
async fn unconnectable_endpoint() -> (
    Arc<EndpointSet>,
    super::service::Balance<crate::endpoint::Connection>,
) {
    let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), Metrics::new());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Change::Insert(addr(1), ())).await.unwrap();
    drop(tx);
    set.clone()
        .follow(
            rx,
            Arc::new(|addr| crate::endpoint::ClientConn::unconnectable(addr, "dial refused")),
            false,
        )
        .await;
    let config = ConfigHandle::new(MeshConfig::default()).unwrap();
    let svc = BalanceLayer::new(set.clone(), config).layer(crate::endpoint::Connection);
    (set, svc)
}

#[tokio::test(start_paused = true)]
async fn calls_that_shared_one_failed_dial_charge_the_endpoint_once() {
    // Fifty calls reach an idle endpoint at once and wait on its one dial,
    // which fails. Charged once per waiting call, the backoff would be
    // 1.6^49 s (capped at 120 s) and the ejections would fill the cap.
    let (set, svc) = unconnectable_endpoint().await;
    let calls: Vec<_> = (0..50)
        .map(|_| tokio::spawn(svc.clone().oneshot(request())))
        .collect();
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            Err(CallError::Transport { never_sent, .. }) => {
                assert!(never_sent);
                refused += 1;
            }
            Err(CallError::NoEndpoint(_)) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
    assert!(
        refused > 1,
        "the calls shared the dial ({refused} saw it fail)"
    );
    let endpoint = set.snapshot()[0].clone();
    assert!(endpoint.is_reconnecting(Instant::now()));
    // The first backoff is 1 s ± 20 %: one failure, not fifty.
    tokio::time::advance(Duration::from_millis(1300)).await;
    assert!(
        !endpoint.is_reconnecting(Instant::now()),
        "backed off as for one failed dial"
    );
    assert!(
        !endpoint.is_ejected(Instant::now()),
        "one failure ejects nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_dial_of_the_real_connection_backs_the_endpoint_off_and_counts_as_never_sent() {
    // The endpoint's own connection (not a mock) whose dial fails: the
    // error it makes must read as a connect failure to the balancer.
    let (set, svc) = unconnectable_endpoint().await;
    match svc.clone().oneshot(request()).await {
        Err(CallError::Transport {
            addr: at,
            never_sent,
            source,
        }) => {
            assert_eq!(at, addr(1));
            assert!(never_sent, "a failed dial sent nothing");
            assert!(source.to_string().contains("dial refused"), "{source}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let endpoint = set.snapshot()[0].clone();
    assert!(endpoint.is_reconnecting(Instant::now()), "backing off");
    // While it backs off, calls fail at once, saying why.
    match svc.oneshot(request()).await {
        Err(CallError::NoEndpoint(NoEndpoint::AllUnavailable { total, last_error })) => {
            assert_eq!(total, 1);
            assert!(
                last_error.is_some_and(|e| e.contains("dial refused")),
                "the dial's error is reported"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test(start_paused = true)]
async fn a_shedding_endpoint_does_not_look_fast_to_p2c_and_is_never_ejected() {
    let set = set_of(2, &Metrics::new()).await;
    let (svc, mut handle) = balanced_by(&set, "p2c");
    // Port 1 is overloaded and refuses at once (RESOURCE_EXHAUSTED); port
    // 2 serves in 20 ms. Judged by answer latency alone, the refusals made
    // port 1 the fastest endpoint, and it got nearly every call.
    let mut to_shedding = 0;
    for _ in 0..300 {
        let call = tokio::spawn(svc.clone().oneshot(request()));
        let (req, answer) = handle.next_request().await.unwrap();
        let port = req.extensions().get::<SendTo>().unwrap().0.addr.port();
        if port == 1 {
            to_shedding += 1;
            let mut shed = trailers_only(Code::ResourceExhausted);
            shed.headers_mut().insert(
                crate::body::SHED_HEADER,
                http::HeaderValue::from_static("1"),
            );
            answer.send_response(shed);
        } else {
            tokio::time::advance(Duration::from_millis(20)).await;
            answer.send_response(trailers_only(Code::Ok));
        }
        call.await.unwrap().unwrap();
    }
    assert!(to_shedding < 45, "{to_shedding} of 300 to the shedding one");
    assert!(
        !set.snapshot()[0].is_ejected(Instant::now()),
        "shedding is not a failure that ejects"
    );
}

/// A real HTTP/2 server on loopback TCP (the `h2` crate) that names
/// itself in a `served-by` header. With a `drain`, it admits one stream at
/// a time, holds every stream until told, then shuts down gracefully
/// (GOAWAY), stops accepting connections, and answers what it holds; without
/// one it answers at once. Counts the streams it admitted.
async fn named_h2_server(
    name: &'static str,
    drain: Option<Arc<tokio::sync::Notify>>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let admitted = Arc::new(AtomicUsize::new(0));
    let count = admitted.clone();
    let answer = move |mut respond: h2::server::SendResponse<bytes::Bytes>| {
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .header("served-by", name)
            .body(())
            .unwrap();
        let _ = respond.send_response(response, true);
    };
    tokio::spawn(async move {
        loop {
            let accept = async { listener.accept().await };
            let drained = async {
                match &drain {
                    Some(drain) => drain.notified().await,
                    None => std::future::pending().await,
                }
            };
            let tcp = tokio::select! {
                accepted = accept => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => return,
                },
                // A draining server takes no new connections.
                _ = drained => return,
            };
            let (count, drain) = (count.clone(), drain.clone());
            tokio::spawn(async move {
                let mut conn = h2::server::Builder::new()
                    .max_concurrent_streams(if drain.is_some() { 1 } else { 100 })
                    .handshake::<_, bytes::Bytes>(tcp)
                    .await
                    .unwrap();
                let Some(drain) = drain else {
                    while let Some(Ok((_, respond))) = conn.accept().await {
                        count.fetch_add(1, Ordering::SeqCst);
                        answer(respond);
                    }
                    return;
                };
                let mut held = Vec::new();
                loop {
                    tokio::select! {
                        stream = conn.accept() => match stream {
                            Some(Ok((_, respond))) => {
                                count.fetch_add(1, Ordering::SeqCst);
                                held.push(respond);
                            }
                            _ => return,
                        },
                        _ = drain.notified() => break,
                    }
                }
                conn.graceful_shutdown();
                held.into_iter().for_each(answer);
                while let Some(Ok((_, respond))) = conn.accept().await {
                    answer(respond);
                }
            });
        }
    });
    (at, admitted)
}

#[tokio::test]
async fn requests_a_goaway_hands_back_unsent_go_to_another_endpoint() {
    // Real connections to two real servers. Calls queue on the first one
    // (it admits one stream at a time and holds it); then the second one
    // joins the set and the first drains. hyper hands back the requests
    // it had not written; they must go to the other server, not be dialled
    // again to the draining address (which now refuses connections).
    let drain = Arc::new(tokio::sync::Notify::new());
    let (a, admitted) = named_h2_server("a", Some(drain.clone())).await;
    let (b, _) = named_h2_server("b", None).await;
    let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), Metrics::new());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Change::Insert(a, ())).await.unwrap();
    tokio::spawn(set.clone().follow(
        rx,
        Arc::new(crate::endpoint::ClientConn::tcp_for_tests),
        false,
    ));
    let config = ConfigHandle::new(MeshConfig::default()).unwrap();
    let svc = BalanceLayer::new(set.clone(), config).layer(crate::endpoint::Connection);
    let served_by = |result: Result<http::Response<Body>, CallError>| {
        result.map(|r| r.headers()["served-by"].to_str().unwrap().to_owned())
    };

    let first = tokio::spawn(svc.clone().oneshot(request()));
    for _ in 0..1000 {
        if admitted.load(std::sync::atomic::Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(request())))
        .collect();
    // Four wait in hyper's queue (one more is in h2's, for the stream).
    let conn = set.snapshot()[0].conn().clone();
    for _ in 0..1000 {
        if conn.queued() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(conn.queued() >= 4, "{}", conn.queued());
    tx.send(Change::Insert(b, ())).await.unwrap();
    for _ in 0..1000 {
        if set.snapshot().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drain.notify_waiters();

    let limit = Duration::from_secs(30);
    let first = tokio::time::timeout(limit, first).await.unwrap().unwrap();
    assert_eq!(served_by(first).unwrap(), "a", "the drain finished it");
    let mut to_b = 0;
    for call in queued {
        match served_by(tokio::time::timeout(limit, call).await.unwrap().unwrap()) {
            Ok(by) => {
                assert_eq!(by, "b", "resent to the other server");
                to_b += 1;
            }
            // The one hyper had passed to h2 to wait for a stream is
            // dropped with the connection's dispatcher, not handed back
            // ("dispatch task is gone"): hyper's, not resent here.
            Err(CallError::Transport {
                addr: at, source, ..
            }) => {
                assert_eq!(at, a, "{source:?}")
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(to_b >= 4, "{to_b} of 5 went to the other server");
    assert_eq!(admitted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A real HTTP/2 server on loopback TCP that answers every call at once,
/// trailers-only, with `headers`.
async fn answering_h2_server(headers: &'static [(&'static str, &'static str)]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut conn = h2::server::Builder::new()
                    .handshake::<_, bytes::Bytes>(tcp)
                    .await
                    .unwrap();
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    let mut response = http::Response::builder();
                    for (name, value) in headers {
                        response = response.header(*name, *value);
                    }
                    let _ = respond.send_response(response.body(()).unwrap(), true);
                }
            });
        }
    });
    at
}

#[tokio::test]
async fn only_a_resource_exhausted_marked_as_the_mesh_s_shedding_raises_the_penalty() {
    // Two real servers answer RESOURCE_EXHAUSTED: one refuses callers (a
    // login rate limit, which any caller can provoke on purpose), one is
    // a mesh server shedding load (marked). Only the second is penalised.
    const REFUSES: &[(&str, &str)] = &[
        ("content-type", "application/grpc"),
        ("grpc-status", "8"),
        ("grpc-message", "too many login attempts; retry in 30 s"),
    ];
    const SHEDS: &[(&str, &str)] = &[
        ("content-type", "application/grpc"),
        ("grpc-status", "8"),
        ("grpc-message", "the server is at its concurrency limit"),
        ("mesh-shed", "1"),
    ];
    let refuses = answering_h2_server(REFUSES).await;
    let sheds = answering_h2_server(SHEDS).await;
    let set = set_over_tcp(&[refuses, sheds]).await;
    let config = ConfigHandle::new(
        MeshConfig::from_json(r#"{"loadBalancingPolicy":"round_robin"}"#).unwrap(),
    )
    .unwrap();
    let svc = BalanceLayer::new(set.clone(), config).layer(crate::endpoint::Connection);
    let mut answered = std::collections::HashMap::<SocketAddr, usize>::new();
    for _ in 0..20 {
        let picked = Picked::default();
        let mut req = request();
        req.extensions_mut().insert(picked.clone());
        let response = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(header_status(&response), Some(Code::ResourceExhausted));
        *answered.entry(picked.get().unwrap()).or_default() += 1;
    }
    assert_eq!(answered.len(), 2, "both answered: {answered:?}");
    let endpoint = |addr| {
        set.snapshot()
            .iter()
            .find(|e| e.addr == addr)
            .unwrap()
            .clone()
    };
    let now = Instant::now();
    // No call in flight: 1.0 is "no penalty".
    assert_eq!(
        endpoint(refuses).queue_cost(now),
        1.0,
        "a service's refusals say nothing of its load"
    );
    assert!(
        endpoint(sheds).queue_cost(now) > 1.0,
        "a marked shed is penalised"
    );
    assert!(!endpoint(sheds).is_ejected(now) && !endpoint(refuses).is_ejected(now));
}

/// A real server on loopback TCP that closes every connection it accepts,
/// after its side of the HTTP/2 handshake (an empty SETTINGS frame) if
/// `speaks`; ten calls go to it through the balancer, each failing as
/// never sent (or finding the endpoint backed off). Returns how many
/// connections it accepted, the endpoint, and whether the first call
/// failed as a failed dial.
async fn calls_to_a_closing_server(
    speaks: bool,
    dial_after_the_close: bool,
) -> (usize, Arc<crate::endpoint::Endpoint>, bool) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(tokio::sync::Notify::new());
    let (count, done) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
            if speaks {
                let _ = tcp.write_all(&SETTINGS).await;
            }
            drop(tcp);
            done.notify_one();
        }
    });
    let connect: crate::endpoint::Connect = Arc::new(move |addr| {
        let closed = closed.clone();
        crate::endpoint::ClientConn::new(
            crate::endpoint::authority_of(addr),
            &crate::config::EndpointConfig::default(),
            move || {
                let closed = closed.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    if dial_after_the_close {
                        closed.notified().await;
                    }
                    Ok(hyper_util::rt::TokioIo::new(tcp))
                }
            },
        )
    });
    let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), Metrics::new());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Change::Insert(at, ())).await.unwrap();
    drop(tx);
    set.clone().follow(rx, connect, false).await;
    let config = ConfigHandle::new(MeshConfig::default()).unwrap();
    let svc = BalanceLayer::new(set.clone(), config).layer(crate::endpoint::Connection);
    let mut first_failed_dial = None;
    for _ in 0..10 {
        match svc.clone().oneshot(request()).await {
            Err(CallError::Transport {
                never_sent, source, ..
            }) => {
                assert!(never_sent);
                first_failed_dial.get_or_insert(crate::endpoint::failed_dial(&*source).is_some());
            }
            Err(CallError::NoEndpoint(_)) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
    (
        accepted.load(Ordering::SeqCst),
        set.snapshot()[0].clone(),
        first_failed_dial == Some(true),
    )
}

#[tokio::test]
async fn a_server_that_closes_after_every_handshake_is_backed_off_once_per_dial() {
    // Each dial completes once the server has closed, so the close is what
    // the connection meets first (not a request racing it).
    let (accepted, endpoint, _) = calls_to_a_closing_server(true, true).await;
    assert!(
        endpoint.is_reconnecting(Instant::now()),
        "backed off as after a failed dial"
    );
    assert_eq!(accepted, 1, "one dial, not one (or two) per call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_without_a_word_is_a_failed_dial() {
    // A proxy with nothing behind it: TCP is accepted and closed at once.
    // The dial waits for the server's SETTINGS, so no call is sent into
    // the closing connection (each would fail as maybe sent, and charge
    // the endpoint a failure instead of a backoff).
    let (accepted, endpoint, failed_dial) = calls_to_a_closing_server(false, false).await;
    assert!(failed_dial, "the first call failed with its dial");
    assert!(
        endpoint.is_reconnecting(Instant::now()),
        "backed off as after a failed dial"
    );
    assert_eq!(accepted, 1, "one dial, not one per call");
}

#[tokio::test(start_paused = true)]
async fn a_request_handed_back_unsent_is_resent_named_timed_and_charged_as_it_went() {
    let set = set_of(2, &Metrics::new()).await;
    let (svc, mut handle) = balanced(&set);
    let picked = Picked::default();
    let mut req = request();
    let expiry = Instant::now() + Duration::from_secs(1);
    req.extensions_mut()
        .insert(crate::deadline::CallExpiry(expiry));
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("1000000u"));
    req.extensions_mut().insert(picked.clone());
    let call = tokio::spawn(svc.clone().oneshot(req));

    // The first endpoint's connection takes 300 ms to close, then hands
    // the request back unwritten.
    let (first, answer) = handle.next_request().await.unwrap();
    let at_first = first.extensions().get::<SendTo>().unwrap().0.addr;
    assert_eq!(picked.get(), Some(at_first));
    tokio::time::advance(Duration::from_millis(300)).await;
    answer.send_error(crate::endpoint::unsent_for_tests(first));

    // Sent again, to the other endpoint, telling it the time left.
    let (second, answer) = handle.next_request().await.unwrap();
    let at_second = second.extensions().get::<SendTo>().unwrap().0.addr;
    assert_ne!(at_second, at_first);
    assert_eq!(picked.get(), Some(at_second), "names where it went");
    assert_eq!(second.headers()["grpc-timeout"], "700000u");
    // Handed back there too: never sent, and nobody is charged for it.
    answer.send_error(crate::endpoint::unsent_for_tests(second));
    match call.await.unwrap() {
        Err(CallError::Transport {
            addr: at,
            never_sent,
            ..
        }) => {
            assert_eq!(at, at_second);
            assert!(never_sent);
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Each was penalised once as a shedding one (a replica that closes with
    // calls queued must not look light), and neither counts toward ejection.
    let now = Instant::now();
    let policy = crate::config::OutlierDetection::default();
    for endpoint in set.snapshot().iter() {
        assert_eq!(
            endpoint.queue_cost(now),
            5.0,
            "{} penalised once",
            endpoint.addr
        );
        for _ in 1..policy.consecutive_failures {
            assert_eq!(
                endpoint.record_failure(now, &policy, true),
                crate::endpoint::Verdict::Kept,
                "{} charged a failure",
                endpoint.addr
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_cut_for_standing_still_backs_off_but_never_ejects() {
    // A caller that holds every stream of a replica's shared connection
    // can get it cut as stalled; that must not eject the replica (the
    // test's policy ejects after 2 failures in a row).
    let set = set_of(1, &Metrics::new()).await;
    let (svc, mut handle) = balanced(&set);
    for dial in 1..=3 {
        let call = tokio::spawn(svc.clone().oneshot(request()));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_error(crate::endpoint::stalled_for_tests(dial));
        assert!(call.await.unwrap().is_err());
        let endpoint = set.snapshot()[0].clone();
        assert!(endpoint.is_reconnecting(Instant::now()), "backed off");
        assert!(
            !endpoint.is_ejected(Instant::now()),
            "ejected after stalled cut {dial}"
        );
        tokio::time::advance(Duration::from_secs(300)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_handed_back_with_no_time_left_is_not_resent() {
    let set = set_of(2, &Metrics::new()).await;
    let (svc, mut handle) = balanced(&set);
    let mut req = request();
    req.extensions_mut().insert(crate::deadline::CallExpiry(
        Instant::now() + Duration::from_millis(100),
    ));
    let call = tokio::spawn(svc.clone().oneshot(req));
    let (first, answer) = handle.next_request().await.unwrap();
    // Handed back once the deadline has all but passed.
    tokio::time::advance(Duration::from_millis(100)).await;
    answer.send_error(crate::endpoint::unsent_for_tests(first));
    let ended = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call waits on a resend sent with no time left");
    match ended.unwrap() {
        Err(CallError::Transport { never_sent, .. }) => assert!(never_sent),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .is_err(),
        "resent with no time left"
    );
}

/// An answer with no `grpc-status` that ended with its headers, as a
/// proxy or a plain HTTP server sends it.
fn bare(status: http::StatusCode) -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

/// Sends `calls` calls, round robin alternating: port 1 answers `answer`,
/// port 2 OK. Returns the ports the calls went to.
async fn run(
    svc: &Balanced,
    handle: &mut Handle,
    answer: impl Fn() -> http::Response<Body>,
    calls: usize,
) -> Vec<u16> {
    let mut ports = Vec::new();
    for _ in 0..calls {
        let call = tokio::spawn(svc.clone().oneshot(request()));
        let (req, reply) = handle.next_request().await.unwrap();
        let port = req.extensions().get::<SendTo>().unwrap().0.addr.port();
        reply.send_response(if port == 1 {
            answer()
        } else {
            trailers_only(Code::Ok)
        });
        // Read to its end, as tonic reads every answer's body (a broken
        // one fails, as it does for the caller).
        let response = call.await.unwrap().unwrap();
        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
        ports.push(port);
    }
    ports
}

#[tokio::test(start_paused = true)]
async fn a_bare_5xx_counts_toward_ejection_and_a_bare_4xx_charges_nobody() {
    let metrics = Metrics::new();
    let set = set_of(2, &metrics).await;
    let (svc, mut handle) = balanced(&set);
    // 431 (oversized headers, the caller's doing) ten times: never ejected.
    let ports = run(
        &svc,
        &mut handle,
        || bare(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        10,
    )
    .await;
    assert_eq!(ports.iter().filter(|p| **p == 1).count(), 5, "{ports:?}");
    let endpoints = set.snapshot();
    let one = endpoints.iter().find(|e| e.addr == addr(1)).unwrap();
    assert!(!one.is_ejected(Instant::now()), "a 4xx charges nobody");
    // Nor a proxy's 403 with a page of its own (a body without trailers).
    let page = || {
        let mut response = http::Response::new(Body::new(http_body_util::Full::new(
            bytes::Bytes::from_static(b"<html>forbidden</html>"),
        )));
        *response.status_mut() = http::StatusCode::FORBIDDEN;
        response
    };
    run(&svc, &mut handle, page, 10).await;
    assert!(
        !one.is_ejected(Instant::now()),
        "a 4xx with a body charges nobody"
    );

    // 503 twice in a row (the policy's consecutiveFailures): ejected.
    let ports = run(
        &svc,
        &mut handle,
        || bare(http::StatusCode::SERVICE_UNAVAILABLE),
        4,
    )
    .await;
    assert_eq!(ports.iter().filter(|p| **p == 1).count(), 2, "{ports:?}");
    let ports = run(
        &svc,
        &mut handle,
        || bare(http::StatusCode::SERVICE_UNAVAILABLE),
        4,
    )
    .await;
    assert_eq!(ports, vec![2; 4], "port 1 is ejected");
}

/// An answer whose body breaks with `status` after its headers (a stream
/// reset under way: tonic's body hands the caller that code).
fn broken(status: fn() -> tonic::Status) -> impl Fn() -> http::Response<Body> {
    move || {
        let frames = futures::stream::iter([Err::<http_body::Frame<bytes::Bytes>, _>(status())]);
        http::Response::new(Body::new(http_body_util::StreamBody::new(frames)))
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_its_caller_broke_charges_nobody_and_one_the_connection_broke_ejects() {
    let metrics = Metrics::new();
    let set = set_of(2, &metrics).await;
    let (svc, mut handle) = balanced(&set);
    let endpoints = set.snapshot();
    let one = endpoints.iter().find(|e| e.addr == addr(1)).unwrap();
    // Reset with CANCEL (the caller's request body failed, or it gave up)
    // ten times: never ejected.
    let cancelled = broken(|| tonic::Status::cancelled("stream error sent by user: CANCEL"));
    let read = http_body_util::BodyExt::collect(cancelled().into_body()).await;
    assert_eq!(read.unwrap_err().code(), Code::Cancelled, "the body breaks");
    run(&svc, &mut handle, &cancelled, 10).await;
    assert!(
        !one.is_ejected(Instant::now()),
        "a caller's reset charges nobody"
    );
    // Broken by a lost connection twice in a row: ejected.
    let lost = broken(|| tonic::Status::unavailable("connection reset by peer"));
    let ports = run(&svc, &mut handle, &lost, 4).await;
    assert_eq!(ports.iter().filter(|p| **p == 1).count(), 2, "{ports:?}");
    assert!(
        one.is_ejected(Instant::now()),
        "a lost connection is the endpoint's failure"
    );
    let ports = run(&svc, &mut handle, &lost, 4).await;
    assert_eq!(ports, vec![2; 4], "port 1 is ejected");
}

/// A real HTTP/2 server on loopback that answers each call OK once its
/// request body has ended (as a client-streaming method does), and
/// nothing to one whose body is reset.
async fn answering_after_the_upload_h2_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(data) = body.data().await {
                            let Ok(data) = data else { return };
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                        let _ = respond.send_response(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "0")
                                .body(())
                                .unwrap(),
                            true,
                        );
                    });
                }
            });
        }
    });
    at
}

#[tokio::test]
async fn an_upload_its_caller_broke_before_the_answer_charges_nobody() {
    // Two replicas of a client-streaming method; each caller's request
    // stream fails after its first message (an encode error, a caller
    // gone), so the mesh resets the stream with CANCEL before the server
    // answers. The test's policy ejects after 2 failures in a row.
    let servers = [
        answering_after_the_upload_h2_server().await,
        answering_after_the_upload_h2_server().await,
    ];
    let set = set_over_tcp(&servers).await;
    let svc = BalanceLayer::new(set.clone(), ejecting_after_two("round_robin"))
        .layer(crate::endpoint::Connection);
    let broken_upload = || {
        let frames = futures::stream::iter([
            Ok(http_body::Frame::data(bytes::Bytes::from_static(&[
                0, 0, 0, 0, 0,
            ]))),
            Err(tonic::Status::internal("the caller's stream failed")),
        ]);
        let mut req = request();
        *req.body_mut() = Body::new(http_body_util::StreamBody::new(frames));
        req
    };
    for call in 0..6 {
        match svc.clone().oneshot(broken_upload()).await {
            Err(CallError::Transport { source, .. }) => {
                let h2 = crate::caused_by::<h2::Error>(&*source).expect("an h2 error");
                assert_eq!(h2.reason(), Some(h2::Reason::CANCEL), "call {call}: {h2}");
            }
            other => panic!("call {call}: {:?}", other.map(|_| ())),
        }
    }
    let now = Instant::now();
    assert!(
        set.snapshot().iter().all(|e| !e.is_ejected(now)),
        "a caller's broken upload ejected a replica"
    );
    // A whole upload is answered: the servers were fine all along.
    let mut req = request();
    *req.body_mut() = Body::new(http_body_util::Full::new(bytes::Bytes::from_static(&[
        0, 0, 0, 0, 0,
    ])));
    let response = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(header_status(&response), Some(Code::Ok));
}
