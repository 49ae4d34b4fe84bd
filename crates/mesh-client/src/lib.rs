//! An in-process service mesh for tonic.
//!
//! A sidecar proxy gives every call discovery, deadlines, retries, mTLS,
//! balancing and telemetry at the cost of one or two extra hops. This crate
//! gives the same guarantees inside the process, as tower layers around an
//! ordinary tonic channel and an ordinary tonic server:
//!
//! - [`Mesh`] is built once per process and hands out [`MeshChannel`]s that
//!   any tonic-generated client accepts unmodified.
//! - [`server::MeshServer`] wraps a service's routes with health, reflection,
//!   inbound deadline capture, load shedding and graceful drain.
//!
//! A server and a client in one process, as a test would run them (this
//! example runs as a doctest):
//!
//! ```
//! use std::time::Duration;
//!
//! use mesh_client::{Mesh, MeshConfig, server::{MeshServer, ServerConfig}};
//! use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A server with only the built-in health and reflection services; add
//! // yours with `.add_service(MyServiceServer::new(my_service))`.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(
//!     MeshServer::new(ServerConfig::default()).serve(listener, async {
//!         let _ = stopped.await;
//!     }),
//! );
//!
//! // One mesh per process; a channel per target, for any tonic client.
//! let mesh = Mesh::from_config(MeshConfig::default())?;
//! let channel = mesh.channel(&format!("static:///{addr}"))?;
//! let mut health = HealthClient::new(channel);
//! let mut request = tonic::Request::new(HealthCheckRequest::default());
//! request.set_timeout(Duration::from_secs(10));
//! let status = health.check(request).await?.into_inner().status();
//! assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving);
//!
//! // Drain: health NOT_SERVING, GOAWAY, in-flight calls finish.
//! drop(health);
//! let _ = stop.send(());
//! server.await??;
//! # Ok(()) }
//! ```
//!
//! A target nobody answers fails fast with `UNAVAILABLE` naming it, not at
//! the deadline:
//!
//! ```
//! # use std::time::Duration;
//! # use mesh_client::{Mesh, MeshConfig};
//! # use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A port that was free a moment ago: connections are refused.
//! let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
//! let mesh = Mesh::from_config(MeshConfig::default())?;
//! let mut health = HealthClient::new(mesh.channel(&format!("static:///{addr}"))?);
//! let mut request = tonic::Request::new(HealthCheckRequest::default());
//! request.set_timeout(Duration::from_secs(30));
//! let err = health.check(request).await.unwrap_err();
//! assert_eq!(err.code(), tonic::Code::Unavailable);
//! assert!(err.message().contains(&addr.to_string()), "{}", err.message());
//! # Ok(()) }
//! ```
//!
//! Client layers, outer to inner, per call (one `ServiceBuilder` in
//! `channel.rs`, from the call to the connection):
//!
//! 0. **route**: by the target's ordered `routes` ([`RouteConfig`],
//!    Gateway API `GRPCRoute` semantics: matches on method and metadata,
//!    weighted `backendRefs`, per-route `timeout`, `retryPolicy`, `fault`
//!    and `mirror`), which backend target this call goes to, decided once
//!    per call so its retries stay there and a reload changes nothing for
//!    calls in flight; no route taking it: the target itself. Below the
//!    retry layer, a route's faults are injected per attempt, and the
//!    balancer of the chosen backend (its own resolver, endpoints and
//!    identity) takes each attempt;
//! 1. **telemetry**: a span per call (OpenTelemetry's RPC conventions, W3C
//!    trace context injected) and the golden metrics ([`telemetry`]);
//! 2. **deadline**: explicit, inherited from the inbound call being handled,
//!    or the method's default, never past its maximum; sent as
//!    `grpc-timeout` and held for the whole response, streams included
//!    ([`deadline`]);
//! 3. **retry**: gRFC A6 retries and hedging for idempotent methods (read
//!    from the proto descriptors), transparent retries of requests that
//!    never left, all within a retry budget ([`retry::RetryLayer`]);
//! 4. **balance**: power of two choices over latency-weighted load with a failure
//!    penalty (or round robin), over a live endpoint set from a resolver
//!    (static list, DNS, file), skipping ejected, draining and
//!    reconnecting endpoints;
//! 5. **endpoint**: one HTTP/2 connection per address with keepalive,
//!    connect timeout and reconnect backoff, client-side health watching and
//!    outlier ejection.
//!
//! The deadline and retry layers are ordinary tower layers a client can
//! use alone, over a plain tonic `Channel` (`examples/layers_over_a_channel.rs`).
//! Metrics are a [`telemetry::Metrics`] handle each [`Mesh`] and server
//! passes to the layers it builds (the process default unless given
//! another).
//!
//! The modules form four layers, each using only itself and those below:
//! vocabulary (errors, config and [`ConfigHandle`], method and path types,
//! authorization policy data, identities, the metrics handle) ←
//! mechanisms (resolvers, endpoints, deadlines, TLS I/O) ← middleware
//! (balance, retry, telemetry, authorization layers) ← assembly
//! ([`Mesh`]/[`MeshChannel`], [`server::MeshServer`]). The drawing is in
//! `docs/mesh-client-modules.md`; a unit test fails on an upward use or a
//! cycle.
//!
//! Cargo features, all on by default (`default-features = false` leaves
//! them out): `otlp` (trace export over OTLP/gRPC from
//! [`telemetry::init`]), `grpc-web` (`MeshServer::grpc_web`), `admin` (the
//! admin port: `MeshServer::admin`, `telemetry::admin`); and, off by
//! default, `dev-ca` (a development CA, `tls::dev`).

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod authz;
mod balance;
mod body;
mod channel;
mod config;
pub mod deadline;
mod endpoint;
mod error;
pub mod fault;
mod headers;
mod methods;
pub mod mirror;
pub mod optional;
mod resolve;
pub mod retry;
mod route;
pub mod server;
pub mod telemetry;
pub mod tls;

#[cfg(test)]
mod layering;

#[doc(hidden)]
pub use balance::subset::subset_members;
#[doc(hidden)]
pub use channel::ModelEndpoints;
pub use channel::{Mesh, MeshChannel};
pub use config::{
    BackendRef, ConfigHandle, EndpointConfig, HeaderMatch, HeaderMatchType, HedgingPolicy,
    LbPolicy, MAX_SUBSET_SIZE, MAX_SUBSET_WIDTH, MeshConfig, MethodConfig, MethodMatch,
    MethodMatchType, OutlierDetection, RetryBudget, RetryPolicy, RouteConfig, RouteMatch,
    SubsetConfig, SubsetMode, TargetConfig,
};
pub use endpoint::EndpointState;
pub use error::{MeshError, caused_by};
pub use methods::{MethodInfo, MethodTable};
pub use resolve::Target;

/// The error type of mesh services: a boxed error, usually a `tonic::Status`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
