//! Routes against real servers on loopback: weighted splits measured by
//! each backend's own counters, weights changed live under load, matching
//! by method and metadata with a wildcard fallback, per-route timeout and
//! retry policy, in-flight calls finishing where they started, a bad
//! reload keeping the last good routes, and the route and backend in the
//! metrics.
//!
//! Every backend is its own echo replica (`common::Replica`), so "where a
//! call went" is read from the replica that served it: its `server_id` in
//! the answer or its own call counter.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{EchoOptions, Replica, mesh, wait_serving};
use mesh_client::{MeshChannel, MeshConfig, telemetry::Metrics};
use mesh_fixture::echo::{
    EchoRequest, Fault, GetStatsRequest, echo_service_client::EchoServiceClient,
};
use tonic::Code;

async fn echo(id: &str) -> Replica {
    let replica = Replica::start(id, EchoOptions::default());
    wait_serving(replica.addr).await;
    replica
}

fn target(r: &Replica) -> String {
    format!("static:///{}", r.addr)
}

/// Calls the replica counted itself (Echo, Record, Chain, streams).
async fn calls(r: &Replica) -> i64 {
    EchoServiceClient::new(common::channel(r.addr))
        .get_stats(GetStatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .calls
}

/// A config whose `routed` target has `routes` (JSON) and whose other
/// targets `backends` exist (empty policy).
fn config(routed: &str, routes: &str, backends: &[&str]) -> MeshConfig {
    let mut targets = vec![format!(r#"{routed:?}:{{"routes":{routes}}}"#)];
    targets.extend(backends.iter().map(|b| format!(r#"{b:?}:{{}}"#)));
    MeshConfig::from_json(&format!(r#"{{"targets":{{{}}}}}"#, targets.join(","))).unwrap()
}

/// `stable` weight `w_stable`, `canary` weight `w_canary`, every call.
fn split(stable: &str, canary: &str, w_stable: u32, w_canary: u32) -> MeshConfig {
    config(
        stable,
        &format!(
            r#"[{{"name":"split","backendRefs":[{{"target":{stable:?},"weight":{w_stable}}},{{"target":{canary:?},"weight":{w_canary}}}]}}]"#
        ),
        &[canary],
    )
}

async fn echo_call(channel: &MeshChannel) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(10));
    EchoServiceClient::new(channel.clone())
        .echo(request)
        .await
        .map(|r| r.into_inner().server_id)
}

/// Whether `k` of `n` is within 4 standard deviations of a binomial share `p`.
fn within_4_sigma(k: usize, n: usize, p: f64) -> bool {
    let (n_f, k_f) = (n as f64, k as f64);
    let sigma = (n_f * p * (1.0 - p)).sqrt();
    (k_f - n_f * p).abs() <= 4.0 * sigma
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_over_2000_calls_lands_within_4_sigma_on_each_backend_s_own_counter() {
    let (stable, canary) = (echo("stable").await, echo("canary").await);
    let (s, c) = (target(&stable), target(&canary));
    let mesh = mesh(split(&s, &c, 90, 10));
    let channel = mesh.channel(&s).unwrap();
    let failed = Arc::new(AtomicUsize::new(0));
    let left = Arc::new(AtomicUsize::new(2000));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (channel, failed, left) = (channel.clone(), failed.clone(), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    if echo_call(&channel).await.is_err() {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    let (on_stable, on_canary) = (calls(&stable).await as usize, calls(&canary).await as usize);
    println!("ROUTES split 90/10 over 2000 calls: stable {on_stable}, canary {on_canary}");
    assert_eq!(on_stable + on_canary, 2000, "each call served once");
    assert!(
        within_4_sigma(on_canary, 2000, 0.1),
        "canary served {on_canary} of 2000; 200 ± {:.0} expected",
        4.0 * (2000.0f64 * 0.1 * 0.9).sqrt()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_changed_live_0_10_50_100_under_load_fail_no_call_and_shares_follow_each_step() {
    let (stable, canary) = (echo("stable").await, echo("canary").await);
    let (s, c) = (target(&stable), target(&canary));
    let mesh = mesh(split(&s, &c, 100, 0));
    let channel = mesh.channel(&s).unwrap();
    // Which step each answer belongs to: the step in force when its call
    // started (a call decides its backend when it starts).
    let step = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    type Tally = HashMap<(usize, String), usize>;
    let tally: Arc<std::sync::Mutex<Tally>> = Arc::default();
    let failures: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (channel, step, stop, tally, failures) = (
                channel.clone(),
                step.clone(),
                stop.clone(),
                tally.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                // Bounded: at most 200 000 calls per worker.
                for _ in 0..200_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let at = step.load(Ordering::SeqCst);
                    match echo_call(&channel).await {
                        Ok(server) => *tally.lock().unwrap().entry((at, server)).or_default() += 1,
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let count = |tally: &Tally, at: usize| -> (usize, usize) {
        let get = |id: &str| tally.get(&(at, id.to_owned())).copied().unwrap_or(0);
        (get("stable"), get("canary"))
    };
    for (i, weight) in [0u32, 10, 50, 100].into_iter().enumerate() {
        // Steps are numbered from 1; calls of step i + 1 started after the
        // reload that made it.
        mesh.reload(split(&s, &c, 100 - weight, weight)).unwrap();
        step.store(i + 1, Ordering::SeqCst);
        // At least 600 calls per step (bounded wait: 60 s).
        for _ in 0..600 {
            let (a, b) = count(&tally.lock().unwrap(), i + 1);
            if a + b >= 600 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (on_stable, on_canary) = count(&tally.lock().unwrap(), i + 1);
        let n = on_stable + on_canary;
        println!("ROUTES live weight canary {weight}: stable {on_stable}, canary {on_canary}");
        assert!(n >= 600, "only {n} calls in step {weight}");
        match weight {
            0 => assert_eq!(on_canary, 0, "weight 0 drains the canary"),
            100 => assert_eq!(on_stable, 0, "weight 0 drains stable"),
            w => assert!(
                within_4_sigma(on_canary, n, f64::from(w) / 100.0),
                "canary {on_canary} of {n} at weight {w}"
            ),
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_by_method_and_metadata_reach_only_their_backend_and_the_rest_falls_back() {
    let (stable, canary, records, beta) = (
        echo("stable").await,
        echo("canary").await,
        echo("records").await,
        echo("beta").await,
    );
    let (s, c, r, b) = (
        target(&stable),
        target(&canary),
        target(&records),
        target(&beta),
    );
    let routes = format!(
        r#"[{{"name":"canary-header",
              "matches":[{{"method":{{"service":"mesh.echo.v1.EchoService","method":"Echo"}},
                           "headers":[{{"name":"x-canary","type":"Exact","value":"true"}}]}}],
              "backendRefs":[{{"target":{c:?},"weight":100}}]}},
            {{"name":"beta-users",
              "matches":[{{"headers":[{{"name":"x-user","type":"RegularExpression","value":"beta-[0-9]+"}}]}}],
              "backendRefs":[{{"target":{b:?}}}]}},
            {{"name":"records","matches":[{{"method":{{"method":"Record"}}}}],
              "backendRefs":[{{"target":{r:?}}}]}},
            {{"name":"fallback","backendRefs":[{{"target":{s:?}}}]}}]"#
    );
    let mesh = mesh(config(&s, &routes, &[&c, &r, &b]));
    let mut client = EchoServiceClient::new(mesh.channel(&s).unwrap());
    let call = |headers: &'static [(&'static str, &'static str)], record: bool| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(EchoRequest::default());
            for (k, v) in headers {
                request.metadata_mut().insert(*k, v.parse().unwrap());
            }
            let answer = if record {
                client.record(request).await
            } else {
                client.echo(request).await
            };
            answer.unwrap().into_inner().server_id
        }
    };
    for _ in 0..20 {
        assert_eq!(call(&[("x-canary", "true")], false).await, "canary");
        assert_eq!(call(&[("x-canary", "false")], false).await, "stable");
        assert_eq!(call(&[], false).await, "stable");
        // The header match is for Echo only: Record with it takes "records".
        assert_eq!(call(&[("x-canary", "true")], true).await, "records");
        assert_eq!(call(&[("x-user", "beta-42")], false).await, "beta");
        assert_eq!(
            call(&[("x-user", "beta-42x")], false).await,
            "stable",
            "the whole value must match"
        );
    }
    // Only the canary saw the canary header's calls: its own counter.
    assert_eq!(calls(&canary).await, 20);
    assert_eq!(calls(&records).await, 20);
    assert_eq!(calls(&beta).await, 20);
    assert_eq!(calls(&stable).await, 60);
    // A call no route takes goes to the target itself: with the fallback
    // gone, GetStats (no route matches it) reaches stable.
    let only_canary = format!(
        r#"[{{"name":"canary-header","matches":[{{"headers":[{{"name":"x-canary","value":"true"}}]}}],"backendRefs":[{{"target":{c:?}}}]}}]"#
    );
    mesh.reload(config(&s, &only_canary, &[&c])).unwrap();
    let stats = client
        .get_stats(GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.server_id, "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_s_timeout_and_retry_policy_replace_the_target_s() {
    let (stable, failing) = (echo("stable").await, echo("failing").await);
    let (s, f) = (target(&stable), target(&failing));
    EchoServiceClient::new(common::channel(failing.addr))
        .set_fault(Fault {
            unavailable: true,
            ..Fault::default()
        })
        .await
        .unwrap();
    let routes = format!(
        r#"[{{"name":"short","matches":[{{"headers":[{{"name":"x-route","value":"short"}}]}}],
              "timeout":"250ms","backendRefs":[{{"target":{s:?}}}]}},
            {{"name":"once","matches":[{{"headers":[{{"name":"x-route","value":"once"}}]}}],
              "retryPolicy":{{"maxAttempts":1}},"backendRefs":[{{"target":{f:?}}}]}},
            {{"name":"default-retries","matches":[{{"headers":[{{"name":"x-route","value":"retried"}}]}}],
              "backendRefs":[{{"target":{f:?}}}]}}]"#
    );
    let mesh = mesh(config(&s, &routes, &[&f]));
    let client = EchoServiceClient::new(mesh.channel(&s).unwrap());
    let call = |route: &'static str| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(EchoRequest::default());
            request
                .metadata_mut()
                .insert("x-route", route.parse().unwrap());
            client.echo(request).await.map(|r| r.into_inner())
        }
    };
    // The server sees the deadline the client sent.
    let short = call("short").await.unwrap();
    assert!(
        (1..=250).contains(&short.timeout_ms),
        "route timeout sent: {}",
        short.timeout_ms
    );
    let plain = call("none").await.unwrap();
    assert!(
        plain.timeout_ms > 5_000,
        "the default 10 s otherwise: {}",
        plain.timeout_ms
    );

    let before = calls(&failing).await;
    assert_eq!(call("once").await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(
        calls(&failing).await - before,
        1,
        "maxAttempts 1: one attempt"
    );
    let before = calls(&failing).await;
    assert_eq!(call("retried").await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(
        calls(&failing).await - before,
        3,
        "the default 3 attempts, all on the routed backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_finishes_on_its_backend_after_the_route_is_removed() {
    let (stable, canary) = (echo("stable").await, echo("canary").await);
    let (s, c) = (target(&stable), target(&canary));
    EchoServiceClient::new(common::channel(canary.addr))
        .set_fault(Fault {
            delay_ms: 1_000,
            ..Fault::default()
        })
        .await
        .unwrap();
    let mesh = mesh(split(&s, &c, 0, 1));
    let channel = mesh.channel(&s).unwrap();
    let in_flight = tokio::spawn({
        let channel = channel.clone();
        async move { echo_call(&channel).await }
    });
    // Wait (bounded) until the canary has the call.
    for _ in 0..200 {
        if calls(&canary).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(calls(&canary).await, 1);
    // Routes gone: new calls go to stable; the canary's set is dropped from
    // the table, but the call on it holds it.
    mesh.reload(MeshConfig::default()).unwrap();
    assert_eq!(echo_call(&channel).await.unwrap(), "stable");
    assert_eq!(in_flight.await.unwrap().unwrap(), "canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_is_refused_by_field_and_the_last_good_routes_stay() {
    let (stable, canary) = (echo("stable").await, echo("canary").await);
    let (s, c) = (target(&stable), target(&canary));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    let good = |w_stable: u32, w_canary: u32| {
        format!(
            r#"{{"targets":{{{s:?}:{{"routes":[{{"name":"split","backendRefs":[{{"target":{s:?},"weight":{w_stable}}},{{"target":{c:?},"weight":{w_canary}}}]}}]}},{c:?}:{{}}}}}}"#
        )
    };
    std::fs::write(&path, good(0, 1)).unwrap();
    let mesh = mesh_client::Mesh::from_file(&path)
        .unwrap()
        .with_descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .unwrap();
    let channel = mesh.channel(&s).unwrap();
    assert_eq!(echo_call(&channel).await.unwrap(), "canary");

    // Through the API: refused, naming the field.
    let mut zero = split(&s, &c, 1, 1);
    for b in &mut zero.targets.get_mut(&s).unwrap().routes[0].backend_refs {
        b.weight = 0;
    }
    let err = mesh.reload(zero).unwrap_err().to_string();
    assert!(
        err.contains(&format!("targets[{s:?}].routes[0].backendRefs")),
        "{err}"
    );
    let mut unknown = split(&s, &c, 1, 1);
    unknown.targets.remove(&c);
    let err = mesh.reload(unknown).unwrap_err().to_string();
    assert!(err.contains("backendRefs[1].target"), "{err}");

    // Through the file: a bad change is refused and the routes stay.
    let weights_zero = good(0, 0);
    std::fs::write(&path, &weights_zero).unwrap();
    let refused = |m: &str| m.contains("mesh_config_reloads_total{outcome=\"refused\"}");
    // Bounded: the file is checked every 2 s; wait at most 30 s.
    for _ in 0..300 {
        if mesh_client::telemetry::metrics()
            .encode()
            .lines()
            .any(refused)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        mesh_client::telemetry::metrics()
            .encode()
            .lines()
            .any(refused)
    );
    for _ in 0..20 {
        assert_eq!(
            echo_call(&channel).await.unwrap(),
            "canary",
            "the last good routes stay"
        );
    }
    // A good change after it applies.
    std::fs::write(&path, good(1, 0)).unwrap();
    let mut now = String::new();
    for _ in 0..300 {
        now = echo_call(&channel).await.unwrap();
        if now == "stable" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(now, "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_calls_are_counted_by_route_and_backend_and_unrouted_ones_as_before() {
    let (stable, canary) = (echo("stable").await, echo("canary").await);
    let (s, c) = (target(&stable), target(&canary));
    let routes = format!(
        r#"[{{"name":"canary-header","matches":[{{"headers":[{{"name":"x-canary","value":"true"}}]}}],"backendRefs":[{{"target":{c:?}}}]}}]"#
    );
    let metrics = Metrics::new();
    let mesh = mesh(config(&s, &routes, &[&c])).with_metrics(metrics.clone());
    let mut client = EchoServiceClient::new(mesh.channel_named("echo", &s, None).unwrap());
    for canary in [true, true, false] {
        let mut request = tonic::Request::new(EchoRequest::default());
        if canary {
            request
                .metadata_mut()
                .insert("x-canary", "true".parse().unwrap());
        }
        client.echo(request).await.unwrap();
    }
    let text = metrics.encode();
    let routed = format!(
        "mesh_responses_total{{direction=\"outbound\",peer=\"echo\",rpc_service=\"mesh.echo.v1.EchoService\",rpc_method=\"Echo\",route=\"canary-header\",backend=\"{c}\",grpc_code=\"OK\"}} 2"
    );
    let unrouted = "mesh_responses_total{direction=\"outbound\",peer=\"echo\",rpc_service=\"mesh.echo.v1.EchoService\",rpc_method=\"Echo\",grpc_code=\"OK\"} 1";
    assert!(text.contains(&routed), "{text}");
    assert!(text.contains(unrouted), "{text}");
    assert!(text.contains(&format!("mesh_requests_total{{direction=\"outbound\",peer=\"echo\",rpc_service=\"mesh.echo.v1.EchoService\",rpc_method=\"Echo\",route=\"canary-header\",backend=\"{c}\"}} 2")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_s_injected_aborts_are_retried_without_ejecting_and_its_delay_spends_the_deadline()
{
    let (stable, canary) = (echo("stable").await, echo("canary").await);
    let (s, c) = (target(&stable), target(&canary));
    let routes = format!(
        r#"[{{"name":"slow","matches":[{{"headers":[{{"name":"x-route","value":"slow"}}]}}],
              "fault":{{"delay":{{"percentage":100,"fixedDelay":"200ms"}}}},
              "backendRefs":[{{"target":{c:?}}}]}},
            {{"name":"flaky","fault":{{"abort":{{"percentage":20,"grpcStatus":"UNAVAILABLE"}}}},
              "backendRefs":[{{"target":{c:?}}}]}}]"#
    );
    let metrics = Metrics::new();
    let mesh = mesh(config(&s, &routes, &[&c])).with_metrics(metrics.clone());
    let channel = mesh.channel(&s).unwrap();
    let mut failed = 0;
    for _ in 0..300 {
        match echo_call(&channel).await {
            Ok(server) => assert_eq!(server, "canary"),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e}");
                failed += 1;
            }
        }
    }
    // 20 % aborts with 3 attempts: 0.8 % of calls fail, about 2 of 300.
    println!("ROUTES 20% injected aborts, 300 calls: {failed} failed");
    assert!(
        failed <= 15,
        "{failed} of 300 failed: aborts are not retried"
    );
    // Every call that the canary saw got there once: aborts never left.
    assert_eq!(calls(&canary).await, 300 - failed);
    // 300 x 20 % aborts, about 60, many in a row: none charged to an endpoint.
    let text = metrics.encode();
    let ejections = text
        .lines()
        .filter(|l| l.starts_with("mesh_endpoint_ejections_total{"))
        .filter(|l| !l.ends_with(" 0"))
        .count();
    assert_eq!(ejections, 0, "{text}");
    assert!(
        text.contains(&format!("mesh_endpoints{{peer=\"{c}\",state=\"ready\"}} 1")),
        "{text}"
    );

    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("x-route", "slow".parse().unwrap());
    request.set_timeout(Duration::from_millis(100));
    let err = EchoServiceClient::new(channel.clone())
        .echo(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert_eq!(
        calls(&canary).await,
        300 - failed,
        "the delayed call was never sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_s_mirror_copies_its_calls_without_side_effects_to_the_shadow() {
    let (stable, canary, shadow) = (
        echo("stable").await,
        echo("canary").await,
        echo("shadow").await,
    );
    let (s, c, m) = (target(&stable), target(&canary), target(&shadow));
    let routes = format!(
        r#"[{{"name":"mirrored","mirror":{{"target":{m:?},"percentage":100,"maxInFlight":16}},
              "backendRefs":[{{"target":{c:?}}}]}}]"#
    );
    let mesh = mesh(config(&s, &routes, &[&c, &m]));
    let mut client = EchoServiceClient::new(mesh.channel(&s).unwrap());
    for _ in 0..50 {
        let answer = client
            .echo(EchoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.server_id, "canary",
            "the primary's answer, not the shadow's"
        );
    }
    // Copies are fire-and-forget: wait (bounded) for the shadow to count them.
    for _ in 0..500 {
        if calls(&shadow).await >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(calls(&shadow).await, 50);
    // Record may have side effects: never copied unless the route allows it.
    for _ in 0..10 {
        client.record(EchoRequest::default()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls(&shadow).await, 50);
    assert_eq!(calls(&canary).await, 60);
    assert_eq!(calls(&stable).await, 0);
}

type Seen = Arc<std::sync::Mutex<Vec<http::HeaderMap>>>;

/// The echo service, recording the request headers of every call it serves.
#[derive(Clone)]
struct Recording {
    inner: mesh_fixture::echo::echo_service_server::EchoServiceServer<common::Echo>,
    seen: Seen,
}

impl tonic::server::NamedService for Recording {
    const NAME: &'static str = <mesh_fixture::echo::echo_service_server::EchoServiceServer<
        common::Echo,
    > as tonic::server::NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for Recording {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = <mesh_fixture::echo::echo_service_server::EchoServiceServer<common::Echo> as tower::Service<
        http::Request<tonic::body::Body>,
    >>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.seen.lock().unwrap().push(request.headers().clone());
        self.inner.call(request)
    }
}

/// A real echo server on loopback (on the test's runtime) that records the
/// request headers of every call.
async fn recording_echo(id: &str) -> (String, Seen) {
    let seen = Seen::default();
    let service =
        Recording {
            inner: mesh_fixture::echo::echo_service_server::EchoServiceServer::new(
                common::Echo::new(id.to_owned(), 0, None),
            ),
            seen: seen.clone(),
        };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = mesh_client::server::MeshServer::new(Default::default())
        .descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .add_service(service);
    tokio::spawn(server.serve(listener, std::future::pending()));
    wait_serving(addr).await;
    (format!("static:///{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_strips_credentials_from_the_copy_unless_keep_headers_names_them() {
    for keep in ["", r#","keepHeaders":["authorization"]"#] {
        let (primary, primary_seen) = recording_echo("primary").await;
        let (shadow, shadow_seen) = recording_echo("shadow").await;
        let routes = format!(
            r#"[{{"name":"mirrored","mirror":{{"target":{shadow:?},"stripHeaders":["x-api-key"]{keep}}},
                  "backendRefs":[{{"target":{primary:?}}}]}}]"#
        );
        let routed = "static:///127.0.0.1:9"; // never called: the route sends to `primary`
        let mesh = mesh(config(routed, &routes, &[&primary, &shadow]));
        let mut request = tonic::Request::new(EchoRequest::default());
        for (name, value) in [
            ("authorization", "Bearer secret-token"),
            ("cookie", "session=secret"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("x-api-key", "secret"),
            ("x-kept", "yes"),
        ] {
            request.metadata_mut().insert(name, value.parse().unwrap());
        }
        EchoServiceClient::new(mesh.channel(routed).unwrap())
            .echo(request)
            .await
            .unwrap();
        // The copy is fire-and-forget: wait (bounded) for it to arrive.
        for _ in 0..500 {
            if !shadow_seen.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let copy = shadow_seen
            .lock()
            .unwrap()
            .pop()
            .expect("the shadow got a copy");
        assert_eq!(copy["mesh-mirrored"], "true");
        assert_eq!(copy["x-kept"], "yes", "other metadata is copied");
        for name in ["cookie", "proxy-authorization", "x-api-key"] {
            assert!(
                !copy.contains_key(name),
                "{name} reached the shadow ({keep})"
            );
        }
        if keep.is_empty() {
            assert!(
                !copy.contains_key("authorization"),
                "the shadow got the caller's token by default"
            );
        } else {
            assert_eq!(copy["authorization"], "Bearer secret-token", "opted in");
        }
        let original = primary_seen
            .lock()
            .unwrap()
            .pop()
            .expect("the primary call");
        for name in [
            "authorization",
            "cookie",
            "proxy-authorization",
            "x-api-key",
        ] {
            assert!(original.contains_key(name), "the primary lost {name}");
        }
    }
}
