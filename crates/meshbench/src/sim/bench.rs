//! Cost measurements that do not need a fleet: the balancer's pick against
//! the endpoint count, memory per idle endpoint, the subset choice's
//! evenness and churn, and a large resolver update beside live calls.
//! Wall-clock numbers from this machine, printed, never asserted.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_client::{
    BoxError, LbPolicy, Mesh, MeshChannel, MeshConfig, ModelEndpoints, SubsetConfig, SubsetMode,
    subset_members,
};
use tonic::body::Body;
use tower::{ServiceExt, discover::Change, util::BoxCloneSyncService};

use super::server_addr;

/// Modelled endpoints that answer OK at once.
fn instant_endpoints() -> ModelEndpoints {
    BoxCloneSyncService::new(tower::service_fn(
        |(_addr, _req): (SocketAddr, http::Request<Body>)| async {
            Ok::<_, BoxError>(
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Body::empty())
                    .expect("a valid response"),
            )
        },
    ))
}

fn config(subset: Option<usize>) -> MeshConfig {
    let mut json = serde_json::json!({"healthChecks": false});
    if let Some(size) = subset {
        json["targets"] =
            serde_json::json!({"t": {"subset": {"size": size, "clientId": "bench-1"}}});
    }
    MeshConfig::from_json(&json.to_string()).expect("valid")
}

/// A model channel over `n` endpoints, once its set has them.
async fn channel_of(
    n: usize,
    subset: Option<usize>,
) -> (
    MeshChannel,
    tokio::sync::mpsc::Sender<Change<SocketAddr, ()>>,
) {
    let mesh = Mesh::new(config(subset)).with_metrics(mesh_client::telemetry::Metrics::new());
    let (tx, rx) = tokio::sync::mpsc::channel(n + 1);
    let channel = mesh.model_channel("t", rx, instant_endpoints());
    for i in 0..n {
        tx.send(Change::Insert(server_addr(i), ()))
            .await
            .expect("set alive");
    }
    for _ in 0..10_000 {
        if channel.endpoints().len() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (channel, tx)
}

/// What each sample of [`pick_cost`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickWork {
    /// The balancer's pick alone (`MeshChannel::pick_once`): the goal's
    /// measure.
    Pick,
    /// The pick, the call marked in flight and unmarked, the address read
    /// (`MeshChannel::pick_and_mark`): the balancer's part of a call
    /// before the connection's.
    PickAndMark,
}

/// Nanoseconds per pick at each count: one sample per round, each of
/// `picks` picks. Every set is built first, and each round takes the
/// counts in turn, in alternating order (a drift in other load is shared
/// by both ends of the ratio), so a burst of load from other processes
/// hits every count alike. `samples[round][count]`.
pub async fn pick_cost(
    counts: &[usize],
    policy: LbPolicy,
    work: PickWork,
    picks: usize,
    rounds: usize,
) -> Vec<Vec<f64>> {
    let mut channels = Vec::new();
    for &n in counts {
        channels.push(channel_of(n, None).await);
    }
    let mut samples = Vec::new();
    for round in 0..rounds {
        let mut row = vec![0.0; counts.len()];
        let mut order: Vec<usize> = (0..counts.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for at in order {
            let channel = &channels[at].0;
            let started = Instant::now();
            let mut sink = 0u64;
            for _ in 0..picks {
                sink += match work {
                    PickWork::Pick => u64::from(channel.pick_once(policy)),
                    PickWork::PickAndMark => {
                        u64::from(channel.pick_and_mark(policy).map_or(0, |a| a.port()))
                    }
                };
            }
            std::hint::black_box(sink);
            row[at] = started.elapsed().as_nanos() as f64 / picks as f64;
        }
        samples.push(row);
    }
    samples
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per count of `samples` (from [`pick_cost`]): the median and the best
/// sample, and the median over rounds of the round's ratio to count
/// `base` (a ratio of neighbouring samples, so load that comes and goes
/// between rounds cancels).
pub fn pick_summary(samples: &[Vec<f64>], base: usize) -> Vec<(f64, f64, f64)> {
    let columns = samples.first().map_or(0, Vec::len);
    (0..columns)
        .map(|c| {
            let column: Vec<f64> = samples.iter().map(|row| row[c]).collect();
            let ratios: Vec<f64> = samples.iter().map(|row| row[c] / row[base]).collect();
            (
                median(&column),
                column.iter().copied().fold(f64::MAX, f64::min),
                median(&ratios),
            )
        })
        .collect()
}

/// Nanoseconds per whole call through the stack (best of `rounds`).
pub async fn call_cost(counts: &[usize], calls: usize, rounds: usize) -> Vec<(usize, f64)> {
    let mut out = Vec::new();
    for &n in counts {
        let (channel, _tx) = channel_of(n, None).await;
        let mut best = f64::MAX;
        for _ in 0..rounds {
            let started = Instant::now();
            for _ in 0..calls {
                let req = http::Request::builder()
                    .method("POST")
                    .uri("http://t/b.B/M")
                    .body(Body::empty())
                    .expect("valid");
                let _ = channel.clone().oneshot(req).await;
            }
            best = best.min(started.elapsed().as_nanos() as f64 / calls as f64);
        }
        out.push((n, best));
    }
    out
}

/// Resident bytes of this process.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<usize>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// Bytes of resident memory per endpoint of a real channel
/// (`Mesh::channel` with a `static:///` list of `n` addresses, health
/// checks off, so nothing connects), with and without a subset of 16.
pub async fn bytes_per_idle_endpoint(n: usize) -> (f64, f64) {
    let list: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "127.{}.{}.{}:{}",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255,
                9000
            )
        })
        .collect();
    let target = format!("static:///{}", list.join(","));
    let mut out = [0.0; 2];
    // The subset first: memory the larger full set frees would hide its growth.
    for (slot, subset) in [(1, Some(16)), (0, None)] {
        let mut json = serde_json::json!({"healthChecks": false});
        if let Some(size) = subset {
            json["targets"] =
                serde_json::json!({ target.clone(): {"subset": {"size": size, "clientId": "m-1"}}});
        }
        let mesh = Mesh::new(MeshConfig::from_json(&json.to_string()).expect("valid"))
            .with_metrics(mesh_client::telemetry::Metrics::new());
        let before = rss();
        let channel = mesh.channel(&target).expect("a channel");
        for _ in 0..20_000 {
            if channel.endpoints().len() == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let grown = rss().saturating_sub(before);
        out[slot] = grown as f64 / n as f64;
        drop(channel);
    }
    (out[0], out[1])
}

/// Evenness and churn of the subset choice at `clients` × `servers`.
#[derive(Debug, serde::Serialize)]
pub struct Choice {
    /// `rendezvous` or `deterministic`.
    pub mode: String,
    /// Clients per server: max / mean.
    pub conns_max_mean: f64,
    /// Clients per server: min.
    pub conns_min: usize,
    /// Members moved (share of clients × size) when one server is
    /// removed, mean over `trials` random removals, and the worst.
    pub moved_on_remove: (f64, f64),
    /// The same when one server is added.
    pub moved_on_add: (f64, f64),
    /// Mean moved share per removal over removals from N down to N − 100
    /// (crossing multiples of the size; fewer with `meshsim bench --quick`).
    pub moved_over_100_removals: f64,
}

fn members(mode: SubsetMode, c: usize, size: usize, addrs: &[SocketAddr]) -> HashSet<SocketAddr> {
    let config = SubsetConfig {
        size,
        client_id: Some(format!("client-{c}")),
        mode,
        max_unhealthy_percent: 25,
        max_width: None,
    };
    subset_members(&config, addrs).into_iter().collect()
}

fn moved(mode: SubsetMode, clients: usize, size: usize, a: &[SocketAddr], b: &[SocketAddr]) -> f64 {
    let changed: usize = (0..clients)
        .map(|c| {
            members(mode, c, size, a)
                .difference(&members(mode, c, size, b))
                .count()
        })
        .sum();
    changed as f64 / (clients * size) as f64
}

/// Measures both modes: `trials` random removals and additions, and a
/// run of up to `removals` removals in a row (crossing multiples of the
/// size).
pub fn subset_choice(
    clients: usize,
    servers: usize,
    size: usize,
    trials: usize,
    removals: usize,
) -> Vec<Choice> {
    use rand::Rng;
    let addrs: Vec<SocketAddr> = (0..servers).map(server_addr).collect();
    let mut rng = rand::rng();
    let mut out = Vec::new();
    for (mode, name) in [
        (SubsetMode::Rendezvous, "rendezvous"),
        (SubsetMode::Deterministic, "deterministic"),
    ] {
        let mut count: HashMap<SocketAddr, usize> = addrs.iter().map(|a| (*a, 0)).collect();
        for c in 0..clients {
            for m in members(mode, c, size, &addrs) {
                *count.entry(m).or_default() += 1;
            }
        }
        let mean = (clients * size) as f64 / servers as f64;
        let max = *count.values().max().unwrap_or(&0);
        let min = *count.values().min().unwrap_or(&0);
        let (mut rm, mut add) = (Vec::new(), Vec::new());
        for t in 0..trials {
            let mut fewer = addrs.clone();
            fewer.remove(rng.random_range(0..fewer.len()));
            rm.push(moved(mode, clients, size, &addrs, &fewer));
            let mut more = addrs.clone();
            more.push(server_addr(servers + t));
            add.push(moved(mode, clients, size, &addrs, &more));
        }
        let stats = |v: &[f64]| {
            (
                v.iter().sum::<f64>() / v.len().max(1) as f64,
                v.iter().copied().fold(0.0, f64::max),
            )
        };
        let mut shrinking = addrs.clone();
        let mut total = 0.0;
        let steps = removals.min(servers.saturating_sub(size));
        for _ in 0..steps {
            let mut next = shrinking.clone();
            next.remove(rng.random_range(0..next.len()));
            total += moved(mode, clients, size, &shrinking, &next);
            shrinking = next;
        }
        out.push(Choice {
            mode: name.into(),
            conns_max_mean: max as f64 / mean,
            conns_min: min,
            moved_on_remove: stats(&rm),
            moved_on_add: stats(&add),
            moved_over_100_removals: total / steps.max(1) as f64,
        });
    }
    out
}

/// A resolver update beside live calls.
#[derive(Debug, serde::Serialize)]
pub struct Update {
    /// Milliseconds from sending a batch of `changes` changes until the set shows it: median.
    pub apply_ms_p50: f64,
    /// And the slowest.
    pub apply_ms_max: f64,
    /// Per-call latency (µs) without updates: p50, p99, max.
    pub quiet_us: (f64, f64, f64),
    /// The same while batches are applied.
    pub busy_us: (f64, f64, f64),
    /// Calls completed while batches were applied.
    pub calls_during_updates: u64,
}

/// Applies `batches` updates that swap 1,000 addresses of a 1,000-endpoint
/// set for new ones while one task keeps calling (two worker threads).
pub async fn update_beside_calls(batches: usize) -> Update {
    let (channel, tx) = channel_of(1000, None).await;
    let measure = |channel: MeshChannel, stop: Arc<AtomicBool>| async move {
        let mut hist =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        while !stop.load(Ordering::Relaxed) {
            let req = http::Request::builder()
                .method("POST")
                .uri("http://t/b.B/M")
                .body(Body::empty())
                .expect("valid");
            let started = Instant::now();
            let _ = channel.clone().oneshot(req).await;
            let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
        }
        hist
    };
    let summary = |h: &hdrhistogram::Histogram<u64>| {
        (
            h.value_at_quantile(0.5) as f64,
            h.value_at_quantile(0.99) as f64,
            h.max() as f64,
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = tokio::spawn(measure(channel.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let quiet = quiet.await.expect("measure task");
    let stop = Arc::new(AtomicBool::new(false));
    let busy = tokio::spawn(measure(channel.clone(), stop.clone()));
    let mut applies = Vec::new();
    let mut base = 0;
    for b in 0..batches {
        let next = (b + 1) * 1000 + 1000;
        let started = Instant::now();
        for i in 0..1000 {
            tx.send(Change::Remove(server_addr(base + i)))
                .await
                .expect("set alive");
            tx.send(Change::Insert(server_addr(next + i), ()))
                .await
                .expect("set alive");
        }
        let last = server_addr(next + 999);
        for _ in 0..100_000 {
            let now = channel.endpoints();
            if now.len() == 1000 && now.contains(&last) {
                break;
            }
            tokio::task::yield_now().await;
        }
        applies.push(started.elapsed().as_secs_f64() * 1000.0);
        base = next;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let busy = busy.await.expect("measure task");
    applies.sort_by(f64::total_cmp);
    Update {
        apply_ms_p50: applies[applies.len() / 2],
        apply_ms_max: *applies.last().unwrap_or(&0.0),
        quiet_us: summary(&quiet),
        busy_us: summary(&busy),
        calls_during_updates: busy.len(),
    }
}

/// A unary answer at once: one Echo response (64 bytes of payload) and
/// an OK status in its trailers, as a server sends it.
fn instant_answer() -> Body {
    // The gRPC frame of `EchoResponse { payload: [7; 64] }`, encoded by
    // hand (field 1, length 64): meshbench does not depend on prost.
    let mut frame = vec![0, 0, 0, 0, 66, 0x0a, 64];
    frame.extend([7u8; 64]);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        http_body::Frame::data(bytes::Bytes::from(frame)),
        http_body::Frame::trailers(trailers),
    ];
    Body::new(http_body_util::StreamBody::new(futures::stream::iter(
        frames.map(Ok::<_, BoxError>),
    )))
}

/// The instant answer to any request, after reading its body (as a server
/// reads the request before it answers).
async fn answer(req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
    use http_body_util::BodyExt;
    req.into_body().collect().await?;
    Ok(http::Response::builder()
        .header("content-type", "application/grpc")
        .body(instant_answer())
        .expect("a valid response"))
}

/// Nanoseconds per call of `calls` Echo calls of `payload`, one after another.
async fn ns_per_echo<T>(
    client: &mut shop_api::echo::v1::echo_service_client::EchoServiceClient<T>,
    calls: usize,
    payload: &[u8],
) -> f64
where
    T: tonic::client::GrpcService<Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let started = Instant::now();
    for _ in 0..calls {
        let request = shop_api::echo::v1::EchoRequest {
            payload: payload.to_vec(),
        };
        client.echo(request).await.expect("the model answers");
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

/// Nanoseconds per call of each client in [`stack_cost`], one sample per
/// round.
pub struct StackCost {
    /// The generated Echo client over a mesh channel (every layer: route,
    /// telemetry, deadline, retry with its replay buffer, fault, balancer)
    /// to one modelled endpoint.
    pub mesh: Vec<f64>,
    /// The same generated client straight over the same answer: tonic's
    /// own encoding and decoding, which both pay.
    pub bare: Vec<f64>,
}

/// The client stack's CPU cost per unary call, without a network: both
/// clients call Echo on an endpoint that answers at once, `calls` calls a
/// round, in turn, `rounds` rounds. The difference is what the mesh's
/// layers cost a call in the caller's task (the connection's share, its
/// HTTP/2 and the network, is left out: `meshbench --scenario overhead`
/// measures the whole path).
pub async fn stack_cost(calls: usize, rounds: usize) -> StackCost {
    use shop_api::echo::v1::echo_service_client::EchoServiceClient;
    let mesh = Mesh::new(config(None))
        .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
        .expect("the shop's contracts")
        .with_metrics(mesh_client::telemetry::Metrics::new());
    let endpoint = BoxCloneSyncService::new(tower::service_fn(
        |(_addr, req): (SocketAddr, http::Request<Body>)| answer(req),
    ));
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let channel = mesh.model_channel("t", rx, endpoint);
    tx.send(Change::Insert(server_addr(0), ()))
        .await
        .expect("set alive");
    while channel.endpoints().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut mesh_client = EchoServiceClient::new(channel);
    let bare = BoxCloneSyncService::new(tower::service_fn(answer));
    let mut bare_client = EchoServiceClient::with_origin(bare, "http://t".parse().expect("a uri"));
    let payload = vec![7u8; 64];
    let mut cost = StackCost {
        mesh: Vec::new(),
        bare: Vec::new(),
    };
    for round in 0..=rounds {
        let mesh_ns = ns_per_echo(&mut mesh_client, calls, &payload).await;
        let bare_ns = ns_per_echo(&mut bare_client, calls, &payload).await;
        // Round 0 warms both up.
        if round > 0 {
            cost.mesh.push(mesh_ns);
            cost.bare.push(bare_ns);
        }
    }
    drop(tx);
    cost
}
