//! Mesh policy: process-wide defaults, per-target and per-method overrides.
//!
//! The file is JSON with camelCase keys; where gRPC's service config has a
//! name for a knob (`maxAttempts`, `initialBackoff`, `retryableStatusCodes`,
//! `hedgingPolicy`, `retryThrottling`-like budgets) the same name is used.
//! Unknown keys are rejected, and every error names the field.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Deserialize;
use tonic::Code;

use crate::error::MeshError;

mod route;
pub(crate) mod text;

pub use route::{
    BackendRef, HeaderMatch, HeaderMatchType, MethodMatch, MethodMatchType, RouteConfig, RouteMatch,
};
pub(crate) use route::{compile_regex, matches_of};
pub(crate) use text::{codes, duration_str};

/// The longest deadline a call gets when nothing configures one (30 s):
/// long enough for any unary call of the shop, short enough that a caller
/// cannot pin work in every service of a chain for hours.
pub const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(30);

/// The live config, swapped whole on reload; calls take a cheap snapshot.
///
/// What a [`crate::Mesh`] hands its layers (and a user hands a layer taken
/// alone, such as [`crate::retry::RetryLayer`]): each call reads the config
/// in force at that moment, so a reload applies from the next call.
#[derive(Clone, Debug)]
pub struct ConfigHandle(Arc<RwLock<Arc<MeshConfig>>>);

impl ConfigHandle {
    /// A handle holding `config`, validated here.
    pub fn new(config: MeshConfig) -> Result<Self, MeshError> {
        config.validate()?;
        Ok(Self::new_validated(config))
    }

    pub(crate) fn new_validated(config: MeshConfig) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(config))))
    }

    /// The config in force now.
    pub fn load(&self) -> Arc<MeshConfig> {
        self.0.read().expect("config lock").clone()
    }

    /// Replaces the config (validated here); calls use it from their next
    /// attempt.
    pub fn reload(&self, config: MeshConfig) -> Result<(), MeshError> {
        config.validate()?;
        self.store(config);
        Ok(())
    }

    pub(crate) fn store(&self, config: MeshConfig) {
        *self.0.write().expect("config lock") = Arc::new(config);
    }
}

/// Process-wide mesh policy.
///
/// ```json
/// { "defaultTimeout": "5s", "maxTimeout": "30s",
///   "retryPolicy": { "maxAttempts": 3, "initialBackoff": "50ms", "maxBackoff": "1s",
///                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"] },
///   "targets": { "dns:///inventory.shop.svc.cluster.local:50052": {
///       "timeout": "2s",
///       "methods": { "mesh.inventory.v1.InventoryService/GetProduct": {
///           "hedgingPolicy": { "maxAttempts": 2, "hedgingDelay": "20ms" } } } } } }
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Deadline given to a call that has neither an explicit nor an
    /// inherited one. Default 10 s; cut to `maxTimeout` if longer.
    #[serde(with = "duration_str")]
    pub default_timeout: Duration,
    /// The longest deadline any outgoing call gets, whatever asked for it:
    /// an explicit `grpc-timeout`, the deadline inherited from the inbound
    /// call being handled (which an outside caller may have chosen) or a
    /// configured default. Longer ones are cut to this. Default 30 s;
    /// targets and methods may set their own (the most specific wins).
    #[serde(with = "duration_str")]
    pub max_timeout: Duration,
    /// `p2c` (default: power of two choices over latency-weighted load)
    /// or `round_robin`.
    pub load_balancing_policy: LbPolicy,
    /// Retries for methods declared idempotent. See [`RetryPolicy`].
    pub retry_policy: RetryPolicy,
    /// Hedging for idempotent methods; off unless set.
    pub hedging_policy: Option<HedgingPolicy>,
    /// Caps retries and hedges to a share of requests.
    pub retry_budget: RetryBudget,
    /// Ejection of endpoints that keep failing.
    pub outlier_detection: OutlierDetection,
    /// Watch each endpoint's `grpc.health.v1.Health`; default true.
    pub health_checks: bool,
    /// Request bodies up to this size are buffered so they can be replayed
    /// by a retry or hedge; larger ones are sent once. Default 64 KiB.
    pub max_replay_bytes: usize,
    /// How often DNS targets are re-resolved. Default 5 s.
    #[serde(with = "duration_str")]
    pub dns_refresh: Duration,
    /// Connection settings for every endpoint.
    pub endpoint: EndpointConfig,
    /// Per-target overrides, keyed by the target string given to
    /// [`crate::Mesh::channel`].
    pub targets: HashMap<String, TargetConfig>,
    /// Which callers may call which methods of this process's server.
    pub authorization: Option<crate::authz::AuthorizationPolicy>,
    /// Faults this process's server injects into calls it receives, by
    /// caller identity and method (first matching rule wins); applied by a
    /// server built with `MeshServer::server_faults_from`.
    pub server_faults: Vec<crate::fault::ServerFaultRule>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(10),
            max_timeout: DEFAULT_MAX_TIMEOUT,
            load_balancing_policy: LbPolicy::P2c,
            retry_policy: RetryPolicy::default(),
            hedging_policy: None,
            retry_budget: RetryBudget::default(),
            outlier_detection: OutlierDetection::default(),
            health_checks: true,
            max_replay_bytes: 64 * 1024,
            dns_refresh: Duration::from_secs(5),
            endpoint: EndpointConfig::default(),
            targets: HashMap::new(),
            authorization: None,
            server_faults: Vec::new(),
        }
    }
}

/// The balancing policy of a target.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Power of two choices over one more call's expected latency (latency
    /// per call in flight, a short-window mean, × in-flight requests),
    /// penalised by recent failures; between endpoints of similar latency
    /// half the picks are random, so bursts of calls spread out.
    #[default]
    P2c,
    /// Each call to the next endpoint in turn (the benchmark baseline).
    RoundRobin,
}

/// Policy for one target.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TargetConfig {
    /// Default deadline for calls to this target.
    #[serde(with = "duration_str::option")]
    pub timeout: Option<Duration>,
    /// Overrides [`MeshConfig::max_timeout`] for calls to this target.
    #[serde(with = "duration_str::option")]
    pub max_timeout: Option<Duration>,
    /// Overrides [`MeshConfig::load_balancing_policy`].
    pub load_balancing_policy: Option<LbPolicy>,
    /// Overrides [`MeshConfig::retry_policy`].
    pub retry_policy: Option<RetryPolicy>,
    /// Overrides [`MeshConfig::hedging_policy`].
    pub hedging_policy: Option<HedgingPolicy>,
    /// The SPIFFE ID the target's servers must present (secure naming);
    /// required for targets called over mTLS.
    pub identity: Option<String>,
    /// Per-method overrides keyed `package.Service/Method`, or
    /// `package.Service/*` for every method of a service.
    pub methods: HashMap<String, MethodConfig>,
    /// Routes of calls to this target, in order, the first that matches
    /// taking the call (see [`RouteConfig`]); none, or none matching: the
    /// call goes to this target itself.
    pub routes: Vec<RouteConfig>,
    /// Connect to a bounded subset of the target's endpoints instead of
    /// all of them (large fleets); off unless set. Read when a channel is
    /// made: a reload applies to channels made after it.
    pub subset: Option<SubsetConfig>,
}

/// Subsetting of one target: `{ "size": 16, "clientId": "orders-7",
/// "mode": "deterministic" }`. See `docs/scaling.md` for the choice.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsetConfig {
    /// Endpoints each client connects to, 1 to [`MAX_SUBSET_SIZE`]; all of
    /// them when the target has fewer.
    pub size: usize,
    /// This client's stable name. `deterministic` needs one ending in an
    /// ordinal (`orders-7`, `7`: a StatefulSet pod name); `rendezvous`
    /// hashes it, and without one picks a random seed at start (the subset
    /// then changes with each restart). At most 253 printable characters.
    #[serde(default)]
    pub client_id: Option<String>,
    /// How members are chosen; default `rendezvous`.
    #[serde(default)]
    pub mode: SubsetMode,
    /// When more than this share of the members (percent, 0 to 100) are
    /// ejected, NOT_SERVING or reconnecting, the subset is widened with the
    /// next endpoints in this client's order until `size` are usable again,
    /// and narrowed back once the first `size` have been usable enough
    /// for 5 s. Default 25.
    #[serde(default = "default_max_unhealthy")]
    pub max_unhealthy_percent: u32,
    /// Members at most while widened: `size` to [`MAX_SUBSET_WIDTH`];
    /// default 2 × `size` (all endpoints when the target has fewer). A
    /// cap, so a target mostly down does not make every client connect to
    /// all of it.
    #[serde(default)]
    pub max_width: Option<usize>,
}

/// The largest [`SubsetConfig::max_width`].
pub const MAX_SUBSET_WIDTH: usize = 2 * MAX_SUBSET_SIZE;

/// The largest [`SubsetConfig::size`]: a subset is there to bound
/// connections, and P2C needs no more than this many to choose from.
pub const MAX_SUBSET_SIZE: usize = 1024;

fn default_max_unhealthy() -> u32 {
    25
}

/// How a client chooses its subset.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SubsetMode {
    /// gRFC A68: the `size` endpoints with the lowest hash of (client
    /// seed, address). Needs nothing but a seed; one endpoint added or
    /// removed moves about one member per client that had it; servers get
    /// a binomially spread number of clients.
    #[default]
    Rendezvous,
    /// The SRE book's deterministic subsetting, on a hash order anchored at
    /// both ends: clients with dense ordinals 0..C cover the endpoints
    /// evenly (each gets C × size / N clients, ±1 per round).
    Deterministic,
}

/// Policy for one method (or every method of a service).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MethodConfig {
    /// Default deadline for calls to this method.
    #[serde(with = "duration_str::option")]
    pub timeout: Option<Duration>,
    /// Overrides the target's (or the process's) `maxTimeout` for calls to
    /// this method.
    #[serde(with = "duration_str::option")]
    pub max_timeout: Option<Duration>,
    /// Retry policy of this method.
    pub retry_policy: Option<RetryPolicy>,
    /// Hedging policy of this method.
    pub hedging_policy: Option<HedgingPolicy>,
}

/// gRPC retry policy (gRFC A6). Applies automatically only to methods whose
/// proto declares `idempotency_level` `IDEMPOTENT` or `NO_SIDE_EFFECTS`;
/// other calls are retried only when the request provably never reached a
/// server (the connection failed, or the stream was refused).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts including the first, 1 to 5. Default 3.
    pub max_attempts: u32,
    /// Backoff before the first retry (randomised: full jitter). Default 50 ms.
    #[serde(with = "duration_str")]
    pub initial_backoff: Duration,
    /// Largest backoff. Default 1 s.
    #[serde(with = "duration_str")]
    pub max_backoff: Duration,
    /// Growth of the backoff per retry. Default 2.
    pub backoff_multiplier: f64,
    /// Status codes that are retried. Default `["UNAVAILABLE"]`.
    #[serde(deserialize_with = "codes::deserialize")]
    pub retryable_status_codes: Vec<Code>,
    /// Time limit of each attempt, within the call's deadline; an attempt
    /// tells the server the smaller of the two as its `grpc-timeout`.
    /// None by default.
    #[serde(with = "duration_str::option")]
    pub per_attempt_recv_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            retryable_status_codes: vec![Code::Unavailable],
            per_attempt_recv_timeout: None,
        }
    }
}

/// gRPC hedging policy (gRFC A6): after `hedging_delay` without an answer,
/// send the same idempotent call to another endpoint; keep the first answer.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HedgingPolicy {
    /// Attempts including the first, 2 to 5.
    pub max_attempts: u32,
    /// Delay before each further attempt.
    #[serde(with = "duration_str")]
    pub hedging_delay: Duration,
    /// Answers with these codes do not end the call while other attempts
    /// are still running. Default `["UNAVAILABLE"]`.
    #[serde(default = "default_non_fatal", deserialize_with = "codes::deserialize")]
    pub non_fatal_status_codes: Vec<Code>,
}

fn default_non_fatal() -> Vec<Code> {
    vec![Code::Unavailable]
}

/// A retry budget: retries (and hedges) may add at most `retry_ratio` of
/// the request rate plus `min_retries_per_second`, measured over `ttl`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetryBudget {
    /// Share of requests that may be retried, 0 to 1. Default 0.2.
    pub retry_ratio: f32,
    /// Retries always allowed per second. Default 10.
    pub min_retries_per_second: u32,
    /// Window over which requests are counted. Default 10 s.
    #[serde(with = "duration_str")]
    pub ttl: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            retry_ratio: 0.2,
            min_retries_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// Ejection of endpoints that fail repeatedly.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Consecutive failures (transport errors, UNAVAILABLE, INTERNAL,
    /// UNKNOWN, DATA_LOSS) that eject an endpoint. Default 5. An INTERNAL
    /// that refuses the caller's malformed message (a bad compression
    /// flag, a cut-off frame, bytes that do not decode) is not counted:
    /// a caller could otherwise eject healthy replicas at will.
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection adds as much. Default 5 s.
    #[serde(with = "duration_str")]
    pub base_ejection_time: Duration,
    /// Longest ejection. Default 300 s.
    #[serde(with = "duration_str")]
    pub max_ejection_time: Duration,
    /// Most endpoints of a target ejected at once, percent. Default 50.
    pub max_ejection_percent: u32,
    /// Do not count answers a server marks as its own injected faults
    /// (`mesh-fault-injected`, from `serverFaults`) against it. Off by
    /// default: any server can send the header, and a broken one that did
    /// would never be ejected. Turn on only for targets whose servers are
    /// this mesh's own and run fault experiments.
    pub trust_injected_faults: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(5),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            trust_injected_faults: false,
        }
    }
}

/// How each endpoint's connection is made and kept.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EndpointConfig {
    /// Give up connecting after this long: the TCP connect, the TLS
    /// handshake and the server's first HTTP/2 bytes (its SETTINGS, which
    /// a dial waits for) together. Default 1 s.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Send an HTTP/2 PING on each connection every this long, busy or
    /// idle. Default 5 s.
    ///
    /// With `keepalive_timeout`, this bounds how long a connection to a
    /// peer that went silent (no RST: a blackholed node, a partition)
    /// lives: at most interval + timeout (8 s) after its last frame. That
    /// must be shorter than the calls' deadlines (10 s by default), so the
    /// idempotent calls in flight on it fail as a broken connection in
    /// time to be retried elsewhere; with the former 30 s + 10 s they all
    /// ended DEADLINE_EXCEEDED (tests/netfaults.rs). A peer that polices
    /// pings (grpc-go's and C-core's servers allow one per 5 min without
    /// data) ends the connection with GOAWAY `ENHANCE_YOUR_CALM`
    /// "too_many_pings"; the endpoint's interval then doubles for its
    /// connections from then on (gRPC's keepalive design, A8), up to an
    /// hour, and the bound above grows with it. Set a longer interval for
    /// such a target's process to spare it the first rounds.
    #[serde(with = "duration_str")]
    pub keepalive_interval: Duration,
    /// Close the connection if a PING is not answered in this long. Default 3 s.
    #[serde(with = "duration_str")]
    pub keepalive_timeout: Duration,
    /// First wait before reconnecting to an endpoint that refused a
    /// connection; grows ×1.6 per failure up to `reconnect_backoff_max`,
    /// with ±20 % jitter (gRPC's connection backoff). Default 1 s.
    #[serde(with = "duration_str")]
    pub reconnect_backoff: Duration,
    /// Longest reconnect wait. Default 120 s.
    #[serde(with = "duration_str")]
    pub reconnect_backoff_max: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(3),
            reconnect_backoff: Duration::from_secs(1),
            reconnect_backoff_max: Duration::from_secs(120),
        }
    }
}

/// The policy that applies to one call.
#[derive(Clone, Debug)]
pub(crate) struct CallPolicy<'a> {
    pub(crate) timeout: Duration,
    pub(crate) max_timeout: Duration,
    pub(crate) retry: &'a RetryPolicy,
    pub(crate) hedging: Option<&'a HedgingPolicy>,
}

impl MeshConfig {
    /// Parses and validates a JSON config, naming the bad field on error.
    pub fn from_json(text: &str) -> Result<Self, MeshError> {
        let config: Self = serde_json::from_str(text).map_err(|e| MeshError::InvalidConfig {
            field: field_of(&e.to_string()),
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value is in range; reports the first bad field.
    pub fn validate(&self) -> Result<(), MeshError> {
        check_timeout("defaultTimeout", self.default_timeout)?;
        check_timeout("maxTimeout", self.max_timeout)?;
        check_timeout("endpoint.connectTimeout", self.endpoint.connect_timeout)?;
        check_timeout(
            "endpoint.keepaliveInterval",
            self.endpoint.keepalive_interval,
        )?;
        check_timeout("endpoint.keepaliveTimeout", self.endpoint.keepalive_timeout)?;
        check_timeout("dnsRefresh", self.dns_refresh)?;
        check_retry("retryPolicy", &self.retry_policy)?;
        if let Some(h) = &self.hedging_policy {
            check_hedging("hedgingPolicy", h)?;
        }
        let b = &self.retry_budget;
        if !(0.0..=1.0).contains(&b.retry_ratio) {
            return Err(invalid("retryBudget.retryRatio", "must be between 0 and 1"));
        }
        if b.ttl < Duration::from_secs(1) || b.ttl > Duration::from_secs(60) {
            return Err(invalid("retryBudget.ttl", "must be between 1s and 60s"));
        }
        let o = &self.outlier_detection;
        if o.consecutive_failures == 0 {
            return Err(invalid(
                "outlierDetection.consecutiveFailures",
                "must be at least 1",
            ));
        }
        if o.max_ejection_percent > 100 {
            return Err(invalid(
                "outlierDetection.maxEjectionPercent",
                "must be 0 to 100",
            ));
        }
        if let Some(policy) = &self.authorization {
            policy.validate()?;
        }
        crate::fault::check_server_faults(&self.server_faults)?;
        for (name, target) in &self.targets {
            let at = |field: &str| format!("targets[{name:?}].{field}");
            if let Some(Err(e)) = target
                .identity
                .as_ref()
                .map(|id| id.parse::<crate::tls::identity::SpiffeId>())
            {
                return Err(invalid(&at("identity"), &e.to_string()));
            }
            if let Some(t) = target.max_timeout {
                check_timeout(&at("maxTimeout"), t)?;
            }
            let target_max = target.max_timeout.unwrap_or(self.max_timeout);
            if let Some(t) = target.timeout {
                check_timeout(&at("timeout"), t)?;
                check_within(&at("timeout"), t, target_max)?;
            }
            if let Some(r) = &target.retry_policy {
                check_retry(&at("retryPolicy"), r)?;
            }
            if let Some(h) = &target.hedging_policy {
                check_hedging(&at("hedgingPolicy"), h)?;
            }
            route::check_routes(name, target, &self.targets, target_max)?;
            if let Some(subset) = &target.subset {
                check_subset(&at("subset"), subset)?;
            }
            for (method, m) in &target.methods {
                let at = |field: &str| format!("targets[{name:?}].methods[{method:?}].{field}");
                if !method.contains('/') || method.starts_with('/') {
                    return Err(invalid(
                        &format!("targets[{name:?}].methods[{method:?}]"),
                        "must be package.Service/Method or package.Service/*",
                    ));
                }
                if let Some(t) = m.max_timeout {
                    check_timeout(&at("maxTimeout"), t)?;
                }
                if let Some(t) = m.timeout {
                    check_timeout(&at("timeout"), t)?;
                    check_within(&at("timeout"), t, m.max_timeout.unwrap_or(target_max))?;
                }
                if let Some(r) = &m.retry_policy {
                    check_retry(&at("retryPolicy"), r)?;
                }
                if let Some(h) = &m.hedging_policy {
                    check_hedging(&at("hedgingPolicy"), h)?;
                }
            }
        }
        Ok(())
    }

    /// The balancing policy of `target`.
    pub fn lb_policy_for(&self, target: &str) -> LbPolicy {
        self.targets
            .get(target)
            .and_then(|t| t.load_balancing_policy)
            .unwrap_or(self.load_balancing_policy)
    }

    /// Everything that applies to a call of `path` (`/pkg.Service/Method`)
    /// on `target`: the most specific setting wins (method, then service
    /// wildcard, then target, then process default).
    /// The longest `maxTimeout` any call may have: mesh-wide, of a
    /// target, or of a method. Mesh-wide, not per target: a routed call
    /// carries its front target's limits to a backend's endpoints.
    pub(crate) fn longest_max_timeout(&self) -> Duration {
        self.targets
            .values()
            .flat_map(|t| {
                t.max_timeout
                    .into_iter()
                    .chain(t.methods.values().filter_map(|m| m.max_timeout))
            })
            .fold(self.max_timeout, Duration::max)
    }

    pub(crate) fn call_policy(&self, target: &str, path: &str) -> CallPolicy<'_> {
        let target_config = self.targets.get(target);
        let name = path.trim_start_matches('/');
        let (method, wildcard) = match target_config {
            Some(t) if !t.methods.is_empty() => (
                t.methods.get(name),
                name.rsplit_once('/')
                    .and_then(|(service, _)| t.methods.get(&format!("{service}/*"))),
            ),
            _ => (None, None),
        };
        let pick = |f: &dyn Fn(&MethodConfig) -> bool| {
            method.filter(|m| f(m)).or(wildcard.filter(|m| f(m)))
        };
        CallPolicy {
            timeout: pick(&|m| m.timeout.is_some())
                .and_then(|m| m.timeout)
                .or(target_config.and_then(|t| t.timeout))
                .unwrap_or(self.default_timeout),
            max_timeout: pick(&|m| m.max_timeout.is_some())
                .and_then(|m| m.max_timeout)
                .or(target_config.and_then(|t| t.max_timeout))
                .unwrap_or(self.max_timeout),
            retry: pick(&|m| m.retry_policy.is_some())
                .and_then(|m| m.retry_policy.as_ref())
                .or(target_config.and_then(|t| t.retry_policy.as_ref()))
                .unwrap_or(&self.retry_policy),
            hedging: pick(&|m| m.hedging_policy.is_some())
                .and_then(|m| m.hedging_policy.as_ref())
                .or(target_config.and_then(|t| t.hedging_policy.as_ref()))
                .or(self.hedging_policy.as_ref()),
        }
    }
}

fn invalid(field: &str, reason: &str) -> MeshError {
    MeshError::InvalidConfig {
        field: field.into(),
        reason: reason.into(),
    }
}

/// serde_json names unknown fields in its message; pull the name out.
fn field_of(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_owned)
        .unwrap_or_else(|| "(document)".into())
}

fn check_timeout(field: &str, value: Duration) -> Result<(), MeshError> {
    if value.is_zero() || value > Duration::from_secs(24 * 3600) {
        return Err(invalid(
            field,
            &format!("must be between 1ms and 24h, got {value:?}"),
        ));
    }
    Ok(())
}

/// A timeout written for a target or method that is longer than the
/// maximum applying to it would be cut at every call: refuse it so the file
/// says what happens. (The process-wide `defaultTimeout` is cut, not
/// refused, so lowering `maxTimeout` alone is enough.)
fn check_within(field: &str, timeout: Duration, max: Duration) -> Result<(), MeshError> {
    if timeout > max {
        return Err(invalid(
            field,
            &format!("{timeout:?} exceeds the maxTimeout of {max:?} that applies to it"),
        ));
    }
    Ok(())
}

/// The ordinal a client id ends in (`orders-7` → 7), for deterministic
/// subsetting.
pub(crate) fn client_ordinal(id: &str) -> Option<u64> {
    let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    (1..=18)
        .contains(&digits)
        .then(|| id[id.len() - digits..].parse().ok())
        .flatten()
}

fn check_subset(field: &str, s: &SubsetConfig) -> Result<(), MeshError> {
    if s.size == 0 || s.size > MAX_SUBSET_SIZE {
        return Err(invalid(
            &format!("{field}.size"),
            &format!("must be 1 to {MAX_SUBSET_SIZE}"),
        ));
    }
    if let Some(width) = s.max_width
        && (width < s.size || width > MAX_SUBSET_WIDTH)
    {
        return Err(invalid(
            &format!("{field}.maxWidth"),
            &format!(
                "must be at least size ({}) and at most {MAX_SUBSET_WIDTH}",
                s.size
            ),
        ));
    }
    if s.max_unhealthy_percent > 100 {
        return Err(invalid(
            &format!("{field}.maxUnhealthyPercent"),
            "must be 0 to 100",
        ));
    }
    if let Some(id) = &s.client_id
        && (id.is_empty() || id.len() > 253 || id.chars().any(|c| c.is_control()))
    {
        return Err(invalid(
            &format!("{field}.clientId"),
            "must be 1 to 253 printable characters",
        ));
    }
    if s.mode == SubsetMode::Deterministic
        && s.client_id.as_deref().and_then(client_ordinal).is_none()
    {
        return Err(invalid(
            &format!("{field}.clientId"),
            "deterministic subsetting needs a client id ending in its ordinal (e.g. \"orders-7\", a StatefulSet pod name), dense from 0 across the clients of the target; use mode \"rendezvous\" without one",
        ));
    }
    Ok(())
}

fn check_retry(field: &str, r: &RetryPolicy) -> Result<(), MeshError> {
    if !(1..=5).contains(&r.max_attempts) {
        return Err(invalid(&format!("{field}.maxAttempts"), "must be 1 to 5"));
    }
    if r.initial_backoff.is_zero() || r.max_backoff < r.initial_backoff {
        return Err(invalid(
            &format!("{field}.maxBackoff"),
            "initialBackoff must be positive and maxBackoff at least initialBackoff",
        ));
    }
    if !(r.backoff_multiplier >= 1.0 && r.backoff_multiplier <= 10.0) {
        return Err(invalid(
            &format!("{field}.backoffMultiplier"),
            "must be 1 to 10",
        ));
    }
    if r.retryable_status_codes.contains(&Code::Ok) {
        return Err(invalid(
            &format!("{field}.retryableStatusCodes"),
            "cannot contain OK",
        ));
    }
    Ok(())
}

fn check_hedging(field: &str, h: &HedgingPolicy) -> Result<(), MeshError> {
    if !(2..=5).contains(&h.max_attempts) {
        return Err(invalid(&format!("{field}.maxAttempts"), "must be 2 to 5"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_overrides() {
        let config = MeshConfig::from_json(
            r#"{"defaultTimeout":"1.5s","targets":{"inv":{"timeout":"250ms",
                "methods":{"a.S/M":{"timeout":"20ms"},"a.S/*":{"retryPolicy":{"maxAttempts":5}}}}}}"#,
        )
        .unwrap();
        assert_eq!(config.default_timeout, Duration::from_millis(1500));
        assert_eq!(
            config.call_policy("inv", "/b.T/M").timeout,
            Duration::from_millis(250)
        );
        assert_eq!(
            config.call_policy("other", "/b.T/M").timeout,
            Duration::from_millis(1500)
        );
        let p = config.call_policy("inv", "/a.S/M");
        assert_eq!(p.timeout, Duration::from_millis(20));
        assert_eq!(p.retry.max_attempts, 5, "service wildcard applies");
        let p = config.call_policy("inv", "/a.S/Other");
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert_eq!(config.call_policy("x", "/a.S/M").retry.max_attempts, 3);
    }

    #[test]
    fn names_the_bad_field() {
        let err = MeshConfig::from_json(r#"{"targets":{"inv":{"timeout":"0s"}}}"#).unwrap_err();
        assert!(
            err.to_string().contains("targets[\"inv\"].timeout"),
            "{err}"
        );
        let err = MeshConfig::from_json(r#"{"defaultTimout":"1s"}"#).unwrap_err();
        assert!(err.to_string().contains("defaultTimout"), "{err}");
        let err = MeshConfig::from_json(r#"{"defaultTimeout":"10"}"#).unwrap_err();
        assert!(err.to_string().contains("no unit"), "{err}");
        let err = MeshConfig::from_json(r#"{"retryPolicy":{"maxAttempts":6}}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("retryPolicy.maxAttempts: must be 1 to 5"),
            "{err}"
        );
        let err =
            MeshConfig::from_json(r#"{"retryPolicy":{"retryableStatusCodes":["UNAVAILBLE"]}}"#)
                .unwrap_err();
        assert!(err.to_string().contains("UNAVAILBLE"), "{err}");
        let err =
            MeshConfig::from_json(r#"{"hedgingPolicy":{"maxAttempts":1,"hedgingDelay":"5ms"}}"#)
                .unwrap_err();
        assert!(
            err.to_string().contains("hedgingPolicy.maxAttempts"),
            "{err}"
        );
        let err = MeshConfig::from_json(r#"{"loadBalancingPolicy":"random"}"#).unwrap_err();
        assert!(err.to_string().contains("random"), "{err}");
    }

    #[test]
    fn a_subset_cap_below_its_size_or_too_large_is_refused_by_name() {
        for width in [7, 2049] {
            let json =
                format!(r#"{{"targets":{{"inv":{{"subset":{{"size":8,"maxWidth":{width}}}}}}}}}"#);
            let err = MeshConfig::from_json(&json).unwrap_err();
            assert!(
                err.to_string()
                    .contains("targets[\"inv\"].subset.maxWidth: must be at least size (8)"),
                "{err}"
            );
        }
        let ok = MeshConfig::from_json(r#"{"targets":{"inv":{"subset":{"size":8,"maxWidth":8}}}}"#);
        assert!(ok.is_ok(), "a cap equal to the size: never widen");
    }

    #[test]
    fn a_silent_connection_dies_before_a_default_deadline_runs_out() {
        // A blackholed peer's connection lives interval + timeout after its
        // last frame; idempotent calls on it are retried elsewhere only if
        // that comes before their deadline.
        let c = MeshConfig::default();
        assert!(c.endpoint.keepalive_interval + c.endpoint.keepalive_timeout < c.default_timeout);
        let err = MeshConfig::from_json(r#"{"endpoint":{"keepaliveInterval":"0s"}}"#).unwrap_err();
        assert!(
            err.to_string().contains("endpoint.keepaliveInterval"),
            "{err}"
        );
    }

    #[test]
    fn the_longest_max_timeout_counts_every_target_and_method() {
        let config = MeshConfig::from_json(
            r#"{"maxTimeout": "20s", "targets": {
                "static:///a": {"methods": {"p.S/Slow": {"maxTimeout": "90s"}}},
                "static:///b": {"maxTimeout": "5s"}}}"#,
        )
        .unwrap();
        assert_eq!(config.longest_max_timeout(), Duration::from_secs(90));
        let short = MeshConfig::from_json(
            r#"{"maxTimeout": "20s", "targets": {"static:///b": {"maxTimeout": "5s"}}}"#,
        )
        .unwrap();
        assert_eq!(short.longest_max_timeout(), Duration::from_secs(20));
    }

    #[test]
    fn max_timeouts_default_to_30s_and_the_most_specific_wins() {
        let config = MeshConfig::from_json(
            r#"{"maxTimeout":"20s","targets":{"inv":{"maxTimeout":"5s",
                "methods":{"a.S/M":{"maxTimeout":"1s"},"a.S/*":{"maxTimeout":"2s"}}}}}"#,
        )
        .unwrap();
        assert_eq!(MeshConfig::default().max_timeout, Duration::from_secs(30));
        let max = |target: &str, path: &str| config.call_policy(target, path).max_timeout;
        assert_eq!(max("other", "/a.S/M"), Duration::from_secs(20));
        assert_eq!(max("inv", "/b.T/M"), Duration::from_secs(5));
        assert_eq!(max("inv", "/a.S/Other"), Duration::from_secs(2));
        assert_eq!(max("inv", "/a.S/M"), Duration::from_secs(1));
    }

    #[test]
    fn a_timeout_over_its_maximum_is_refused_by_name() {
        for (json, field) in [
            (r#"{"maxTimeout":"0s"}"#, "maxTimeout"),
            (r#"{"maxTimeout":"1500m"}"#, "maxTimeout"),
            (r#"{"maxTimout":"1s"}"#, "maxTimout"),
            (
                r#"{"maxTimeout":"5s","targets":{"inv":{"timeout":"6s"}}}"#,
                "targets[\"inv\"].timeout",
            ),
            (
                r#"{"targets":{"inv":{"maxTimeout":"1s","methods":{"a.S/M":{"timeout":"2s"}}}}}"#,
                "targets[\"inv\"].methods[\"a.S/M\"].timeout",
            ),
            (
                r#"{"targets":{"inv":{"methods":{"a.S/M":{"maxTimeout":"x"}}}}}"#,
                "no unit",
            ),
        ] {
            let err = MeshConfig::from_json(json).unwrap_err().to_string();
            assert!(err.contains(field), "{json}: {err}");
        }
        // The built-in default (10 s) under a shorter maximum is cut at
        // each call, not refused.
        let c = MeshConfig::from_json(r#"{"maxTimeout":"5s"}"#).unwrap();
        assert_eq!(
            c.call_policy("t", "/a.S/M").max_timeout,
            Duration::from_secs(5)
        );
        // A more specific maximum may allow a longer default.
        MeshConfig::from_json(
            r#"{"maxTimeout":"1s","defaultTimeout":"1s",
                "targets":{"batch":{"maxTimeout":"5m","timeout":"2m"}}}"#,
        )
        .unwrap();
    }

    proptest::proptest! {
        // Any text: parsed or refused with a named field, never a panic.
        #[test]
        fn the_config_parser_never_panics(text in "\\PC{0,400}") {
            if let Err(e) = MeshConfig::from_json(&text) {
                proptest::prop_assert!(e.to_string().starts_with("invalid mesh config: "));
            }
        }

        #[test]
        fn structured_configs_validate_or_name_the_field(
            attempts in 0u32..10,
            backoff in "[0-9]{1,4}(ms|s|m|)",
            ratio in -1.0f32..2.0,
            percent in 0u32..200,
        ) {
            let json = format!(
                r#"{{"retryPolicy":{{"maxAttempts":{attempts},"initialBackoff":"{backoff}"}},
                    "retryBudget":{{"retryRatio":{ratio}}},
                    "outlierDetection":{{"maxEjectionPercent":{percent}}}}}"#
            );
            match MeshConfig::from_json(&json) {
                Ok(c) => {
                    proptest::prop_assert!((1..=5).contains(&c.retry_policy.max_attempts));
                    proptest::prop_assert!((0.0..=1.0).contains(&c.retry_budget.retry_ratio));
                    proptest::prop_assert!(c.outlier_detection.max_ejection_percent <= 100);
                }
                Err(e) => {
                    let msg = e.to_string();
                    proptest::prop_assert!(
                        msg.contains("retryPolicy") || msg.contains("retryBudget") || msg.contains("outlierDetection") || msg.contains("initialBackoff") || msg.contains("duration") || msg.contains("unit"),
                        "{}", msg
                    );
                }
            }
        }

        #[test]
        fn timeouts_never_exceed_their_maximum_once_parsed(
            max in "[0-9]{1,3}(ms|s|m|h|)",
            timeout in "[0-9]{1,3}(ms|s|m|)",
            method_max in proptest::option::of("[0-9]{1,3}(ms|s|m)"),
        ) {
            let method_max = method_max
                .map(|m| format!(r#","maxTimeout":"{m}""#))
                .unwrap_or_default();
            let json = format!(
                r#"{{"maxTimeout":"{max}","targets":{{"t":{{"methods":{{"a.S/M":
                    {{"timeout":"{timeout}"{method_max}}}}}}}}}}}"#
            );
            match MeshConfig::from_json(&json) {
                Ok(c) => {
                    let p = c.call_policy("t", "/a.S/M");
                    proptest::prop_assert!(p.timeout <= p.max_timeout);
                }
                Err(e) => {
                    let msg = e.to_string();
                    proptest::prop_assert!(
                        msg.contains("maxTimeout") || msg.contains("timeout") || msg.contains("unit"),
                        "{}", msg
                    );
                }
            }
        }

        #[test]
        fn durations_parse_or_refuse(text in "\\PC{0,20}") {
            let _ = duration_str::parse(&text);
        }
    }
}
