//! A minimal service on the mesh, to copy: one tonic service on a
//! `MeshServer`, which adds health, reflection, inbound deadlines, load
//! shedding, graceful drain on SIGTERM or Ctrl-C and, with a workload
//! identity, mutual TLS.
//!
//! ```sh
//! cargo run -p mesh-client --example server                 # plaintext, 127.0.0.1:50100
//! # mTLS with this repository's dev CA (identities spiffe://shop.local/ns/shop/sa/{server,client}):
//! cargo run -p shopctl -- certs --out certs --workloads server,client
//! MESH_TLS_DIR=certs/server cargo run -p mesh-client --example server
//! ```
//!
//! `MESH_TLS_DIR` holds `tls.crt`, `tls.key` and `ca.crt` (a SPIFFE
//! workload certificate and its CA bundle: a mounted Kubernetes TLS
//! Secret, or `shopctl`'s dev CA in this repository). Without it the server
//! speaks plaintext, for trying it out on loopback only.

use std::net::SocketAddr;

use mesh_client::{
    server::{MeshServer, ServerConfig},
    tls::{MeshTls, TlsFiles},
};
// Your own tonic-generated server goes here; the example uses the echo
// contract of mesh-client's tests (`proto/mesh/echo/v1/echo.proto`).
use mesh_fixture::echo::{
    EchoRequest, EchoResponse,
    echo_service_server::{EchoService, EchoServiceServer},
};
use tonic::{Request, Response, Status};

/// The service: answers Echo (every other method of the contract answers
/// `UNIMPLEMENTED`).
struct Greeter;

#[tonic::async_trait]
impl EchoService for Greeter {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        // The caller's verified SPIFFE ID (mTLS only); headers never count.
        let caller = mesh_client::tls::caller_identity(&request).map_or_else(
            || "an unauthenticated caller".to_owned(),
            ToString::to_string,
        );
        tracing::info!(%caller, "echo");
        Ok(Response::new(EchoResponse {
            payload: request.into_inner().payload,
            server_id: "example-server".into(),
            timeout_ms: 0,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs (RUST_LOG), traces (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set).
    let telemetry = mesh_client::telemetry::init("example-server");
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50100".into())
        .parse()?;
    let mut server = MeshServer::new(ServerConfig::default())
        // Reflection describes what you serve (grpcurl needs no .proto files).
        .descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .add_service(EchoServiceServer::new(Greeter));
    match std::env::var_os("MESH_TLS_DIR") {
        // Re-read every second: rotated certificates need no restart.
        Some(dir) => server = server.tls(MeshTls::load(TlsFiles::in_dir(dir))?),
        None => tracing::warn!("MESH_TLS_DIR is not set: plaintext, no caller identities"),
    }
    // An already-bound listener: tests bind port 0 and pass it in.
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving");
    server.serve(listener, shutdown()).await?;
    telemetry.shutdown().await;
    Ok(())
}

/// Completes on SIGTERM (what Kubernetes sends) or Ctrl-C, which starts the
/// drain.
async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
