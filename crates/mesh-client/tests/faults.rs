//! Fault injection and mirroring through routes, against real servers on
//! loopback (echo replicas, `common::Replica`): where a call went and how
//! many arrived is read from each replica's own counter.

mod common;

use std::{sync::Arc, time::Duration};

use common::{EchoOptions, Replica, mesh, wait_serving};
use mesh_client::{MeshChannel, MeshConfig, telemetry::Metrics};
use mesh_fixture::echo::{
    EchoRequest, Fault, GetStatsRequest, echo_service_client::EchoServiceClient,
};
use tokio::time::Instant;
use tonic::Code;

async fn echo(id: &str) -> Replica {
    let replica = Replica::start(id, EchoOptions::default());
    wait_serving(replica.addr).await;
    replica
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

async fn set_fault(r: &Replica, fault: Fault) {
    EchoServiceClient::new(common::channel(r.addr))
        .set_fault(fault)
        .await
        .unwrap();
}

async fn echo_call(channel: &MeshChannel, timeout: Duration) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(timeout);
    EchoServiceClient::new(channel.clone())
        .echo(request)
        .await
        .map(|r| r.into_inner().server_id)
}

/// The sum of the series `name` whose labels contain `labels`.
fn count(metrics: &Metrics, name: &str, labels: &str) -> u64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A config routing every call of `target` to itself through one route
/// with these extra route fields (JSON), and `extra` top-level fields.
fn routed(target: &str, route_fields: &str, extra: &str) -> MeshConfig {
    MeshConfig::from_json(&format!(
        r#"{{ {extra} "targets":{{ {target:?}:{{"routes":[{{"name":"chaos",
            "backendRefs":[{{"target":{target:?},"weight":100}}], {route_fields} }}]}} }} }}"#
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_unavailable_aborts_on_an_idempotent_method_are_retried_and_eject_nothing() {
    let (a, b) = (echo("a").await, echo("b").await);
    let target = format!("static:///{},{}", a.addr, b.addr);
    // Ejection allowed for every endpoint, so charging them with the
    // aborts would show; a retry budget sized for a 20 % failure rate
    // (retries of retries add up to 25 % of calls).
    let config = routed(
        &target,
        r#""fault":{"abort":{"percentage":20,"grpcStatus":"UNAVAILABLE"}}"#,
        r#""outlierDetection":{"maxEjectionPercent":100},
           "retryBudget":{"retryRatio":0.4},"#,
    );
    let metrics = Metrics::new();
    let mesh = mesh(config).with_metrics(metrics.clone());
    let channel = mesh.channel(&target).unwrap();
    const CALLS: usize = 500;
    let mut failed = 0;
    for _ in 0..CALLS {
        match echo_call(&channel, Duration::from_secs(10)).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                failed += 1;
            }
        }
    }
    let aborted = count(
        &metrics,
        "mesh_client_faults_injected_total",
        "kind=\"abort\"",
    );
    let retries = count(&metrics, "mesh_retries_total", "");
    let served = (calls(&a).await + calls(&b).await) as usize;
    println!(
        "FAULTS 20% aborts over {CALLS} calls: {aborted} aborted attempts, {retries} retries, {failed} calls failed"
    );
    // 3 attempts: a call fails with probability 0.2^3 = 0.8 % (4 of 500).
    assert!(failed <= 15, "{failed} of {CALLS} calls failed");
    // Aborted attempts never reached a server: each call that succeeded
    // was served exactly once.
    assert_eq!(
        served,
        CALLS - failed,
        "only the successful attempts were served"
    );
    assert!(aborted >= 50, "about 125 aborts expected, {aborted} seen");
    assert!(
        channel.endpoint_states().iter().all(|e| !e.ejected),
        "{:?}",
        channel.endpoint_states()
    );
    assert_eq!(count(&metrics, "mesh_endpoint_ejections_total", ""), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200ms_route_delay_on_a_100ms_deadline_ends_deadline_exceeded_at_the_deadline() {
    let r = echo("r").await;
    let target = format!("static:///{}", r.addr);
    let config = routed(
        &target,
        r#""fault":{"delay":{"percentage":100,"fixedDelay":"200ms"}}"#,
        "",
    );
    let metrics = Metrics::new();
    let mesh = mesh(config).with_metrics(metrics.clone());
    let channel = mesh.channel(&target).unwrap();
    let started = Instant::now();
    let err = echo_call(&channel, Duration::from_millis(100))
        .await
        .expect_err("the delay outlasts the deadline");
    let took = started.elapsed();
    println!("FAULTS 200 ms delay, 100 ms deadline: DEADLINE_EXCEEDED after {took:?}");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(took >= Duration::from_millis(100), "{took:?}");
    // It ended at the deadline, before the delay was over: the call was
    // never sent.
    assert_eq!(calls(&r).await, 0);
    assert_eq!(
        count(
            &metrics,
            "mesh_client_faults_injected_total",
            "kind=\"delay\""
        ),
        1
    );
}

/// The 99th percentile of `samples`.
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// One Echo call's latency, panicking on a failure.
async fn timed(channel: &MeshChannel) -> Duration {
    let started = Instant::now();
    echo_call(channel, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("a primary call failed: {e:?}"));
    started.elapsed()
}

/// `n` calls on each channel, alternating, so both see the same load from
/// whatever else runs on the machine: (latencies of `a`, of `b`).
async fn interleaved(a: &MeshChannel, b: &MeshChannel, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut on_a, mut on_b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        on_a.push(timed(a).await);
        on_b.push(timed(b).await);
    }
    (on_a, on_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_hangs_or_fails_changes_neither_the_primary_s_answers_nor_its_p99() {
    let (primary, shadow) = (echo("primary").await, echo("shadow").await);
    let target = format!("static:///{}", primary.addr);
    let shadow_target = format!("static:///{}", shadow.addr);
    // Every call mirrored, at most 8 copies at once.
    let config = routed(
        &target,
        &format!(r#""mirror":{{"target":{shadow_target:?},"percentage":100,"maxInFlight":8}}"#),
        "",
    );
    let metrics = Metrics::new();
    let mirrored = mesh(config).with_metrics(metrics.clone());
    let mirrored = mirrored.channel(&target).unwrap();
    // The same primary without a mirror, called turn about with it.
    let plain = mesh(MeshConfig::default()).channel(&target).unwrap();
    const N: usize = 300;
    interleaved(&plain, &mirrored, 50).await; // warm the connections

    // The shadow hangs (10 s per call): 8 copies hang, the rest are
    // dropped; the primary does not notice.
    set_fault(
        &shadow,
        Fault {
            delay_ms: 10_000,
            ..Fault::default()
        },
    )
    .await;
    let (base_hanging, hanging) = interleaved(&plain, &mirrored, N).await;
    assert!(
        count(
            &metrics,
            "mesh_client_mirrored_total",
            "outcome=\"dropped\""
        ) > 0
    );

    // The shadow fails every call. Copies already hanging keep their
    // permits until their deadline; wait (bounded) for them to end.
    set_fault(
        &shadow,
        Fault {
            unavailable: true,
            ..Fault::default()
        },
    )
    .await;
    for _ in 0..150 {
        if count(&metrics, "mesh_client_mirrored_total", "outcome=\"failed\"") >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed_before = count(&metrics, "mesh_client_mirrored_total", "outcome=\"failed\"");
    let (base_failing, failing) = interleaved(&plain, &mirrored, N).await;
    let (base_hanging, hanging) = (p99(base_hanging), p99(hanging));
    let (base_failing, failing) = (p99(base_failing), p99(failing));
    println!(
        "MIRROR p99 over {N} calls, unmirrored vs mirrored: shadow hanging {base_hanging:?} vs {hanging:?}, shadow failing {base_failing:?} vs {failing:?}"
    );
    assert_eq!(
        calls(&primary).await as usize,
        2 * (50 + 2 * N),
        "every primary call served once"
    );
    // Beyond noise would be the shadow's 10 s, or a queue behind it; the
    // margin absorbs a descheduled thread on a busy machine (p99 of 300 is
    // the third-worst call), far below the hang it guards against.
    assert!(
        hanging < base_hanging * 4 + Duration::from_millis(500),
        "p99 {hanging:?} with a hanging shadow, {base_hanging:?} without"
    );
    assert!(
        failing < base_failing * 4 + Duration::from_millis(500),
        "p99 {failing:?} with a failing shadow, {base_failing:?} without"
    );
    assert!(
        count(&metrics, "mesh_client_mirrored_total", "outcome=\"failed\"") > failed_before,
        "the shadow's failures are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_sees_about_the_configured_share_of_side_effect_free_calls_only() {
    let (primary, shadow) = (echo("primary").await, echo("shadow").await);
    let target = format!("static:///{}", primary.addr);
    let shadow_target = format!("static:///{}", shadow.addr);
    let config = routed(
        &target,
        &format!(r#""mirror":{{"target":{shadow_target:?},"percentage":10,"maxInFlight":1024}}"#),
        "",
    );
    let metrics = Metrics::new();
    let mesh = mesh(config).with_metrics(metrics.clone());
    let channel = mesh.channel(&target).unwrap();
    const N: usize = 2000;
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(N));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (channel, left) = (channel.clone(), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
                {
                    echo_call(&channel, Duration::from_secs(10)).await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    // Record has side effects: never copied.
    for _ in 0..100 {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.set_timeout(Duration::from_secs(10));
        EchoServiceClient::new(channel.clone())
            .record(request)
            .await
            .unwrap();
    }
    let sent = count(&metrics, "mesh_client_mirrored_total", "outcome=\"sent\"") as i64;
    // Copies finish on their own time: wait (bounded) for all to arrive.
    for _ in 0..100 {
        if calls(&shadow).await >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = calls(&shadow).await;
    let sigma = (N as f64 * 0.1 * 0.9).sqrt();
    println!(
        "MIRROR 10% of {N} calls: the shadow saw {seen} (200 ± {:.0} at 4 sigma)",
        4.0 * sigma
    );
    assert_eq!(seen, sent, "every copy sent arrived, nothing else");
    assert!(
        (seen as f64 - 200.0).abs() <= 4.0 * sigma,
        "shadow saw {seen} of {N}"
    );
    assert_eq!(
        count(
            &metrics,
            "mesh_client_mirrored_total",
            "outcome=\"dropped\""
        ),
        0
    );
    assert!(
        count(
            &metrics,
            "mesh_client_mirrored_total",
            "outcome=\"ineligible\""
        ) > 0
    );
    assert_eq!(calls(&primary).await as usize, N + 100);
}
