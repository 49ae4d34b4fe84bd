//! A fleet simulator: many clients running the mesh's real client stack
//! (balancer, outlier detection, subsetting, retries, deadlines) against
//! modelled servers, under tokio's paused clock.
//!
//! # The model
//!
//! - **Servers**: `capacity` calls served at once, the rest wait in a FIFO
//!   queue of at most `queue_limit` (beyond it: `RESOURCE_EXHAUSTED` at
//!   once). Service times are log-normal with mean `service` and shape
//!   `sigma`. A *slow* server takes `slow_factor` × as long; a *dying*
//!   server answers every call `UNAVAILABLE` at once.
//! - **Network**: a fixed one-way delay each way. Nothing else: no
//!   bandwidth, loss, reordering, connection set-up, TLS handshakes, HTTP/2
//!   flow control or head-of-line blocking, and no CPU cost of the clients
//!   themselves. tokio's clock ticks in milliseconds, so every sleep is
//!   rounded up to one.
//! - **Clients**: each a [`mesh_client::Mesh`] channel made with
//!   `Mesh::model_channel`: the same layers as a real channel, whose
//!   innermost service hands the attempt to the modelled server instead of
//!   a connection. Calls arrive as one Poisson stream for the fleet, each
//!   to a client drawn at random (the superposition of the clients'
//!   streams). "Connections" are the members of each client's endpoint set:
//!   with health checks on each holds one HTTP/2 connection.
//!
//! Time is simulated: the runtime jumps to the next timer whenever every
//! task waits, so a second of fleet traffic takes as long as the client
//! code needs to run it, on one thread.

pub mod bench;
pub mod client;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use mesh_client::{BoxError, Mesh, MeshChannel, MeshConfig, ModelEndpoints};
use rand::Rng;
use tokio::{sync::Semaphore, time::Instant};
use tonic::body::Body;
use tower::{ServiceExt, discover::Change, util::BoxCloneSyncService};

/// How clients balance.
#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    /// Round robin over every server.
    RoundRobin,
    /// P2C over every server.
    P2c,
    /// P2C over a subset of this size, chosen by `mode`.
    P2cSubset {
        /// Members per client.
        size: usize,
        /// `rendezvous` or `deterministic`.
        mode: mesh_client::SubsetMode,
    },
}

impl Strategy {
    /// A short name for tables and plots.
    pub fn name(&self) -> String {
        match self {
            Strategy::RoundRobin => "round robin".into(),
            Strategy::P2c => "P2C, full mesh".into(),
            Strategy::P2cSubset { size, mode } => format!(
                "P2C, subset {size} ({})",
                match mode {
                    mesh_client::SubsetMode::Rendezvous => "rendezvous",
                    mesh_client::SubsetMode::Deterministic => "deterministic",
                }
            ),
        }
    }
}

/// What happens to some servers part-way through a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    /// Nothing: a steady run.
    None,
    /// This share of the servers turns `factor` × slower at `at`.
    Slow {
        /// Share of servers (every 1/share-th one).
        share: f64,
        /// Service-time multiplier.
        factor: f64,
        /// When.
        at: Duration,
    },
    /// This share of the servers answers UNAVAILABLE from `at` on.
    Dying {
        /// Share of servers.
        share: f64,
        /// When.
        at: Duration,
    },
}

/// One simulated run.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// Client processes.
    pub clients: usize,
    /// Server replicas.
    pub servers: usize,
    /// How the clients balance.
    pub strategy: Strategy,
    /// Calls each server serves at once.
    pub capacity: usize,
    /// Calls that may wait at a server beyond its capacity.
    pub queue_limit: usize,
    /// Mean service time.
    pub service: Duration,
    /// Log-normal shape of service times (0: constant).
    pub sigma: f64,
    /// Offered load as a share of the fleet's capacity.
    pub utilization: f64,
    /// One-way network delay.
    pub one_way: Duration,
    /// Simulated length of the run (calls arrive until then).
    pub duration: Duration,
    /// Statistics count calls that start after this.
    pub measure_from: Duration,
    /// Slow or dying servers.
    pub event: Event,
}

impl Fleet {
    /// The comparison's defaults: `clients` × `servers`, 4 calls at once per
    /// server, 20 ms mean service (σ 0.5), half the capacity offered, 1 ms
    /// each way, 4 s measured from 2 s.
    pub fn new(clients: usize, servers: usize, strategy: Strategy) -> Self {
        Self {
            clients,
            servers,
            strategy,
            capacity: 4,
            queue_limit: 64,
            service: Duration::from_millis(20),
            sigma: 0.5,
            utilization: 0.5,
            one_way: Duration::from_millis(1),
            duration: Duration::from_secs(4),
            measure_from: Duration::from_secs(2),
            event: Event::None,
        }
    }

    /// Calls per second the fleet offers.
    pub fn rate(&self) -> f64 {
        self.utilization * self.servers as f64 * self.capacity as f64 / self.service.as_secs_f64()
    }

    /// Whether server `i` is one the event hits.
    fn hit(&self, i: usize) -> bool {
        let share = match self.event {
            Event::None => return false,
            Event::Slow { share, .. } | Event::Dying { share, .. } => share,
        };
        let every = (1.0 / share).round().max(1.0) as usize;
        i % every == every / 2
    }

    /// The mesh config each client gets (client `i`).
    fn config(&self, i: usize) -> MeshConfig {
        let target = match &self.strategy {
            Strategy::RoundRobin => serde_json::json!({"loadBalancingPolicy": "round_robin"}),
            Strategy::P2c => serde_json::json!({"loadBalancingPolicy": "p2c"}),
            Strategy::P2cSubset { size, mode } => serde_json::json!({
                "loadBalancingPolicy": "p2c",
                "subset": {
                    "size": size,
                    "clientId": format!("client-{i}"),
                    "mode": match mode {
                        mesh_client::SubsetMode::Rendezvous => "rendezvous",
                        mesh_client::SubsetMode::Deterministic => "deterministic",
                    },
                },
            }),
        };
        let json = serde_json::json!({
            "defaultTimeout": "5s",
            "healthChecks": false,
            "targets": { TARGET: target },
        });
        MeshConfig::from_json(&json.to_string()).expect("the simulator's config is valid")
    }
}

/// The target name every simulated client calls.
const TARGET: &str = "fleet";

/// The address of modelled server `i` (10.0.0.0/8, port 8080).
pub fn server_addr(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0x0A00_0000 + i as u32), 8080))
}

fn server_index(addr: SocketAddr) -> Option<usize> {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => Some((u32::from(v4) - 0x0A00_0000) as usize),
        std::net::IpAddr::V6(_) => None,
    }
}

/// One modelled server.
struct Server {
    slots: Semaphore,
    waiting: AtomicUsize,
    slow: AtomicBool,
    dead: AtomicBool,
    /// Attempts that reached it (any outcome), measured window only.
    received: AtomicU64,
    /// Attempts it served OK, measured window only.
    served: AtomicU64,
    /// All attempts that reached it, whole run (conservation).
    received_total: AtomicU64,
}

/// Everything shared by the servers' model.
struct Model {
    fleet: Fleet,
    servers: Vec<Server>,
    start: Instant,
}

impl Model {
    fn measuring(&self, at: Instant) -> bool {
        at.duration_since(self.start) >= self.fleet.measure_from
    }

    async fn attempt(self: Arc<Self>, addr: SocketAddr) -> http::Response<Body> {
        let Some(server) = server_index(addr).and_then(|i| self.servers.get(i)) else {
            return grpc(5, "no such modelled server");
        };
        tokio::time::sleep(self.fleet.one_way).await;
        server.received_total.fetch_add(1, Ordering::Relaxed);
        let counted = self.measuring(Instant::now());
        if counted {
            server.received.fetch_add(1, Ordering::Relaxed);
        }
        let code = if server.dead.load(Ordering::Relaxed) {
            14
        } else if server.slots.available_permits() == 0
            && server.waiting.load(Ordering::Relaxed) >= self.fleet.queue_limit
        {
            8
        } else {
            server.waiting.fetch_add(1, Ordering::Relaxed);
            let slot = server.slots.acquire().await.expect("never closed");
            server.waiting.fetch_sub(1, Ordering::Relaxed);
            let mut time = service_time(&self.fleet);
            if server.slow.load(Ordering::Relaxed) {
                time = time.mul_f64(self.slow_factor());
            }
            tokio::time::sleep(time).await;
            drop(slot);
            if counted {
                server.served.fetch_add(1, Ordering::Relaxed);
            }
            0
        };
        tokio::time::sleep(self.fleet.one_way).await;
        grpc(code, "")
    }

    fn slow_factor(&self) -> f64 {
        match self.fleet.event {
            Event::Slow { factor, .. } => factor,
            _ => 1.0,
        }
    }
}

/// A log-normal service time with the fleet's mean and shape.
fn service_time(fleet: &Fleet) -> Duration {
    if fleet.sigma == 0.0 {
        return fleet.service;
    }
    let mut rng = rand::rng();
    // Box-Muller.
    let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    let s = fleet.sigma;
    fleet.service.mul_f64((s * z - s * s / 2.0).exp())
}

/// A trailers-only gRPC response with `code`, marked as from a server.
fn grpc(code: u8, message: &str) -> http::Response<Body> {
    let mut builder = http::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("x-sim-server", "1");
    if !message.is_empty() {
        builder = builder.header("grpc-message", message);
    }
    if code == 8 {
        // A full queue is the server shedding load, marked as a mesh
        // server marks it (only marked sheds raise P2C's penalty).
        builder = builder.header(mesh_client::server::SHED_HEADER, "1");
    }
    builder.body(Body::empty()).expect("a valid response")
}

/// What a run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// The strategy's name.
    pub strategy: String,
    /// Clients × servers.
    pub clients: usize,
    /// Servers.
    pub servers: usize,
    /// Calls the clients started (whole run).
    pub calls: u64,
    /// Calls that finished (whole run; equals `calls` after the drain).
    pub finished: u64,
    /// Calls answered OK (whole run).
    pub ok: u64,
    /// Calls that failed with a status from a server (whole run).
    pub failed_at_server: u64,
    /// Calls that failed in the client without reaching a server.
    pub failed_in_client: u64,
    /// Attempts that reached a server (whole run).
    pub attempts_received: u64,
    /// Calls started in the measured window.
    pub measured_calls: u64,
    /// Of those, failed.
    pub measured_failed: u64,
    /// Latency percentiles of measured OK calls, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Calls served per server in the window (healthy servers): max / mean.
    pub load_max_mean: f64,
    /// Min / mean of the same.
    pub load_min_mean: f64,
    /// The max / mean that counts drawn from a Poisson distribution with
    /// the same mean would show: the noise floor of `load_max_mean` at
    /// this many calls per server (a perfectly fair random spread).
    pub poisson_floor: f64,
    /// Calls served by each healthy server in the window, sorted, as a
    /// share of the mean (for the plot).
    pub load_sorted: Vec<f64>,
    /// Share of the measured calls the event's servers received.
    pub hit_share: f64,
    /// Endpoint-set members (connections) per client: mean and max.
    pub conns_per_client: (f64, usize),
    /// Clients holding each server (connections per server): mean and max.
    pub conns_per_server: (f64, usize),
    /// Failed share of calls per 100 ms after the event (dying servers).
    pub failure_timeline: Vec<f64>,
    /// Milliseconds from the event until the failed share per 100 ms
    /// stayed under 0.1 %.
    pub reaction_ms: Option<u64>,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
}

/// Runs `fleet` on a current-thread runtime with the clock paused.
pub fn run(fleet: &Fleet) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let wall = std::time::Instant::now();
    let mut report = runtime.block_on(simulate(fleet.clone()));
    report.wall_s = wall.elapsed().as_secs_f64();
    report
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    finished: AtomicU64,
    ok: AtomicU64,
    failed_at_server: AtomicU64,
    failed_in_client: AtomicU64,
    measured_calls: AtomicU64,
    measured_failed: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    /// (ok, failed) per 100 ms since the start.
    timeline: Mutex<Vec<(u64, u64)>>,
}

async fn simulate(fleet: Fleet) -> Report {
    let start = Instant::now();
    let model = Arc::new(Model {
        servers: (0..fleet.servers)
            .map(|_| Server {
                slots: Semaphore::new(fleet.capacity),
                waiting: AtomicUsize::new(0),
                slow: AtomicBool::new(false),
                dead: AtomicBool::new(false),
                received: AtomicU64::new(0),
                served: AtomicU64::new(0),
                received_total: AtomicU64::new(0),
            })
            .collect(),
        fleet: fleet.clone(),
        start,
    });
    let endpoints: ModelEndpoints = {
        let model = model.clone();
        BoxCloneSyncService::new(tower::service_fn(
            move |(addr, _req): (SocketAddr, http::Request<Body>)| {
                let model = model.clone();
                async move { Ok::<_, BoxError>(model.attempt(addr).await) }
            },
        ))
    };
    let metrics = mesh_client::telemetry::Metrics::new();
    let mut channels: Vec<MeshChannel> = Vec::with_capacity(fleet.clients);
    for i in 0..fleet.clients {
        let mesh = Mesh::new(fleet.config(i)).with_metrics(metrics.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(fleet.servers + 1);
        for s in 0..fleet.servers {
            tx.try_send(Change::Insert(server_addr(s), ()))
                .expect("room for every server");
        }
        channels.push(mesh.model_channel(TARGET, rx, endpoints.clone()));
    }
    // Let every set take its endpoints (one update each).
    tokio::time::sleep(Duration::from_millis(1)).await;

    let tally = Arc::new(Tally {
        latency: Mutex::new(Some(
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        )),
        ..Tally::default()
    });
    let events = {
        let (model, fleet) = (model.clone(), fleet.clone());
        tokio::spawn(async move {
            let at = match fleet.event {
                Event::None => return,
                Event::Slow { at, .. } | Event::Dying { at, .. } => at,
            };
            tokio::time::sleep_until(start + at).await;
            for (i, server) in model.servers.iter().enumerate() {
                if fleet.hit(i) {
                    match fleet.event {
                        Event::Slow { .. } => server.slow.store(true, Ordering::Relaxed),
                        Event::Dying { .. } => server.dead.store(true, Ordering::Relaxed),
                        Event::None => {}
                    }
                }
            }
        })
    };

    // One Poisson stream for the fleet, in 1 ms steps (the clock's tick).
    let per_ms = fleet.rate() / 1000.0;
    let mut rng = rand::rng();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let request = || {
        http::Request::builder()
            .method("POST")
            .uri("http://fleet/sim.Model/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::empty())
            .expect("a valid request")
    };
    while start.elapsed() < fleet.duration {
        tick.tick().await;
        for _ in 0..poisson(&mut rng, per_ms) {
            let channel = channels[rng.random_range(0..channels.len())].clone();
            let (tally, model) = (tally.clone(), model.clone());
            let req = request();
            tokio::spawn(async move {
                let began = Instant::now();
                let measured = model.measuring(began);
                tally.calls.fetch_add(1, Ordering::Relaxed);
                if measured {
                    tally.measured_calls.fetch_add(1, Ordering::Relaxed);
                }
                let outcome = channel.oneshot(req).await;
                let took = began.elapsed();
                let (ok, at_server) = match &outcome {
                    Ok(resp) => (
                        resp.headers().get("grpc-status").is_none_or(|v| v == "0"),
                        resp.headers().contains_key("x-sim-server"),
                    ),
                    Err(_) => (false, false),
                };
                let counter = match (ok, at_server) {
                    (true, _) => &tally.ok,
                    (false, true) => &tally.failed_at_server,
                    (false, false) => &tally.failed_in_client,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let bucket = (began.duration_since(model.start).as_millis() / 100) as usize;
                {
                    let mut timeline = tally.timeline.lock().expect("tally lock");
                    if timeline.len() <= bucket {
                        timeline.resize(bucket + 1, (0, 0));
                    }
                    if ok {
                        timeline[bucket].0 += 1;
                    } else {
                        timeline[bucket].1 += 1;
                    }
                }
                if measured {
                    if ok {
                        if let Some(h) = tally.latency.lock().expect("tally lock").as_mut() {
                            let _ = h.record(took.as_micros().max(1) as u64);
                        }
                    } else {
                        tally.measured_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tally.finished.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
    // Drain: every call ends by its deadline (5 s) at the latest.
    for _ in 0..700 {
        if tally.finished.load(Ordering::Relaxed) == tally.calls.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = events.await;
    summarize(&fleet, &model, &tally, &channels)
}

/// A Poisson draw with mean `mean` (normal approximation above 30).
fn poisson(rng: &mut impl Rng, mean: f64) -> u64 {
    if mean > 30.0 {
        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        return (mean + z * mean.sqrt()).round().max(0.0) as u64;
    }
    let limit = (-mean).exp();
    let (mut k, mut p) = (0, 1.0);
    loop {
        p *= rng.random::<f64>();
        if p <= limit {
            return k;
        }
        k += 1;
    }
}

fn summarize(fleet: &Fleet, model: &Model, tally: &Tally, channels: &[MeshChannel]) -> Report {
    let healthy: Vec<f64> = model
        .servers
        .iter()
        .enumerate()
        .filter(|(i, _)| !fleet.hit(*i))
        .map(|(_, s)| s.served.load(Ordering::Relaxed) as f64)
        .collect();
    let mean = healthy.iter().sum::<f64>() / healthy.len().max(1) as f64;
    let mut sorted: Vec<f64> = healthy.iter().map(|l| l / mean.max(1e-9)).collect();
    sorted.sort_by(f64::total_cmp);
    let received: u64 = model
        .servers
        .iter()
        .map(|s| s.received.load(Ordering::Relaxed))
        .sum();
    let hit_received: u64 = model
        .servers
        .iter()
        .enumerate()
        .filter(|(i, _)| fleet.hit(*i))
        .map(|(_, s)| s.received.load(Ordering::Relaxed))
        .sum();
    let mut per_server = vec![0usize; fleet.servers];
    let mut per_client = Vec::with_capacity(channels.len());
    for channel in channels {
        let members = channel.endpoint_states();
        per_client.push(members.len());
        for m in members {
            if let Some(i) = server_index(m.addr) {
                per_server[i] += 1;
            }
        }
    }
    let latency = tally.latency.lock().expect("tally lock").take();
    let quantile = |q: f64| {
        latency
            .as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    let timeline = tally.timeline.lock().expect("tally lock").clone();
    let event_at = match fleet.event {
        Event::Dying { at, .. } => Some(at),
        _ => None,
    };
    let (failure_timeline, reaction_ms) = match event_at {
        Some(at) => {
            let from = (at.as_millis() / 100) as usize;
            let shares: Vec<f64> = timeline
                .iter()
                .skip(from)
                .map(|(ok, failed)| *failed as f64 / (*ok + *failed).max(1) as f64)
                .collect();
            // The first bucket after which every bucket stays under 0.1 %.
            let settled = (0..=shares.len())
                .find(|&b| shares[b..].iter().all(|s| *s < 0.001))
                .filter(|&b| b < shares.len());
            (shares, settled.map(|b| b as u64 * 100))
        }
        None => (Vec::new(), None),
    };
    let attempts_received = model
        .servers
        .iter()
        .map(|s| s.received_total.load(Ordering::Relaxed))
        .sum();
    Report {
        strategy: fleet.strategy.name(),
        clients: fleet.clients,
        servers: fleet.servers,
        calls: tally.calls.load(Ordering::Relaxed),
        finished: tally.finished.load(Ordering::Relaxed),
        ok: tally.ok.load(Ordering::Relaxed),
        failed_at_server: tally.failed_at_server.load(Ordering::Relaxed),
        failed_in_client: tally.failed_in_client.load(Ordering::Relaxed),
        attempts_received,
        measured_calls: tally.measured_calls.load(Ordering::Relaxed),
        measured_failed: tally.measured_failed.load(Ordering::Relaxed),
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        p999_ms: quantile(0.999),
        load_max_mean: sorted.last().copied().unwrap_or(0.0),
        poisson_floor: {
            let mut rng = rand::rng();
            let draws: Vec<u64> = (0..healthy.len())
                .map(|_| poisson(&mut rng, mean))
                .collect();
            draws.iter().copied().max().unwrap_or(0) as f64 / mean.max(1e-9)
        },
        load_min_mean: sorted.first().copied().unwrap_or(0.0),
        load_sorted: sorted,
        hit_share: hit_received as f64 / received.max(1) as f64,
        conns_per_client: (
            per_client.iter().sum::<usize>() as f64 / per_client.len().max(1) as f64,
            per_client.iter().copied().max().unwrap_or(0),
        ),
        conns_per_server: (
            per_server.iter().sum::<usize>() as f64 / per_server.len().max(1) as f64,
            per_server.iter().copied().max().unwrap_or(0),
        ),
        failure_timeline,
        reaction_ms,
        wall_s: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_fleet_conserves_calls_and_holds_its_structure() {
        for strategy in [
            Strategy::RoundRobin,
            Strategy::P2c,
            Strategy::P2cSubset {
                size: 4,
                mode: mesh_client::SubsetMode::Deterministic,
            },
            Strategy::P2cSubset {
                size: 4,
                mode: mesh_client::SubsetMode::Rendezvous,
            },
        ] {
            let mut fleet = Fleet::new(10, 20, strategy.clone());
            fleet.duration = Duration::from_secs(2);
            fleet.measure_from = Duration::from_millis(500);
            fleet.event = Event::Dying {
                share: 0.1,
                at: Duration::from_secs(1),
            };
            let r = run(&fleet);
            let name = strategy.name();
            assert!(r.calls > 1000, "{name}: {r:?}");
            assert_eq!(r.finished, r.calls, "{name}: every call ends");
            assert_eq!(
                r.ok + r.failed_at_server + r.failed_in_client,
                r.calls,
                "{name}: each call has one outcome"
            );
            // No retries in the model's config: one attempt per call that
            // reached a server.
            assert_eq!(
                r.attempts_received,
                r.ok + r.failed_at_server,
                "{name}: attempts reach servers once"
            );
            let expected = match strategy {
                Strategy::P2cSubset { size, .. } => size,
                _ => 20,
            };
            assert_eq!(r.conns_per_client.1, expected, "{name}: members per client");
            assert_eq!(
                (r.conns_per_client.0 * 10.0).round() as usize,
                expected * 10,
                "{name}"
            );
            let total_server_side = (r.conns_per_server.0 * 20.0).round() as usize;
            assert_eq!(
                total_server_side,
                expected * 10,
                "{name}: each member counted once"
            );
            assert_eq!(r.load_sorted.len(), 18, "{name}: the healthy servers");
            assert!(
                r.failed_at_server > 0,
                "{name}: the dying servers answered some calls"
            );
        }
    }
}
