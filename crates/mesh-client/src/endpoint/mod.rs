//! One endpoint: a single HTTP/2 connection to one address, its load
//! estimate, and the failure bookkeeping that ejects it or backs off its
//! reconnects.
//!
//! The load estimate is one more call's expected latency: a short-window
//! mean of response latency per call in flight, multiplied by in-flight
//! requests and by a decaying failure penalty, so a replica that fails fast
//! does not look like the fastest one (see [`Endpoint::load`] for why not
//! tower's peak-EWMA × in-flight, which counts the queue twice). It is kept
//! here rather than by wrapping the connection in `tower::load::PeakEwma`
//! because that type owns its service and needs `&mut` for every call, while
//! an endpoint is shared by concurrent calls.

mod conn;
mod health;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::Either;
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::Service;

pub(crate) use crate::body::{ObservedBody, header_status};
pub(crate) use conn::{
    ClientConn, StallWindow, authority_of, dead_dial, failed_dial, is_queue_full, is_stalled,
    is_unsent, never_processed, stall_window, take_unsent,
};
#[cfg(test)]
pub(crate) use conn::{stalled_for_tests, unsent_for_tests};
pub(crate) use health::watch_health;

use crate::config::{EndpointConfig, OutlierDetection};

/// How fast the latency estimate decays toward zero while no answer comes
/// (tower's default for PeakEwma), so an endpoint once slow is tried again.
const RTT_DECAY: Duration = Duration::from_secs(10);
/// Decay window of the typical (mean) latency that judges whether two
/// endpoints are alike: short, so it follows the endpoint's latency now,
/// and not peak-sensitive, so scheduling stalls on a busy host do not make
/// every endpoint look alike (see `balance::lighter`).
const TYPICAL_RTT_DECAY: Duration = Duration::from_secs(1);
/// The least [`RTT_DECAY`] takes an idle endpoint's latency estimate to.
const MIN_DECAY: f64 = 1e-6;
/// Latency assumed for an endpoint with no measurements yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Half-life of the failure penalty.
const PENALTY_HALF_LIFE: Duration = Duration::from_secs(2);

/// The most a run of shedding answers or refused calls raises the
/// penalty to (33× the load at [`PENALTY_WEIGHT`] 4): enough to steer
/// nearly every pick away, and back to 1 three half-lives (6 s) after the
/// shedding stops.
const MAX_SHED_PENALTY: f64 = 8.0;
/// Load multiplier per unit of (decayed) recent failures.
const PENALTY_WEIGHT: f64 = 4.0;
/// Calls in flight whose mean age exceeds this many times the endpoint's
/// typical latency mark it slow at once (see [`Endpoint::latency_now`]):
/// a client otherwise learns of a slow server only when a call to it
/// completes, and meanwhile keeps queueing calls there. 4, so a
/// log-normal service time (σ 0.5) trips it on ~0.1 % of calls.
const STUCK_FACTOR: f64 = 4.0;
/// ... and at least this old: on a busy host a scheduling stall of a few
/// milliseconds would otherwise mark a sub-millisecond endpoint slow and
/// switch off the chance pick that breaks convoys.
const STUCK_FLOOR: Duration = Duration::from_millis(10);
/// Low bits of `Endpoint::outstanding` that count calls; the bits above
/// sum their start times (µs since `born`, modulo 2^44).
const COUNT_BITS: u32 = 20;
/// Mask of the summed start times (and of ages summed from them).
const SUM_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

const HEALTH_UNKNOWN: u8 = 0;
const HEALTH_SERVING: u8 = 1;
const HEALTH_NOT_SERVING: u8 = 2;

/// Makes an endpoint's connection (dialled on its first call or health
/// watch, not when it is made).
pub(crate) type Connect = Arc<dyn Fn(SocketAddr) -> ClientConn + Send + Sync>;

/// One address of a target.
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    /// Made on first use, so an endpoint never called costs no connection
    /// state at all (8 bytes here until then: 10,000 idle endpoints stay
    /// small); the connection itself is dialled on its first call.
    conn: std::sync::OnceLock<ClientConn>,
    connect: Option<Connect>,
    /// What a pick reads, in one cache line.
    hot: Hot,
    state: Mutex<State>,
    health_task: Mutex<Option<tokio::task::AbortHandle>>,
    /// The highest dial number whose failure was charged to this endpoint.
    charged_dial: AtomicU64,
}

/// What the balancer's pick reads of an endpoint, together in one
/// 64-byte line: at 10,000 endpoints the two endpoints a P2C pick draws
/// are cache misses, and spread over the whole struct they cost about
/// three lines each instead of one.
#[repr(align(64))]
struct Hot {
    /// Calls in flight.
    in_flight: AtomicU32,
    health: AtomicU8,
    /// Set while `state` holds any failure bookkeeping; when clear, the
    /// endpoint is eligible and unpenalised without looking at `state`.
    troubled: AtomicBool,
    /// Calls in flight (low [`COUNT_BITS`]) and the sum of their start
    /// times (µs since `born`, above): one word, so the mean age of the
    /// calls in flight is read consistently in O(1). Wrapping arithmetic:
    /// exact while fewer than 2^20 calls are in flight and their ages sum
    /// to under 2^44 µs (203 days).
    outstanding: AtomicU64,
    /// Latency per call in flight (f64 bits, ns): a plain EWMA over
    /// [`TYPICAL_RTT_DECAY`] of each answer's latency divided by the calls
    /// in flight when it was sent (itself included). × (in-flight + 1) it
    /// estimates one more call's latency (see [`Endpoint::load`]).
    /// Atomics, so the success path takes no lock.
    unit_rtt_ns: AtomicU64,
    /// Plain EWMA latency (f64 bits, ns) over [`TYPICAL_RTT_DECAY`].
    typical_rtt_ns: AtomicU64,
    /// When the latency estimates were last fed an answer (ns since
    /// `born`; 0 before the first): weighs the next answer.
    rtt_at: AtomicU64,
    /// When the endpoint last gave news of how slow it is (ns since
    /// `born`): an answer, or a late call that ended unanswered.
    /// The latency estimate decays from then (see [`Endpoint::load`]).
    news_at: AtomicU64,
    born: Instant,
}

// The line the pick reads is one line.
const _: () = assert!(std::mem::size_of::<Hot>() == 64);

struct State {
    penalty: f64,
    penalty_at: Instant,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// When the current (or last) ejection began.
    ejected_at: Option<Instant>,
    connect_failures: u32,
    backoff_until: Option<Instant>,
    last_connect_error: Option<String>,
}

/// Why an outcome was recorded, for the caller's logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing changed for the endpoint's eligibility.
    Kept,
    /// The endpoint was ejected for this long.
    Ejected(Duration),
}

/// Codes that say the endpoint, not the request, is at fault.
pub(crate) fn is_endpoint_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss
    )
}

impl Endpoint {
    #[cfg(test)]
    pub(crate) fn new(addr: SocketAddr, conn: ClientConn) -> Self {
        let endpoint = Self::make(addr, None);
        let _ = endpoint.conn.set(conn);
        endpoint
    }

    /// An endpoint whose connection `connect` makes when it is first used.
    pub(crate) fn lazy(addr: SocketAddr, connect: Connect) -> Self {
        Self::make(addr, Some(connect))
    }

    /// The endpoint's connection, made now if it was not yet (it dials on
    /// its first call).
    pub(crate) fn conn(&self) -> &ClientConn {
        self.conn.get_or_init(|| {
            (self
                .connect
                .as_ref()
                .expect("a lazy endpoint has a connector"))(self.addr)
        })
    }

    fn make(addr: SocketAddr, connect: Option<Connect>) -> Self {
        let now = Instant::now();
        Self {
            addr,
            conn: std::sync::OnceLock::new(),
            connect,
            hot: Hot {
                in_flight: AtomicU32::new(0),
                health: AtomicU8::new(HEALTH_UNKNOWN),
                troubled: AtomicBool::new(false),
                outstanding: AtomicU64::new(0),
                unit_rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
                typical_rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
                rtt_at: AtomicU64::new(0),
                news_at: AtomicU64::new(0),
                born: now,
            },
            state: Mutex::new(State {
                penalty: 0.0,
                penalty_at: now,
                consecutive_failures: 0,
                ejections: 0,
                ejected_until: None,
                ejected_at: None,
                connect_failures: 0,
                backoff_until: None,
                last_connect_error: None,
            }),
            health_task: Mutex::new(None),
            charged_dial: AtomicU64::new(0),
        }
    }

    /// Whether the failure of dial number `dial` is reported here for the
    /// first time: every call that waited on one dial gets its failure,
    /// and the endpoint is charged (backoff, ejection) once per dial, not
    /// once per waiting call (a thousand calls on one failed dial would
    /// otherwise mean the longest backoff at once).
    pub(crate) fn first_report_of_dial(&self, dial: u64) -> bool {
        self.charged_dial.fetch_max(dial, Ordering::Relaxed) < dial
    }

    pub(crate) fn set_health_task(&self, handle: tokio::task::AbortHandle) {
        *self.health_task.lock().expect("endpoint lock") = Some(handle);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("endpoint lock poisoned")
    }

    /// Whether new calls may go here now.
    pub(crate) fn is_eligible(&self, now: Instant) -> bool {
        if self.hot.health.load(Ordering::Relaxed) == HEALTH_NOT_SERVING {
            return false;
        }
        if !self.hot.troubled.load(Ordering::Relaxed) {
            return true;
        }
        let state = self.state();
        state.ejected_until.is_none_or(|t| now >= t) && state.backoff_until.is_none_or(|t| now >= t)
    }

    /// Whether the endpoint waits to reconnect after failed connections.
    pub(crate) fn is_reconnecting(&self, now: Instant) -> bool {
        self.hot.troubled.load(Ordering::Relaxed)
            && self.state().backoff_until.is_some_and(|t| now < t)
    }

    /// Why the last connection attempt failed, while backing off.
    pub(crate) fn last_connect_error(&self) -> Option<String> {
        if !self.hot.troubled.load(Ordering::Relaxed) {
            return None;
        }
        self.state().last_connect_error.clone()
    }

    /// Whether the endpoint is ejected now.
    #[cfg(test)]
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.hot.troubled.load(Ordering::Relaxed)
            && self.state().ejected_until.is_some_and(|t| now < t)
    }

    /// One more call's expected latency × failure penalty: the latency
    /// per call in flight × (in-flight + 1), and at least the age of calls
    /// stuck in flight (see [`Self::latency_now`]) × (in-flight + 1).
    ///
    /// Per call in flight, because an answer's latency already holds the
    /// queue it waited in: latency × (in-flight + 1), tower's peak-EWMA
    /// cost, counts that queue twice, and made a replica answering in
    /// 1.4 ms with 16 calls in flight (cost 24 ms) look busier than one
    /// 20 ms slower with none (cost 20 ms), so the slow one got 2-4 % of
    /// the calls and set p99 (meshbench's slow-replica scenario on a
    /// busy host). A server that answers n calls at once in t each (a
    /// wait, not work) gives t / n, and one more call's estimate stays
    /// about t. The estimate decays toward zero while the endpoint gives
    /// no news (as tower's PeakEwma's does, over [`RTT_DECAY`]): one once
    /// slow is tried again now and then, or it would be judged by its
    /// last answer for good. A late call that ends unanswered raises it
    /// to its age (a hung endpoint's calls reaching their deadlines, see
    /// [`Self::at_least`]), so a hung endpoint does not decay into a magnet
    /// for calls it will not answer; a refusing one is steered from by its
    /// penalty ([`Self::record_shed`]).
    pub(crate) fn load(&self, now: Instant) -> f64 {
        (self.unit_rtt() * self.decay(now)).max(self.stuck_age(now)) * self.queue_cost(now)
    }

    /// Whether an answer has measured the endpoint's latency yet (before
    /// one, its estimates are [`DEFAULT_RTT`], a guess).
    pub(crate) fn measured(&self) -> bool {
        self.hot.rtt_at.load(Ordering::Relaxed) != 0
    }

    /// The latency to judge the endpoint by now, in nanoseconds: its
    /// typical latency, or the mean age of its calls in flight when that
    /// is over [`STUCK_FACTOR`] × typical (and [`STUCK_FLOOR`]). An
    /// endpoint that turned slow is known as soon as its calls are late,
    /// not only once one of them completes.
    pub(crate) fn latency_now(&self, now: Instant) -> f64 {
        self.typical_rtt().max(self.stuck_age(now))
    }

    /// The mean age of the calls in flight (ns) if they are late (see
    /// [`Self::latency_now`]), else 0.
    pub(crate) fn stuck_age(&self, now: Instant) -> f64 {
        let age = self.in_flight_age(now).as_nanos() as f64;
        if age > STUCK_FACTOR * self.typical_rtt() && age > STUCK_FLOOR.as_nanos() as f64 {
            age
        } else {
            0.0
        }
    }

    /// The mean age of the calls in flight now (zero without any). O(1).
    pub(crate) fn in_flight_age(&self, now: Instant) -> Duration {
        let packed = self.hot.outstanding.load(Ordering::Relaxed);
        let count = packed & ((1 << COUNT_BITS) - 1);
        if count == 0 {
            return Duration::ZERO;
        }
        // Σ age = count × now − Σ start, modulo 2^44 like the sum.
        let ages = count
            .wrapping_mul(self.micros(now))
            .wrapping_sub(packed >> COUNT_BITS)
            & SUM_MASK;
        // A call started after `now` was read makes the sum "negative".
        if ages > SUM_MASK / 2 {
            return Duration::ZERO;
        }
        Duration::from_micros(ages / count)
    }

    /// Microseconds from `born` to `now`.
    fn micros(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.hot.born).as_micros() as u64
    }

    /// Nanoseconds from `born` to `now`.
    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.hot.born).as_nanos() as u64
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.hot.in_flight.load(Ordering::Relaxed)
    }

    /// The latency per call in flight, in nanoseconds (see [`Hot`]).
    fn unit_rtt(&self) -> f64 {
        f64::from_bits(self.hot.unit_rtt_ns.load(Ordering::Relaxed))
    }

    /// The typical (mean, short-window) latency, in nanoseconds.
    pub(crate) fn typical_rtt(&self) -> f64 {
        f64::from_bits(self.hot.typical_rtt_ns.load(Ordering::Relaxed))
    }

    /// (in-flight + 1) × failure penalty: the load before latency is weighed.
    pub(crate) fn queue_cost(&self, now: Instant) -> f64 {
        let pending = f64::from(self.hot.in_flight.load(Ordering::Relaxed)) + 1.0;
        let penalty = if self.hot.troubled.load(Ordering::Relaxed) {
            let state = self.state();
            decay(
                state.penalty,
                now.saturating_duration_since(state.penalty_at),
            )
        } else {
            0.0
        };
        pending * (1.0 + PENALTY_WEIGHT * penalty)
    }

    /// Marks a call in flight until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(Instant::now())
    }

    /// [`Endpoint::start`] for a call sent at `now` (a clock read the
    /// caller already made).
    pub(crate) fn start_at(self: &Arc<Self>, now: Instant) -> InFlight {
        let ahead = self.hot.in_flight.fetch_add(1, Ordering::Relaxed);
        let entry = (self.micros(now) << COUNT_BITS) | 1;
        self.hot.outstanding.fetch_add(entry, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            entry,
            sharing: ahead.saturating_add(1),
            answered: false,
        }
    }

    /// A call sent `entry` (see [`InFlight`]) with `sharing` calls in
    /// flight ended without an answer (its deadline passed, its caller
    /// gave up, its connection failed). Only a call that was late for the
    /// endpoint says anything of it: older than [`STUCK_FACTOR`] × its
    /// expected latency (the estimate per call × the calls it was sent
    /// beside) and [`STUCK_FLOOR`]. A hedge's loser is cut short by a
    /// faster answer elsewhere, a caller's early cancel by the caller, and
    /// a refused or handed-back request left at once. A late one is a
    /// latency at least its age: see [`Self::at_least`].
    fn unanswered(&self, entry: u64, sharing: u32) {
        let now = Instant::now();
        let age_us = self.micros(now).wrapping_sub(entry >> COUNT_BITS) & SUM_MASK;
        let age = (age_us * 1000) as f64;
        let expected = self.unit_rtt() * self.decay(now) * f64::from(sharing.max(1));
        if age_us <= SUM_MASK / 2
            && age > STUCK_FACTOR * expected
            && age > STUCK_FLOOR.as_nanos() as f64
        {
            self.at_least(age, sharing, now);
        }
    }

    /// News of a latency of at least `latency` for a call sent with
    /// `sharing` in flight (a late call given up, an answer that is not a
    /// service time): the per-call estimate rises to it where lower
    /// (never falls: the answer might have come at once after), from its
    /// decayed value, and the decay starts over. The typical latency, which
    /// judges whether endpoints are alike, is left to answers: raised by
    /// one late call, a healthy endpoint after a 2 s pause would be unlike
    /// its peers and unused for a minute; a hung one is found by its calls
    /// in flight turning late instead (`Endpoint::latency_now`).
    fn at_least(&self, latency: f64, sharing: u32, now: Instant) {
        let unit = latency / f64::from(sharing.max(1));
        let decayed = self.unit_rtt() * self.decay(now);
        self.hot
            .unit_rtt_ns
            .store(decayed.max(unit).to_bits(), Ordering::Relaxed);
        self.hot
            .news_at
            .store(self.nanos(now).max(1), Ordering::Relaxed);
    }

    /// How far the per-call latency estimate has decayed since the last
    /// news (see [`Self::load`]).
    fn decay(&self, now: Instant) -> f64 {
        let news = self.hot.news_at.load(Ordering::Relaxed);
        let idle = self.nanos(now).saturating_sub(news) as f64;
        // Floored: hours idle, e^-x reaches 0, and queue depth and failure
        // penalty would no longer order the idle endpoints.
        (-idle / RTT_DECAY.as_nanos() as f64).exp().max(MIN_DECAY)
    }

    /// An answer that is not a service time (an error status, at once or
    /// not): it may show the endpoint slow, never fast.
    pub(crate) fn observe_at_least(&self, rtt: Duration, sharing: u32, now: Instant) {
        self.at_least(rtt.as_nanos() as f64, sharing, now);
    }

    /// Feeds one response latency into the latency estimates: `sharing` is
    /// the calls in flight when it was sent, itself included
    /// ([`InFlight::answered`]).
    pub(crate) fn observe_rtt(&self, rtt: Duration, sharing: u32, now: Instant) {
        // Racing updates may lose one sample; an estimate does not need more.
        let at = self.nanos(now);
        let last = self.hot.rtt_at.load(Ordering::Relaxed);
        let elapsed = at.saturating_sub(last) as f64;
        let rtt = rtt.as_nanos() as f64;
        // The first measurement replaces the default outright.
        let weight = if last == 0 {
            0.0
        } else {
            (-elapsed / TYPICAL_RTT_DECAY.as_nanos() as f64).exp()
        };
        let ewma = |bits: &AtomicU64, sample: f64| {
            let previous = f64::from_bits(bits.load(Ordering::Relaxed));
            bits.store(
                (previous * weight + sample * (1.0 - weight)).to_bits(),
                Ordering::Relaxed,
            );
        };
        ewma(&self.hot.unit_rtt_ns, rtt / f64::from(sharing.max(1)));
        ewma(&self.hot.typical_rtt_ns, rtt);
        self.hot.rtt_at.store(at.max(1), Ordering::Relaxed);
        self.hot.news_at.store(at.max(1), Ordering::Relaxed);
    }

    /// A call sent at `started` succeeded. One sent before the endpoint's
    /// current ejection was in flight when the failures ejected it, and
    /// says nothing of a recovery: it leaves the ejection in place (the
    /// first such success re-admitted an endpoint that failed every other
    /// call at once).
    pub(crate) fn record_success(&self, started: Instant) {
        if !self.hot.troubled.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.state();
        if state.ejected_at.is_some_and(|at| started < at)
            && state
                .ejected_until
                .is_some_and(|until| Instant::now() < until)
        {
            return;
        }
        state.consecutive_failures = 0;
        state.connect_failures = 0;
        state.backoff_until = None;
        if state.ejected_until.take().is_some() {
            // Re-admitted and healthy: the next ejection starts shorter again.
            state.ejections = state.ejections.saturating_sub(1);
        }
        if state.ejections == 0 && state.penalty_at.elapsed() > 8 * PENALTY_HALF_LIFE {
            self.hot.troubled.store(false, Ordering::Relaxed);
        }
    }

    /// Records a failure; ejects the endpoint after enough in a row, if
    /// `may_eject` (the share of ejected endpoints allows it).
    pub(crate) fn record_failure(
        &self,
        now: Instant,
        policy: &OutlierDetection,
        may_eject: bool,
    ) -> Verdict {
        let mut state = self.penalise(now);
        // Calls that were in flight when it was ejected fail afterwards:
        // the same incident, not grounds for a second, longer ejection
        // (ten calls cut by one crash ejected it twice, and took two of
        // the share cap's places from other endpoints).
        if state.ejected_until.is_some_and(|until| now < until) {
            return Verdict::Kept;
        }
        state.consecutive_failures += 1;
        if state.consecutive_failures < policy.consecutive_failures || !may_eject {
            return Verdict::Kept;
        }
        state.consecutive_failures = 0;
        state.ejections += 1;
        let time = policy
            .base_ejection_time
            .saturating_mul(state.ejections)
            .min(policy.max_ejection_time);
        state.ejected_until = Some(now + time);
        state.ejected_at = Some(now);
        Verdict::Ejected(time)
    }

    /// A shedding answer (`RESOURCE_EXHAUSTED`): the server is overloaded,
    /// not broken. It raises the failure penalty as a failure does, so fast
    /// refusals do not make an overloaded server look like the fastest one
    /// (and the chance pick skips it), but it neither ejects the endpoint
    /// nor counts toward ejection: shedding is the server protecting
    /// itself, and ejecting for it would push its load onto the others.
    pub(crate) fn record_shed(&self, now: Instant) {
        let mut state = self.state();
        self.hot.troubled.store(true, Ordering::Relaxed);
        let decayed = decay(
            state.penalty,
            now.saturating_duration_since(state.penalty_at),
        );
        // One more, up to the cap: a burst of a thousand refusals says no
        // more than a few, and uncapped it would keep the endpoint avoided
        // long after its queue drained. A higher penalty from failures stays.
        state.penalty = (decayed + 1.0).min(MAX_SHED_PENALTY).max(decayed);
        state.penalty_at = now;
    }

    /// Adds one to the decaying failure penalty; the state, still locked.
    fn penalise(&self, now: Instant) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state();
        self.hot.troubled.store(true, Ordering::Relaxed);
        state.penalty = decay(
            state.penalty,
            now.saturating_duration_since(state.penalty_at),
        ) + 1.0;
        state.penalty_at = now;
        state
    }

    /// A connection attempt failed: wait before the next one (gRPC
    /// connection backoff: ×1.6 per failure, capped, ±20 % jitter).
    pub(crate) fn record_connect_failure(
        &self,
        now: Instant,
        config: &EndpointConfig,
        error: String,
    ) -> Duration {
        let mut state = self.state();
        self.hot.troubled.store(true, Ordering::Relaxed);
        state.connect_failures += 1;
        let exp = 1.6f64.powi(state.connect_failures.saturating_sub(1).min(30) as i32);
        let base = config
            .reconnect_backoff
            .mul_f64(exp)
            .min(config.reconnect_backoff_max);
        let wait = base.mul_f64(0.8 + rand::random::<f64>() * 0.4);
        state.backoff_until = Some(now + wait);
        state.last_connect_error = Some(error);
        wait
    }

    pub(crate) fn set_serving(&self, serving: bool) {
        let value = if serving {
            HEALTH_SERVING
        } else {
            HEALTH_NOT_SERVING
        };
        self.hot.health.store(value, Ordering::Relaxed);
    }

    /// Whether the health watch has seen the endpoint SERVING (so its
    /// connection is up), or its server has no health service.
    pub(crate) fn is_serving(&self) -> bool {
        self.hot.health.load(Ordering::Relaxed) == HEALTH_SERVING
    }

    pub(crate) fn is_not_serving(&self) -> bool {
        self.hot.health.load(Ordering::Relaxed) == HEALTH_NOT_SERVING
    }
}

/// Request extension: the endpoint a request is to be sent to (the
/// balancer's choice), read by [`Connection`].
#[derive(Clone)]
pub(crate) struct SendTo(pub(crate) Arc<Endpoint>);

/// The innermost client service: sends each request on the HTTP/2
/// connection of the endpoint its [`SendTo`] extension names.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Connection;

impl Service<http::Request<Body>> for Connection {
    type Response = http::Response<Body>;
    type Error = crate::BoxError;
    type Future =
        Either<futures::future::Ready<Result<Self::Response, Self::Error>>, conn::ResponseFuture>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Each endpoint's connection is judged per call: the balancer has
        // picked a fit endpoint, and its connection dials if it has none.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let Some(SendTo(endpoint)) = req.extensions_mut().remove::<SendTo>() else {
            return Either::Left(futures::future::ready(Err(
                "no endpoint chosen for the request (the balancer sets one)".into(),
            )));
        };
        Either::Right(endpoint.conn().call(req))
    }
}

/// What the mesh thinks of one endpoint now.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointState {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// Ejected for consecutive failures.
    pub ejected: bool,
    /// Waiting before reconnecting after a failed connection attempt.
    pub reconnecting: bool,
    /// The health watch's view: `Some(true)` SERVING, `Some(false)`
    /// NOT_SERVING, `None` not known (yet, or no health service).
    pub serving: Option<bool>,
    /// Calls in flight.
    pub in_flight: u32,
    /// The balancer's load score (lower is preferred).
    pub load: f64,
}

impl Endpoint {
    /// A snapshot of this endpoint's state.
    pub(crate) fn snapshot(&self) -> EndpointState {
        let now = Instant::now();
        let (ejected, reconnecting) = {
            let state = self.state();
            (
                state.ejected_until.is_some_and(|t| now < t),
                state.backoff_until.is_some_and(|t| now < t),
            )
        };
        EndpointState {
            addr: self.addr,
            ejected,
            reconnecting,
            serving: match self.hot.health.load(Ordering::Relaxed) {
                HEALTH_SERVING => Some(true),
                HEALTH_NOT_SERVING => Some(false),
                _ => None,
            },
            in_flight: self.hot.in_flight.load(Ordering::Relaxed),
            load: self.load(now),
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(task) = self.health_task.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
    }
}

fn decay(value: f64, elapsed: Duration) -> f64 {
    value * 0.5f64.powf(elapsed.as_secs_f64() / PENALTY_HALF_LIFE.as_secs_f64())
}

/// A call in flight on an endpoint until its answer's head comes
/// ([`InFlight::answered`]) or it is dropped unanswered, which, if it was
/// late for the endpoint, counts as news of a latency at least its age
/// (see [`Endpoint::load`]).
pub(crate) struct InFlight {
    endpoint: Arc<Endpoint>,
    /// Its entry in `outstanding`.
    entry: u64,
    /// Calls in flight when it was sent, itself included.
    sharing: u32,
    answered: bool,
}

impl InFlight {
    /// The call's answer came: it ends here. Returns the calls in flight
    /// when it was sent, itself included, for [`Endpoint::observe_rtt`].
    pub(crate) fn answered(mut self) -> u32 {
        self.answered = true;
        self.sharing
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let hot = &self.endpoint.hot;
        hot.in_flight.fetch_sub(1, Ordering::Relaxed);
        hot.outstanding.fetch_sub(self.entry, Ordering::Relaxed);
        if !self.answered {
            self.endpoint.unanswered(self.entry, self.sharing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        let addr = "127.0.0.1:1".parse().unwrap();
        Endpoint::new(addr, ClientConn::tcp_for_tests(addr))
    }

    #[tokio::test(start_paused = true)]
    async fn a_lazy_endpoint_makes_its_connection_on_first_use_and_dials_on_first_call() {
        let made = Arc::new(AtomicU32::new(0));
        let connect: Connect = {
            let made = made.clone();
            Arc::new(move |addr| {
                made.fetch_add(1, Ordering::SeqCst);
                ClientConn::unconnectable(addr, "not dialled in this test")
            })
        };
        let ep = Arc::new(Endpoint::lazy("127.0.0.1:1".parse().unwrap(), connect));
        // Picking, accounting and diagnostics make no connection.
        let now = Instant::now();
        assert!(ep.is_eligible(now));
        let _ = (ep.load(now), ep.snapshot(), ep.start());
        ep.record_failure(now, &OutlierDetection::default(), false);
        ep.record_connect_failure(now, &EndpointConfig::default(), String::new());
        assert_eq!(made.load(Ordering::SeqCst), 0);
        // The first use makes it once; it has not dialled yet.
        assert_eq!(ep.conn().state(), conn::ConnState::Idle);
        let _ = ep.conn();
        assert_eq!(made.load(Ordering::SeqCst), 1);
        // A call dials, and a failed dial is a connect error.
        let err = ep
            .conn()
            .call(http::Request::new(Body::empty()))
            .await
            .unwrap_err();
        assert!(
            crate::caused_by::<tonic::ConnectError>(&*err).is_some(),
            "{err}"
        );
        assert!(
            err.to_string().contains("not dialled in this test"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_with_growing_time() {
        let ep = endpoint();
        let policy = OutlierDetection::default();
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(ep.record_failure(now, &policy, true), Verdict::Kept);
        }
        assert_eq!(
            ep.record_failure(now, &policy, true),
            Verdict::Ejected(Duration::from_secs(5))
        );
        assert!(!ep.is_eligible(now));
        // Failures while it is out (calls in flight at the ejection) count
        // for nothing.
        for _ in 0..10 {
            assert_eq!(ep.record_failure(now, &policy, true), Verdict::Kept);
        }
        let back = now + Duration::from_secs(5);
        assert!(ep.is_eligible(back));
        for _ in 0..4 {
            assert_eq!(ep.record_failure(back, &policy, true), Verdict::Kept);
        }
        assert_eq!(
            ep.record_failure(back, &policy, true),
            Verdict::Ejected(Duration::from_secs(10))
        );
        let now = back + Duration::from_secs(10);
        assert!(ep.is_eligible(now));
        // The share cap holds an endpoint in service even when it fails.
        for _ in 0..10 {
            assert_eq!(ep.record_failure(now, &policy, false), Verdict::Kept);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_raise_load_and_decay() {
        let ep = endpoint();
        let now = Instant::now();
        let base = ep.load(now);
        ep.record_failure(now, &OutlierDetection::default(), false);
        assert!(ep.load(now) > 4.0 * base);
        assert!(ep.load(now + Duration::from_secs(30)) < 1.01 * base);
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_backoff_grows_and_caps() {
        let ep = endpoint();
        let config = EndpointConfig::default();
        let now = Instant::now();
        let first = ep.record_connect_failure(now, &config, String::new());
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
        let mut last = first;
        for _ in 0..20 {
            last = ep.record_connect_failure(now, &config, String::new());
        }
        assert!(
            last <= Duration::from_secs(144) && last >= Duration::from_secs(96),
            "{last:?}"
        );
        ep.record_success(now);
        assert!(ep.is_eligible(now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_flight_at_the_ejection_does_not_end_it_by_succeeding() {
        let ep = endpoint();
        let policy = OutlierDetection::default();
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        let now = Instant::now();
        for _ in 0..policy.consecutive_failures {
            ep.record_failure(now, &policy, true);
        }
        assert!(ep.is_ejected(now));
        // Sent before the ejection: it stays.
        ep.record_success(sent);
        assert!(ep.is_ejected(now), "an older call's success re-admitted it");
        // Sent after it (a panic-mode pick): re-admitted.
        tokio::time::advance(Duration::from_millis(10)).await;
        ep.record_success(Instant::now());
        assert!(!ep.is_ejected(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_late_for_the_endpoint_mark_it_slow_at_once() {
        let ep = Arc::new(endpoint());
        let start = Instant::now();
        ep.observe_rtt(Duration::from_millis(20), 1, start);
        let typical = ep.typical_rtt();
        let first = ep.start();
        tokio::time::advance(Duration::from_millis(50)).await;
        let now = Instant::now();
        assert_eq!(ep.in_flight_age(now), Duration::from_millis(50));
        // 50 ms is not late for a 20 ms endpoint (under 4 × typical).
        assert_eq!(ep.latency_now(now), typical);
        tokio::time::advance(Duration::from_millis(150)).await;
        let second = ep.start();
        let now = Instant::now();
        // Mean age of the two: (200 + 0) / 2 = 100 ms, over 80 ms: late.
        assert_eq!(ep.in_flight_age(now), Duration::from_millis(100));
        assert_eq!(ep.latency_now(now), 100e6);
        assert!(ep.load(now) >= 100e6 * 3.0, "{}", ep.load(now));
        let _ = first.answered();
        // The young one left: not late, back to the typical latency.
        assert_eq!(ep.in_flight_age(now), Duration::ZERO);
        assert_eq!(ep.latency_now(now), typical);
        let _ = second.answered();
        assert_eq!(ep.in_flight_age(now), Duration::ZERO);
        assert_eq!(ep.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_endpoint_is_not_late_below_the_floor() {
        // A 100 µs endpoint with a call stalled 5 ms (a busy host): over
        // 4 × typical, but under the 10 ms floor.
        let ep = Arc::new(endpoint());
        ep.observe_rtt(Duration::from_micros(100), 1, Instant::now());
        let _call = ep.start();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(ep.latency_now(Instant::now()), ep.typical_rtt());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(ep.latency_now(Instant::now()) >= 15e6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shed_answer_raises_the_penalty_but_never_ejects() {
        let ep = endpoint();
        let policy = OutlierDetection::default();
        let now = Instant::now();
        let base = ep.load(now);
        for _ in 0..20 {
            ep.record_shed(now);
        }
        let capped = 1.0 + PENALTY_WEIGHT * MAX_SHED_PENALTY;
        assert!(ep.load(now) > 0.99 * capped * base, "penalised");
        for _ in 0..1000 {
            ep.record_shed(now);
        }
        assert!(
            ep.load(now) < 1.01 * capped * base,
            "a burst of refusals is capped: {} > {capped}",
            ep.load(now) / base
        );
        assert!(ep.is_eligible(now), "never ejected for shedding");
        // Sheds are not failures in a row: four failures still keep it.
        for _ in 0..4 {
            assert_eq!(ep.record_failure(now, &policy, true), Verdict::Kept);
        }
        assert!(
            ep.load(now + Duration::from_secs(60)) < 1.01 * base,
            "decays"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_cut_short_before_it_is_late_for_the_endpoint_is_no_news() {
        // An endpoint taking 100 ms a call; a hedge's loser there is cut
        // short: no news, so the estimate goes on decaying from the last
        // answer.
        let ep = Arc::new(endpoint());
        ep.observe_rtt(Duration::from_millis(100), 1, Instant::now());
        let per_call = |ep: &Endpoint| ep.load(Instant::now()) / ep.queue_cost(Instant::now());
        // Decayed to about 37 ms a call; a loser cut at 100 ms (over that,
        // so news would raise it; under 4 x it, so it is not late).
        tokio::time::advance(RTT_DECAY).await;
        let loser = ep.start();
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(loser);
        let idle = RTT_DECAY + Duration::from_millis(100);
        let expected = 100e6 * (-idle.as_secs_f64() / RTT_DECAY.as_secs_f64()).exp();
        assert!((per_call(&ep) - expected).abs() < 1e3, "{}", per_call(&ep));
        // One that waited 500 ms (over 4 x its expected latency, now about
        // 37 ms) is late: news of at least 500 ms a call.
        let late = ep.start();
        tokio::time::advance(Duration::from_millis(500)).await;
        drop(late);
        assert!((per_call(&ep) - 500e6).abs() < 1e3, "{}", per_call(&ep));
    }

    #[tokio::test(start_paused = true)]
    async fn the_latency_estimate_follows_answers_and_decays_while_none_come() {
        let ep = Arc::new(endpoint());
        let now = Instant::now();
        assert!(!ep.measured());
        ep.observe_rtt(Duration::from_millis(20), 1, now);
        assert!(ep.measured());
        let slow = ep.load(now);
        assert_eq!(slow, 20e6);
        // No news for a decay window: e^-1 of it, so it is tried again.
        let idle = ep.load(now + RTT_DECAY);
        assert!((idle / slow - (-1f64).exp()).abs() < 1e-9, "{idle}");
        // Idle for days, it still orders by its penalty.
        let days = now + Duration::from_secs(3 * 86_400);
        assert!(ep.load(days) > 0.0);
        let later = now + Duration::from_secs(30);
        ep.observe_rtt(Duration::from_millis(1), 1, later);
        assert!((ep.load(later) / ep.queue_cost(later) - 1e6).abs() < 1e3);
        // An answer in 8 ms sent with three other calls in flight is 2 ms
        // per call, so one more beside those three is 2 × 4 = 8 ms, not
        // 8 × 4: the queue the answer waited in is counted once.
        let after = later + Duration::from_secs(30);
        let calls: Vec<_> = (0..3).map(|_| ep.start_at(after)).collect();
        ep.observe_rtt(Duration::from_millis(8), 4, after);
        let one_more = ep.load(after) / ep.queue_cost(after) * 4.0;
        assert!((one_more - 8e6).abs() < 1e3, "{one_more}");
        for call in calls {
            let _ = call.answered();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_ends_unanswered_raises_the_estimate_to_its_age() {
        let ep = Arc::new(endpoint());
        ep.observe_rtt(Duration::from_millis(1), 1, Instant::now());
        let per_call = |ep: &Endpoint| ep.load(Instant::now()) / ep.queue_cost(Instant::now());
        // Two calls hang for 10 s (their deadline), then are given up. The
        // first was sent alone: at least 10 s per call (5 s if it were
        // judged by the two in flight when it ended), not decayed (the
        // endpoint gave news). The second, sent beside it, is not late for
        // an endpoint now expected to take 10 s a call: no more news.
        let [first, second] = [ep.start(), ep.start()];
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(first);
        assert!((per_call(&ep) - 10e9).abs() < 1e6, "{}", per_call(&ep));
        assert_eq!(ep.typical_rtt(), 1e6, "judging likeness is left to answers");
        drop(second);
        assert!((per_call(&ep) - 10e9).abs() < 1e6, "{}", per_call(&ep));
        // An answered call lowers nothing by being dropped...
        let answered = ep.start();
        tokio::time::advance(Duration::from_secs(20)).await;
        let _ = answered.answered();
        // ...and the estimate decays from the last news (20 s, e^-2).
        let decayed = per_call(&ep) / 10e9;
        assert!((decayed - (-2f64).exp()).abs() < 1e-3, "{decayed}");
        // A call that ends unanswered before it is late (a hedge's loser, a
        // refused connection) is no news: the decay goes on.
        let cut_short = ep.start();
        drop(cut_short);
        assert!((per_call(&ep) / 10e9 - decayed).abs() < 1e-3);
        // A slow error answer raises the estimate (from its decayed value)...
        ep.observe_at_least(Duration::from_secs(3), 1, Instant::now());
        assert!((per_call(&ep) - 3e9).abs() < 1e6, "{}", per_call(&ep));
        // ...and a fast one does not lower it.
        ep.observe_at_least(Duration::from_micros(50), 1, Instant::now());
        assert!((per_call(&ep) - 3e9).abs() < 1e6, "{}", per_call(&ep));
    }
}
