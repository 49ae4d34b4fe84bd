//! Shared helpers for the cross-service tests: real service processes on
//! loopback, real databases, and the rule for skipping tests whose tools
//! are missing.
//!
//! A test that needs PostgreSQL, grpcurl or Python skips with a visible
//! message when they are absent, unless `MESH_TEST_REQUIRE_ALL=1` (set by
//! `.ci/run`), which turns every such skip into a failure.

#![allow(dead_code)] // each test binary uses a different part

// The DNS test server, the test PKI and health/admin probes belong to
// mesh-client's tests; the shop's tests reuse the one copy of each.
mod certs;
#[path = "../../crates/mesh-client/tests/common/dns.rs"]
pub mod dns;
mod grpc;
mod invariants;
pub mod netbed;
pub mod netshop;
pub mod otlp;
#[path = "../../crates/mesh-client/tests/common/pki.rs"]
mod pki;
mod postgres;
#[path = "../../crates/mesh-client/tests/common/probe.rs"]
mod probe;
mod procs;
mod shop;
mod tools;
pub mod up;

// One flat namespace, as before the split: tests say `common::Shop`. Not
// every test binary uses every module.
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use grpc::*;
#[allow(unused_imports)]
pub use invariants::*;
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use probe::*;
#[allow(unused_imports)]
pub use procs::*;
#[allow(unused_imports)]
pub use shop::*;
#[allow(unused_imports)]
pub use tools::*;
