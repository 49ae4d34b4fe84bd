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
//! "any endpoint but these". The choice uses plain short-window means of
//! latency, which CPU contention does not blur as tower's peak-EWMA did
//! (see [`lighter`] and `Endpoint::load`).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use rand::{SeedableRng, rngs::SmallRng};
use tokio::{sync::Notify, time::Instant};
use tower::discover::Change;

mod service;
pub(crate) mod subset;

pub(crate) use subset::Subset;

pub(crate) use service::{
    Balance, BalanceLayer, CallError, Exclude, NoneServing, Picked, Served, timed_out,
};

use crate::{
    config::{LbPolicy, OutlierDetection},
    endpoint::{Connect, Endpoint, Verdict, watch_health},
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
    /// Every address the resolver reports; only the subset's members (all
    /// of them without subsetting) are endpoints with a connection.
    resolved_addrs: Mutex<HashSet<SocketAddr>>,
    /// Subsetting, when the target is configured for it.
    subset: OnceLock<subset::Subset>,
    /// Members wanted now: the subset's size, more while widened.
    width: AtomicUsize,
    /// Whether health watches run (else no endpoint is ever seen SERVING,
    /// and the pick skips that preference level without looking).
    health_checks: AtomicBool,
    /// When each ejection made by this set ends, soonest first, and of
    /// which endpoint: the ejected share is read from here in O(log n),
    /// not by a scan. Entries of endpoints that leave the set are purged
    /// on the update that removes them.
    ejections: Mutex<BinaryHeap<Reverse<(Instant, SocketAddr)>>>,
    /// Checks in a row at which a widened subset's first `size` members
    /// were usable enough to narrow back (see [`NARROW_AFTER`]).
    narrow_streak: AtomicUsize,
}

/// How often a subsetting set checks whether to widen or narrow.
const WIDEN_EVERY: Duration = Duration::from_secs(1);

/// A widened subset narrows back only after its first `size` members have
/// been usable enough at this many checks in a row (5 s): an endpoint
/// re-admitted after an ejection often fails again at once, and narrowing
/// at the first good check made the subset flap every few seconds (its
/// extra connections made and dropped each time).
const NARROW_AFTER: usize = 5;

/// Random draws a P2C pick makes for a usable endpoint before it scans
/// the set: with a share `f` usable, a draw fails with (1 − f)^8, so the
/// O(n) scan runs for under 0.4 % of picks while half the set is usable.
const DRAWS: usize = 8;

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
            // A random first turn: clients that all started at 0 moved
            // through the endpoints in step, and 1,000 of them sent their
            // calls to the same server at once (meshsim: 83 % of calls
            // shed at 1,000 × 1,000).
            next: AtomicUsize::new(rand::random::<u32>() as usize),
            reresolve,
            changed: Notify::new(),
            resolved: false.into(),
            dropped: tokio_util::sync::CancellationToken::new(),
            metrics: metrics.clone(),
            resolved_addrs: Mutex::default(),
            subset: OnceLock::new(),
            width: AtomicUsize::new(0),
            health_checks: AtomicBool::new(false),
            ejections: Mutex::default(),
            narrow_streak: AtomicUsize::new(0),
        });
        metrics.add_source(&set);
        set
    }

    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.read().expect("endpoint set lock").clone()
    }

    /// Every address the resolver reports now (members of the subset or not).
    pub(crate) fn addresses(&self) -> Vec<SocketAddr> {
        let mut all: Vec<_> = self.all().iter().copied().collect();
        all.sort();
        all
    }

    fn all(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        self.resolved_addrs.lock().expect("endpoint set lock")
    }

    /// Connects to a subset of the endpoints only (before [`Self::follow`]).
    pub(crate) fn use_subset(&self, subset: subset::Subset) {
        self.width.store(subset.size, Ordering::Relaxed);
        let _ = self.subset.set(subset);
    }

    /// Members wanted now (0 without subsetting).
    pub(crate) fn subset_width(&self) -> usize {
        self.width.load(Ordering::Relaxed)
    }

    /// Applies resolver changes until the resolver stops or the set is
    /// dropped (it holds the set only weakly). A burst of changes is one
    /// update, built aside and swapped in: calls keep picking from the
    /// previous set meanwhile (a read lock taken for one `Arc` clone).
    pub(crate) async fn follow(
        self: Arc<Self>,
        mut changes: Changes,
        connect: Connect,
        health_checks: bool,
    ) {
        let dropped = self.dropped.clone();
        self.health_checks.store(health_checks, Ordering::Relaxed);
        let subsetting = self.subset.get().is_some();
        let weak = Arc::downgrade(&self);
        drop(self);
        let mut widen = tokio::time::interval_at(Instant::now() + WIDEN_EVERY, WIDEN_EVERY);
        widen.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = dropped.cancelled() => return,
                change = changes.recv() => {
                    let Some(change) = change else { return };
                    let Some(set) = weak.upgrade() else { return };
                    set.apply(change, &mut changes, &connect, health_checks);
                }
                _ = widen.tick(), if subsetting => {
                    let Some(set) = weak.upgrade() else { return };
                    set.widen(&connect, health_checks);
                }
            }
        }
    }

    fn apply(
        &self,
        first: Change<SocketAddr, ()>,
        changes: &mut Changes,
        connect: &Connect,
        health_checks: bool,
    ) {
        // Apply a burst of changes as one update.
        let mut all = self.all();
        let mut change = Some(first);
        while let Some(next) = change.take().or_else(|| changes.try_recv().ok()) {
            match next {
                Change::Insert(addr, ()) => {
                    all.insert(addr);
                }
                Change::Remove(addr) => {
                    all.remove(&addr);
                }
            }
        }
        self.rebuild(&all, connect, health_checks);
        drop(all);
        self.resolved.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Makes the members the first `width` of `all` in the subset's order
    /// (all of `all` without subsetting), keeping the endpoints (and
    /// connections) of members that stay.
    fn rebuild(&self, all: &HashSet<SocketAddr>, connect: &Connect, health_checks: bool) {
        let members: Vec<SocketAddr> = match self.subset.get() {
            Some(subset) => {
                let addrs: Vec<SocketAddr> = all.iter().copied().collect();
                subset.preference(&addrs, self.subset_width())
            }
            None => all.iter().copied().collect(),
        };
        let current = self.snapshot();
        let mut by_addr: HashMap<SocketAddr, Arc<Endpoint>> =
            current.iter().map(|e| (e.addr, e.clone())).collect();
        let mut next: Vec<Arc<Endpoint>> = members
            .into_iter()
            .map(|addr| {
                by_addr.remove(&addr).unwrap_or_else(|| {
                    let endpoint = Arc::new(Endpoint::lazy(addr, connect.clone()));
                    if health_checks {
                        let task = tokio::spawn(watch_health(Arc::downgrade(&endpoint)));
                        endpoint.set_health_task(task.abort_handle());
                    }
                    tracing::debug!(target = %self.target, %addr, "endpoint added");
                    endpoint
                })
            })
            .collect();
        for gone in by_addr.keys() {
            tracing::debug!(target = %self.target, addr = %gone, "endpoint removed");
        }
        if !by_addr.is_empty() || next.len() != current.len() {
            tracing::info!(target = %self.target, members = next.len(), resolved = all.len(), removed = by_addr.len(), "endpoint set updated");
        }
        next.sort_by_key(|e| e.addr);
        if !by_addr.is_empty() {
            // Ejections of endpoints no longer in the set count no more
            // against the cap (their entries stayed until they expired).
            self.ejections
                .lock()
                .expect("endpoint set lock")
                .retain(|Reverse((_, addr))| !by_addr.contains_key(addr));
        }
        *self.endpoints.write().expect("endpoint set lock") = Arc::new(next);
    }

    /// Widens the subset while more than its share of members is unusable
    /// (ejected, NOT_SERVING, reconnecting), with the next endpoints in
    /// this client's order, up to its cap (`maxWidth`, default 2 × size),
    /// and narrows it back to its size once the first `size` members have
    /// been usable enough for [`NARROW_AFTER`] checks in a row.
    /// O(members), once a second.
    fn widen(&self, connect: &Connect, health_checks: bool) {
        let Some(subset) = self.subset.get() else {
            return;
        };
        let now = Instant::now();
        let members = self.snapshot();
        let usable = |e: &&Arc<Endpoint>| e.is_eligible(now) && !e.is_reconnecting(now);
        let usable_count = members.iter().filter(usable).count();
        let width = self.subset_width();
        let all = self.all();
        // With every endpoint a member already, there is nothing to widen with.
        let cap = subset.max_width.min(all.len());
        let next = if usable_count < subset.needed() && cap > width {
            self.narrow_streak.store(0, Ordering::Relaxed);
            (width + subset.size.saturating_sub(usable_count)).min(cap)
        } else if usable_count < subset.needed() {
            // At the cap: more members would cost connections and spread
            // load over endpoints further from this client's share.
            tracing::debug!(target = %self.target, width, usable = usable_count, "subset at its widening cap");
            self.narrow_streak.store(0, Ordering::Relaxed);
            width
        } else if width > subset.size {
            let addrs: Vec<SocketAddr> = all.iter().copied().collect();
            let first: HashSet<SocketAddr> =
                subset.preference(&addrs, subset.size).into_iter().collect();
            let base_usable = members
                .iter()
                .filter(|e| first.contains(&e.addr))
                .filter(usable)
                .count();
            if base_usable < subset.needed() {
                self.narrow_streak.store(0, Ordering::Relaxed);
                width
            } else if self.narrow_streak.fetch_add(1, Ordering::Relaxed) + 1 >= NARROW_AFTER {
                self.narrow_streak.store(0, Ordering::Relaxed);
                subset.size
            } else {
                width
            }
        } else {
            width
        };
        if next != width {
            tracing::warn!(target = %self.target, from = width, to = next, usable = usable_count, "subset resized");
            self.width.store(next, Ordering::Relaxed);
            self.rebuild(&all, connect, health_checks);
        }
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
    /// shared dependency down, or all draining). Stops at the first one
    /// that is not: O(1) while most serve; a full scan only when (nearly)
    /// all are NOT_SERVING, and then only on failed responses.
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
        PICK_RNG.with_borrow_mut(|rng| self.pick_with(policy, exclude, rng))
    }

    fn pick_with(
        &self,
        policy: LbPolicy,
        exclude: &[SocketAddr],
        mut rng: &mut SmallRng,
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
        // One turn per pick, whichever level takes it.
        let turn = match policy {
            LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
            LbPolicy::P2c => 0,
        };
        // Without health watches no endpoint is ever seen SERVING.
        let first_level = if self.health_checks.load(Ordering::Relaxed) {
            0
        } else {
            1
        };
        for level in first_level..4u8 {
            if level == 2 && exclude.is_empty() {
                continue;
            }
            let chosen = match policy {
                LbPolicy::RoundRobin => probe(turn, level).cloned(),
                LbPolicy::P2c => {
                    let coin = rand::Rng::random_bool(&mut rng, 0.5);
                    let lighter =
                        |x: &Arc<Endpoint>, y: &Arc<Endpoint>| lighter(x, y, now, coin).clone();
                    // Two distinct usable endpoints, each uniform among the
                    // usable ones: by rejection (O(1) while most are usable),
                    // else by counting them (O(n), when most are not).
                    let mut draw = |not: Option<usize>| {
                        (0..DRAWS)
                            .map(|_| rand::Rng::random_range(&mut rng, 0..n))
                            .find(|&i| Some(i) != not && usable(&endpoints[i], level))
                    };
                    match draw(None) {
                        Some(a) if n == 1 => Some(endpoints[a].clone()),
                        Some(a) => match draw(Some(a)) {
                            Some(b) => Some(lighter(&endpoints[a], &endpoints[b])),
                            None => {
                                let others: Vec<usize> = (0..n)
                                    .filter(|&i| i != a && usable(&endpoints[i], level))
                                    .collect();
                                match others.len() {
                                    0 => Some(endpoints[a].clone()),
                                    k => Some(lighter(
                                        &endpoints[a],
                                        &endpoints[others[rand::Rng::random_range(&mut rng, 0..k)]],
                                    )),
                                }
                            }
                        },
                        None => {
                            let usable_count =
                                endpoints.iter().filter(|e| usable(e, level)).count();
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
        let total = self.snapshot().len().max(1);
        let mut ejections = self.ejections.lock().expect("endpoint set lock");
        while ejections
            .peek()
            .is_some_and(|Reverse((until, _))| *until <= now)
        {
            ejections.pop();
        }
        // An endpoint re-admitted early while ejected still counts until
        // its ejection would have ended: the cap errs on the side of
        // keeping endpoints in service. (Removed ones are purged.)
        let ejected = ejections.len().min(total);
        let cap = (total * policy.max_ejection_percent as usize) / 100;
        let may_eject = ejected < cap.max(1).min(total);
        if let Verdict::Ejected(time) = endpoint.record_failure(now, policy, may_eject) {
            ejections.push(Reverse((now + time, endpoint.addr)));
            drop(ejections);
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
        if self.subset.get().is_some() {
            let members: i64 = counts.iter().sum();
            let resolved = self.all().len() as i64;
            scrape.endpoints(&self.peer, "outside_subset", resolved - members);
            scrape.subset_size(&self.peer, self.subset_width() as i64);
        }
    }
}

/// The less loaded of two endpoints, `x` (drawn at random) on a tie.
///
/// Endpoints whose typical latencies (a plain EWMA over the last second)
/// differ by more than [`ALIKE_RATIO`] (1.5×) are compared by one more
/// call's expected latency (`Endpoint::load`: a short-window mean of
/// latency per call in flight, decayed while the endpoint gives no news,
/// × (in-flight + 1) × failure penalty), so a slow endpoint is
/// avoided. Both the likeness and the comparison use plain means, not
/// tower's 10 s peak-EWMA: on a busy host every endpoint's peak is some
/// recent scheduling stall, which made a 20 ms-slower replica look like the
/// others and get a sixth to a quarter of the calls (modelled in the tests
/// below; `meshbench` and the resilience tests saw it under CPU
/// contention). A hung endpoint answers nothing, so no latency tells of
/// it; its calls in flight pile up instead, and age: an endpoint whose
/// calls in flight are late (older on average than 4× its typical latency
/// and 10 ms, `Endpoint::latency_now`) is judged by their age, so it is
/// unlike the others at once, gets no chance pick, and its load is at
/// least that age. Without it a client learned that a server turned slow
/// only when a call completed, and kept queueing calls there meanwhile
/// (meshsim, 5 % of servers 10× slow: docs/scaling.md).
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
    // The typical latency, or the age of calls stuck in flight (a server
    // that turned slow is avoided before its first slow answer arrives).
    let (mut rx, mut ry) = (x.latency_now(now), y.latency_now(now));
    // A latency not measured yet is a guess: taken as the other's (calls
    // stuck on it still count), so a new endpoint gets its share of draws
    // and is measured. Judged by the guess, one behind sub-millisecond
    // peers was never picked.
    if !x.measured() {
        rx = y.typical_rtt().max(x.stuck_age(now));
    }
    if !y.measured() {
        ry = x.typical_rtt().max(y.stuck_age(now));
    }
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

thread_local! {
    /// The pick's random numbers: a small fast generator per thread
    /// (Xoshiro256++), seeded once from the thread's ChaCha. The draws
    /// only spread load, so they need no cryptographic strength, and
    /// ChaCha per pick was most of its cost (2.33× at 10,000 endpoints
    /// against 10, debug build: docs/scaling.md).
    static PICK_RNG: std::cell::RefCell<SmallRng> =
        std::cell::RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

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
        let (tx, rx) = tokio::sync::mpsc::channel(usize::from(n) + 1);
        for port in 1..=n {
            tx.send(Change::Insert(SocketAddr::from(([127, 0, 0, 1], port)), ()))
                .await
                .unwrap();
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
        endpoints[0].observe_rtt(Duration::from_millis(50), 1, now);
        endpoints[1].observe_rtt(Duration::from_millis(1), 1, now);
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

    // Paused: the picks are made at the instant the calls start (on a
    // running clock a slow debug build made the calls "late" meanwhile).
    #[tokio::test(start_paused = true)]
    async fn p2c_leans_to_fewer_in_flight_without_sending_every_call_there() {
        let set = set_of(2).await;
        let endpoints = set.snapshot();
        let now = Instant::now();
        // Similar latency (within 1.5×); port 1 has three calls in flight.
        endpoints[0].observe_rtt(Duration::from_micros(1200), 1, now);
        endpoints[1].observe_rtt(Duration::from_micros(1000), 1, now);
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

    #[tokio::test(start_paused = true)]
    async fn p2c_sends_nothing_by_chance_to_an_endpoint_whose_calls_in_flight_are_late() {
        let set = set_of(2).await;
        let endpoints = set.snapshot();
        let now = Instant::now();
        for e in endpoints.iter() {
            e.observe_rtt(Duration::from_millis(20), 1, now);
        }
        // One call each, both young: alike, the coin splits the picks.
        let old = endpoints[0].start();
        let _young = endpoints[1].start();
        let to_first = (0..400)
            .filter(|_| set.pick(LbPolicy::P2c, &[]).unwrap().addr.port() == 1)
            .count();
        assert!((100..300).contains(&to_first), "{to_first} of 400");
        // Port 1 turned slow: its call is 200 ms old (10x its typical
        // latency) and has not answered. Before any answer tells of it, no
        // call goes there; the in-flight counts alone (1 and 1) let the
        // coin send it half.
        tokio::time::advance(Duration::from_millis(200)).await;
        let _fresh = endpoints[1].start();
        let _ = _young.answered();
        for _ in 0..200 {
            assert_eq!(set.pick(LbPolicy::P2c, &[]).unwrap().addr.port(), 2);
        }
        // Its late call answered: it is judged by its answers again.
        let _ = old.answered();
        endpoints[0].observe_rtt(Duration::from_millis(20), 1, Instant::now());
        assert!(
            (0..400).any(|_| set.pick(LbPolicy::P2c, &[]).unwrap().addr.port() == 1),
            "back in the rotation"
        );
    }

    #[tokio::test]
    async fn p2c_sends_nothing_by_chance_to_an_endpoint_with_calls_piling_up_or_failing() {
        let set = set_of(2).await;
        let endpoints = set.snapshot();
        let now = Instant::now();
        for e in endpoints.iter() {
            e.observe_rtt(Duration::from_millis(1), 1, now);
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
            endpoints[port].observe_rtt(
                Duration::from_secs_f64((base[port] + stall) / 1000.0),
                1,
                now,
            );
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

    /// meshbench's slow-replica scenario as a model: calls start 20 times
    /// a simulated millisecond over three replicas; two answer in 1.4 ms
    /// (so about 14 calls wait on each), the third every call in 20 ms
    /// however many it holds (a wait, not work). A fifth of the fast
    /// answers come after a scheduling stall of up to `stall_ms`. Returns
    /// the slow replica's share of the calls after a second's warm-up.
    async fn modelled_slow_share_under_load(stall_ms: f64) -> f64 {
        use rand::{Rng, SeedableRng};
        let set = set_of(3).await;
        let endpoints = set.snapshot();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // (due, replica, sent, call)
        let mut calls: Vec<(Instant, usize, Instant, crate::endpoint::InFlight)> = Vec::new();
        let (warm_up, picks, mut slow) = (20 * 1000, 20 * 6000, 0);
        for i in 0..warm_up + picks {
            tokio::time::advance(Duration::from_micros(50)).await;
            let now = Instant::now();
            let mut j = 0;
            while j < calls.len() {
                if calls[j].0 <= now {
                    let (_, port, sent, call) = calls.swap_remove(j);
                    let sharing = call.answered();
                    endpoints[port].observe_rtt(now - sent, sharing, now);
                } else {
                    j += 1;
                }
            }
            let port = usize::from(set.pick(LbPolicy::P2c, &[]).unwrap().addr.port()) - 1;
            let latency_ms = if port == 2 {
                slow += usize::from(i >= warm_up);
                20.0
            } else if stall_ms > 0.0 && rng.random_bool(0.2) {
                1.4 + rng.random_range(0.0..stall_ms)
            } else {
                1.4
            };
            let due = now + Duration::from_secs_f64(latency_ms / 1000.0);
            calls.push((due, port, now, endpoints[port].start_at(now)));
        }
        slow as f64 / picks as f64
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_avoids_a_slow_replica_when_the_fast_ones_hold_a_queue() {
        // With tower's peak-EWMA x (in-flight + 1) as the load, 1.4 ms x 15
        // looked busier than 20 ms x 1, and a stalled answer's peak made it
        // busier still for seconds: meshbench's slow-replica scenario gave
        // the slow replica 0.5-4 % of the calls (docs/benchmarks.md).
        let quiet = modelled_slow_share_under_load(0.0).await;
        let busy = modelled_slow_share_under_load(10.0).await;
        eprintln!("modelled slow share under load: quiet {quiet:.4}, busy {busy:.4}");
        assert!(quiet < 0.001 && busy < 0.001, "quiet {quiet}, busy {busy}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_behind_sub_millisecond_peers_gets_its_share() {
        let set = set_of(3).await;
        let endpoints = set.snapshot();
        // Two measured at 100 µs, with calls in flight; the third is new
        // (its 1 ms is only a guess, ten times theirs).
        for e in &endpoints[..2] {
            e.observe_rtt(Duration::from_micros(100), 4, Instant::now());
        }
        let _busy: Vec<_> = (0..4)
            .flat_map(|_| [endpoints[0].start(), endpoints[1].start()])
            .collect();
        let to_new = (0..3000)
            .filter(|_| set.pick(LbPolicy::P2c, &[]).unwrap().addr.port() == 3)
            .count();
        assert!(to_new > 1000, "{to_new} of 3000 to the new endpoint");
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
        // connecting (its SYNs may be going nowhere). (The set follows
        // with watches off; say they are on, as their results show.)
        set.health_checks.store(true, Ordering::Relaxed);
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

    /// A set of `n` endpoints following an open channel with a subset of
    /// `size` (rendezvous, fixed id); the sender keeps it following.
    async fn subset_set_of(
        n: u16,
        size: usize,
        max_width: Option<usize>,
    ) -> (
        Arc<EndpointSet>,
        tokio::sync::mpsc::Sender<Change<SocketAddr, ()>>,
        Metrics,
    ) {
        following_set_of(
            n,
            Some(Subset::new(&crate::config::SubsetConfig {
                size,
                client_id: Some("c-1".into()),
                mode: crate::config::SubsetMode::Rendezvous,
                max_unhealthy_percent: 25,
                max_width,
            })),
        )
        .await
    }

    /// A set of `n` endpoints (with `subset`, if any) following an open
    /// channel, once resolved; the sender keeps it following.
    async fn following_set_of(
        n: u16,
        subset: Option<Subset>,
    ) -> (
        Arc<EndpointSet>,
        tokio::sync::mpsc::Sender<Change<SocketAddr, ()>>,
        Metrics,
    ) {
        let metrics = Metrics::new();
        let set = EndpointSet::new("t".into(), "t".into(), Arc::default(), metrics.clone());
        if let Some(subset) = subset {
            set.use_subset(subset);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(usize::from(n) + 1);
        for port in 1..=n {
            tx.send(Change::Insert(SocketAddr::from(([127, 0, 0, 1], port)), ()))
                .await
                .unwrap();
        }
        tokio::spawn(set.clone().follow(
            rx,
            Arc::new(crate::endpoint::ClientConn::tcp_for_tests),
            false,
        ));
        for _ in 0..100 {
            if set.is_resolved() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (set, tx, metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn a_subset_holds_only_its_members_widens_while_they_are_ejected_and_narrows_back() {
        let (set, tx, metrics) = subset_set_of(100, 8, None).await;
        assert_eq!(set.snapshot().len(), 8, "endpoints only for the members");
        assert_eq!(set.addresses().len(), 100, "every address is known");
        let text = metrics.encode();
        assert!(text.contains("mesh_subset_size{peer=\"t\"} 8"), "{text}");
        assert!(
            text.contains("mesh_endpoints{peer=\"t\",state=\"outside_subset\"} 92"),
            "{text}"
        );
        // Three of eight ejected: more than 25 % unusable.
        let policy = OutlierDetection {
            consecutive_failures: 1,
            max_ejection_percent: 100,
            ..Default::default()
        };
        let first: Vec<_> = set.snapshot().iter().cloned().collect();
        for e in &first[..3] {
            set.record_failure(e, &policy);
        }
        tokio::time::sleep(WIDEN_EVERY + Duration::from_millis(10)).await;
        assert_eq!(set.subset_width(), 11, "widened by the three unusable");
        assert_eq!(set.snapshot().len(), 11);
        let kept: HashSet<_> = set.snapshot().iter().map(|e| e.addr).collect();
        assert!(
            first.iter().all(|e| kept.contains(&e.addr)),
            "the first members stay"
        );
        for _ in 0..50 {
            assert!(
                !first[..3]
                    .iter()
                    .any(|e| Arc::ptr_eq(e, &set.pick(LbPolicy::P2c, &[]).unwrap()))
            );
        }
        // Ejections end (5 s), but the subset holds its width until the
        // first eight have been usable for NARROW_AFTER checks in a row...
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            set.subset_width(),
            11,
            "no narrowing at the first good check"
        );
        // ...then back to eight, the same eight.
        tokio::time::sleep(WIDEN_EVERY * NARROW_AFTER as u32).await;
        assert_eq!(set.subset_width(), 8);
        let back: HashSet<_> = set.snapshot().iter().map(|e| e.addr).collect();
        assert_eq!(back, first.iter().map(|e| e.addr).collect::<HashSet<_>>());
        // A removed member is replaced by the next in this client's order.
        tx.send(Change::Remove(first[0].addr)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let after: HashSet<_> = set.snapshot().iter().map(|e| e.addr).collect();
        assert_eq!(after.len(), 8);
        assert_eq!(after.difference(&back).count(), 1, "one member moved");
        assert!(!after.contains(&first[0].addr));
    }

    #[tokio::test(start_paused = true)]
    async fn a_widened_subset_stops_at_its_cap_and_a_flapping_member_does_not_narrow_it() {
        let (set, _tx, _metrics) = subset_set_of(100, 8, None).await;
        let policy = OutlierDetection {
            consecutive_failures: 1,
            max_ejection_percent: 100,
            max_ejection_time: Duration::from_secs(300),
            base_ejection_time: Duration::from_secs(300),
            ..Default::default()
        };
        // Every member ejected, again and again: without a cap the subset
        // grew by its size each second, towards every endpoint.
        for _ in 0..6 {
            for e in set.snapshot().iter() {
                if e.is_eligible(Instant::now()) {
                    set.record_failure(e, &policy);
                }
            }
            tokio::time::sleep(WIDEN_EVERY).await;
            assert!(set.subset_width() <= 16, "{}", set.subset_width());
        }
        assert_eq!(set.subset_width(), 16, "2 × size by default");
        assert_eq!(set.snapshot().len(), 16);

        // A member that comes back and fails again every other second keeps
        // the subset wide instead of narrowing and widening each time.
        let (set, _tx, _metrics) = subset_set_of(100, 8, Some(10)).await;
        let short = OutlierDetection {
            consecutive_failures: 1,
            max_ejection_percent: 100,
            base_ejection_time: Duration::from_secs(1),
            max_ejection_time: Duration::from_secs(1),
            ..Default::default()
        };
        let first: Vec<_> = set.snapshot().iter().cloned().collect();
        let mut widths = Vec::new();
        for second in 0..12 {
            if second % 2 == 0 {
                for e in &first[..3] {
                    set.record_failure(e, &short);
                }
            }
            tokio::time::sleep(WIDEN_EVERY).await;
            widths.push(set.subset_width());
        }
        assert!(widths[1..].iter().all(|w| *w == 10), "{widths:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_of_removed_endpoints_do_not_count_against_the_cap() {
        let (set, tx, _metrics) = following_set_of(4, None).await;
        let policy = OutlierDetection {
            consecutive_failures: 1,
            ..Default::default()
        };
        // Two of four ejected: the 50 % cap is reached.
        let endpoints = set.snapshot();
        set.record_failure(&endpoints[0], &policy);
        set.record_failure(&endpoints[1], &policy);
        // The resolver drops both and reports two new ones.
        for port in [1, 2] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            tx.send(Change::Remove(addr)).await.unwrap();
        }
        for port in [5, 6] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            tx.send(Change::Insert(addr, ())).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(set.snapshot().len(), 4);
        assert_eq!(set.ejections.lock().unwrap().len(), 0, "purged");
        // None of the four is ejected, so one failing may be.
        let third = set.snapshot()[0].clone();
        set.record_failure(&third, &policy);
        assert!(third.is_ejected(Instant::now()), "ejected under the cap");
    }

    #[tokio::test]
    async fn p2c_draws_only_usable_endpoints_and_evenly_when_most_are_ejected() {
        // 40 endpoints, 36 ejected: the random draws mostly miss, and the
        // counted fallback must still spread evenly over the four left.
        let set = set_of(40).await;
        let policy = OutlierDetection {
            consecutive_failures: 1,
            max_ejection_percent: 100,
            ..Default::default()
        };
        for e in set.snapshot()[4..].iter() {
            set.record_failure(e, &policy);
        }
        let mut picks = [0u32; 4];
        for _ in 0..4000 {
            let port = set.pick(LbPolicy::P2c, &[]).unwrap().addr.port();
            assert!(port <= 4, "port {port} is ejected");
            picks[usize::from(port) - 1] += 1;
        }
        assert!(picks.iter().all(|p| (700..1300).contains(p)), "{picks:?}");
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

    #[tokio::test]
    async fn an_ejected_endpoint_takes_one_place_of_the_share_cap() {
        let set = set_of(4).await;
        let policy = OutlierDetection::default();
        let endpoints = set.snapshot();
        // One crash fails the ten calls in flight on endpoint 0, then
        // endpoint 1 fails its five in a row: both are out, half of four.
        for _ in 0..10 {
            set.record_failure(&endpoints[0], &policy);
        }
        for _ in 0..policy.consecutive_failures {
            set.record_failure(&endpoints[1], &policy);
        }
        let now = Instant::now();
        assert!(endpoints[0].is_ejected(now));
        assert!(endpoints[1].is_ejected(now), "the second place was free");
        assert!(
            !endpoints[0].is_ejected(now + policy.base_ejection_time),
            "ejected once, for the base time"
        );
    }
}
