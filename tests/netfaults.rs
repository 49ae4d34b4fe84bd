//! Faults loopback cannot show, on pods in network namespaces
//! (`common::netbed`): a replica that goes silent (no RST), one-way
//! partitions, SYNs dropped to a new endpoint, lossy and distant links, a
//! healed partition.
//!
//! Every scenario runs `mesh-echo` replicas in pods behind a DNS name
//! served from the client's pod (a headless Service), drives the mesh
//! client from a runtime inside the client's pod, prints its numbers
//! (`NETFAULTS ...` lines), and asserts only invariants (no failed
//! idempotent call, no call past its deadline, shares in the right
//! direction), never tight timings. Each is bounded in time and calls.

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    Proc, bin,
    dns::TestDns,
    netbed::{NetBed, NsRuntime, Pod, Shape},
    netshop::PgPod,
};
use mesh_client::{LbPolicy, Mesh, MeshChannel, MeshConfig};
use shop_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};
use tokio::time::Instant;
use tonic::Code;

const PORT: u16 = 50051;
const NAME: &str = "echo.bed.test";
/// Every call's own deadline in these scenarios: the mesh's default.
const DEADLINE: Duration = Duration::from_secs(10);
/// How far past its deadline a call may end on a busy two-core host.
const SLACK: Duration = Duration::from_millis(1500);

/// A bed with a client pod (DNS server, mesh runtime) and echo replicas.
/// Fields drop in order: the runtime and processes before the bed.
struct Echoes {
    rt: NsRuntime,
    dns: TestDns,
    replicas: Vec<(Pod, Proc)>,
    client: Pod,
    bed: NetBed,
}

impl Echoes {
    async fn start(n: usize) -> Option<Echoes> {
        let bed = NetBed::new()?;
        let client = bed.pod("client");
        bed.set_nameserver(client.addr);
        let rt = NsRuntime::new(&client);
        let dns = rt
            .run(TestDns::start_on(SocketAddr::from((client.addr, 53))))
            .await;
        let mut echoes = Echoes {
            rt,
            dns,
            replicas: Vec::new(),
            client,
            bed,
        };
        for i in 0..n {
            echoes.add_replica(i).await;
        }
        echoes.announce();
        Some(echoes)
    }

    /// Starts replica `r<i>` in a new pod and waits until it serves (not
    /// yet in DNS: see [`Echoes::announce`]).
    async fn add_replica(&mut self, i: usize) -> SocketAddr {
        let pod = self.bed.pod(&format!("echo{i}"));
        let addr = SocketAddr::from((pod.addr, PORT));
        let child = self
            .bed
            .command(&pod, &bin("mesh-echo"))
            .args(["--listen", &addr.to_string(), "--id", &format!("r{i}")])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting mesh-echo in its pod");
        let proc = Proc::adopt("mesh-echo", addr, child);
        // Checked from inside its own pod, so faults already imposed on
        // its link (scenario 3) do not hide a healthy start.
        NsRuntime::new(&pod).run(common::wait_serving(addr)).await;
        self.replicas.push((pod, proc));
        addr
    }

    /// Publishes every replica's address under [`NAME`].
    fn announce(&self) {
        let ips: Vec<Ipv4Addr> = self.replicas.iter().map(|(p, _)| p.addr).collect();
        self.dns.set(NAME, &ips);
    }

    fn target(&self) -> String {
        format!("dns://{}:53/{NAME}:{PORT}", self.client.addr)
    }

    fn pod(&self, i: usize) -> &Pod {
        &self.replicas[i].0
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.replicas[i].1.addr
    }

    /// A mesh channel to the replicas, made inside the client's pod, with
    /// its endpoints resolved.
    async fn channel(&self, config: MeshConfig) -> MeshChannel {
        let target = self.target();
        let expected = self.replicas.len();
        self.rt
            .run(async move {
                let channel = Mesh::from_config(config)
                    .unwrap()
                    .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
                    .unwrap()
                    .channel(&target)
                    .unwrap();
                for _ in 0..100 {
                    if channel.endpoints().len() >= expected {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                channel
            })
            .await
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    /// `Echo`: NO_SIDE_EFFECTS, retried by the mesh.
    Idempotent,
    /// `Record`: no idempotency level, never retried once sent.
    NonIdempotent,
}

/// One call's outcome.
#[derive(Clone, Debug)]
struct Sample {
    /// When it started, since the load began.
    at: Duration,
    took: Duration,
    code: Code,
    server: Option<String>,
    message: String,
}

/// Runs `callers` loops of `call` (each with [`DEADLINE`]) from `start`
/// for `duration`, at most `max_calls` calls, in the client's pod.
fn load(
    rt: &NsRuntime,
    channel: &MeshChannel,
    call: Call,
    callers: usize,
    start: Instant,
    duration: Duration,
    max_calls: usize,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let channel = channel.clone();
    rt.spawn(async move {
        let end = start + duration;
        let budget = Arc::new(AtomicUsize::new(max_calls));
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let mut client = EchoServiceClient::new(channel.clone());
                let budget = budget.clone();
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    while Instant::now() < end && budget.fetch_sub(1, Ordering::Relaxed) > 0 {
                        let began = Instant::now();
                        let mut request = tonic::Request::new(EchoRequest {
                            payload: b"hi".to_vec(),
                        });
                        request.set_timeout(DEADLINE);
                        let result = match call {
                            Call::Idempotent => client.echo(request).await,
                            Call::NonIdempotent => client.record(request).await,
                        };
                        let (code, server, message) = match result {
                            Ok(r) => (Code::Ok, Some(r.into_inner().server_id), String::new()),
                            Err(s) => (s.code(), None, s.message().to_owned()),
                        };
                        samples.push(Sample {
                            at: began - start,
                            took: began.elapsed(),
                            code,
                            server,
                            message,
                        });
                        if code != Code::Ok {
                            // A failing caller must not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    samples
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_by_key(|s| s.at);
        all
    })
}

fn failed(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.code != Code::Ok).collect()
}

fn codes(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for s in samples {
        *by.entry(format!("{:?}", s.code)).or_default() += 1;
    }
    by
}

fn share(samples: &[Sample], server: &str) -> f64 {
    let ok = samples.iter().filter(|s| s.code == Code::Ok).count();
    let to = samples
        .iter()
        .filter(|s| s.server.as_deref() == Some(server))
        .count();
    to as f64 / ok.max(1) as f64
}

fn percentile(samples: &[Sample], p: f64) -> Duration {
    let mut took: Vec<Duration> = samples
        .iter()
        .filter(|s| s.code == Code::Ok)
        .map(|s| s.took)
        .collect();
    took.sort();
    if took.is_empty() {
        return Duration::ZERO;
    }
    took[((took.len() - 1) as f64 * p).round() as usize]
}

fn longest(samples: &[Sample]) -> Duration {
    samples.iter().map(|s| s.took).max().unwrap_or_default()
}

/// No call, failed or not, may end long after its deadline.
fn assert_none_hung(what: &str, samples: &[Sample]) {
    let worst = longest(samples);
    assert!(
        worst <= DEADLINE + SLACK,
        "{what}: a call took {worst:?}, past its {DEADLINE:?} deadline"
    );
}

/// Non-idempotent calls that failed did so as UNAVAILABLE or DEADLINE_EXCEEDED.
fn assert_fails_cleanly(what: &str, samples: &[Sample]) {
    for s in failed(samples) {
        assert!(
            matches!(s.code, Code::Unavailable | Code::DeadlineExceeded),
            "{what}: a non-idempotent call failed with {:?}: {}",
            s.code,
            s.message
        );
    }
}

fn assert_no_idempotent_failure(what: &str, samples: &[Sample]) {
    let failures = failed(samples);
    assert!(
        failures.is_empty(),
        "{what}: {} idempotent calls failed ({:?}); first: {:?}",
        failures.len(),
        codes(samples),
        failures.first()
    );
}

/// How long after `since` the endpoint `addr` was first seen out of
/// rotation (ejected, reconnecting or NOT_SERVING), watched every 50 ms
/// until `until`.
fn watch_detection(
    rt: &NsRuntime,
    channel: &MeshChannel,
    addr: SocketAddr,
    since: Instant,
    until: Instant,
) -> tokio::task::JoinHandle<Option<Duration>> {
    let channel = channel.clone();
    rt.spawn(async move {
        tokio::time::sleep_until(since).await;
        while Instant::now() < until {
            let out = channel
                .endpoint_states()
                .into_iter()
                .find(|s| s.addr == addr)
                .is_none_or(|s| s.ejected || s.reconnecting || s.serving == Some(false));
            if out {
                return Some(since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    })
}

/// The time from `since` to the last successful call served by `server`
/// that started after `since` (how long the mesh kept sending it calls
/// that still got through), if any.
fn last_served_after(samples: &[Sample], server: &str, since: Duration) -> Option<Duration> {
    samples
        .iter()
        .filter(|s| s.server.as_deref() == Some(server) && s.at >= since)
        .map(|s| s.at - since)
        .max()
}

/// Runs idempotent and non-idempotent traffic over three replicas and
/// applies `fault` to replica 1 at 2 s; returns both sample sets and when
/// the endpoint was seen out of rotation.
async fn fault_under_traffic(
    name: &str,
    fault: impl FnOnce(&NetBed, &Pod),
) -> Option<(Vec<Sample>, Vec<Sample>, Option<Duration>)> {
    let echoes = Echoes::start(3).await?;
    let channel = echoes.channel(MeshConfig::default()).await;
    let start = Instant::now() + Duration::from_millis(100);
    let run = Duration::from_secs(16);
    let at = Duration::from_secs(2);
    let idem = load(
        &echoes.rt,
        &channel,
        Call::Idempotent,
        4,
        start,
        run,
        100_000,
    );
    let non = load(
        &echoes.rt,
        &channel,
        Call::NonIdempotent,
        2,
        start,
        run,
        50_000,
    );
    let detection = watch_detection(
        &echoes.rt,
        &channel,
        echoes.addr(1),
        start + at,
        start + run,
    );
    tokio::time::sleep_until(start + at).await;
    fault(&echoes.bed, echoes.pod(1));
    let (idem, non) = (idem.await.unwrap(), non.await.unwrap());
    let detected = detection.await.unwrap();
    let fails = failed(&idem);
    println!(
        "NETFAULTS {name}: idempotent calls {} failed {} {:?} (first failure at {:?} after the fault); \
         out of rotation after {:?}; r1 still answered a call started {:?} after the fault; \
         longest idempotent call {:?}, p99 {:?}",
        idem.len(),
        fails.len(),
        codes(&idem),
        fails.first().map(|s| s.at.saturating_sub(at)),
        detected,
        last_served_after(&idem, "r1", at),
        longest(&idem),
        percentile(&idem, 0.99),
    );
    println!(
        "NETFAULTS {name}: non-idempotent calls {} outcomes {:?}, longest {:?}",
        non.len(),
        codes(&non),
        longest(&non),
    );
    drop(channel);
    let prefix = echoes.bed.prefix.clone();
    drop(echoes);
    assert!(
        NetBed::leftovers(&prefix).is_empty(),
        "namespaces left behind: {:?}",
        NetBed::leftovers(&prefix)
    );
    Some((idem, non, detected))
}

/// Scenario 1: one replica goes silent (every packet dropped, no RST)
/// under continuous traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_replica_fails_no_idempotent_call_and_no_call_hangs_past_its_deadline() {
    let Some((idem, non, detected)) = fault_under_traffic("blackhole", NetBed::blackhole).await
    else {
        return;
    };
    assert_none_hung("idempotent", &idem);
    assert_none_hung("non-idempotent", &non);
    assert_fails_cleanly("non-idempotent", &non);
    assert!(
        detected.is_some(),
        "the blackholed endpoint stayed in rotation"
    );
    assert_no_idempotent_failure("blackhole", &idem);
}

/// Scenario 2a: requests to a replica are dropped, its packets to the
/// client pass (it hears nothing, so answers nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_partition_towards_a_replica_fails_no_idempotent_call() {
    let Some((idem, non, detected)) = fault_under_traffic("one-way to r1", NetBed::drop_to).await
    else {
        return;
    };
    assert_none_hung("idempotent", &idem);
    assert_none_hung("non-idempotent", &non);
    assert_fails_cleanly("non-idempotent", &non);
    assert!(
        detected.is_some(),
        "the partitioned endpoint stayed in rotation"
    );
    assert_no_idempotent_failure("one-way to r1", &idem);
}

/// Scenario 2b: a replica's packets to the client are dropped; requests
/// reach it (and run: a non-idempotent call may take effect unseen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_partition_from_a_replica_fails_no_idempotent_call() {
    let Some((idem, non, detected)) =
        fault_under_traffic("one-way from r1", NetBed::drop_from).await
    else {
        return;
    };
    assert_none_hung("idempotent", &idem);
    assert_none_hung("non-idempotent", &non);
    assert_fails_cleanly("non-idempotent", &non);
    assert!(
        detected.is_some(),
        "the partitioned endpoint stayed in rotation"
    );
    assert_no_idempotent_failure("one-way from r1", &idem);
}

/// Scenario 3: DNS announces a new replica whose SYNs are dropped: the
/// connect timeout bounds what it costs, and calls keep going to the
/// replicas that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_whose_syns_are_dropped_costs_no_call_its_connect_timeout() {
    let Some(mut echoes) = Echoes::start(2).await else {
        return;
    };
    let channel = echoes.channel(MeshConfig::default()).await;
    let connect_timeout = MeshConfig::default().endpoint.connect_timeout;
    // The new pod's SYNs are dropped before it is announced.
    let pod = echoes.bed.pod("echo2");
    echoes.bed.drop_syn_to(&pod);
    let new = {
        let addr = SocketAddr::from((pod.addr, PORT));
        let child = echoes
            .bed
            .command(&pod, &bin("mesh-echo"))
            .args(["--listen", &addr.to_string(), "--id", "r2"])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        NsRuntime::new(&pod).run(common::wait_serving(addr)).await;
        echoes
            .replicas
            .push((pod, Proc::adopt("mesh-echo", addr, child)));
        addr
    };
    let start = Instant::now() + Duration::from_millis(100);
    let run = Duration::from_secs(10);
    let idem = load(
        &echoes.rt,
        &channel,
        Call::Idempotent,
        4,
        start,
        run,
        100_000,
    );
    let non = load(
        &echoes.rt,
        &channel,
        Call::NonIdempotent,
        2,
        start,
        run,
        50_000,
    );
    tokio::time::sleep_until(start + Duration::from_secs(1)).await;
    echoes.announce();
    let (idem, non) = (idem.await.unwrap(), non.await.unwrap());
    let states = channel.endpoint_states();
    let state = states.iter().find(|s| s.addr == new);
    let slow = |samples: &[Sample]| {
        samples
            .iter()
            .filter(|s| s.took >= connect_timeout.mul_f64(0.9))
            .count()
    };
    println!(
        "NETFAULTS connect blackhole: idempotent calls {} {:?}, {} took >= 0.9 x the {connect_timeout:?} connect timeout, longest {:?}, p99 {:?}; \
         non-idempotent {} {:?}, {} slow, longest {:?}; r2 served {}; its state at the end {state:?}",
        idem.len(),
        codes(&idem),
        slow(&idem),
        longest(&idem),
        percentile(&idem, 0.99),
        non.len(),
        codes(&non),
        slow(&non),
        longest(&non),
        share(&idem, "r2") + share(&non, "r2"),
    );
    if let Some(first) = failed(&non).first() {
        println!("NETFAULTS connect blackhole: first non-idempotent failure {first:?}");
    }
    assert!(state.is_some(), "DNS announced the new endpoint");
    assert_eq!(
        share(&idem, "r2") + share(&non, "r2"),
        0.0,
        "SYNs are dropped"
    );
    assert_no_idempotent_failure("connect blackhole", &idem);
    // A call that went to the unreachable endpoint had never been sent:
    // even non-idempotent ones are retried elsewhere.
    assert!(failed(&non).is_empty(), "{:?}", codes(&non));
    for s in idem.iter().chain(&non) {
        assert!(
            s.took < connect_timeout + SLACK + Duration::from_secs(1),
            "a call took {:?}: the connect timeout did not bound it",
            s.took
        );
    }
    assert_eq!(
        slow(&idem) + slow(&non),
        0,
        "calls waited on the connecting endpoint instead of going to a ready one"
    );
}

/// Runs `callers` idempotent callers for `duration` with `policy` and
/// returns the samples.
async fn run_policy(
    echoes: &Echoes,
    policy: LbPolicy,
    callers: usize,
    duration: Duration,
) -> Vec<Sample> {
    let channel = echoes
        .channel(MeshConfig {
            load_balancing_policy: policy,
            ..Default::default()
        })
        .await;
    // Connections up and estimates warm before measuring.
    let warm = Instant::now();
    load(
        &echoes.rt,
        &channel,
        Call::Idempotent,
        callers,
        warm,
        Duration::from_millis(500),
        10_000,
    )
    .await
    .unwrap();
    let start = Instant::now();
    load(
        &echoes.rt,
        &channel,
        Call::Idempotent,
        callers,
        start,
        duration,
        100_000,
    )
    .await
    .unwrap()
}

/// Scenario 4: one replica's link loses 1 % and then 5 % of its packets
/// with ±2 ms jitter: P2C sends it less than round robin does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_shifts_load_away_from_a_lossy_jittery_link() {
    let Some(echoes) = Echoes::start(3).await else {
        return;
    };
    for loss in [1.0, 5.0] {
        echoes.bed.shape(
            echoes.pod(2),
            Shape {
                delay: Duration::from_millis(2),
                jitter: Duration::from_millis(2),
                loss_percent: loss,
                rate_kbit: None,
            },
        );
        let p2c = run_policy(&echoes, LbPolicy::P2c, 4, Duration::from_secs(5)).await;
        let rr = run_policy(&echoes, LbPolicy::RoundRobin, 4, Duration::from_secs(5)).await;
        println!(
            "NETFAULTS lossy link {loss}% ±2 ms: share to r2 p2c {:.3} round robin {:.3}; \
             p99 p2c {:?} round robin {:?}; calls p2c {} round robin {}; failures p2c {:?} rr {:?}",
            share(&p2c, "r2"),
            share(&rr, "r2"),
            percentile(&p2c, 0.99),
            percentile(&rr, 0.99),
            p2c.len(),
            rr.len(),
            failed(&p2c).len(),
            failed(&rr).len(),
        );
        assert_no_idempotent_failure("lossy p2c", &p2c);
        assert_no_idempotent_failure("lossy round robin", &rr);
        assert!(
            share(&p2c, "r2") < share(&rr, "r2"),
            "P2C sent the lossy replica {:.3}, round robin {:.3}",
            share(&p2c, "r2"),
            share(&rr, "r2")
        );
    }
}

/// Scenario 5: two replicas 0.2 ms away, two 30 ms away (round trip):
/// P2C sends most calls to the near pair, and the far pair stays watched
/// (SERVING over its health stream) and connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_prefers_the_near_zone_and_keeps_the_far_one_health_checked() {
    let Some(echoes) = Echoes::start(4).await else {
        return;
    };
    for (i, one_way) in [(0, 100), (1, 100), (2, 15_000), (3, 15_000)] {
        echoes.bed.shape(
            echoes.pod(i),
            Shape {
                delay: Duration::from_micros(one_way),
                ..Default::default()
            },
        );
    }
    let p2c = run_policy(&echoes, LbPolicy::P2c, 4, Duration::from_secs(6)).await;
    let rr = run_policy(&echoes, LbPolicy::RoundRobin, 4, Duration::from_secs(6)).await;
    let near = |s: &[Sample]| share(s, "r0") + share(s, "r1");
    // A fresh channel that sends no calls: is the far zone still watched?
    let idle = echoes.channel(MeshConfig::default()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let states = idle.endpoint_states();
    println!(
        "NETFAULTS zones 0.2 ms / 30 ms: near-pair share p2c {:.3} round robin {:.3}; \
         p50 p2c {:?} rr {:?}; p99 p2c {:?} rr {:?}; calls p2c {} rr {}; idle channel's view {:?}",
        near(&p2c),
        near(&rr),
        percentile(&p2c, 0.5),
        percentile(&rr, 0.5),
        percentile(&p2c, 0.99),
        percentile(&rr, 0.99),
        p2c.len(),
        rr.len(),
        states
            .iter()
            .map(|s| (s.addr.ip().to_string(), s.serving))
            .collect::<Vec<_>>(),
    );
    assert_no_idempotent_failure("zones p2c", &p2c);
    assert!(near(&p2c) > 0.55, "near share {:.3}", near(&p2c));
    assert!(
        near(&p2c) > near(&rr),
        "p2c {:.3} rr {:.3}",
        near(&p2c),
        near(&rr)
    );
    for i in [2, 3] {
        let state = states.iter().find(|s| s.addr == echoes.addr(i)).unwrap();
        assert_eq!(state.serving, Some(true), "far replica's health: {state:?}");
    }
    // The far pair still gets calls now and then, and answers them.
    assert!(share(&p2c, "r2") + share(&p2c, "r3") > 0.0);
}

/// Scenario 7: a replica blackholed long enough to be taken out of
/// rotation, then healed: traffic returns to it within the reconnect
/// backoff, ramping up rather than all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_partition_brings_traffic_back_without_a_thundering_herd() {
    let Some(echoes) = Echoes::start(3).await else {
        return;
    };
    let channel = echoes.channel(MeshConfig::default()).await;
    let start = Instant::now() + Duration::from_millis(100);
    let run = Duration::from_secs(34);
    let (cut, heal) = (Duration::from_secs(2), Duration::from_secs(14));
    let idem = load(
        &echoes.rt,
        &channel,
        Call::Idempotent,
        4,
        start,
        run,
        300_000,
    );
    let detection = watch_detection(
        &echoes.rt,
        &channel,
        echoes.addr(1),
        start + cut,
        start + heal,
    );
    tokio::time::sleep_until(start + cut).await;
    echoes.bed.blackhole(echoes.pod(1));
    tokio::time::sleep_until(start + heal).await;
    let before = channel
        .endpoint_states()
        .into_iter()
        .find(|s| s.addr == echoes.addr(1));
    echoes.bed.heal(echoes.pod(1));
    let idem = idem.await.unwrap();
    let detected = detection.await.unwrap();
    let back = idem
        .iter()
        .find(|s| s.server.as_deref() == Some("r1") && s.at >= heal)
        .map(|s| s.at - heal);
    // r1's share of each second's calls from its return on.
    let mut per_second = Vec::new();
    if let Some(back) = back {
        for k in 0..8u32 {
            let from = heal + back + Duration::from_secs(k.into());
            let window: Vec<&Sample> = idem
                .iter()
                .filter(|s| {
                    s.code == Code::Ok && s.at >= from && s.at < from + Duration::from_secs(1)
                })
                .collect();
            let to = window
                .iter()
                .filter(|s| s.server.as_deref() == Some("r1"))
                .count();
            per_second.push((to, window.len()));
        }
    }
    let steady = {
        let window: Vec<&Sample> = idem
            .iter()
            .filter(|s| s.code == Code::Ok && s.at < cut)
            .collect();
        window
            .iter()
            .filter(|s| s.server.as_deref() == Some("r1"))
            .count() as f64
            / window.len().max(1) as f64
    };
    println!(
        "NETFAULTS healed partition: out of rotation after {detected:?}; state at the heal {before:?}; \
         first call served {back:?} after the heal; r1 calls/total per second from then {per_second:?}; \
         r1 share before the cut {steady:.3}; failed idempotent calls {} {:?}",
        failed(&idem).len(),
        codes(&idem),
    );
    assert!(
        detected.is_some(),
        "the blackholed endpoint stayed in rotation"
    );
    assert_none_hung("idempotent", &idem);
    assert_no_idempotent_failure("healed partition", &idem);
    let back = back.expect("traffic never returned to the healed replica");
    // Within the reconnect backoff (at most a few seconds after ~12 s down).
    assert!(back < Duration::from_secs(15), "returned after {back:?}");
    // No herd: in no second does the returning replica take nearly all calls.
    for (to, total) in &per_second {
        assert!(
            (*to as f64) < 0.8 * (*total).max(1) as f64,
            "r1 took {to} of {total} calls in one second after its return: {per_second:?}"
        );
    }
}

/// Scenario 6 (one service): PostgreSQL blackholed for 20 s under reads
/// of two inventory replicas: both report NOT_SERVING, calls fail with
/// UNAVAILABLE or DEADLINE_EXCEEDED within about one pool timeout (the
/// mesh does not retry while every replica is NOT_SERVING) and none
/// outlives its deadline, and the service recovers once the database is
/// reachable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_database_turns_its_service_not_serving_and_calls_fail_within_their_deadline()
{
    use shop_api::common::v1::Money;
    use shop_api::inventory::v1::{
        CreateProductRequest, GetProductRequest, inventory_service_client::InventoryServiceClient,
    };
    let Some(bed) = NetBed::new() else {
        return;
    };
    let client = bed.pod("client");
    let Some(pg) = PgPod::start(&bed) else {
        return;
    };
    let rt = NsRuntime::new(&client);
    let mut replicas = Vec::new();
    for i in 0..2 {
        let pod = bed.pod(&format!("inventory{i}"));
        let addr = SocketAddr::from((pod.addr, 50052));
        let child = bed
            .command(&pod, &bin("inventory"))
            .args(["--listen", &addr.to_string(), "--database-url", &pg.url()])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        replicas.push((pod, Proc::adopt("inventory", addr, child)));
        rt.run(common::wait_serving(addr)).await;
    }
    let target = format!(
        "static:///{}",
        replicas
            .iter()
            .map(|(_, p)| p.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let channel = rt
        .run(async move {
            Mesh::from_config(MeshConfig::default())
                .unwrap()
                .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
                .unwrap()
                .channel(&target)
                .unwrap()
        })
        .await;
    let product = {
        let mut inv = InventoryServiceClient::new(channel.clone());
        rt.run(async move {
            inv.create_product(CreateProductRequest {
                sku: "NETFAULTS-1".into(),
                name: "netfaults".into(),
                price: Some(Money {
                    currency_code: "USD".into(),
                    amount_minor: 100,
                }),
                initial_stock: 10,
            })
            .await
            .unwrap()
            .into_inner()
            .product_id
        })
        .await
    };
    let start = Instant::now() + Duration::from_millis(100);
    let (cut, heal, end) = (
        Duration::from_secs(3),
        Duration::from_secs(23),
        Duration::from_secs(40),
    );
    let reads = {
        let channel = channel.clone();
        rt.spawn(async move {
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let mut inv = InventoryServiceClient::new(channel.clone());
                    let product = product.clone();
                    tokio::spawn(async move {
                        let mut samples = Vec::new();
                        tokio::time::sleep_until(start).await;
                        while Instant::now() < start + end && samples.len() < 50_000 {
                            let began = Instant::now();
                            let mut request = tonic::Request::new(GetProductRequest {
                                product_id: product.clone(),
                            });
                            request.set_timeout(DEADLINE);
                            let (code, message) = match inv.get_product(request).await {
                                Ok(_) => (Code::Ok, String::new()),
                                Err(s) => (s.code(), s.message().to_owned()),
                            };
                            samples.push(Sample {
                                at: began - start,
                                took: began.elapsed(),
                                code,
                                server: None,
                                message,
                            });
                            if code != Code::Ok {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        samples
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all.sort_by_key(|s| s.at);
            all
        })
    };
    // When both replicas are seen NOT_SERVING, and SERVING again.
    let watch = {
        let channel = channel.clone();
        rt.spawn(async move {
            let (mut down, mut up) = (None, None);
            tokio::time::sleep_until(start + cut).await;
            while Instant::now() < start + end {
                let states = channel.endpoint_states();
                let all = |v: Option<bool>| states.iter().all(|s| s.serving == v);
                let now = Instant::now() - start;
                if down.is_none() && all(Some(false)) {
                    down = Some(now - cut);
                }
                if down.is_some() && up.is_none() && now >= heal && all(Some(true)) {
                    up = Some(now - heal);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (down, up)
        })
    };
    tokio::time::sleep_until(start + cut).await;
    bed.blackhole(&pg.pod);
    tokio::time::sleep_until(start + heal).await;
    bed.heal(&pg.pod);
    let samples = reads.await.unwrap();
    let (down, up) = watch.await.unwrap();
    let during: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at >= cut && s.at < heal)
        .cloned()
        .collect();
    let fails = failed(&during);
    let slow_fails = fails
        .iter()
        .filter(|s| s.took > Duration::from_millis(2500))
        .count();
    let mut fail_took: Vec<Duration> = fails.iter().map(|s| s.took).collect();
    fail_took.sort();
    let back = samples
        .iter()
        .find(|s| s.at >= heal && s.code == Code::Ok)
        .map(|s| s.at - heal);
    println!(
        "NETFAULTS database blackhole 20 s: both replicas NOT_SERVING after {down:?}, SERVING again {up:?} after the heal; \
         calls during the outage {} {:?}; failures' duration p50 {:?} max {:?}, {} over 2.5 s; first success {back:?} after the heal; \
         after the heal {:?}; first failure {:?}",
        during.len(),
        codes(&during),
        fail_took.get(fail_took.len() / 2),
        fail_took.last(),
        slow_fails,
        codes(
            &samples
                .iter()
                .filter(|s| s.at >= heal)
                .cloned()
                .collect::<Vec<_>>()
        ),
        fails.first(),
    );
    assert_none_hung("reads", &samples);
    for s in &fails {
        assert!(
            matches!(s.code, Code::Unavailable | Code::DeadlineExceeded),
            "a read failed with {:?}: {}",
            s.code,
            s.message
        );
    }
    assert!(down.is_some(), "the replicas never reported NOT_SERVING");
    // Reads started once both replicas report NOT_SERVING fail within about
    // one pool acquire timeout (1 s), not one per attempt. (Reads whose
    // query was on the wire at the cut fail when the readiness probe finds
    // the database silent: tests/netfaults_shop.rs proves that bound.)
    let known_down = cut + down.unwrap() + Duration::from_millis(500);
    let slow_after: Vec<&&Sample> = fails
        .iter()
        .filter(|s| s.at >= known_down && s.at < heal && s.took > Duration::from_millis(2500))
        .collect();
    assert!(
        slow_after.is_empty(),
        "{} reads failed after more than 2.5 s while every replica was NOT_SERVING; first {:?}",
        slow_after.len(),
        slow_after.first()
    );
    assert!(back.is_some(), "reads never succeeded again after the heal");
    drop(channel);
    drop(rt);
    drop(replicas);
    let prefix = bed.prefix.clone();
    // The bed first: it kills PostgreSQL with its pod, then its files go.
    drop(bed);
    drop(pg);
    assert!(NetBed::leftovers(&prefix).is_empty());
}
