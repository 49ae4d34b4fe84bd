//! A minimal mesh client, to copy: one `Mesh` per process, one channel per
//! target, and an unmodified tonic-generated client over it. Every call
//! gets a deadline, retries within a budget for idempotent methods, P2C
//! balancing over the target's endpoints, outlier ejection and, with a
//! workload identity, mutual TLS with the server's identity checked.
//!
//! ```sh
//! cargo run -p mesh-client --example server &
//! cargo run -p mesh-client --example client                 # static:///127.0.0.1:50100
//! cargo run -p mesh-client --example client -- static:///127.0.0.1:50100,127.0.0.1:50101
//! # with the server's mTLS (see server.rs for the certificates):
//! MESH_TLS_DIR=certs/client MESH_SERVER_ID=spiffe://shop.local/ns/shop/sa/server \
//!     cargo run -p mesh-client --example client
//! ```
//!
//! A server presenting another identity is refused: `UNAVAILABLE ...
//! secure naming: expected server spiffe://..., it presented ...`.

use std::time::Duration;

use mesh_client::{
    Mesh, MeshConfig,
    tls::{MeshTls, TlsFiles},
};
// Your own tonic-generated client goes here; the example uses the echo
// contract of mesh-client's tests (`proto/mesh/echo/v1/echo.proto`).
use mesh_fixture::echo::{EchoRequest, echo_service_client::EchoServiceClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "static:///127.0.0.1:50100".into());
    // Built once per process. `Mesh::from_file(path)` instead follows a
    // policy file (timeouts, retries, balancing, authorization) as it
    // changes. The descriptor set tells the mesh which methods are
    // idempotent (`option idempotency_level`), so only those are retried.
    let mut mesh = Mesh::from_config(MeshConfig::default())?
        .with_descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)?;
    let channel = match std::env::var_os("MESH_TLS_DIR") {
        Some(dir) => {
            mesh = mesh.with_tls(MeshTls::load(TlsFiles::in_dir(dir))?);
            // With mTLS the server must present this SPIFFE ID.
            let server = std::env::var("MESH_SERVER_ID")
                .map_err(|_| "MESH_SERVER_ID: the server's SPIFFE ID, needed with MESH_TLS_DIR")?;
            mesh.channel_with_identity(&target, &server)?
        }
        None => mesh.channel(&target)?,
    };
    let mut client = EchoServiceClient::new(channel.clone());
    for i in 0..3 {
        let mut request = tonic::Request::new(EchoRequest {
            payload: format!("hello {i}").into_bytes(),
        });
        // Optional: without it the method's configured default applies.
        request.set_timeout(Duration::from_secs(2));
        match client.echo(request).await {
            Ok(answer) => println!("{} answered", answer.into_inner().server_id),
            // The status names the target and endpoint when the mesh failed
            // the call (no endpoint, connection refused, deadline).
            Err(status) => println!("failed: {:?}: {}", status.code(), status.message()),
        }
    }
    for endpoint in channel.endpoint_states() {
        println!("{endpoint:?}");
    }
    Ok(())
}
