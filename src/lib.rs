//! Generated gRPC clients and servers for every shop contract in `proto/`.
//!
//! Each service has its own module named after its package, for example
//! [`orders::v1`] holds `mesh.orders.v1`: the messages, an
//! `orders_service_client::OrdersServiceClient` that works over any tonic
//! channel (including a mesh channel) and an
//! `orders_service_server::OrdersServiceServer` to implement.
//!
//! [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set of every contract;
//! servers serve it through reflection so `grpcurl` can list and describe
//! them, and the mesh reads each method's `idempotency_level` from it.

#![allow(missing_docs)] // generated code carries the proto comments, not rustdoc on every item

/// The encoded `google.protobuf.FileDescriptorSet` of every shop contract,
/// including the well-known types they import.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_descriptor.bin"));

/// Types shared by several contracts (`mesh.common.v1`).
pub mod common {
    /// `mesh.common.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.common.v1");
    }
}

/// The auth contract (`mesh.auth.v1`).
pub mod auth {
    /// `mesh.auth.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.auth.v1");
    }
}

/// The inventory contract (`mesh.inventory.v1`).
pub mod inventory {
    /// `mesh.inventory.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.inventory.v1");
    }
}

/// The payments contract (`mesh.payments.v1`).
pub mod payments {
    /// `mesh.payments.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.payments.v1");
    }
}

/// The echo contract (`mesh.echo.v1`), for the mesh's tests and benchmarks.
pub mod echo {
    /// `mesh.echo.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.echo.v1");
    }
}

/// The orders contract (`mesh.orders.v1`).
pub mod orders {
    /// `mesh.orders.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.orders.v1");
    }
}

/// The gRPC project's interop test contract (`grpc.testing`), for the
/// conformance matrix against the reference implementation.
pub mod grpc {
    /// `grpc.testing`.
    pub mod testing {
        tonic::include_proto!("grpc.testing");
    }
}

/// The recommendations contract (`mesh.recommendations.v1`), served by the
/// Python service in `services/recommendations`.
pub mod recommendations {
    /// `mesh.recommendations.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.recommendations.v1");
    }
}

/// The mesh identity service's contract (`mesh.identity.v1`): workload
/// certificates from CSRs and ServiceAccount tokens.
pub mod identity {
    /// `mesh.identity.v1`.
    pub mod v1 {
        tonic::include_proto!("mesh.identity.v1");
    }
}
