//! The inventory service: products, their stock, and reservations of stock
//! for orders, with the stock invariant enforced by the database.

#![forbid(unsafe_code)]

mod service;

use std::{ffi::OsString, future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use shop_api::inventory::v1::inventory_service_server::InventoryServiceServer;
use tokio::net::TcpListener;

pub use service::InventoryService;

/// Configuration of the inventory service, from flags or environment.
#[derive(Clone, Debug, Parser)]
#[command(name = "inventory", about = "The shop's inventory service")]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://USER:PASS@HOST/DB`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite:inventory.db")]
    pub database_url: String,
    /// Identity, mesh policy and drain.
    #[command(flatten)]
    pub mesh: shop_kit::MeshArgs,
    /// A reservation neither committed nor released in this many seconds is
    /// released, so a saga that never returns cannot hold stock forever.
    #[arg(long, env = "RESERVATION_TTL_SECS", default_value_t = 900)]
    pub reservation_ttl_secs: u64,
}

impl shop_kit::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = shop_kit::db::backend(&self.database_url) {
            problems.push(format!("--database-url: {e}"));
        }
        if !(1..=7 * 86_400).contains(&self.reservation_ttl_secs) {
            problems.push(format!(
                "--reservation-ttl-secs: must be 1 to 604800, got {}",
                self.reservation_ttl_secs
            ));
        }
        problems.extend(self.mesh.problems());
        problems
    }
}

/// Why the process stopped.
pub use shop_kit::ServiceError as Error;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Runs the service on `listener` until `shutdown` completes, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let pool = shop_kit::db::connect(&config.database_url, &MIGRATOR).await?;
    let service = InventoryService::new(
        pool.clone(),
        Duration::from_secs(config.reservation_ttl_secs),
    );
    let tls = config.mesh.tls()?;
    let server = config.mesh.server(tls)?.add_service(shop_kit::db::guard(
        InventoryServiceServer::new(service.clone())
            .max_decoding_message_size(config.mesh.max_request_bytes)
            .max_encoding_message_size(config.mesh.max_response_bytes)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
    ));
    let sweeper = tokio::spawn(service.clone().release_expired_forever(server.draining()));
    shop_kit::serve(server, pool, listener, shutdown).await?;
    sweeper.abort();
    Ok(())
}

/// The process entry point: `args` are the command line.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    shop_kit::service_main("inventory", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
