use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::Notify;
use tonic::body::Body;
use tower::{Service, ServiceBuilder, util::BoxCloneSyncService};

use crate::{
    BoxError,
    authz::AuthzMode,
    balance::EndpointSet,
    body::BodyDeadlineLayer,
    config::{ConfigHandle, EndpointConfig, MeshConfig},
    deadline::{CallDeadline, DeadlineLayer},
    endpoint::{ClientConn, Connection, EndpointState, authority_of},
    error::MeshError,
    fault::layer::FaultLayer,
    methods::MethodTable,
    mirror::{MirrorPolicy, layer::MirrorLayer},
    resolve::{self, Target},
    retry::RetryLayer,
    route::{DispatchLayer, MakeMirror, MakeSet, RouteLayer, RouteMirrorLayer, Router},
    telemetry::{metrics::Metrics, rpc::ClientTelemetryLayer},
    tls::{MeshTls, SpiffeId, io::Connector},
};

/// The mesh of one process: its policy, what it knows about methods, and
/// the factory of its channels.
///
/// Build one per process and share it; channels are cheap to clone.
#[derive(Clone, Debug)]
pub struct Mesh {
    config: ConfigHandle,
    methods: Arc<MethodTable>,
    tls: Option<Arc<MeshTls>>,
    metrics: Metrics,
}

impl Mesh {
    /// A mesh with this policy (validated here), recording into the
    /// process's default metrics ([`crate::telemetry::metrics()`]).
    pub fn from_config(config: MeshConfig) -> Result<Self, MeshError> {
        check_backend_targets(&config)?;
        Ok(Self {
            config: ConfigHandle::new(config)?,
            methods: Arc::new(MethodTable::default()),
            tls: None,
            metrics: crate::telemetry::metrics::metrics().clone(),
        })
    }

    /// Like [`Mesh::from_config`], for a config known to be valid.
    ///
    /// # Panics
    ///
    /// If `config` does not validate (the panic message names the field);
    /// use [`Mesh::from_config`] for a config read from outside.
    pub fn new(config: MeshConfig) -> Self {
        Self::from_config(config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Records this mesh's metrics (calls, retries, ejections, endpoints,
    /// certificate expiry, config reloads) in `metrics` instead of the
    /// process default, so two meshes in one process keep their series
    /// apart. Channels made before keep recording where they did, and so
    /// does the file watch of [`Mesh::from_file`] (its reload counts go
    /// to the process default).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        if let Some(tls) = &self.tls {
            metrics.add_source(tls);
        }
        self.metrics = metrics;
        self
    }

    /// Where this mesh's channels record their metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A mesh whose policy is read from a JSON file and re-read whenever the
    /// file changes (checked every 2 s). A changed file that does not
    /// validate is logged as an error and ignored; the last good policy
    /// stays, and so it does when a change would remove the
    /// `authorization` policy (fail closed: switching authorization off
    /// takes a restart). Must be called inside a tokio runtime.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, MeshError> {
        let path = path.as_ref().to_path_buf();
        let text = read(&path)?;
        let mesh = Self::from_config(MeshConfig::from_json(&text)?)?;
        tokio::spawn(reload_forever(
            path,
            text,
            mesh.config.clone(),
            mesh.metrics.clone(),
        ));
        Ok(mesh)
    }

    /// Registers an encoded `FileDescriptorSet`, so the mesh knows which
    /// methods are idempotent (retried and hedged automatically) and which
    /// take a single request message (buffered for replay). Calls to
    /// methods in no registered descriptor are sent once.
    pub fn with_descriptor_set(mut self, encoded: &[u8]) -> Result<Self, MeshError> {
        let mut table = (*self.methods).clone();
        table.add_encoded(encoded)?;
        self.methods = Arc::new(table);
        Ok(self)
    }

    /// Calls over mutual TLS with this workload identity. Every channel
    /// then verifies its servers by SPIFFE ID (secure naming): the expected
    /// identity comes from the target's `identity` in the config or from
    /// [`Mesh::channel_with_identity`].
    pub fn with_tls(mut self, tls: Arc<MeshTls>) -> Self {
        self.metrics.add_source(&tls);
        self.tls = Some(tls);
        self
    }

    /// The policy in force now.
    pub fn config(&self) -> Arc<MeshConfig> {
        self.config.load()
    }

    /// The live config, for a server or a layer that follows its reloads.
    pub fn config_handle(&self) -> ConfigHandle {
        self.config.clone()
    }

    /// What the mesh knows about methods (from registered descriptors).
    pub fn methods(&self) -> Arc<MethodTable> {
        self.methods.clone()
    }

    /// Replaces the policy; channels use it from their next call.
    pub fn reload(&self, config: MeshConfig) -> Result<(), MeshError> {
        check_backend_targets(&config)?;
        self.config.reload(config)
    }

    /// A channel to `target` that any tonic-generated client accepts.
    ///
    /// Resolution starts now and connections are made lazily, so this never
    /// blocks and works before the target is up. Must be called inside a
    /// tokio runtime. See [`Target`] for the accepted forms.
    pub fn channel(&self, target: &str) -> Result<MeshChannel, MeshError> {
        let identity = self.identity_for(target, None)?;
        self.build_channel(&peer_name(target, identity.as_ref()), target, identity)
    }

    /// A channel to `target` whose servers must present `identity` (a
    /// SPIFFE ID) over mTLS.
    pub fn channel_with_identity(
        &self,
        target: &str,
        identity: &str,
    ) -> Result<MeshChannel, MeshError> {
        let identity = self.identity_for(target, Some(identity))?;
        self.build_channel(&peer_name(target, identity.as_ref()), target, identity)
    }

    /// Like [`Mesh::channel`] or, with `identity`, [`Mesh::channel_with_identity`],
    /// naming the peer `name` in metrics and spans. Without a name a
    /// channel's peer is its identity's service account, else the DNS
    /// target's first label, else the target itself.
    pub fn channel_named(
        &self,
        name: &str,
        target: &str,
        identity: Option<&str>,
    ) -> Result<MeshChannel, MeshError> {
        let identity = self.identity_for(target, identity)?;
        self.build_channel(name, target, identity)
    }

    /// The identity `target`'s servers must present: `explicit`, else the
    /// target's configured one; required when the mesh speaks mTLS.
    fn identity_for(
        &self,
        target: &str,
        explicit: Option<&str>,
    ) -> Result<Option<SpiffeId>, MeshError> {
        let (field, identity) = match explicit {
            Some(identity) => ("identity".to_owned(), Some(identity.to_owned())),
            None => (
                format!("targets[{target:?}].identity"),
                self.config
                    .load()
                    .targets
                    .get(target)
                    .and_then(|t| t.identity.clone()),
            ),
        };
        if self.tls.is_some() && identity.is_none() {
            return Err(MeshError::InvalidConfig {
                field,
                reason: "with mTLS every target needs the SPIFFE ID its servers must present"
                    .into(),
            });
        }
        identity
            .map(|i| i.parse())
            .transpose()
            .map_err(|e: crate::tls::SpiffeIdError| MeshError::InvalidConfig {
                field,
                reason: e.to_string(),
            })
    }

    /// The live endpoint set of `target` (named `peer` in metrics), its
    /// resolver and its connections, verifying servers as `identity`.
    fn endpoint_set(
        &self,
        peer: &str,
        target: &str,
        identity: Option<SpiffeId>,
    ) -> Result<Arc<EndpointSet>, MeshError> {
        let parsed: Target = target.parse()?;
        let config = self.config.load();
        let reresolve = Arc::new(Notify::new());
        let set = EndpointSet::new(
            Arc::from(target),
            Arc::from(peer),
            reresolve.clone(),
            self.metrics.clone(),
        );
        let changes = resolve::spawn(parsed, config.dns_refresh, reresolve);
        if let Some(subset) = config.targets.get(target).and_then(|t| t.subset.as_ref()) {
            set.use_subset(crate::balance::Subset::new(subset));
        }
        let endpoint_config = config.endpoint.clone();
        let tls = self.tls.clone();
        // From the live config: a reload that raises a maxTimeout widens
        // the window of the connections already made.
        let stall_window: crate::endpoint::StallWindow = {
            let (live, settings) = (self.config.clone(), endpoint_config.clone());
            Arc::new(move || {
                crate::endpoint::stall_window(live.load().longest_max_timeout(), &settings)
            })
        };
        tokio::spawn(set.clone().follow(
            changes,
            Arc::new(move |addr| {
                connect_lazy(addr, &endpoint_config, tls.clone(), identity.clone())
                    .with_stall_window(stall_window.clone())
            }),
            config.health_checks,
        ));
        Ok(set)
    }

    fn build_channel(
        &self,
        peer: &str,
        target: &str,
        identity: Option<SpiffeId>,
    ) -> Result<MeshChannel, MeshError> {
        let set = self.endpoint_set(peer, target, identity)?;
        // A route's backend is a target of its own: its resolver, its
        // endpoints, the identity its `targets` entry names.
        let make: MakeSet = {
            let mesh = self.clone();
            Arc::new(move |backend: &str| {
                let identity = mesh.identity_for(backend, None)?;
                mesh.endpoint_set(&peer_name(backend, None), backend, identity)
            })
        };
        // A route's mirror copies to a channel of its own (the shadow's
        // identity from its `targets` entry), counted under its name.
        let make_mirror: MakeMirror = {
            let mesh = self.clone();
            Arc::new(move |policy: &MirrorPolicy| {
                let shadow = mesh.channel(&policy.target)?;
                Ok(MirrorLayer::new(
                    policy.clone(),
                    shadow,
                    mesh.methods.clone(),
                    mesh.config.load().max_replay_bytes,
                    mesh.metrics.clone(),
                )
                .named(&peer_name(&policy.target, None)))
            })
        };
        let router = Router::new(
            Arc::from(target),
            self.config.clone(),
            set.clone(),
            make,
            make_mirror,
        )?;
        Ok(self.stack(peer, target, set, router, Connection))
    }

    /// The client stack over `set`, with `connection` innermost.
    fn stack<C>(
        &self,
        peer: &str,
        target: &str,
        set: Arc<EndpointSet>,
        router: Arc<Router>,
        connection: C,
    ) -> MeshChannel
    where
        C: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        C::Future: Send + 'static,
    {
        let timeouts = {
            let (config, target) = (self.config.clone(), target.to_owned());
            move |path: &str| {
                let config = config.load();
                let policy = config.call_policy(&target, path);
                CallDeadline {
                    default: policy.timeout,
                    max: policy.max_timeout,
                }
            }
        };
        let stack = ServiceBuilder::new()
            // First the call's route and backend, once per call, so its
            // metrics, deadline and retries know them and every attempt
            // goes to the same backend.
            .layer(RouteLayer::new(router.clone()))
            // The call's span and metrics cover everything below.
            .layer(ClientTelemetryLayer::new(
                Arc::from(peer),
                Arc::from(target),
                self.metrics.clone(),
            ))
            // Every call gets its deadline, never past maxTimeout, before
            // anything can wait.
            .layer(DeadlineLayer::with_limits(Arc::new(timeouts)))
            // The deadline holds for the whole response, streams included.
            .layer(BodyDeadlineLayer)
            // A routed call's copy to its route's shadow, once per call,
            // fire-and-forget.
            .layer(RouteMirrorLayer)
            // Then retries and hedges within the budget, by the live policy.
            .layer(
                RetryLayer::new(target, self.config.clone(), self.methods.clone())
                    .named(peer)
                    .metrics(self.metrics.clone()),
            )
            // A route's injected faults, per attempt: an abort is retried
            // above within the budget and never reaches the balancer (no
            // endpoint is charged with it); a delay spends the deadline.
            .layer(FaultLayer::new(peer, self.metrics.clone()))
            // Each attempt to one endpoint of the routed backend's live
            // set (or the target's own), balanced afresh.
            .layer(DispatchLayer::new(&router))
            // On that endpoint's own HTTP/2 connection.
            .service(connection);
        MeshChannel {
            inner: BoxCloneSyncService::new(stack),
            set,
        }
    }

    /// A channel whose endpoints are modelled, for the fleet simulator
    /// (`meshsim`): the same stack as [`Mesh::channel`] (telemetry,
    /// deadline, retry, balancer with outlier detection and the target's
    /// subsetting), but the endpoint set follows `changes` instead of a
    /// resolver, and each attempt goes to `endpoints` with the chosen
    /// address instead of over a connection. Health watching is off.
    #[doc(hidden)]
    pub fn model_channel(
        &self,
        target: &str,
        changes: tokio::sync::mpsc::Receiver<tower::discover::Change<SocketAddr, ()>>,
        endpoints: ModelEndpoints,
    ) -> MeshChannel {
        let config = self.config.load();
        let set = EndpointSet::new(
            Arc::from(target),
            Arc::from(target),
            Arc::new(Notify::new()),
            self.metrics.clone(),
        );
        if let Some(subset) = config.targets.get(target).and_then(|t| t.subset.as_ref()) {
            set.use_subset(crate::balance::Subset::new(subset));
        }
        tokio::spawn(
            set.clone()
                .follow(changes, Arc::new(unreachable_conn), false),
        );
        // The simulator models one target: routes to other backends are
        // not modelled, so their sets cannot be made.
        let unmodelled = |what: &str| MeshError::InvalidTarget {
            target: what.to_owned(),
            reason: "the fleet simulator models one target's endpoints; routes are not modelled"
                .into(),
        };
        let router = Router::new(
            Arc::from(target),
            self.config.clone(),
            set.clone(),
            Arc::new(move |backend: &str| Err(unmodelled(backend))),
            Arc::new(move |policy: &MirrorPolicy| Err(unmodelled(&policy.target))),
        )
        .expect("a modelled target has no routes");
        self.stack(target, target, set, router, ModelConnection(endpoints))
    }
}

/// What a modelled endpoint does with an attempt: `(address, request)`
/// to a response (see [`Mesh::model_channel`]).
#[doc(hidden)]
pub type ModelEndpoints =
    BoxCloneSyncService<(SocketAddr, http::Request<Body>), http::Response<Body>, BoxError>;

/// Modelled endpoints are never connected to; a connection that cannot be
/// made keeps the type (and is never made: the model sends no request on it).
fn unreachable_conn(addr: SocketAddr) -> ClientConn {
    ClientConn::unconnectable(addr, "a modelled endpoint is never connected to")
}

/// The innermost service of a model channel: the attempt to the modelled
/// endpoint the balancer chose.
#[derive(Clone)]
struct ModelConnection(ModelEndpoints);

impl Service<http::Request<Body>> for ModelConnection {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = <ModelEndpoints as Service<(SocketAddr, http::Request<Body>)>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let addr = req
            .extensions_mut()
            .remove::<crate::endpoint::SendTo>()
            .map(|to| to.0.addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        self.0.call((addr, req))
    }
}

/// The name a target gets in metrics and spans when none is given.
fn peer_name(target: &str, identity: Option<&SpiffeId>) -> String {
    if let Some(account) = identity.and_then(SpiffeId::service_account) {
        return account.to_owned();
    }
    match target.strip_prefix("dns:///") {
        Some(host) => host
            .split(['.', ':'])
            .next()
            .filter(|h| !h.is_empty())
            .unwrap_or(host)
            .to_owned(),
        None => target.to_owned(),
    }
}

fn read(path: &Path) -> Result<String, MeshError> {
    std::fs::read_to_string(path).map_err(|e| MeshError::InvalidConfig {
        field: "(file)".into(),
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

/// How often [`Mesh::from_file`] checks its file.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

async fn reload_forever(path: PathBuf, mut last: String, config: ConfigHandle, metrics: Metrics) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    let mut unreadable = false;
    loop {
        tick.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                // Once per outage, not every tick.
                if !std::mem::replace(&mut unreadable, true) {
                    tracing::error!(path = %path.display(), "mesh config file unreadable, keeping the last good config (including its authorization policy): {e}");
                }
                continue;
            }
        };
        unreadable = false;
        if text == last {
            continue;
        }
        match check_reload(&config.load(), &text) {
            Ok(next) => {
                tracing::info!(path = %path.display(), "mesh config reloaded");
                metrics.config_reload("applied");
                config.store(next);
            }
            Err(e) => {
                metrics.config_reload("refused");
                tracing::error!(
                    path = %path.display(),
                    "mesh config change REFUSED, the last good config (timeouts, retries, authorization policy) stays in force: {e}"
                )
            }
        }
        last = text;
    }
}

/// Every route backend is a target the mesh can resolve (the config's
/// own validation knows targets only as names).
fn check_backend_targets(config: &MeshConfig) -> Result<(), MeshError> {
    for (name, target) in &config.targets {
        for (i, route) in target.routes.iter().enumerate() {
            for (b, backend) in route.backend_refs.iter().enumerate() {
                if let Err(e) = backend.target.parse::<Target>() {
                    return Err(MeshError::InvalidConfig {
                        field: format!("targets[{name:?}].routes[{i}].backendRefs[{b}].target"),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The config a changed file brings, if it may replace `current`.
fn check_reload(current: &MeshConfig, text: &str) -> Result<MeshConfig, MeshError> {
    let next = MeshConfig::from_json(text)?;
    check_backend_targets(&next)?;
    if current.authorization.is_some() && next.authorization.is_none() {
        return Err(MeshError::InvalidConfig {
            field: "authorization".into(),
            reason: "the change removes the authorization policy, which would allow every caller; restart to turn authorization off".into(),
        });
    }
    // Audit mode lets every call through too: the same downgrade.
    let enforcing = |c: &MeshConfig| {
        c.authorization
            .as_ref()
            .is_some_and(|p| p.mode == AuthzMode::Enforce)
    };
    if enforcing(current) && !enforcing(&next) {
        return Err(MeshError::InvalidConfig {
            field: "authorization.mode".into(),
            reason: "the change turns enforcement into audit, which would allow every caller; restart to audit".into(),
        });
    }
    Ok(next)
}

/// One HTTP/2 connection to `addr`, made on first use (over mTLS when the
/// mesh has an identity), driven by hyper's client with no buffer task.
fn connect_lazy(
    addr: SocketAddr,
    settings: &EndpointConfig,
    tls: Option<Arc<MeshTls>>,
    expected: Option<SpiffeId>,
) -> ClientConn {
    let connector = Connector {
        addr,
        tls,
        expected,
        connect_timeout: settings.connect_timeout,
    };
    ClientConn::expiring(authority_of(addr), settings, move || connector.dial())
}

/// A channel to one target through the mesh's client layers.
///
/// Pass it to any tonic-generated client: `FooClient::new(channel)`.
#[derive(Clone)]
pub struct MeshChannel {
    inner: BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>,
    set: Arc<EndpointSet>,
}

impl MeshChannel {
    /// The target this channel calls, as given to [`Mesh::channel`].
    pub fn target(&self) -> &str {
        &self.set.target
    }

    /// The endpoints the resolver reports now.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.set.addresses()
    }

    /// The state of every endpoint the channel connects to (all of them,
    /// or its subset's members), for diagnostics and metrics.
    pub fn endpoint_states(&self) -> Vec<EndpointState> {
        self.set.snapshot().iter().map(|e| e.snapshot()).collect()
    }

    /// The endpoints wanted in the subset now (its size, more while
    /// widened); 0 without subsetting.
    pub fn subset_size(&self) -> usize {
        self.set.subset_width()
    }

    /// One pick of the balancer, the one a call makes, without the call
    /// (benchmarks): whether an endpoint was picked. Nothing of the chosen
    /// endpoint is read beyond what the pick reads.
    #[doc(hidden)]
    pub fn pick_once(&self, policy: crate::LbPolicy) -> bool {
        self.set.pick(policy, &[]).is_ok()
    }

    /// One pick and what the balancer does with it before the connection's
    /// work (benchmarks): the call marked in flight on the endpoint and
    /// unmarked, and its address read (as a retry's tracking does).
    #[doc(hidden)]
    pub fn pick_and_mark(&self, policy: crate::LbPolicy) -> Option<SocketAddr> {
        self.set.pick(policy, &[]).ok().map(|endpoint| {
            // Answered: an unanswered end reads the clock, which a call's
            // pick does not.
            let _ = endpoint.start().answered();
            endpoint.addr
        })
    }
}

impl std::fmt::Debug for MeshChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshChannel")
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}

impl Service<http::Request<Body>> for MeshChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        <BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError> as Service<
            http::Request<Body>,
        >>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_may_change_the_policy_but_not_drop_it_or_break_it() {
        let policy = r#"{"authorization":{"rules":[{"callers":["*"],"methods":["a.S/M"]}]}}"#;
        let with = MeshConfig::from_json(policy).unwrap();
        let without = MeshConfig::default();
        let err = check_reload(&with, "{}").unwrap_err().to_string();
        assert!(err.contains("authorization"), "{err}");
        assert!(check_reload(&with, r#"{"authorization":"#).is_err());
        let narrower = r#"{"authorization":{"rules":[{"callers":["spiffe://t/ns/a/sa/b"],"methods":["a.S/M"]}]}}"#;
        let next = check_reload(&with, narrower).unwrap();
        assert!(
            !next
                .authorization
                .unwrap()
                .allows(Some("spiffe://t/ns/a/sa/c"), "a.S/M")
        );
        let audit =
            r#"{"authorization":{"mode":"audit","rules":[{"callers":["*"],"methods":["a.S/M"]}]}}"#;
        let err = check_reload(&with, audit).unwrap_err().to_string();
        assert!(err.contains("audit"), "{err}");
        // Without a policy in force, any valid file is taken.
        assert!(check_reload(&without, "{}").is_ok());
        assert!(check_reload(&without, policy).is_ok());
    }

    /// The value of `mesh_config_reloads_total{outcome=..}` in the process default.
    fn reloads(outcome: &str) -> u64 {
        crate::telemetry::metrics()
            .encode()
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "mesh_config_reloads_total{{outcome=\"{outcome}\"}} "
                ))
                .map(|n| n.parse().unwrap())
            })
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_config_file_applies_at_the_next_check_and_a_broken_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.json");
        std::fs::write(&path, r#"{"defaultTimeout":"1s"}"#).unwrap();
        let mesh = Mesh::from_file(&path).unwrap();
        let (applied, refused) = (reloads("applied"), reloads("refused"));
        std::fs::write(&path, r#"{"defaultTimeout":"3s"}"#).unwrap();
        // Bounded: at most fifty checks (of paused time).
        for _ in 0..50 {
            if mesh.config().default_timeout == Duration::from_secs(3) {
                break;
            }
            tokio::time::sleep(RELOAD_EVERY).await;
        }
        assert_eq!(mesh.config().default_timeout, Duration::from_secs(3));
        assert_eq!(reloads("applied"), applied + 1);

        std::fs::write(&path, r#"{"defaultTimeout":"#).unwrap();
        for _ in 0..50 {
            if reloads("refused") > refused {
                break;
            }
            tokio::time::sleep(RELOAD_EVERY).await;
        }
        assert_eq!(reloads("refused"), refused + 1);
        assert_eq!(
            mesh.config().default_timeout,
            Duration::from_secs(3),
            "the last good config stays"
        );
    }

    #[tokio::test]
    async fn a_mesh_with_its_own_metrics_keeps_its_series_apart_and_drops_them_with_the_channel() {
        let own = Metrics::new();
        let mesh = Mesh::new(MeshConfig::default()).with_metrics(own.clone());
        let other = Mesh::new(MeshConfig::default()).with_metrics(Metrics::new());
        let channel = mesh.channel("static:///127.0.0.1:9").unwrap();
        let line = "mesh_endpoints{peer=\"static:///127.0.0.1:9\",state=\"ready\"} 1";
        for _ in 0..200 {
            if own.encode().contains(line) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(own.encode().contains(line), "{}", own.encode());
        assert!(!other.metrics().encode().contains("static:///127.0.0.1:9"));
        assert!(
            !crate::telemetry::metrics()
                .encode()
                .contains("static:///127.0.0.1:9"),
            "not in the process default either"
        );
        drop(channel);
        assert!(
            !own.encode().contains("mesh_endpoints{"),
            "a dropped channel's endpoints are no longer reported"
        );
    }
}
