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
//! ```no_run
//! # async fn demo() -> Result<(), mesh_client::MeshError> {
//! use mesh_client::{Mesh, MeshConfig};
//! let mesh = Mesh::new(MeshConfig::default());
//! let channel = mesh.channel("static:///127.0.0.1:50052,127.0.0.1:50062")?;
//! // let mut inventory = InventoryServiceClient::new(channel);
//! # Ok(()) }
//! ```
//!
//! Client layers, outer to inner, per call:
//!
//! 1. **deadline**: explicit, inherited from the inbound call being handled,
//!    or the method's default; sent as `grpc-timeout`
//!    ([`deadline`]);
//! 2. **retry**: gRFC A6 retries and hedging for idempotent methods (read
//!    from the proto descriptors), transparent retries of requests that
//!    never left, all within a retry budget;
//! 3. **balance**: power of two choices over peak-EWMA load with a failure
//!    penalty (or round robin), over a live endpoint set from a resolver
//!    (static list, DNS, file), skipping ejected, draining and
//!    reconnecting endpoints;
//! 4. **endpoint**: one HTTP/2 connection per address with keepalive,
//!    connect timeout and reconnect backoff, client-side health watching and
//!    outlier ejection.

#![forbid(unsafe_code)]

pub mod authz;
mod balance;
mod body;
mod channel;
mod config;
pub mod deadline;
mod endpoint;
mod error;
mod methods;
mod resolve;
mod retry;
pub mod server;
pub mod telemetry;
pub mod tls;

pub use channel::{Mesh, MeshChannel};
pub use config::{
    EndpointConfig, HedgingPolicy, LbPolicy, MeshConfig, MethodConfig, OutlierDetection,
    RetryBudget, RetryPolicy, TargetConfig,
};
pub use endpoint::EndpointState;
pub use error::{MeshError, caused_by};
pub use methods::{MethodInfo, MethodTable};
pub use resolve::Target;

/// The error type of mesh services: a boxed error, usually a `tonic::Status`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
