//! The payments service: customer accounts, a double-entry ledger, and
//! idempotent charges and refunds.

#![forbid(unsafe_code)]

mod ledger;
mod service;
mod wallet;

use std::{ffi::OsString, future::Future, net::SocketAddr, process::ExitCode};

use clap::Parser;
use shop_api::{
    auth::v1::auth_service_client::AuthServiceClient,
    payments::v1::{
        payments_service_server::PaymentsServiceServer, wallet_service_server::WalletServiceServer,
    },
};
use tokio::net::TcpListener;

pub use ledger::WALLET_MAX_BALANCE_MINOR;
pub use ledger::{LedgerCheck, check_ledger};
pub use service::PaymentsService;
pub use wallet::{MAX_ACCOUNTS_PER_USER, WalletService};

/// Configuration of the payments service, from flags or environment.
#[derive(Clone, Debug, Parser)]
#[command(name = "payments", about = "The shop's payments service")]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50053")]
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://USER:PASS@HOST/DB`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite:payments.db")]
    pub database_url: String,
    /// Identity, mesh policy and drain.
    #[command(flatten)]
    pub mesh: shop_kit::MeshArgs,
    /// Where the auth service is, as a mesh target (for its token keys).
    #[arg(long, env = "AUTH_TARGET", default_value = "static:///127.0.0.1:50051")]
    pub auth_target: String,
    /// Which user tokens the wallet accepts.
    #[command(flatten)]
    pub tokens: shop_kit::token::TokenArgs,
}

impl shop_kit::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = shop_kit::db::backend(&self.database_url)
            .err()
            .map(|e| format!("--database-url: {e}"))
            .into_iter()
            .collect();
        if let Err(e) = self.auth_target.parse::<mesh_client::Target>() {
            problems.push(format!("--auth-target: {e}"));
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
    let tls = config.mesh.tls()?;
    let mesh = config.mesh.mesh(tls.clone())?;
    let auth = config
        .mesh
        .channel(&mesh, tls.is_some(), &config.auth_target, "auth")?;
    let users =
        shop_kit::token::UserTokens::new(config.tokens.key_cache(AuthServiceClient::new(auth)));
    let payments = PaymentsService::new(pool.clone());
    let limits = &config.mesh;
    let server = config
        .mesh
        .server(tls)?
        .add_service(shop_kit::db::guard(
            PaymentsServiceServer::new(payments.clone())
                .max_decoding_message_size(limits.max_request_bytes)
                .max_encoding_message_size(limits.max_response_bytes)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        ))
        .add_service(shop_kit::db::guard(
            WalletServiceServer::new(WalletService::new(payments, users.clone()))
                .max_decoding_message_size(limits.max_request_bytes)
                .max_encoding_message_size(limits.max_response_bytes)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        ));
    let key_refresh = tokio::spawn(users.keys().clone().refresh_until(server.draining()));
    shop_kit::serve(server, pool, listener, shutdown).await?;
    key_refresh.abort();
    Ok(())
}

/// The process entry point: `args` are the command line.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    shop_kit::service_main("payments", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
