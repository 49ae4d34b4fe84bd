//! The orders service: orders placed by signed-in users, fulfilled by a saga
//! over inventory and payments, every call through the mesh.
//!
//! The saga's next step is written to the orders database before the step
//! runs, and every step is idempotent under a key derived from the order
//! (the reservation id is the order id; the charge key is
//! `order-<id>-charge`), so a step sent twice has one effect and a restart
//! resumes where the order was.

#![forbid(unsafe_code)]

mod metrics;
mod recommendations;
mod saga;
mod service;
mod store;
mod watch;

use std::{ffi::OsString, future::Future, net::SocketAddr, process::ExitCode};

use clap::Parser;
use shop_api::{
    auth::v1::auth_service_client::AuthServiceClient,
    inventory::v1::inventory_service_client::InventoryServiceClient,
    orders::v1::orders_service_server::OrdersServiceServer,
    payments::v1::payments_service_client::PaymentsServiceClient,
};
use tokio::net::TcpListener;

pub use saga::Saga;
pub use service::{MAX_PENDING_ORDERS_PER_USER, OrdersService};
pub use shop_kit::token::VERIFIED_SUBJECT_HEADER;
pub use watch::{MAX_WATCHES_PER_USER, WATCH_POLL};

/// Configuration of the orders service, from flags or environment.
#[derive(Clone, Debug, Parser)]
#[command(name = "orders", about = "The shop's orders service")]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50054")]
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://USER:PASS@HOST/DB`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite:orders.db")]
    pub database_url: String,
    /// Identity, mesh policy and drain.
    #[command(flatten)]
    pub mesh: shop_kit::MeshArgs,
    /// Where the auth service is, as a mesh target.
    #[arg(long, env = "AUTH_TARGET", default_value = "static:///127.0.0.1:50051")]
    pub auth_target: String,
    /// Where the inventory service is, as a mesh target.
    #[arg(
        long,
        env = "INVENTORY_TARGET",
        default_value = "static:///127.0.0.1:50052"
    )]
    pub inventory_target: String,
    /// Where the payments service is, as a mesh target.
    #[arg(
        long,
        env = "PAYMENTS_TARGET",
        default_value = "static:///127.0.0.1:50053"
    )]
    pub payments_target: String,
    /// Where the recommendations service is, as a mesh target; told about
    /// each confirmed order, best effort (unset: no one is told).
    #[arg(long, env = "RECOMMENDATIONS_TARGET")]
    pub recommendations_target: Option<String>,
    /// Which user tokens are accepted (checked here with auth's published keys).
    #[command(flatten)]
    pub tokens: shop_kit::token::TokenArgs,
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
        for (flag, target) in [
            ("--auth-target", &self.auth_target),
            ("--inventory-target", &self.inventory_target),
            ("--payments-target", &self.payments_target),
        ]
        .into_iter()
        .chain(
            self.recommendations_target
                .as_ref()
                .map(|t| ("--recommendations-target", t)),
        ) {
            if let Err(e) = target.parse::<mesh_client::Target>() {
                problems.push(format!("{flag}: {e}"));
            }
        }
        problems.extend(self.mesh.problems());
        problems
    }
}

/// Why the process stopped.
pub use shop_kit::ServiceError as Error;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a draining process waits for its running sagas.
const SAGA_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the service on `listener` until `shutdown` completes, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let pool = shop_kit::db::connect(&config.database_url, &MIGRATOR).await?;
    let tls = config.mesh.tls()?;
    let tls_on = tls.is_some();
    let mesh = config.mesh.mesh(tls.clone())?;
    let channel = |target: &str, service: &str| config.mesh.channel(&mesh, tls_on, target, service);
    let users = shop_kit::token::UserTokens::new(config.tokens.key_cache(AuthServiceClient::new(
        channel(&config.auth_target, "auth")?,
    )));
    let inventory = InventoryServiceClient::new(channel(&config.inventory_target, "inventory")?);
    let payments = PaymentsServiceClient::new(channel(&config.payments_target, "payments")?);

    let server = config.mesh.server(tls)?;
    let mut saga = Saga::new(pool.clone(), inventory.clone(), payments.clone());
    if let Some(target) = &config.recommendations_target {
        saga = saga.with_recommendations(recommendations::Teller::new(channel(
            target,
            "recommendations",
        )?));
    }
    let recovery = tokio::spawn(saga.clone().recover_forever(server.draining()));
    let key_refresh = tokio::spawn(users.keys().clone().refresh_until(server.draining()));
    let service = OrdersService::new(
        pool.clone(),
        saga.clone(),
        users,
        inventory,
        payments,
        server.draining(),
    );
    let server = server.add_service(shop_kit::db::guard(
        OrdersServiceServer::new(service)
            .max_decoding_message_size(config.mesh.max_request_bytes)
            .max_encoding_message_size(config.mesh.max_response_bytes)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
    ));
    shop_kit::serve(server, pool, listener, shutdown).await?;
    recovery.abort();
    key_refresh.abort();
    // Sagas this process started finish here rather than wait for another
    // pod's recovery sweep (bounded: whatever is left is resumed by it).
    if !saga.wait_idle(SAGA_DRAIN_TIMEOUT).await {
        tracing::warn!("sagas still running at exit; another orders process resumes them");
    }
    Ok(())
}

/// The process entry point: `args` are the command line.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    shop_kit::service_main("orders", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
