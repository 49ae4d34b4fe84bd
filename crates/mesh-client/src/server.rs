//! The mesh server: what every service's gRPC server is built with.
//!
//! Layers, outer to inner, after the TLS accept (which makes the peer's
//! SPIFFE ID the caller identity): gRPC-Web translation, when enabled
//! ([`MeshServer::grpc_web`]) → telemetry (a span and the golden metrics
//! for every call, refused ones included) → authorization (claimed-identity
//! headers stripped, then `PERMISSION_DENIED` for what the policy does not
//! allow) → load shedding (`RESOURCE_EXHAUSTED` marked [`SHED_HEADER`] at once when the process is
//! at its concurrency limit, instead of queueing into the caller's
//! deadline) → the process-wide concurrency limit → inbound deadline
//! capture (for propagation, cut to [`ServerConfig::max_inbound_deadline`])
//! → the call's deadline enforced on the response (`DEADLINE_EXCEEDED`,
//! streams included) → injected faults, when enabled
//! ([`MeshServer::server_faults_from`]) → the service. Alongside the service it serves
//! `grpc.health.v1.Health` and reflection (v1 and v1alpha) limited to what
//! this server implements.
//!
//! Shutdown drains: health flips to `NOT_SERVING`, the server waits
//! [`ServerConfig::drain_grace`] so balancers notice, then sends HTTP/2
//! GOAWAY and lets in-flight calls finish, for at most
//! [`ServerConfig::drain_timeout`].

use std::{collections::HashSet, convert::Infallible, future::Future, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Notify};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, server::NamedService, service::RoutesBuilder, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{
    Service, ServiceBuilder, ServiceExt, limit::GlobalConcurrencyLimitLayer,
    load_shed::LoadShedLayer, util::MapResultLayer,
};

pub use crate::body::SHED_HEADER;

use crate::{
    authz::{
        AuthorizationPolicy,
        layer::{AuthzLayer, PolicySource},
    },
    body::ServerDeadlineLayer,
    channel::Mesh,
    error::MeshError,
    fault::server::ServerFaultLayer,
    methods::MethodTable,
    telemetry::{metrics::Metrics, rpc::ServerTelemetryLayer},
    tls::{MeshTls, PublicTls, ServerTls, io::accept_loop},
};

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The health-check service name that answers SERVING while the process
/// runs (for liveness probes); `""` and the services' own names follow
/// readiness instead.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Limits and timings of a mesh server. Every limit is explicit: tonic's
/// own defaults leave several of them unbounded.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// HTTP/2 streams one connection may have open at once. Default 256.
    pub max_concurrent_streams: u32,
    /// Calls the whole process handles at once; beyond it calls are shed
    /// with `RESOURCE_EXHAUSTED`. Default 1024.
    pub concurrency_limit: usize,
    /// Streams a connection may have reset by the server for protocol
    /// errors before it is closed (hyper's flood guard). Default 256.
    pub max_local_error_reset_streams: usize,
    /// Streams a client may reset before the server accepted them, per
    /// connection. Default 32.
    pub max_pending_accept_reset_streams: usize,
    /// Largest header list accepted, in bytes. Default 16 KiB.
    pub max_header_list_size: u32,
    /// Calls one connection may have in progress; beyond it that
    /// connection's calls are shed with `RESOURCE_EXHAUSTED`. Default 256.
    pub concurrency_limit_per_connection: usize,
    /// Connections older than this are sent GOAWAY (clients reconnect, which
    /// rebalances long-lived connections). Default 1 h.
    pub max_connection_age: Duration,
    /// Time in-flight calls get after a max-age GOAWAY. Default 30 s.
    pub max_connection_age_grace: Duration,
    /// HTTP/2 PING interval. Default 30 s.
    pub keepalive_interval: Duration,
    /// Close a connection whose PING is not answered in this long. Default 10 s.
    pub keepalive_timeout: Duration,
    /// Time between reporting `NOT_SERVING` and closing listeners. Default 0.
    pub drain_grace: Duration,
    /// Longest wait for in-flight calls once draining. Default 25 s, under
    /// Kubernetes' default 30 s termination grace period.
    pub drain_timeout: Duration,
    /// Continue the caller's trace from its `traceparent`. Default true;
    /// false for a server that faces the outside, so outsiders cannot pick
    /// trace ids or force sampling inside the shop.
    pub trust_trace_context: bool,
    /// The longest inbound deadline passed on to the calls a handler makes:
    /// a `grpc-timeout` longer than this (a caller asking for
    /// `99999999H`) is cut to it for propagation, so the caller cannot
    /// choose how long every service behind this one holds resources.
    /// Outgoing calls are also cut to their own `maxTimeout`. Default 30 s
    /// ([`crate::deadline::DEFAULT_MAX_TIMEOUT`]).
    pub max_inbound_deadline: Duration,
    /// TLS handshakes the listener runs at once. At the limit it stops
    /// accepting, so further connections wait in the kernel's accept
    /// backlog (not accepted and closed: see the `tls::io` module docs for
    /// why) until a handshake finishes or times out. Bounds the tasks and
    /// memory that connections which never complete a handshake can pin.
    /// Must be at least 1. Default 256.
    pub max_concurrent_handshakes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 256,
            concurrency_limit: 1024,
            max_local_error_reset_streams: 256,
            max_pending_accept_reset_streams: 32,
            max_header_list_size: 16 * 1024,
            concurrency_limit_per_connection: 256,
            max_connection_age: Duration::from_secs(3600),
            max_connection_age_grace: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain_grace: Duration::ZERO,
            drain_timeout: Duration::from_secs(25),
            trust_trace_context: true,
            max_inbound_deadline: crate::deadline::DEFAULT_MAX_TIMEOUT,
            max_concurrent_handshakes: 256,
        }
    }
}

/// Builds and runs a service's gRPC server with the mesh's server layers.
pub struct MeshServer {
    config: ServerConfig,
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    reporter: HealthReporter,
    draining: CancellationToken,
    tls: Option<Arc<MeshTls>>,
    public_tls: Option<Arc<PublicTls>>,
    authorization: PolicySource,
    server_faults: Option<crate::config::ConfigHandle>,
    #[cfg(feature = "admin")]
    admin: Option<std::net::TcpListener>,
    fallback: Option<FallbackService>,
    grpc_web: Option<Vec<http::HeaderValue>>,
    metrics: Metrics,
}

/// A service for every path no added service claims (a proxy).
type FallbackService =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

impl std::fmt::Debug for MeshServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshServer")
            .field("config", &self.config)
            .field("service_names", &self.service_names)
            .finish_non_exhaustive()
    }
}

impl MeshServer {
    /// A server with these limits and no services yet.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config,
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            descriptor_sets: Vec::new(),
            reporter: HealthReporter::new(),
            draining: CancellationToken::new(),
            tls: None,
            public_tls: None,
            authorization: PolicySource::default(),
            server_faults: None,
            #[cfg(feature = "admin")]
            admin: None,
            fallback: None,
            grpc_web: None,
            metrics: crate::telemetry::metrics::metrics().clone(),
        }
    }

    /// Records the server's metrics (inbound calls, denials, handshake
    /// failures, certificate expiry) in `metrics` and serves those on the
    /// admin port, instead of the process default
    /// ([`crate::telemetry::metrics()`]). Give it the mesh's
    /// ([`Mesh::metrics`]) to serve the client side's series too.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        if let Some(tls) = &self.tls {
            metrics.add_source(tls);
        }
        self.metrics = metrics;
        self
    }

    /// Sends every call no added service claims to `svc` (a proxy, such
    /// as an edge gateway). `names` are the services it answers for: they
    /// get health statuses and, if their descriptors are registered,
    /// reflection, like added services.
    pub fn fallback<S>(mut self, names: &[&'static str], svc: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.extend_from_slice(names);
        self.fallback = Some(FallbackService::new(svc));
        self
    }

    /// Also accepts gRPC-Web (HTTP/1.1 and HTTP/2, binary and text), so a
    /// browser can call the services, with CORS allowing exactly
    /// `allowed_origins` (a preflight from any other origin gets no
    /// `access-control-allow-origin`, so the browser refuses the call).
    /// With the `grpc-web` feature (on by default).
    #[cfg(feature = "grpc-web")]
    pub fn grpc_web(mut self, allowed_origins: Vec<http::HeaderValue>) -> Self {
        self.grpc_web = Some(allowed_origins);
        self
    }

    /// Serves the admin endpoints (`/metrics`, `/live`, `/ready`, and
    /// `grpc.health.v1.Health` in plaintext for kubelet gRPC probes; see
    /// [`crate::telemetry::admin`]) on `listener` while the server runs.
    /// `/ready` follows the server's overall health status. With the
    /// `admin` feature (on by default).
    #[cfg(feature = "admin")]
    pub fn admin(mut self, listener: std::net::TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// Serves mutual TLS with this workload identity: every client must
    /// present a certificate that chains to the trust bundle, and its
    /// SPIFFE ID becomes the caller identity ([`crate::tls::caller_identity`]).
    /// Without this the server speaks plaintext.
    pub fn tls(mut self, tls: Arc<MeshTls>) -> Self {
        self.metrics.add_source(&tls);
        self.tls = Some(tls);
        self
    }

    /// Serves server-only TLS (clients present no certificate) for a port
    /// that faces the outside, such as an edge gateway's. Not with
    /// [`MeshServer::tls`]: a port is either inside the mesh or outside it.
    pub fn public_tls(mut self, tls: PublicTls) -> Self {
        self.public_tls = Some(Arc::new(tls));
        self
    }

    /// Authorizes every call against `policy` (deny by default; see
    /// [`AuthorizationPolicy`]).
    pub fn authorization(mut self, policy: Option<AuthorizationPolicy>) -> Self {
        self.authorization = PolicySource::Fixed(policy.map(Arc::new));
        self
    }

    /// Injects the faults of the `serverFaults` rules in `mesh`'s config,
    /// as it is at each call (a watched file's changes apply without a
    /// restart), matched on the caller's verified SPIFFE ID and the
    /// method; see [`crate::fault::ServerFaultRule`]. Counted in
    /// `mesh_server_faults_injected_total{rule,kind}`.
    pub fn server_faults_from(mut self, mesh: &Mesh) -> Self {
        self.server_faults = Some(mesh.config_handle());
        self
    }

    /// Authorizes every call against the `authorization` policy in
    /// `mesh`'s config as it is at that call, so a policy file the mesh
    /// watches ([`crate::Mesh::from_file`]) is enforced as it changes,
    /// without a restart; see [`crate::authz`] for what a bad change does.
    pub fn authorization_from(mut self, mesh: &Mesh) -> Self {
        self.authorization = PolicySource::Live(mesh.config_handle());
        self
    }

    /// Adds a tonic-generated service; it is reported `SERVING` once the
    /// server runs and listed by reflection.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes.add_service(svc);
        self
    }

    /// Registers an encoded `FileDescriptorSet` describing the services, for
    /// reflection.
    pub fn descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.descriptor_sets.push(encoded);
        self
    }

    /// The names of the services added so far.
    pub fn service_names(&self) -> &[&'static str] {
        &self.service_names
    }

    /// The health reporter, to mark services `NOT_SERVING` while a
    /// dependency (a database) is unavailable.
    pub fn health_reporter(&self) -> HealthReporter {
        self.reporter.clone()
    }

    /// Cancelled when draining starts: long-lived streams should end on it,
    /// or the drain waits for them until [`ServerConfig::drain_timeout`].
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Serves on `listener` until `shutdown` completes, then drains.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), MeshError> {
        let addr = listener.local_addr()?;
        let config = self.config;
        let mut routes = self.routes;

        routes.add_service(tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.reporter.clone()),
        ));
        let sets = &self.descriptor_sets;
        routes.add_service(
            reflection_builder(&self.service_names, sets)
                .build_v1()
                .map_err(invalid_descriptors)?,
        );
        routes.add_service(
            reflection_builder(&self.service_names, sets)
                .build_v1alpha()
                .map_err(invalid_descriptors)?,
        );

        let reporter = self.reporter;
        let names = Arc::new(self.service_names);
        set_status(&reporter, &names, ServingStatus::Serving).await;
        // Liveness is not readiness: SERVING for as long as the process
        // serves at all, through drains and dependency outages, so a
        // liveness probe never kills a pod that is only unready.
        reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        tracing::info!(%addr, services = ?names, "serving");

        let drain_started = Arc::new(Notify::new());
        let signal = {
            let (reporter, names, drain_started, draining) = (
                reporter.clone(),
                names.clone(),
                drain_started.clone(),
                self.draining.clone(),
            );
            async move {
                shutdown.await;
                tracing::info!(%addr, "draining: health NOT_SERVING, finishing in-flight calls");
                set_status(&reporter, &names, ServingStatus::NotServing).await;
                drain_started.notify_one();
                draining.cancel();
                tokio::time::sleep(config.drain_grace).await;
                // Clearing the statuses ends clients' Health/Watch streams,
                // which would otherwise hold the drain open.
                let mut reporter = reporter;
                reporter.clear_service_status("").await;
                for name in names.iter() {
                    reporter.clear_service_status(name).await;
                }
            }
        };

        if config.max_concurrent_handshakes == 0 {
            return Err(MeshError::InvalidConfig {
                field: "max_concurrent_handshakes".into(),
                reason: "must be at least 1 (0 would never accept a TLS connection)".into(),
            });
        }
        let server_tls = match (&self.tls, &self.public_tls) {
            (Some(_), Some(_)) => {
                return Err(MeshError::InvalidConfig {
                    field: "tls".into(),
                    reason: "a server speaks either the mesh's mTLS or public TLS, not both".into(),
                });
            }
            (Some(mesh), None) => Some(ServerTls::Mesh(mesh.clone())),
            (None, Some(public)) => Some(ServerTls::Public(public.clone())),
            (None, None) => None,
        };
        if let Some(tls) = &self.tls {
            tokio::spawn(watch_certificate(
                tls.clone(),
                reporter.clone(),
                names.clone(),
                self.draining.clone(),
            ));
        } else if self.public_tls.is_none() {
            tracing::warn!(%addr, "PLAINTEXT: no TLS; callers are not authenticated and traffic is readable on the wire");
        }
        // The accept loop runs until tonic stops polling it: ending it on
        // `draining` would make tonic skip the rest of the drain signal.
        let stop_accepting = CancellationToken::new();
        let _stop_on_return = stop_accepting.clone().drop_guard();
        let incoming = tokio_stream::wrappers::ReceiverStream::new(accept_loop(
            listener,
            server_tls,
            config.max_concurrent_handshakes,
            stop_accepting,
            self.metrics.clone(),
        ));
        let known = Arc::new(known_paths(sets)?);
        let stop_admin = CancellationToken::new();
        let _stop_admin_on_return = stop_admin.clone().drop_guard();
        let _timer_anchor = TimerAnchor::spawn();
        #[cfg(feature = "admin")]
        if let Some(listener) = self.admin {
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            tracing::info!(admin = %listener.local_addr()?, "admin port: /metrics /live /ready");
            tokio::spawn(crate::telemetry::admin::serve(
                listener,
                self.metrics.clone(),
                readiness(reporter.clone()),
                Some(tonic_health::pb::health_server::HealthServer::new(
                    tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
                )),
                stop_admin,
            ));
        }
        #[cfg(feature = "grpc-web")]
        let web = self.grpc_web.clone().map(|origins| {
            ServiceBuilder::new()
                .layer(cors(origins))
                .layer(tonic_web::GrpcWebLayer::new())
                .into_inner()
        });
        #[cfg(not(feature = "grpc-web"))]
        let web: Option<tower::layer::util::Identity> = None;
        let server_faults = self
            .server_faults
            .map(|config| ServerFaultLayer::new(config, self.metrics.clone()));
        let layers = ServiceBuilder::new()
            // Browsers' gRPC-Web becomes gRPC before anything else looks at it.
            .option_layer(web)
            .layer(call_layers(
                &config,
                known,
                self.authorization,
                self.metrics,
            ))
            // Innermost: injected faults, after authorization and inside
            // the call's deadline, for the callers and methods the live
            // config's serverFaults name.
            .option_layer(server_faults)
            .into_inner();
        let server = Server::builder()
            .max_concurrent_streams(config.max_concurrent_streams)
            .http2_max_local_error_reset_streams(Some(config.max_local_error_reset_streams))
            .http2_max_pending_accept_reset_streams(Some(config.max_pending_accept_reset_streams))
            .http2_max_header_list_size(config.max_header_list_size)
            .concurrency_limit_per_connection(config.concurrency_limit_per_connection)
            .load_shed(true)
            .max_connection_age(config.max_connection_age)
            .max_connection_age_grace(config.max_connection_age_grace)
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .tcp_nodelay(true)
            .accept_http1(self.grpc_web.is_some())
            .layer(layers)
            .add_routes(match self.fallback {
                None => routes.routes(),
                Some(fallback) => tonic::service::Routes::from(
                    routes.routes().into_axum_router().fallback_service(
                        fallback.map_request(|r: http::Request<axum::body::Body>| r.map(Body::new)),
                    ),
                ),
            })
            .serve_with_incoming_shutdown(incoming, signal);

        let drain_deadline = async {
            drain_started.notified().await;
            tokio::time::sleep(config.drain_grace + config.drain_timeout).await;
        };
        tokio::select! {
            result = server => result.map_err(|source| MeshError::Serve { addr, source }),
            () = drain_deadline => {
                tracing::warn!(%addr, timeout = ?config.drain_timeout, "drain timed out; exiting with calls in flight");
                Ok(())
            }
        }
    }
}

/// The layers of [`call_layers`], outer to inner.
type CallLayers = tower::layer::util::Stack<
    ServerDeadlineLayer,
    tower::layer::util::Stack<
        GlobalConcurrencyLimitLayer,
        tower::layer::util::Stack<
            LoadShedLayer,
            tower::layer::util::Stack<
                MapResultLayer<MarkShed>,
                tower::layer::util::Stack<
                    AuthzLayer,
                    tower::layer::util::Stack<ServerTelemetryLayer, tower::layer::util::Identity>,
                >,
            >,
        >,
    >,
>;

/// The layers every call passes between the connection (and gRPC-Web
/// translation) and the service, outer to inner; one function so that the
/// order is tested as served (`server/tests.rs`).
/// [`mark_shed`]'s type, to name it in [`CallLayers`].
type MarkShed = fn(
    Result<http::Response<Body>, crate::BoxError>,
) -> Result<http::Response<Body>, crate::BoxError>;

/// The load shedder's refusal as a trailers-only `RESOURCE_EXHAUSTED`
/// marked with [`SHED_HEADER`]; any other answer loses the mark, so a
/// service passing on an upstream's status (its metadata included) cannot
/// make its callers penalise it for another server's shedding.
fn mark_shed(
    result: Result<http::Response<Body>, crate::BoxError>,
) -> Result<http::Response<Body>, crate::BoxError> {
    match result {
        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
            let mut response = tonic::Status::resource_exhausted(
                "the server is at its concurrency limit (shed at once, not queued); retry shortly",
            )
            .into_http::<Body>();
            response
                .headers_mut()
                .insert(SHED_HEADER, http::HeaderValue::from_static("1"));
            Ok(response)
        }
        Ok(mut response) => {
            response.headers_mut().remove(SHED_HEADER);
            Ok(response)
        }
        other => other,
    }
}

fn call_layers(
    config: &ServerConfig,
    known: Arc<HashSet<String>>,
    authorization: PolicySource,
    metrics: Metrics,
) -> ServiceBuilder<CallLayers> {
    ServiceBuilder::new()
        // Every call is measured and traced, even refused ones.
        .layer(ServerTelemetryLayer::new(
            known.clone(),
            config.trust_trace_context,
            metrics.clone(),
        ))
        // Then who may call what, before any work is done: a denied
        // caller learns nothing about the server's load.
        .layer(AuthzLayer::new(authorization, known, metrics))
        // At the concurrency limit, RESOURCE_EXHAUSTED at once rather than
        // a queue that eats the caller's deadline, marked as the mesh's
        // shedding (the only kind the callers' balancers penalise).
        .layer(MapResultLayer::new(mark_shed as MarkShed))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(config.concurrency_limit))
        // The inbound deadline captured for the handler's own calls (cut
        // to the maximum); a call past it ends with DEADLINE_EXCEEDED, as
        // at the reference servers (tonic alone says CANCELLED, or nothing
        // for a stalled stream), on one timer per call at most; and a
        // client's cancellation reaches the handler as an error, not as
        // the end of its request stream.
        .layer(ServerDeadlineLayer::new(config.max_inbound_deadline))
}

/// A timer kept armed [`TIMER_ANCHOR_PERIOD`] ahead on the server's
/// runtime while it serves.
///
/// tokio's timer driver wakes the I/O driver (an `eventfd` write, and a
/// parked worker) whenever a timer is registered earlier than the wake-up
/// it last planned. That plan is refreshed only when the driver parks, and
/// otherwise holds the connections' keepalive (30 s) or nothing at all, so
/// each call with a `grpc-timeout` whose handler waits paid a wake-up for
/// its timers (tonic's own, and this server's deadline layer's): 0.27
/// more `eventfd` writes per call than a call without one, measured. With
/// a timer always due within a second, a deadline longer than that is
/// never the earliest, and the cost is one wake-up a second.
struct TimerAnchor(tokio::task::AbortHandle);

/// How far ahead [`TimerAnchor`] keeps its timer.
const TIMER_ANCHOR_PERIOD: Duration = Duration::from_secs(1);

impl TimerAnchor {
    fn spawn() -> Self {
        let task = tokio::spawn(async {
            let mut tick = tokio::time::interval(TIMER_ANCHOR_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
            }
        });
        Self(task.abort_handle())
    }
}

impl Drop for TimerAnchor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Not ready without a valid certificate: reports NOT_SERVING while the
/// certificate is expired, SERVING again once a valid one is rotated in.
async fn watch_certificate(
    tls: Arc<MeshTls>,
    reporter: HealthReporter,
    names: Arc<Vec<&'static str>>,
    draining: CancellationToken,
) {
    let mut valid = true;
    loop {
        tokio::select! {
            _ = draining.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now_valid = tls.is_valid();
        if now_valid != valid {
            valid = now_valid;
            let status = if valid {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_status(&reporter, &names, status).await;
        }
    }
}

async fn set_status(reporter: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    // "" is the whole server, which is what Kubernetes' gRPC probes ask for.
    reporter.set_service_status("", status).await;
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

// grpcurl 1.8 only speaks reflection v1alpha; newer tools speak v1. Both are
// served from one builder, limited to the services this server implements.
fn reflection_builder<'a>(
    names: &[&'static str],
    sets: &[&'a [u8]],
) -> tonic_reflection::server::Builder<'a> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(HEALTH_SERVICE);
    for set in sets {
        builder = builder.register_encoded_file_descriptor_set(set);
    }
    for name in names {
        builder = builder.with_service_name(*name);
    }
    builder
}

/// CORS for gRPC-Web: the origins given, the headers grpc-web clients send
/// and the ones they must read.
#[cfg(feature = "grpc-web")]
fn cors(origins: Vec<http::HeaderValue>) -> tower_http::cors::CorsLayer {
    use http::{HeaderName, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header("content-type"),
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
            header("authorization"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
            header("retry-after"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Every path this server can answer, for bounded metric labels.
fn known_paths(sets: &[&[u8]]) -> Result<HashSet<String>, MeshError> {
    let mut table = MethodTable::default();
    table.add_encoded(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
    for set in sets {
        table.add_encoded(set)?;
    }
    let mut known: HashSet<String> = table.paths().map(str::to_owned).collect();
    for version in ["v1", "v1alpha"] {
        known.insert(format!(
            "/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        ));
    }
    Ok(known)
}

/// Ready when the whole server reports SERVING (not draining, certificate
/// valid, dependencies up).
#[cfg(feature = "admin")]
fn readiness(reporter: HealthReporter) -> crate::telemetry::admin::Readiness {
    use tonic_health::pb::{HealthCheckRequest, health_check_response, health_server::Health};
    let health = Arc::new(tonic_health::server::HealthService::from_health_reporter(
        reporter,
    ));
    Arc::new(move || {
        let health = health.clone();
        Box::pin(async move {
            let request = tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            });
            health.check(request).await.is_ok_and(|r| {
                r.into_inner().status == health_check_response::ServingStatus::Serving as i32
            })
        })
    })
}

fn invalid_descriptors(e: tonic_reflection::server::Error) -> MeshError {
    MeshError::InvalidConfig {
        field: "descriptor_set".into(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests;
