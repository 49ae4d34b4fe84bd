//! Golden metrics, in a Prometheus registry behind a cheap handle.
//!
//! A [`Metrics`] is a handle to one registry. The assembly (a `Mesh`, a
//! `MeshServer`) holds one and passes it to the layers it builds; nothing
//! below reaches for a global. By default every mesh and server of a
//! process shares the process default ([`metrics()`]), like a sidecar that
//! exports one set per pod; [`Metrics::new`] gives a mesh a registry of its
//! own (two meshes in one process, tests).
//!
//! Gauges that describe live state (endpoints per state, certificate
//! expiry) are not kept up per call: their owners register as a
//! [`GaugeSource`] and are asked at each scrape. This module knows no
//! owner's type, so it imports nothing from the layers that record here.
//!
//! Label values are bounded: methods are those of the registered contracts
//! (others are `unknown`), peers are target names or verified SPIFFE IDs,
//! codes are the 17 gRPC codes. No request ids, addresses of callers or
//! user input.

use std::{
    sync::{Arc, Mutex, OnceLock, RwLock, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tonic::Code;

use crate::methods::RpcPath;

/// Which way a call went, seen from this process.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// A call this process received.
    Inbound,
    /// A call this process made.
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Labels of request, latency and in-flight series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RpcLabels {
    direction: &'static str,
    peer: Arc<str>,
    rpc_service: Arc<str>,
    rpc_method: Arc<str>,
    #[prometheus(flatten)]
    route: RouteLabels,
}

/// [`RpcLabels`] plus the call's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResponseLabels {
    direction: &'static str,
    peer: Arc<str>,
    rpc_service: Arc<str>,
    rpc_method: Arc<str>,
    #[prometheus(flatten)]
    route: RouteLabels,
    grpc_code: &'static str,
}

/// The `route` and `backend` labels of a routed outbound call (both from
/// the config: a route's name and a backend's target); none on calls no
/// route took, whose series keep the labels they always had.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub(crate) struct RouteLabels(pub(crate) Option<(Arc<str>, Arc<str>)>);

impl prometheus_client::encoding::EncodeLabelSet for RouteLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some((route, backend)) => {
                [("route", &**route), ("backend", &**backend)].encode(encoder)
            }
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    peer: Arc<str>,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    rpc_service: Arc<str>,
    rpc_method: Arc<str>,
    caller: Arc<str>,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// Labels of `mesh_fallbacks_total` (see `optional`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    peer: Arc<str>,
    rpc_service: &'static str,
    rpc_method: &'static str,
    reason: &'static str,
}

/// Labels of `mesh_client_faults_injected_total` (see `fault`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientFaultLabels {
    peer: Arc<str>,
    kind: &'static str,
}

/// Labels of `mesh_server_faults_injected_total`: the rule's configured
/// name (bounded by the config), not the caller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerFaultLabels {
    rule: Arc<str>,
    kind: &'static str,
}

/// Labels of `mesh_client_mirrored_total` (see `mirror`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorLabels {
    peer: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    service: String,
    identity: String,
}

/// Latency bucket bounds in seconds: fine below a millisecond, where
/// loopback and in-cluster calls live, up to the longest default deadlines.
const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A handle to a registry of golden metrics; clones share the registry.
///
/// [`metrics()`] is the process default, which every mesh and server uses
/// unless given another with `Mesh::with_metrics` or
/// `MeshServer::metrics`.
#[derive(Clone)]
pub struct Metrics(Arc<Registered>);

/// The registry and the families it serves.
struct Registered {
    registry: RwLock<Registry>,
    requests: Family<RpcLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: Family<RpcLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<RpcLabels, Gauge>,
    retries: Family<RpcLabels, Counter>,
    hedges: Family<RpcLabels, Counter>,
    budget_exhausted: Family<PeerLabels, Counter>,
    ejections: Family<PeerLabels, Counter>,
    endpoints: Family<EndpointLabels, Gauge>,
    subset_size: Family<PeerLabels, Gauge>,
    denials: Family<DenialLabels, Counter>,
    config_reloads: Family<OutcomeLabels, Counter>,
    handshake_failures: Family<OutcomeLabels, Counter>,
    cert_expiry: Family<IdentityLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    process: Family<ProcessLabels, Gauge>,
    fallbacks: Family<FallbackLabels, Counter>,
    client_faults: Family<ClientFaultLabels, Counter>,
    server_faults: Family<ServerFaultLabels, Counter>,
    mirrored: Family<MirrorLabels, Counter>,
    // Asked on each scrape; weak so a dropped channel's set goes away.
    sources: Mutex<Vec<Weak<dyn GaugeSource>>>,
    service: Mutex<Option<String>>,
    scrape: Mutex<()>,
}

/// Live state read into gauges at each scrape, registered by its owner
/// with [`Metrics::add_source`] (an endpoint set, a certificate).
///
/// Not prometheus-client's `Collector`: two channels naming the same peer
/// add up into one series, and a collector per owner would encode the
/// family once per owner.
pub(crate) trait GaugeSource: Send + Sync {
    /// Reports the current state.
    fn collect(&self, scrape: &mut Scrape<'_>);
}

/// What [`GaugeSource`]s report into during one scrape.
pub(crate) struct Scrape<'a> {
    endpoints: &'a Family<EndpointLabels, Gauge>,
    subset_size: &'a Family<PeerLabels, Gauge>,
    certificates: Vec<(String, SystemTime)>,
}

impl Scrape<'_> {
    /// `count` endpoints of the target named `peer` are in `state`
    /// (`ready`, `ejected`, `reconnecting` or `unhealthy`).
    pub(crate) fn endpoints(&mut self, peer: &Arc<str>, state: &'static str, count: i64) {
        self.endpoints
            .get_or_create(&EndpointLabels {
                peer: peer.clone(),
                state,
            })
            // Two channels may name the same peer: their endpoints add up.
            .inc_by(count);
    }

    /// The target named `peer` connects to a subset of `size` endpoints.
    pub(crate) fn subset_size(&mut self, peer: &Arc<str>, size: i64) {
        self.subset_size
            .get_or_create(&PeerLabels { peer: peer.clone() })
            .inc_by(size);
    }

    /// A workload certificate of `identity` expiring at `expires_at`.
    pub(crate) fn certificate(&mut self, identity: String, expires_at: SystemTime) {
        self.certificates.push((identity, expires_at));
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    /// A registry of its own (the same as [`Metrics::new`]).
    fn default() -> Self {
        Self::new()
    }
}

/// The process default metrics, created on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    /// A registry of its own, with every mesh metric registered and no
    /// series yet: for a mesh whose series must not mix with others of the
    /// process (most code uses the process default, [`metrics()`]).
    pub fn new() -> Self {
        let metrics = Registered {
            registry: RwLock::new(Registry::with_prefix("mesh")),
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            retries: Family::default(),
            hedges: Family::default(),
            budget_exhausted: Family::default(),
            ejections: Family::default(),
            endpoints: Family::default(),
            subset_size: Family::default(),
            denials: Family::default(),
            config_reloads: Family::default(),
            handshake_failures: Family::default(),
            cert_expiry: Family::default(),
            process: Family::default(),
            fallbacks: Family::default(),
            client_faults: Family::default(),
            server_faults: Family::default(),
            mirrored: Family::default(),
            sources: Mutex::default(),
            service: Mutex::default(),
            scrape: Mutex::default(),
        };
        {
            let mut r = metrics.registry.write().expect("registry lock");
            r.register(
                "requests",
                "Calls started, by direction, peer and method",
                metrics.requests.clone(),
            );
            r.register(
                "responses",
                "Calls finished, by direction, peer, method and gRPC status code",
                metrics.responses.clone(),
            );
            r.register_with_unit(
                "response_latency",
                "Time from request to the end of the response (its trailers)",
                Unit::Seconds,
                metrics.latency.clone(),
            );
            r.register(
                "in_flight_requests",
                "Calls started and not yet finished",
                metrics.in_flight.clone(),
            );
            r.register(
                "retries",
                "Retry attempts sent (not counting first attempts)",
                metrics.retries.clone(),
            );
            r.register(
                "hedges",
                "Hedged attempts sent (not counting first attempts)",
                metrics.hedges.clone(),
            );
            r.register(
                "retry_budget_exhausted",
                "Retries or hedges not sent because the retry budget was spent",
                metrics.budget_exhausted.clone(),
            );
            r.register(
                "endpoint_ejections",
                "Endpoints ejected for consecutive failures",
                metrics.ejections.clone(),
            );
            r.register(
                "endpoints",
                "Endpoints per target by state (ready, ejected, reconnecting, unhealthy; outside_subset: resolved, not connected)",
                metrics.endpoints.clone(),
            );
            r.register(
                "subset_size",
                "Endpoints each subsetting target connects to (its size, more while widened)",
                metrics.subset_size.clone(),
            );
            r.register(
                "authorization_denials",
                "Inbound calls the authorization policy denied (or would deny, in audit mode)",
                metrics.denials.clone(),
            );
            r.register(
                "config_reloads",
                "Changes of the mesh config file, applied or refused (the last good config stays)",
                metrics.config_reloads.clone(),
            );
            r.register(
                "tls_handshake_failures",
                "Inbound TLS handshakes that failed (refused or timed out), logged or not",
                metrics.handshake_failures.clone(),
            );
            r.register_with_unit(
                "certificate_expiry_timestamp",
                "When this workload's certificate expires (Unix time)",
                Unit::Seconds,
                metrics.cert_expiry.clone(),
            );
            r.register(
                "fallbacks",
                "Calls to an optional dependency answered without it (deadline, unavailable, error, open)",
                metrics.fallbacks.clone(),
            );
            r.register(
                "client_faults_injected",
                "Outbound calls given an injected fault by a route, by peer and kind (delay, abort)",
                metrics.client_faults.clone(),
            );
            r.register(
                "server_faults_injected",
                "Inbound calls given an injected fault by a serverFaults rule, by rule and kind (delay, abort)",
                metrics.server_faults.clone(),
            );
            r.register(
                "client_mirrored",
                "Calls picked for mirroring, by shadow peer and outcome (sent; not sent: dropped, too many copies in flight; too_large, body over maxReplayBytes; ineligible, method not NO_SIDE_EFFECTS, client-streaming or unknown; and failed: a sent copy ended in an error or its time limit)",
                metrics.mirrored.clone(),
            );
            r.register(
                "process_info",
                "The service this process runs and its workload identity",
                metrics.process.clone(),
            );
        }
        Self(Arc::new(metrics))
    }

    /// Registers more metrics (the application's own) to be served with
    /// the mesh's on the admin port. Names get the `mesh_` prefix.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.0.registry.write().expect("registry lock"));
    }

    /// Names the service this process runs in `mesh_process_info` (with
    /// its workload identity once mTLS is on); the live view labels the
    /// process with it.
    pub fn set_service(&self, service: &str) {
        *self.0.service.lock().expect("metrics lock") = Some(service.to_owned());
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        // One scrape at a time: gauges are cleared and refilled for each.
        let _scrape = self.0.scrape.lock().expect("scrape lock");
        self.refresh_gauges();
        let mut out = String::new();
        encode(&mut out, &self.0.registry.read().expect("registry lock"))
            .expect("writing to a String cannot fail");
        out
    }

    /// The sum of the series `name` whose labels include `labels` (0 if
    /// none), for tests.
    #[cfg(test)]
    pub(crate) fn sum_of(&self, name: &str, labels: &str) -> u64 {
        let prefix = format!("{name}{{");
        self.encode()
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Gauges read from live state at scrape time, not kept up per call.
    fn refresh_gauges(&self) {
        let m = &*self.0;
        let sources: Vec<Arc<dyn GaugeSource>> = {
            let mut sources = m.sources.lock().expect("metrics lock");
            sources.retain(|s| s.strong_count() > 0);
            sources.iter().filter_map(Weak::upgrade).collect()
        };
        m.endpoints.clear();
        m.subset_size.clear();
        let mut scrape = Scrape {
            endpoints: &m.endpoints,
            subset_size: &m.subset_size,
            certificates: Vec::new(),
        };
        for source in sources {
            source.collect(&mut scrape);
        }
        m.cert_expiry.clear();
        m.process.clear();
        if let Some(service) = m.service.lock().expect("metrics lock").clone() {
            let identity = scrape.certificates.first().map(|(id, _)| id.clone());
            m.process
                .get_or_create(&ProcessLabels {
                    service,
                    identity: identity.unwrap_or_default(),
                })
                .set(1);
        }
        for (identity, expires_at) in scrape.certificates {
            let at = expires_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            m.cert_expiry
                .get_or_create(&IdentityLabels { identity })
                .set(at.as_secs_f64());
        }
    }

    /// Asks `source` for its gauges at every scrape while it lives (held
    /// weakly; registering the same source twice counts it once).
    pub(crate) fn add_source<T: GaugeSource + 'static>(&self, source: &Arc<T>) {
        let mut sources = self.0.sources.lock().expect("metrics lock");
        let ptr = Arc::as_ptr(source) as *const ();
        if !sources.iter().any(|s| s.as_ptr() as *const () == ptr) {
            let weak: Weak<dyn GaugeSource> = Arc::downgrade(source) as Weak<dyn GaugeSource>;
            sources.push(weak);
        }
    }

    /// Counts a retry or hedge of a call to `path`. Only methods in the
    /// mesh's registered descriptors are retried or hedged, so the paths
    /// counted here are bounded by the contracts.
    pub(crate) fn retry(&self, peer: &Arc<str>, path: &str, hedge: bool) {
        let labels = &RpcLabels::new(Direction::Outbound, peer.clone(), &RpcPath::parse(path));
        if hedge {
            self.0.hedges.get_or_create(labels).inc();
        } else {
            self.0.retries.get_or_create(labels).inc();
        }
    }

    pub(crate) fn budget_exhausted(&self, peer: &Arc<str>) {
        self.0
            .budget_exhausted
            .get_or_create(&PeerLabels { peer: peer.clone() })
            .inc();
    }

    /// One call to an optional dependency answered without it.
    pub(crate) fn fallback(
        &self,
        peer: &Arc<str>,
        rpc_service: &'static str,
        rpc_method: &'static str,
        reason: &'static str,
    ) {
        self.0
            .fallbacks
            .get_or_create(&FallbackLabels {
                peer: peer.clone(),
                rpc_service,
                rpc_method,
                reason,
            })
            .inc();
    }

    #[cfg(test)]
    pub(crate) fn fallback_count(
        &self,
        peer: &str,
        rpc_service: &'static str,
        rpc_method: &'static str,
        reason: &'static str,
    ) -> u64 {
        self.0
            .fallbacks
            .get_or_create(&FallbackLabels {
                peer: Arc::from(peer),
                rpc_service,
                rpc_method,
                reason,
            })
            .get()
    }

    /// A route injected a fault (`kind`: `delay` or `abort`) into a call to `peer`.
    pub(crate) fn client_fault(&self, peer: &Arc<str>, kind: &'static str) {
        self.0
            .client_faults
            .get_or_create(&ClientFaultLabels {
                peer: peer.clone(),
                kind,
            })
            .inc();
    }

    /// The `serverFaults` rule `rule` injected a fault into an inbound call.
    pub(crate) fn server_fault(&self, rule: &Arc<str>, kind: &'static str) {
        self.0
            .server_faults
            .get_or_create(&ServerFaultLabels {
                rule: rule.clone(),
                kind,
            })
            .inc();
    }

    /// A call picked for mirroring to `peer` ended as `outcome`.
    pub(crate) fn mirrored(&self, peer: &Arc<str>, outcome: &'static str) {
        self.0
            .mirrored
            .get_or_create(&MirrorLabels {
                peer: peer.clone(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn ejected(&self, peer: &Arc<str>) {
        self.0
            .ejections
            .get_or_create(&PeerLabels { peer: peer.clone() })
            .inc();
    }

    /// A changed mesh config file was `applied` or `refused`.
    pub(crate) fn config_reload(&self, outcome: &'static str) {
        self.0
            .config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// An inbound TLS handshake was `refused` or `timed_out`.
    pub(crate) fn handshake_failed(&self, outcome: &'static str) {
        self.0
            .handshake_failures
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn denied(&self, path: &RpcPath, caller: Option<&str>, audit: bool) {
        self.0
            .denials
            .get_or_create(&DenialLabels {
                rpc_service: path.service.clone(),
                rpc_method: path.method.clone(),
                caller: Arc::from(caller.unwrap_or("unauthenticated")),
                mode: if audit { "audit" } else { "enforce" },
            })
            .inc();
    }
}

/// The series one (direction, peer, method) records into, resolved once and
/// cached so a call costs no label hashing.
#[derive(Debug)]
pub(crate) struct CallSeries {
    pub(crate) labels: RpcLabels,
    requests: Counter,
    latency: Histogram,
    in_flight: Gauge,
    responses: [OnceLock<Counter>; 17],
    families: Family<ResponseLabels, Counter>,
    /// `service/method`, the name of the call's span: made once per series,
    /// not formatted again for every call.
    span_name: Arc<str>,
}

impl RpcLabels {
    /// The service label, shared (a span attribute without a copy).
    pub(crate) fn rpc_service_shared(&self) -> Arc<str> {
        self.rpc_service.clone()
    }

    /// The method label, shared.
    pub(crate) fn rpc_method_shared(&self) -> Arc<str> {
        self.rpc_method.clone()
    }

    fn new(direction: Direction, peer: Arc<str>, path: &RpcPath) -> Self {
        Self {
            direction: direction.as_str(),
            peer,
            rpc_service: path.service.clone(),
            rpc_method: path.method.clone(),
            route: RouteLabels::default(),
        }
    }
}

impl CallSeries {
    pub(crate) fn new(
        metrics: &Metrics,
        direction: Direction,
        peer: Arc<str>,
        path: &RpcPath,
        route: RouteLabels,
    ) -> Self {
        let m = &*metrics.0;
        let labels = RpcLabels {
            route,
            ..RpcLabels::new(direction, peer, path)
        };
        let span_name = format!("{}/{}", labels.rpc_service, labels.rpc_method).into();
        Self {
            span_name,
            requests: m.requests.get_or_create_owned(&labels),
            latency: m.latency.get_or_create_owned(&labels),
            in_flight: m.in_flight.get_or_create_owned(&labels),
            labels,
            responses: Default::default(),
            families: m.responses.clone(),
        }
    }

    /// The span name of calls in this series: `service/method`.
    pub(crate) fn span_name(&self) -> &str {
        &self.span_name
    }

    /// Whether a call by `peer` to `path` without a route records here:
    /// these labels are exactly the ones [`RpcPath::parse`] gives `path`
    /// (so the shared cache would return a series with these very labels).
    pub(crate) fn is_for(&self, peer: &str, path: &str) -> bool {
        let l = &self.labels;
        l.route.0.is_none()
            && *l.peer == *peer
            && path
                .strip_prefix('/')
                .and_then(|p| p.strip_prefix(&*l.rpc_service))
                .and_then(|p| p.strip_prefix('/'))
                == Some(&*l.rpc_method)
    }

    pub(crate) fn started(&self) {
        self.requests.inc();
        self.in_flight.inc();
    }

    pub(crate) fn finished(&self, code: Code, elapsed: Duration) {
        self.in_flight.dec();
        self.latency.observe(elapsed.as_secs_f64());
        self.responses[code as usize]
            .get_or_init(|| {
                let l = &self.labels;
                self.families.get_or_create_owned(&ResponseLabels {
                    direction: l.direction,
                    peer: l.peer.clone(),
                    rpc_service: l.rpc_service.clone(),
                    rpc_method: l.rpc_method.clone(),
                    route: l.route.clone(),
                    grpc_code: code_name(code),
                })
            })
            .inc();
    }
}

/// The canonical name of a gRPC status code, as in the gRPC spec and
/// OpenTelemetry's conventions.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
