//! The contracts mesh-client's behaviour tests (`crates/mesh-client/tests`)
//! run against: `mesh.echo.v1.EchoService`, whose faults a test switches at
//! run time, and `grpc.testing.TestService` for bidirectional streams; and
//! the one echo implementation ([`Echo`]), which those tests serve in
//! process on `MeshServer` and meshbench's `mesh-echo` binary serves for
//! the benchmarks.
//!
//! A crate of its own, and not a build script in mesh-client, so that
//! mesh-client's users compile no protobuf tooling: mesh-client names this
//! crate as a path-only dev-dependency, which `cargo publish` leaves out.

#![forbid(unsafe_code)]
#![allow(missing_docs)] // generated code carries the proto comments, not rustdoc on every item

/// The encoded descriptor set of both contracts.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fixture_descriptor.bin"));

/// `mesh.echo.v1`: the echo service with switchable faults.
pub mod echo {
    tonic::include_proto!("mesh.echo.v1");
}

/// `grpc.testing`: the gRPC interop contract, for its streaming methods.
pub mod testing {
    tonic::include_proto!("grpc.testing");
}

pub mod server;

pub use server::Echo;
