//! Routing: which backend target a call goes to, by the target's ordered
//! routes (Gateway API `GRPCRoute` semantics; the config side is
//! [`crate::RouteConfig`]).
//!
//! Two layers share one [`Router`]:
//!
//! - [`RouteLayer`], the outermost of a channel, decides once per call:
//!   the first route that matches the call's method and metadata, then one
//!   of its backends at random by weight. The decision travels down as a
//!   [`Routed`] request extension (with the route's deadline as a
//!   [`CallDeadline`], its retry policy as a [`RetryOverride`] and its
//!   fault as a [`RouteFault`] when it sets them), so telemetry, deadline,
//!   retry and fault injection above the balancer see
//!   it, and every attempt of the call, retries and hedges included, goes
//!   to the same backend. A call no route takes carries nothing and goes
//!   to the target itself.
//! - [`DispatchLayer`], in place of the balancer, balances each attempt
//!   over the endpoint set that [`Routed`] names, or the target's own.
//!
//! Why decide above telemetry and retry rather than per attempt at the
//! balancer (as Envoy's router does): a route's timeout and retry policy
//! must be known before the deadline and retry layers act, metrics name
//! the route and backend a call took, and "in-flight calls finish on the
//! backend they started on" holds by construction: the decision, holding
//! the backend's endpoint set, is in the call's own request, so a reload
//! that drains or removes the backend changes nothing for calls already
//! made; the set lives until its last call ends.
//!
//! A backend is another target of the config with its own resolver,
//! balancer, endpoints and identity (its `targets` entry's); its endpoint
//! set is made the first time a config routes to it and kept while
//! routes name it (a weight of 0 keeps its connections warm). The
//! compiled routing table is rebuilt once per config reload, on the first
//! call that sees the new config; a call costs a read lock, a pointer
//! comparison and, with routes, the matching and one random number.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::HeaderName;
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

use crate::{
    balance::{Balance, BalanceLayer, CallError, EndpointSet},
    config::{
        ConfigHandle, HeaderMatchType, MeshConfig, RetryPolicy, RouteConfig, compile_regex,
        matches_of,
    },
    deadline::CallDeadline,
    error::MeshError,
    fault::layer::RouteFault,
    mirror::{
        MirrorPolicy,
        layer::{Mirror, MirrorLayer},
    },
    retry::RetryOverride,
};

/// Makes the endpoint set of a backend target (its resolver, its
/// connections with its identity): what the assembly hands the router.
pub(crate) type MakeSet = Arc<dyn Fn(&str) -> Result<Arc<EndpointSet>, MeshError> + Send + Sync>;

/// Makes the mirror of a route (its shadow channel, its bound on copies in
/// flight): what the assembly hands the router.
pub(crate) type MakeMirror =
    Arc<dyn Fn(&MirrorPolicy) -> Result<MirrorLayer, MeshError> + Send + Sync>;

/// The decision for one call: its route and backend.
///
/// A request extension set by [`RouteLayer`] and read below it: by
/// telemetry (the `route` and `backend` labels and span attributes), by
/// [`DispatchLayer`] (where each attempt goes), and by layers that act
/// per route (their policy is in [`Routed::config`]).
#[derive(Clone)]
pub(crate) struct Routed {
    route: Arc<CompiledRoute>,
    backend: usize,
}

impl Routed {
    /// The route's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.route.name
    }

    /// The backend's target, as the config writes it.
    pub(crate) fn backend(&self) -> &Arc<str> {
        &self.route.backends[self.backend].target
    }

    /// The route as configured, for layers with per-route policy.
    #[allow(dead_code)] // read by the per-route layers wired in later
    pub(crate) fn config(&self) -> &RouteConfig {
        &self.route.config
    }

    fn set(&self) -> &Arc<EndpointSet> {
        &self.route.backends[self.backend].set
    }
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("route", self.name())
            .field("backend", self.backend())
            .finish()
    }
}

struct CompiledRoute {
    name: Arc<str>,
    matchers: Vec<Matcher>,
    backends: Vec<Backend>,
    /// Sum of the weights, above 0 (validation refuses all-zero).
    total: u64,
    timeout: Option<Duration>,
    retry: Option<RetryOverride>,
    fault: Option<RouteFault>,
    mirror: Option<MirrorLayer>,
    config: RouteConfig,
}

struct Backend {
    target: Arc<str>,
    weight: u32,
    set: Arc<EndpointSet>,
}

struct Matcher {
    service: Option<Box<str>>,
    method: Option<Box<str>>,
    headers: Vec<(HeaderName, Value)>,
}

enum Value {
    Exact(Box<str>),
    Regex(regex::Regex),
}

impl Matcher {
    fn holds(&self, service: &str, method: &str, headers: &http::HeaderMap) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.method.as_deref().is_none_or(|m| m == method)
            && self.headers.iter().all(|(name, value)| {
                headers
                    .get_all(name)
                    .iter()
                    .any(|v| match (value, v.to_str()) {
                        (Value::Exact(want), Ok(got)) => **want == *got,
                        (Value::Regex(re), Ok(got)) => re.is_match(got),
                        (_, Err(_)) => false,
                    })
            })
    }
}

/// The compiled routes of one config.
struct Table {
    /// The config this table was built from (compared by pointer).
    config: Arc<MeshConfig>,
    routes: Vec<Arc<CompiledRoute>>,
    /// Backend endpoint sets by target, the routed target's own excluded.
    sets: HashMap<Arc<str>, Arc<EndpointSet>>,
}

/// The routing state of one channel, shared by its [`RouteLayer`] and
/// [`DispatchLayer`].
pub(crate) struct Router {
    target: Arc<str>,
    config: ConfigHandle,
    primary: Arc<EndpointSet>,
    make: MakeSet,
    make_mirror: MakeMirror,
    table: RwLock<Arc<Table>>,
}

impl Router {
    /// Routes calls to `target` (whose own endpoints are `primary`) by the
    /// routes `config` holds at each call, making backend sets with `make`.
    pub(crate) fn new(
        target: Arc<str>,
        config: ConfigHandle,
        primary: Arc<EndpointSet>,
        make: MakeSet,
        make_mirror: MakeMirror,
    ) -> Result<Arc<Self>, MeshError> {
        let now = config.load();
        let empty = Table {
            config: now.clone(),
            routes: Vec::new(),
            sets: HashMap::new(),
        };
        let router = Self {
            target,
            config,
            primary,
            make,
            make_mirror,
            table: RwLock::new(Arc::new(empty)),
        };
        // The config a channel starts with must be routable: a backend that
        // cannot be made is an error of the channel, not a log line.
        let table = router.build(&now, &router.table.read().expect("route table lock"))?;
        *router.table.write().expect("route table lock") = Arc::new(table);
        Ok(Arc::new(router))
    }

    /// The table for `config`, rebuilt if the config changed.
    fn table(&self, config: &Arc<MeshConfig>) -> Arc<Table> {
        {
            let table = self.table.read().expect("route table lock");
            if Arc::ptr_eq(&table.config, config) {
                return table.clone();
            }
        }
        let mut table = self.table.write().expect("route table lock");
        if !Arc::ptr_eq(&table.config, config) {
            let next = match self.build(config, &table) {
                Ok(next) => next,
                Err(e) => {
                    // The config validated but a backend cannot be made (no
                    // identity under mTLS, a target that does not parse):
                    // keep routing as before.
                    tracing::error!(target = %self.target, "routes of the new mesh config REFUSED, the last good routes stay in force: {e}");
                    Table {
                        config: config.clone(),
                        routes: table.routes.clone(),
                        sets: table.sets.clone(),
                    }
                }
            };
            *table = Arc::new(next);
        }
        table.clone()
    }

    fn build(&self, config: &Arc<MeshConfig>, previous: &Table) -> Result<Table, MeshError> {
        let mut sets: HashMap<Arc<str>, Arc<EndpointSet>> = HashMap::new();
        let mut routes = Vec::new();
        let Some(target) = config.targets.get(&*self.target) else {
            return Ok(Table {
                config: config.clone(),
                routes,
                sets,
            });
        };
        for route in &target.routes {
            let mut backends = Vec::with_capacity(route.backend_refs.len());
            for backend in &route.backend_refs {
                let set = if *backend.target == *self.target {
                    self.primary.clone()
                } else if let Some(set) = sets
                    .get(backend.target.as_str())
                    .or_else(|| previous.sets.get(backend.target.as_str()))
                {
                    set.clone()
                } else {
                    (self.make)(&backend.target)?
                };
                let target: Arc<str> = Arc::from(backend.target.as_str());
                if set.target != self.primary.target {
                    sets.insert(target.clone(), set.clone());
                }
                backends.push(Backend {
                    target,
                    weight: backend.weight,
                    set,
                });
            }
            let matchers = matches_of(route)
                .iter()
                .map(|m| {
                    let headers = m
                        .headers
                        .iter()
                        .map(|h| {
                            let name =
                                HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                                    .map_err(|e| {
                                        invalid_route(&self.target, route, &e.to_string())
                                    })?;
                            let value = match h.match_type {
                                HeaderMatchType::Exact => Value::Exact(h.value.as_str().into()),
                                HeaderMatchType::RegularExpression => Value::Regex(
                                    compile_regex(&h.value)
                                        .map_err(|e| invalid_route(&self.target, route, &e))?,
                                ),
                            };
                            Ok((name, value))
                        })
                        .collect::<Result<_, MeshError>>()?;
                    Ok(Matcher {
                        service: m
                            .method
                            .as_ref()
                            .and_then(|m| m.service.as_deref().map(Into::into)),
                        method: m
                            .method
                            .as_ref()
                            .and_then(|m| m.method.as_deref().map(Into::into)),
                        headers,
                    })
                })
                .collect::<Result<_, MeshError>>()?;
            // A mirror whose policy is unchanged keeps its shadow channel
            // and its copies in flight across reloads.
            let mirror = match &route.mirror {
                None => None,
                Some(policy) => Some(
                    match previous.routes.iter().find(|r| {
                        r.config.name == route.name && r.config.mirror.as_ref() == Some(policy)
                    }) {
                        Some(same) => same
                            .mirror
                            .clone()
                            .expect("a route with a mirror policy has a mirror"),
                        None => (self.make_mirror)(policy)?,
                    },
                ),
            };
            routes.push(Arc::new(CompiledRoute {
                name: Arc::from(route.name.as_str()),
                matchers,
                total: backends.iter().map(|b| u64::from(b.weight)).sum(),
                backends,
                timeout: route.timeout,
                retry: route
                    .retry_policy
                    .clone()
                    .map(|r: RetryPolicy| RetryOverride(Arc::new(r))),
                fault: route.fault.clone().map(|f| RouteFault(Arc::new(f))),
                mirror,
                config: route.clone(),
            }));
        }
        Ok(Table {
            config: config.clone(),
            routes,
            sets,
        })
    }

    /// The route and backend for a call, if a route takes it.
    fn decide(&self, table: &Table, req: &http::Request<Body>) -> Option<Routed> {
        let path = req.uri().path();
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        let route = table.routes.iter().find(|r| {
            r.matchers
                .iter()
                .any(|m| m.holds(service, method, req.headers()))
        })?;
        if route.total == 0 {
            return None;
        }
        let mut ticket = rand::random_range(0..route.total);
        let backend = route
            .backends
            .iter()
            .position(|b| {
                let w = u64::from(b.weight);
                if ticket < w {
                    true
                } else {
                    ticket -= w;
                    false
                }
            })
            .unwrap_or(0);
        Some(Routed {
            route: route.clone(),
            backend,
        })
    }
}

fn invalid_route(target: &str, route: &RouteConfig, reason: &str) -> MeshError {
    MeshError::InvalidConfig {
        field: format!("targets[{target:?}].routes[{:?}]", route.name),
        reason: reason.to_owned(),
    }
}

/// Outermost layer of a channel: decides each call's route and backend.
///
/// # Contract
///
/// Below: a call a route takes carries a [`Routed`] extension, plus a
/// [`CallDeadline`] (the route's `timeout` as the default, the method's
/// maximum as the cap), a [`RetryOverride`] and a [`RouteFault`] when the
/// route sets those.
/// The extensions are cloned into every attempt, so all attempts of a
/// call see the same decision. Never fails a call.
#[derive(Clone)]
pub(crate) struct RouteLayer {
    router: Arc<Router>,
}

impl RouteLayer {
    /// Decides by `router`'s live routes.
    pub(crate) fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Route {
            inner,
            router: self.router.clone(),
        }
    }
}

/// The service made by [`RouteLayer`].
#[derive(Clone)]
pub(crate) struct Route<S> {
    inner: S,
    router: Arc<Router>,
}

impl<S> Service<http::Request<Body>> for Route<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let config = self.router.config.load();
        let table = self.router.table(&config);
        if !table.routes.is_empty()
            && let Some(routed) = self.router.decide(&table, &req)
        {
            if let Some(timeout) = routed.route.timeout {
                let policy = config.call_policy(&self.router.target, req.uri().path());
                req.extensions_mut().insert(CallDeadline {
                    default: timeout,
                    max: policy.max_timeout,
                });
            }
            if let Some(retry) = &routed.route.retry {
                req.extensions_mut().insert(retry.clone());
            }
            if let Some(fault) = &routed.route.fault {
                req.extensions_mut().insert(fault.clone());
            }
            req.extensions_mut().insert(routed);
        }
        self.inner.call(req)
    }
}

/// Copies a share of a routed call to its route's shadow (the route's
/// `mirror`), by mirror17's [`MirrorLayer`] of that route: once per call,
/// above the retry layer, with the call's deadline already in its
/// headers. Calls of routes without a mirror pass through.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RouteMirrorLayer;

impl<S> Layer<S> for RouteMirrorLayer {
    type Service = RouteMirror<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RouteMirror { inner }
    }
}

/// The service made by [`RouteMirrorLayer`].
#[derive(Clone)]
pub(crate) struct RouteMirror<S> {
    inner: S,
}

impl<S> Service<http::Request<Body>> for RouteMirror<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<crate::BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = crate::BoxError;
    type Future = futures::future::Either<
        <Mirror<S> as Service<http::Request<Body>>>::Future,
        futures::future::ErrInto<S::Future, crate::BoxError>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        use futures::TryFutureExt;
        match req
            .extensions()
            .get::<Routed>()
            .and_then(|r| r.route.mirror.as_ref())
        {
            // The readied inner service goes to the mirror's service, which
            // calls it at once.
            Some(mirror) => {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                futures::future::Either::Left(mirror.layer(inner).call(req))
            }
            None => futures::future::Either::Right(self.inner.call(req).err_into()),
        }
    }
}

/// In place of the balancer: balances each attempt over the endpoints of
/// the backend its [`Routed`] extension names, or of the target itself.
///
/// The contract with the layers above and below is the balancer's (see
/// `balance::BalanceLayer`): it honours `Exclude`, fills `Picked`, fails
/// with `CallError`, and sends with `SendTo`. Each backend's endpoints
/// keep their own load, failure and ejection accounting.
#[derive(Clone)]
pub(crate) struct DispatchLayer {
    primary: Arc<EndpointSet>,
    config: ConfigHandle,
}

impl DispatchLayer {
    /// Attempts without a [`Routed`] go to `router`'s own target.
    pub(crate) fn new(router: &Router) -> Self {
        Self {
            primary: router.primary.clone(),
            config: router.config.clone(),
        }
    }
}

impl<S: Clone> Layer<S> for DispatchLayer {
    type Service = Dispatch<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Dispatch {
            balance: BalanceLayer::new(self.primary.clone(), self.config.clone())
                .layer(inner.clone()),
            inner,
        }
    }
}

/// The service made by [`DispatchLayer`].
///
/// The target's own set and the config are the balancer's: every call
/// clones the stack below the retry layer, and each `Arc` held twice was
/// one more count written from both cores per call.
#[derive(Clone)]
pub(crate) struct Dispatch<S> {
    /// The balancer over the target's own endpoints.
    balance: Balance<S>,
    inner: S,
}

impl<S> Service<http::Request<Body>> for Dispatch<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<crate::BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Self::Response, CallError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per endpoint, judged when one is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match req.extensions().get::<Routed>() {
            Some(routed) if !Arc::ptr_eq(routed.set(), self.balance.set()) => {
                let balance =
                    BalanceLayer::new(routed.set().clone(), self.balance.config().clone())
                        .layer(self.inner.clone());
                Box::pin(balance.oneshot(req))
            }
            _ => self.balance.call(req),
        }
    }
}
