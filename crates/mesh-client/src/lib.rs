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
//! Client layers, outer to inner: deadline (explicit, inherited from the
//! inbound call being handled, or the target default; sent as
//! `grpc-timeout`) → endpoint selection over the resolved addresses →
//! one HTTP/2 connection per endpoint.

#![forbid(unsafe_code)]

mod channel;
mod config;
pub mod deadline;
mod error;
mod resolve;
pub mod server;

pub use channel::{Mesh, MeshChannel};
pub use config::{EndpointConfig, MeshConfig, TargetConfig};
pub use error::MeshError;
pub use resolve::Target;

/// The error type of mesh services: a boxed error, usually a `tonic::Status`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
