//! One endpoint: a single HTTP/2 connection to one address, its load
//! estimate, and the failure bookkeeping that ejects it or backs off its
//! reconnects.
//!
//! The load estimate is tower's peak-EWMA (Finagle's) over response latency,
//! multiplied by in-flight requests and by a decaying failure penalty, so a
//! replica that fails fast does not look like the fastest one. It is kept
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
pub(crate) use conn::{ClientConn, authority_of, never_processed};
pub(crate) use health::watch_health;

use crate::config::{EndpointConfig, OutlierDetection};

/// Decay window of the latency estimate (tower's default for PeakEwma).
const RTT_DECAY: Duration = Duration::from_secs(10);
/// Decay window of the typical (mean) latency that judges whether two
/// endpoints are alike: short, so it follows the endpoint's latency now,
/// and not peak-sensitive, so scheduling stalls on a busy host do not make
/// every endpoint look alike (see `balance::lighter`).
const TYPICAL_RTT_DECAY: Duration = Duration::from_secs(1);
/// Latency assumed for an endpoint with no measurements yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Half-life of the failure penalty.
const PENALTY_HALF_LIFE: Duration = Duration::from_secs(2);
/// Load multiplier per unit of (decayed) recent failures.
const PENALTY_WEIGHT: f64 = 4.0;

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
    in_flight: AtomicU32,
    health: AtomicU8,
    /// Peak-EWMA latency (f64 bits, ns) and when it was last updated (ns
    /// since `born`): atomics, so the success path takes no lock.
    rtt_ns: AtomicU64,
    rtt_at: AtomicU64,
    /// Plain EWMA latency (f64 bits, ns) over [`TYPICAL_RTT_DECAY`].
    typical_rtt_ns: AtomicU64,
    born: Instant,
    /// Set while `state` holds any failure bookkeeping; when clear, the
    /// endpoint is eligible and unpenalised without looking at `state`.
    troubled: AtomicBool,
    state: Mutex<State>,
    health_task: Mutex<Option<tokio::task::AbortHandle>>,
}

struct State {
    penalty: f64,
    penalty_at: Instant,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
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
            in_flight: AtomicU32::new(0),
            health: AtomicU8::new(HEALTH_UNKNOWN),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            rtt_at: AtomicU64::new(0),
            typical_rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            born: now,
            troubled: AtomicBool::new(false),
            state: Mutex::new(State {
                penalty: 0.0,
                penalty_at: now,
                consecutive_failures: 0,
                ejections: 0,
                ejected_until: None,
                connect_failures: 0,
                backoff_until: None,
                last_connect_error: None,
            }),
            health_task: Mutex::new(None),
        }
    }

    pub(crate) fn set_health_task(&self, handle: tokio::task::AbortHandle) {
        *self.health_task.lock().expect("endpoint lock") = Some(handle);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("endpoint lock poisoned")
    }

    /// Whether new calls may go here now.
    pub(crate) fn is_eligible(&self, now: Instant) -> bool {
        if self.health.load(Ordering::Relaxed) == HEALTH_NOT_SERVING {
            return false;
        }
        if !self.troubled.load(Ordering::Relaxed) {
            return true;
        }
        let state = self.state();
        state.ejected_until.is_none_or(|t| now >= t) && state.backoff_until.is_none_or(|t| now >= t)
    }

    /// Whether the endpoint waits to reconnect after failed connections.
    pub(crate) fn is_reconnecting(&self, now: Instant) -> bool {
        self.troubled.load(Ordering::Relaxed) && self.state().backoff_until.is_some_and(|t| now < t)
    }

    /// Why the last connection attempt failed, while backing off.
    pub(crate) fn last_connect_error(&self) -> Option<String> {
        if !self.troubled.load(Ordering::Relaxed) {
            return None;
        }
        self.state().last_connect_error.clone()
    }

    /// Whether the endpoint is ejected now.
    #[cfg(test)]
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.troubled.load(Ordering::Relaxed) && self.state().ejected_until.is_some_and(|t| now < t)
    }

    /// Peak-EWMA latency × (in-flight + 1) × failure penalty.
    pub(crate) fn load(&self, now: Instant) -> f64 {
        self.rtt_estimate() * self.queue_cost(now)
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The peak-EWMA latency estimate, in nanoseconds.
    pub(crate) fn rtt_estimate(&self) -> f64 {
        f64::from_bits(self.rtt_ns.load(Ordering::Relaxed))
    }

    /// The typical (mean, short-window) latency, in nanoseconds.
    pub(crate) fn typical_rtt(&self) -> f64 {
        f64::from_bits(self.typical_rtt_ns.load(Ordering::Relaxed))
    }

    /// (in-flight + 1) × failure penalty: the load before latency is weighed.
    pub(crate) fn queue_cost(&self, now: Instant) -> f64 {
        let pending = f64::from(self.in_flight.load(Ordering::Relaxed)) + 1.0;
        let penalty = if self.troubled.load(Ordering::Relaxed) {
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
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Feeds one response latency into the peak-EWMA and typical estimates.
    pub(crate) fn observe_rtt(&self, rtt: Duration, now: Instant) {
        // Racing updates may lose one sample; an estimate does not need more.
        let at = now.saturating_duration_since(self.born).as_nanos() as u64;
        let last = self.rtt_at.load(Ordering::Relaxed);
        let elapsed = at.saturating_sub(last) as f64;
        let previous = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let rtt = rtt.as_nanos() as f64;
        let next = if rtt > previous {
            // Peak: jump up at once, so a slowing endpoint is avoided quickly.
            rtt
        } else {
            let weight = (-elapsed / RTT_DECAY.as_nanos() as f64).exp();
            previous * weight + rtt * (1.0 - weight)
        };
        let typical = f64::from_bits(self.typical_rtt_ns.load(Ordering::Relaxed));
        // The first measurement replaces the default outright.
        let weight = if last == 0 {
            0.0
        } else {
            (-elapsed / TYPICAL_RTT_DECAY.as_nanos() as f64).exp()
        };
        let typical = typical * weight + rtt * (1.0 - weight);
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.typical_rtt_ns
            .store(typical.to_bits(), Ordering::Relaxed);
        self.rtt_at.store(at.max(1), Ordering::Relaxed);
    }

    pub(crate) fn record_success(&self) {
        if !self.troubled.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.state();
        state.consecutive_failures = 0;
        state.connect_failures = 0;
        state.backoff_until = None;
        if state.ejected_until.take().is_some() {
            // Re-admitted and healthy: the next ejection starts shorter again.
            state.ejections = state.ejections.saturating_sub(1);
        }
        if state.ejections == 0 && state.penalty_at.elapsed() > 8 * PENALTY_HALF_LIFE {
            self.troubled.store(false, Ordering::Relaxed);
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
        let mut state = self.state();
        self.troubled.store(true, Ordering::Relaxed);
        state.penalty = decay(
            state.penalty,
            now.saturating_duration_since(state.penalty_at),
        ) + 1.0;
        state.penalty_at = now;
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
        Verdict::Ejected(time)
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
        self.troubled.store(true, Ordering::Relaxed);
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
        self.health.store(value, Ordering::Relaxed);
    }

    /// Whether the health watch has seen the endpoint SERVING (so its
    /// connection is up), or its server has no health service.
    pub(crate) fn is_serving(&self) -> bool {
        self.health.load(Ordering::Relaxed) == HEALTH_SERVING
    }

    pub(crate) fn is_not_serving(&self) -> bool {
        self.health.load(Ordering::Relaxed) == HEALTH_NOT_SERVING
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
            serving: match self.health.load(Ordering::Relaxed) {
                HEALTH_SERVING => Some(true),
                HEALTH_NOT_SERVING => Some(false),
                _ => None,
            },
            in_flight: self.in_flight.load(Ordering::Relaxed),
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

/// A call in flight on an endpoint.
pub(crate) struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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
        assert!(ep.is_eligible(now + Duration::from_secs(5)));
        for _ in 0..4 {
            ep.record_failure(now, &policy, true);
        }
        assert_eq!(
            ep.record_failure(now, &policy, true),
            Verdict::Ejected(Duration::from_secs(10))
        );
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
        ep.record_success();
        assert!(ep.is_eligible(now));
    }

    #[tokio::test(start_paused = true)]
    async fn latency_peaks_up_and_decays_down() {
        let ep = endpoint();
        let now = Instant::now();
        ep.observe_rtt(Duration::from_millis(20), now);
        let slow = ep.load(now);
        ep.observe_rtt(Duration::from_millis(1), now + Duration::from_secs(30));
        assert!(ep.load(now + Duration::from_secs(30)) < slow / 5.0);
    }
}
