//! Endpoint selection over a live endpoint set.
//!
//! Power of two choices (P2C): pick two eligible endpoints at random and
//! send to the one with the lower load (typical latency × in-flight ×
//! failure penalty); between endpoints of similar latency, half the draws
//! are left to chance so bursts of calls do not convoy (see [`lighter`]).
//! Round robin is there as the baseline.
//!
//! Written here rather than with `tower::balance::p2c::Balance` because that
//! balancer gates endpoints through `poll_ready` and a ready cache: ejected,
//! `NOT_SERVING` and backing-off endpoints must be skipped at once, an empty
//! set must fail fast with `UNAVAILABLE`, and hedges must be able to ask for
//! "any endpoint but these". Endpoints still keep tower's peak-EWMA, which
//! `EndpointState::load` reports; the choice uses a plain short-window mean,
//! which CPU contention does not blur (see [`lighter`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{sync::Notify, time::Instant};
use tower::discover::Change;

mod service;

pub(crate) use service::{
    Balance, BalanceLayer, CallError, Exclude, NoneServing, Picked, Served, timed_out,
};

use crate::{
    config::{LbPolicy, OutlierDetection},
    endpoint::{Endpoint, Verdict, watch_health},
    resolve::Changes,
    telemetry::metrics::{GaugeSource, Metrics, Scrape},
};

/// The endpoints of one target, as the resolver last reported them.
pub(crate) struct EndpointSet {
    pub(crate) target: Arc<str>,
    /// The name metrics and spans give the target (a service name).
    pub(crate) peer: Arc<str>,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    next: AtomicUsize,
    /// Notified after a connection failure, so DNS can re-resolve at once.
    pub(crate) reresolve: Arc<Notify>,
    /// Notified whenever the set changes.
    changed: Notify,
    resolved: std::sync::atomic::AtomicBool,
    /// Cancelled when the last channel using this set is dropped, which
    /// stops resolution and closes the connections.
    dropped: tokio_util::sync::CancellationToken,
    /// Where ejections are counted and the set reports its endpoints.
    metrics: Metrics,
}

impl Drop for EndpointSet {
    fn drop(&mut self) {
        self.dropped.cancel();
    }
}

/// Why no endpoint could be picked.
#[derive(Debug)]
pub(crate) enum NoEndpoint {
    /// The resolver reports no endpoints.
    Empty,
    /// Every endpoint is waiting to reconnect after failed connections.
    AllUnavailable {
        total: usize,
        /// Why a connection last failed.
        last_error: Option<String>,
    },
}

impl EndpointSet {
    /// An empty set for `target` (named `peer` in metrics), counting its
    /// ejections in `metrics` and reporting its endpoints there at each
    /// scrape for as long as it lives.
    pub(crate) fn new(
        target: Arc<str>,
        peer: Arc<str>,
        reresolve: Arc<Notify>,
        metrics: Metrics,
    ) -> Arc<Self> {
        let set = Arc::new(Self {
            target,
            peer,
            endpoints: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            reresolve,
            changed: Notify::new(),
            resolved: false.into(),
            dropped: tokio_util::sync::CancellationToken::new(),
            metrics: metrics.clone(),
        });
        metrics.add_source(&set);
        set
    }

    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.read().expect("endpoint set lock").clone()
    }

    /// Addresses in the set now.
    pub(crate) fn addresses(&self) -> Vec<SocketAddr> {
        self.snapshot().iter().map(|e| e.addr).collect()
    }

    /// Applies resolver changes until the resolver stops or the set is
    /// dropped (it holds the set only weakly).
    pub(crate) async fn follow(
        self: Arc<Self>,
        mut changes: Changes,
        connect: impl Fn(SocketAddr) -> tonic::transport::Channel,
        health_checks: bool,
    ) {
        let dropped = self.dropped.clone();
        let weak = Arc::downgrade(&self);
        drop(self);
        loop {
            let first = tokio::select! {
                _ = dropped.cancelled() => return,
                change = changes.recv() => match change {
                    Some(change) => change,
                    None => return,
                },
            };
            let Some(set) = weak.upgrade() else { return };
            set.apply(first, &mut changes, &connect, health_checks);
        }
    }

    fn apply(
        &self,
        first: Change<SocketAddr, ()>,
        changes: &mut Changes,
        connect: &impl Fn(SocketAddr) -> tonic::transport::Channel,
        health_checks: bool,
    ) {
        // Apply a burst of changes as one update.
        let mut batch = vec![first];
        while let Ok(more) = changes.try_recv() {
            batch.push(more);
        }
        let current = self.snapshot();
        let mut by_addr: HashMap<SocketAddr, Arc<Endpoint>> =
            current.iter().map(|e| (e.addr, e.clone())).collect();
        for change in batch {
            match change {
                Change::Insert(addr, ()) => {
                    by_addr.entry(addr).or_insert_with(|| {
                        let endpoint = Arc::new(Endpoint::new(addr, connect(addr)));
                        if health_checks {
                            let task = tokio::spawn(watch_health(Arc::downgrade(&endpoint)));
                            endpoint.set_health_task(task.abort_handle());
                        }
                        tracing::info!(target = %self.target, %addr, "endpoint added");
                        endpoint
                    });
                }
                Change::Remove(addr) => {
                    if by_addr.remove(&addr).is_some() {
                        tracing::info!(target = %self.target, %addr, "endpoint removed");
                    }
                }
            }
        }
        let mut next: Vec<_> = by_addr.into_values().collect();
        next.sort_by_key(|e| e.addr);
        *self.endpoints.write().expect("endpoint set lock") = Arc::new(next);
        self.resolved.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Waits (within the caller's deadline) for the first resolution.
    pub(crate) async fn wait_resolved(&self) {
        while !self.resolved.load(Ordering::Acquire) {
            let changed = self.changed.notified();
            if self.resolved.load(Ordering::Acquire) {
                return;
            }
            changed.await;
        }
    }

    pub(crate) fn is_resolved(&self) -> bool {
        self.resolved.load(Ordering::Acquire)
    }

    /// Whether there are endpoints and every one reports NOT_SERVING (a
    /// shared dependency down, or all draining).
    pub(crate) fn all_not_serving(&self) -> bool {
        let endpoints = self.snapshot();
        !endpoints.is_empty() && endpoints.iter().all(|e| e.is_not_serving())
    }

    /// Picks an endpoint for one call, avoiding `exclude` when possible.
    pub(crate) fn pick(
        &self,
        policy: LbPolicy,
        exclude: &[SocketAddr],
    ) -> Result<Arc<Endpoint>, NoEndpoint> {
        let endpoints = self.snapshot();
        let n = endpoints.len();
        if n == 0 {
            return Err(NoEndpoint::Empty);
        }
        let now = Instant::now();
        // Preference levels: eligible, not excluded and seen SERVING by its
        // health watch; eligible and not excluded; eligible; then "panic
        // mode" (as Envoy does): when every endpoint is ejected or
        // draining, trying one beats failing every call. Endpoints that
        // cannot even be connected to are never tried before their backoff.
        // The first level keeps calls off an endpoint whose connection is
        // still being made while others are up (gRPC picks only READY
        // subchannels): a new endpoint behind dropped SYNs held every call
        // that picked it for the connect timeout, one after another
        // (tests/netfaults.rs); without health watching it is skipped.
        let usable = |e: &Endpoint, level: u8| match level {
            0 => e.is_serving() && e.is_eligible(now) && !exclude.contains(&e.addr),
            1 => e.is_eligible(now) && !exclude.contains(&e.addr),
            2 => e.is_eligible(now),
            _ => !e.is_reconnecting(now),
        };
        // Scan forward from a start index to the first usable endpoint.
        let probe = |start: usize, level: u8| {
            (0..n)
                .map(|i| &endpoints[(start + i) % n])
                .find(|e| usable(e, level))
        };
        let mut rng = rand::rng();
        // One turn per pick, whichever level takes it.
        let turn = match policy {
            LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
            LbPolicy::P2c => 0,
        };
        for level in 0..4u8 {
            if level == 2 && exclude.is_empty() {
                continue;
            }
            let chosen = match policy {
                LbPolicy::RoundRobin => probe(turn, level).cloned(),
                LbPolicy::P2c => {
                    let coin = rand::Rng::random_bool(&mut rng, 0.5);
                    let lighter =
                        |x: &Arc<Endpoint>, y: &Arc<Endpoint>| lighter(x, y, now, coin).clone();
                    let (a, b) = two_distinct(&mut rng, n);
                    let (x, y) = (&endpoints[a], &endpoints[b]);
                    if usable(x, level) && usable(y, level) {
                        Some(lighter(x, y))
                    } else {
                        // Draw both among the usable endpoints only: scanning past an
                        // unusable one would hand its share of picks, unweighed, to
                        // its neighbour.
                        let usable_count = endpoints.iter().filter(|e| usable(e, level)).count();
                        let (ra, rb) = two_distinct(&mut rng, usable_count.max(1));
                        let mut drawn = endpoints
                            .iter()
                            .filter(|e| usable(e, level))
                            .enumerate()
                            .filter(|(rank, _)| *rank == ra || *rank == rb)
                            .map(|(_, e)| e);
                        match (drawn.next(), drawn.next()) {
                            // Ties go to the first argument: keep the draw's order.
                            (Some(low), Some(high)) if ra < rb => Some(lighter(low, high)),
                            (Some(low), Some(high)) => Some(lighter(high, low)),
                            (x, _) => x.cloned(),
                        }
                    }
                }
            };
            if let Some(endpoint) = chosen {
                return Ok(endpoint);
            }
        }
        Err(NoEndpoint::AllUnavailable {
            total: n,
            last_error: endpoints.iter().find_map(|e| e.last_connect_error()),
        })
    }

    /// Records a failure of `endpoint`, ejecting it if it keeps failing and
    /// the share of ejected endpoints allows (or every endpoint is failing).
    pub(crate) fn record_failure(&self, endpoint: &Endpoint, policy: &OutlierDetection) {
        let now = Instant::now();
        let endpoints = self.snapshot();
        let total = endpoints.len().max(1);
        let ejected = endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let cap = (total * policy.max_ejection_percent as usize) / 100;
        let may_eject = ejected < cap.max(1).min(total);
        if let Verdict::Ejected(time) = endpoint.record_failure(now, policy, may_eject) {
            self.metrics.ejected(&self.peer);
            tracing::warn!(target = %self.target, addr = %endpoint.addr, ?time, "endpoint ejected after consecutive failures");
        }
    }
}

/// The set reports how many of its endpoints are in each state.
impl GaugeSource for EndpointSet {
    fn collect(&self, scrape: &mut Scrape<'_>) {
        let mut counts = [0i64; 4];
        for state in self.snapshot().iter().map(|e| e.snapshot()) {
            let at = if state.ejected {
                1
            } else if state.reconnecting {
                2
            } else if state.serving == Some(false) {
                3
            } else {
                0
            };
            counts[at] += 1;
        }
        for (state, count) in ["ready", "ejected", "reconnecting", "unhealthy"]
            .into_iter()
            .zip(counts)
        {
            scrape.endpoints(&self.peer, state, count);
        }
    }
}

/// The less loaded of two endpoints, `x` (drawn at random) on a tie.
///
/// Endpoints whose typical latencies (a plain EWMA over the last second)
/// differ by more than [`ALIKE_RATIO`] (1.5×) are compared by typical
/// latency × (in-flight + 1) × failure penalty, so a slow endpoint is
/// avoided. Both the likeness and the comparison use the typical latency,
/// not the 10 s peak-EWMA: on a busy host every endpoint's peak is some
/// recent scheduling stall, which made a 20 ms-slower replica look like the
/// others and get a sixth to a quarter of the calls (modelled in the tests
/// below; `meshbench` and the resilience tests saw it under CPU
/// contention). A hung endpoint answers nothing, so no latency tells of
/// it; its calls in flight pile up instead.
/// Between endpoints of similar latency, `coin` sends half the draws to `x`
/// as long as `x` is not failing or clearly busier ([`COIN_LIMIT`]):
/// always preferring the endpoint with fewer calls in flight sends a burst
/// of callers woken together all back to the endpoint that just answered
/// them, and the bursts never break up (with two replicas, p99 doubled;
/// measured with `meshbench`, docs/benchmarks.md). A hung endpoint's calls
/// pile up, and one that fails is penalised, so either soon exceeds the
/// limit and gets no more calls by chance.
fn lighter<'a>(
    x: &'a Arc<Endpoint>,
    y: &'a Arc<Endpoint>,
    now: Instant,
    coin: bool,
) -> &'a Arc<Endpoint> {
    let (rx, ry) = (x.typical_rtt(), y.typical_rtt());
    if rx > ALIKE_RATIO * ry || ry > ALIKE_RATIO * rx {
        return if x.load(now) <= y.load(now) { x } else { y };
    }
    let (qx, qy) = (x.queue_cost(now), y.queue_cost(now));
    let pending_x = f64::from(x.in_flight()) + 1.0;
    // A penalty (recent failures) makes the queue cost exceed the pending count.
    let chance_allowed = qx <= pending_x
        && pending_x <= COIN_LIMIT.0 * (f64::from(y.in_flight()) + 1.0) + COIN_LIMIT.1;
    if (coin && chance_allowed) || qx <= qy {
        x
    } else {
        y
    }
}

/// Endpoints whose typical latencies differ by more than this factor are
/// compared by load alone, with no chance pick. A ratio, so it holds at any
/// latency; 1.5 and not 2, because CPU contention adds the same scheduling
/// delay to every replica and shrinks the ratio of a fixed gap: on two busy
/// cores (load average 12) the replica 20 ms slower answered in 57-81 ms
/// against the others' 27-48 ms, 1.7-2.1x, and under a 2x rule it got
/// 0.25-0.31 of the calls, about round robin's third. Alike replicas were
/// within 1.15x of each other in every run, quiet or busy.
const ALIKE_RATIO: f64 = 1.5;

/// The chance pick may go to an endpoint without recent failures whose
/// calls in flight (+ 1) are at most `.0` × the other's (+ 1) + `.1`: wide
/// enough for the imbalance bursts of calls make (narrower limits let the
/// convoys back, measured), narrow enough that a hung endpoint stops getting
/// calls by chance once a few are stuck on it.
const COIN_LIMIT: (f64, f64) = (4.0, 8.0);

/// Two different indices below `n` (the same one when `n` is 1).
fn two_distinct(rng: &mut impl rand::Rng, n: usize) -> (usize, usize) {
    let a = rng.random_range(0..n);
    let b = if n > 1 {
        (a + 1 + rng.random_range(0..n - 1)) % n
    } else {
        a
    };
    (a, b)
}

#[cfg(test)]
mod layer_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn set_of(n: u16) -> Arc<EndpointSet> {
        let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), Metrics::new());
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for port in 1..=n {
            tx.send(Change::Insert(SocketAddr::from(([127, 0, 0, 1], port)), ()))
                .await
                .unwrap();
        }
        drop(tx);
        set.clone()
            .follow(
                rx,
                |addr| {
                    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                        .unwrap()
                        .connect_lazy()
                },
                false,
            )
            .await;
        set
    }

    #[tokio::test]
    async fn empty_set_fails_fast() {
        let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), Metrics::new());
        assert!(matches!(
            set.pick(LbPolicy::P2c, &[]),
            Err(NoEndpoint::Empty)
        ));
    }

    #[tokio::test]
    async fn p2c_prefers_the_less_loaded_endpoint() {
        let set = set_of(2).await;
        let endpoints = set.snapshot();
        let now = Instant::now();
        endpoints[0].observe_rtt(Duration::from_millis(50), now);
        endpoints[1].observe_rtt(Duration::from_millis(1), now);
        for _ in 0..50 {
            assert_eq!(set.pick(LbPolicy::P2c, &[]).unwrap().addr.port(), 2);
        }
    }

    #[tokio::test]
    async fn p2c_spreads_evenly_over_the_endpoints_left_after_one_is_ejected() {
        let set = set_of(3).await;
        let policy = OutlierDetection {
            consecutive_failures: 1,
            ..Default::default()
        };
        set.record_failure(&set.snapshot()[2], &policy);
        let mut picks = [0u32; 3];
        for _ in 0..3000 {
            picks[(set.pick(LbPolicy::P2c, &[]).unwrap().addr.port() - 1) as usize] += 1;
        }
        assert_eq!(picks[2], 0, "the ejected endpoint is not picked: {picks:?}");
        // Equal loads: each of the other two wins half of its draws. Scanning
        // past the ejected one used to give its neighbour two thirds.
        assert!(picks[0] > 1200 && picks[1] > 1200, "{picks:?}");
    }

    #[tokio::test]
    async fn p2c_leans_to_fewer_in_flight_without_sending_every_call_there() {
        let set = set_of(2).await;
        let endpoints = set.snapshot();
        let now = Instant::now();
        // Similar latency (within 1.5×); port 1 has three calls in flight.
        endpoints[0].observe_rtt(Duration::from_micros(1200), now);
        endpoints[1].observe_rtt(Duration::from_micros(1000), now);
        let _busy = [
            endpoints[0].start(),
            endpoints[0].start(),
            endpoints[0].start(),
        ];
        let idle = (0..2000)
            .filter(|_| set.pick(LbPolicy::P2c, &[]).unwrap().addr.port() == 2)
            .count();
        // Half the draws follow the load, half are left to chance: about 75 %.
        // All of them (the old rule) let bursts of callers convoy.
        assert!(
            (1300..1700).contains(&idle),
            "{idle} of 2000 to the idle endpoint"
        );
    }

    #[tokio::test]
    async fn p2c_sends_nothing_by_chance_to_an_endpoint_with_calls_piling_up_or_failing() {
        let set = set_of(2).await;
        let endpoints = set.snapshot();
        let now = Instant::now();
        for e in endpoints.iter() {
            e.observe_rtt(Duration::from_millis(1), now);
        }
        // Port 1 hangs: its calls never answer, so they pile up.
        let stuck: Vec<_> = (0..16).map(|_| endpoints[0].start()).collect();
        let _normal = endpoints[1].start();
        for _ in 0..200 {
            assert_eq!(set.pick(LbPolicy::P2c, &[]).unwrap().addr.port(), 2);
        }
        // Port 2 fails once: penalised, it gets nothing by chance either.
        drop(stuck);
        set.record_failure(&endpoints[1], &OutlierDetection::default());
        for _ in 0..200 {
            assert_eq!(set.pick(LbPolicy::P2c, &[]).unwrap().addr.port(), 1);
        }
    }

    /// Picks `calls` times from three endpoints whose latency is `base`
    /// (ms) plus, for a `stall_chance` of calls, a scheduling stall of up to
    /// `stall_ms`, one call per simulated millisecond; the slowest
    /// endpoint's share of the calls.
    async fn modelled_slow_share(base: [f64; 3], stall_chance: f64, stall_ms: f64) -> f64 {
        use rand::{Rng, SeedableRng};
        let set = set_of(3).await;
        let endpoints = set.snapshot();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let start = Instant::now();
        let calls = 6000;
        let mut slow = 0;
        for i in 0..calls {
            let now = start + Duration::from_millis(i);
            let picked = set.pick(LbPolicy::P2c, &[]).unwrap();
            let port = usize::from(picked.addr.port()) - 1;
            if port == 2 {
                slow += 1;
            }
            let stall = if rng.random_bool(stall_chance) {
                rng.random_range(0.0..stall_ms)
            } else {
                0.0
            };
            endpoints[port]
                .observe_rtt(Duration::from_secs_f64((base[port] + stall) / 1000.0), now);
        }
        f64::from(slow) / calls as f64
    }

    #[tokio::test]
    async fn p2c_keeps_avoiding_a_slow_replica_when_a_busy_host_stalls_every_replica() {
        // Quiet host: 1 ms replicas and one 20 ms slower.
        let quiet = modelled_slow_share([1.0, 1.0, 21.0], 0.0, 0.0).await;
        assert!(quiet < 0.02, "quiet: {quiet}");
        // Busy host: every replica stalls up to 50 ms on a tenth of its
        // calls. Judged on peaks, the slow one got ~17 % (round robin: 33 %).
        let busy = modelled_slow_share([10.0, 10.0, 30.0], 0.1, 50.0).await;
        assert!(busy < 0.05, "busy: {busy}");
    }

    #[tokio::test]
    async fn p2c_keeps_avoiding_a_slow_replica_when_contention_slows_every_replica() {
        // Measured with the slow-replica test (tests/mesh.rs) beside three busy
        // loops (load average 12 on two cores): the fast replicas answered in
        // 27-48 ms, the one with 20 ms added in 57-81 ms, 1.7-2.1x apart, and
        // P2C sent it 0.25-0.31 of the calls (round robin: 0.33). Alike
        // replicas were never more than 1.15x apart, quiet or busy.
        let busy = modelled_slow_share([30.0, 30.0, 60.0], 0.1, 50.0).await;
        eprintln!("modelled slow share: busy {busy:.3}");
        assert!(busy < 0.1, "busy: {busy}");
        let busier = modelled_slow_share([45.0, 45.0, 80.0], 0.1, 50.0).await;
        eprintln!("modelled slow share: busier {busier:.3}");
        assert!(busier < 0.1, "busier: {busier}");
    }

    #[tokio::test]
    async fn round_robin_cycles_and_exclusion_is_honoured() {
        let set = set_of(3).await;
        let ports: Vec<u16> = (0..6)
            .map(|_| set.pick(LbPolicy::RoundRobin, &[]).unwrap().addr.port())
            .collect();
        assert_eq!(ports.iter().filter(|p| **p == 1).count(), 2);
        let avoid = [
            SocketAddr::from(([127, 0, 0, 1], 1)),
            SocketAddr::from(([127, 0, 0, 1], 2)),
        ];
        for _ in 0..20 {
            assert_eq!(set.pick(LbPolicy::P2c, &avoid).unwrap().addr.port(), 3);
        }
    }

    #[tokio::test]
    async fn an_endpoint_not_yet_seen_serving_is_skipped_while_another_is_up() {
        let set = set_of(3).await;
        let endpoints = set.snapshot();
        // Nothing watched yet (or no health checks): every endpoint is used,
        // round robin still takes each in turn.
        let ports: Vec<u16> = (0..6)
            .map(|_| set.pick(LbPolicy::RoundRobin, &[]).unwrap().addr.port())
            .collect();
        for port in 1..=3 {
            assert_eq!(ports.iter().filter(|p| **p == port).count(), 2, "{ports:?}");
        }
        // Ports 1 and 2 answered their health watch; port 3 is still
        // connecting (its SYNs may be going nowhere).
        endpoints[0].set_serving(true);
        endpoints[1].set_serving(true);
        for policy in [LbPolicy::P2c, LbPolicy::RoundRobin] {
            for _ in 0..200 {
                assert_ne!(set.pick(policy, &[]).unwrap().addr.port(), 3, "{policy:?}");
            }
        }
        // Excluding both serving ones (a retry) still finds the third.
        let tried = [endpoints[0].addr, endpoints[1].addr];
        assert_eq!(set.pick(LbPolicy::P2c, &tried).unwrap().addr.port(), 3);
    }

    #[tokio::test]
    async fn a_lone_failing_endpoint_is_still_tried() {
        let set = set_of(1).await;
        let policy = OutlierDetection {
            consecutive_failures: 1,
            ..Default::default()
        };
        set.record_failure(&set.snapshot()[0], &policy);
        assert!(set.snapshot()[0].is_ejected(Instant::now()));
        assert!(set.pick(LbPolicy::P2c, &[]).is_ok(), "panic mode");
        set.snapshot()[0].record_connect_failure(
            Instant::now(),
            &Default::default(),
            "refused".into(),
        );
        assert!(matches!(
            set.pick(LbPolicy::P2c, &[]),
            Err(NoEndpoint::AllUnavailable { total: 1, .. })
        ));
    }

    #[tokio::test]
    async fn ejection_share_is_capped() {
        let set = set_of(4).await;
        let policy = OutlierDetection {
            consecutive_failures: 1,
            ..Default::default()
        };
        for e in set.snapshot().iter() {
            set.record_failure(e, &policy);
        }
        let now = Instant::now();
        let ejected = set.snapshot().iter().filter(|e| e.is_ejected(now)).count();
        assert_eq!(ejected, 2, "50% of 4");
        for _ in 0..20 {
            assert!(set.pick(LbPolicy::P2c, &[]).is_ok());
        }
    }
}
