//! The echo server that the mesh's tests and benchmarks run against.
//!
//! It serves `mesh_fixture::Echo` (the one echo implementation, which
//! mesh-client's own tests serve in process) on a `MeshServer`, so it has
//! the same health, reflection, deadline capture and drain as every shop
//! service, and its faults (added latency, `UNAVAILABLE`, retry pushback)
//! can be switched at run time with `SetFault`.

#![forbid(unsafe_code)]

pub mod interop;
pub mod plot;
pub mod sim;

use std::{ffi::OsString, future::Future, net::SocketAddr, process::ExitCode};

use clap::Parser;
use mesh_client::server::ServerConfig;
use mesh_fixture::{Echo, echo::echo_service_server::EchoServiceServer};
use tokio::net::TcpListener;

/// Flags of `mesh-echo`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "mesh-echo",
    about = "Echo server for mesh tests and benchmarks"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50100")]
    pub listen: SocketAddr,
    /// Name reported in answers.
    #[arg(long, default_value = "echo")]
    pub id: String,
    /// Initial added latency, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: i64,
    /// Mesh target of the next hop for Chain.
    #[arg(long)]
    pub next: Option<String>,
    /// SPIFFE ID the next hop must present (with mTLS).
    #[arg(long)]
    pub next_identity: Option<String>,
    /// Identity, mesh policy and drain.
    #[command(flatten)]
    pub mesh: shop_kit::MeshArgs,
    /// Calls handled at once before shedding with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub concurrency_limit: usize,
}

impl shop_kit::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(Err(e)) = self.next.as_ref().map(|n| n.parse::<mesh_client::Target>()) {
            problems.push(format!("--next: {e}"));
        }
        if self.delay_ms < 0 {
            problems.push("--delay-ms: must not be negative".into());
        }
        if self.next.is_some() && self.mesh.tls_dir.is_some() && self.next_identity.is_none() {
            problems
                .push("--next-identity: required with --next and --tls-dir (secure naming)".into());
        }
        problems.extend(self.mesh.problems());
        problems
    }
}

/// Why the process stopped.
pub use shop_kit::ServiceError as Error;

/// Runs the echo server until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let tls = config.mesh.tls()?;
    let next = match &config.next {
        Some(target) => {
            let mesh = config.mesh.mesh(tls.clone())?;
            let channel = match &config.next_identity {
                Some(identity) => mesh.channel_with_identity(target, identity)?,
                None => mesh.channel(target)?,
            };
            Some(channel)
        }
        None => None,
    };
    let limits = ServerConfig {
        concurrency_limit: config.concurrency_limit,
        ..ServerConfig::default()
    };
    config
        .mesh
        .server_with(limits, tls)?
        .add_service(
            EchoServiceServer::new(Echo::new(config.id, config.delay_ms, next))
                .max_decoding_message_size(config.mesh.max_request_bytes)
                .max_encoding_message_size(config.mesh.max_response_bytes)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// The `mesh-echo` entry point.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    shop_kit::service_main("mesh-echo", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
