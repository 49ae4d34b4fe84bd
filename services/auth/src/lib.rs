//! The auth service: users with argon2id password hashes, and Ed25519-signed
//! JWTs that the rest of the shop verifies.
//!
//! Signing keys live in the service's own database and are created on first
//! start, so every replica pointing at the same database signs with the same
//! key and any of them verifies any token.

#![forbid(unsafe_code)]

mod limit;
mod password;
mod service;
mod tokens;

use std::{ffi::OsString, future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use shop_api::auth::v1::auth_service_server::AuthServiceServer;
use tokio::net::TcpListener;

pub use service::AuthService;
pub use tokens::{Claims, TokenError, TokenVerifier};

/// Configuration of the auth service, from flags or environment.
#[derive(Clone, Debug, Parser)]
#[command(name = "auth", about = "The shop's auth service")]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://USER:PASS@HOST/DB`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite:auth.db")]
    pub database_url: String,
    /// Identity, mesh policy and drain.
    #[command(flatten)]
    pub mesh: shop_kit::MeshArgs,
    /// The `iss` claim of issued tokens.
    #[arg(long, env = "TOKEN_ISSUER", default_value = "mesh-shop-auth")]
    pub issuer: String,
    /// The `aud` claim of issued tokens.
    #[arg(long, env = "TOKEN_AUDIENCE", default_value = "mesh-shop")]
    pub audience: String,
    /// Lifetime of issued tokens, in seconds (60 to 86400).
    #[arg(long, env = "TOKEN_TTL_SECS", default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// Rotate the signing key once it is this old, in seconds (default 30
    /// days). The old key keeps verifying until its last token expires.
    #[arg(long, env = "SIGNING_KEY_MAX_AGE_SECS", default_value_t = 30 * 86_400)]
    pub signing_key_max_age_secs: u64,
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
        if !(60..=86_400).contains(&self.token_ttl_secs) {
            problems.push(format!(
                "--token-ttl-secs: must be 60 to 86400, got {}",
                self.token_ttl_secs
            ));
        }
        if self.signing_key_max_age_secs < 2 {
            problems.push("--signing-key-max-age-secs: must be at least 2".into());
        }
        if self.issuer.is_empty() {
            problems.push("--issuer: must not be empty".into());
        }
        if self.audience.is_empty() {
            problems.push("--audience: must not be empty".into());
        }
        problems.extend(self.mesh.problems());
        problems
    }
}

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS material or the mesh policy could not be used.
    #[error("{0}")]
    Setup(String),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Db(#[from] shop_kit::db::DbError),
    /// Loading or creating the signing key failed.
    #[error("signing keys: {0}")]
    Keys(String),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] mesh_client::MeshError),
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Runs the service on `listener` until `shutdown` completes, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let pool = shop_kit::db::connect(&config.database_url, &MIGRATOR).await?;
    let service = AuthService::new(
        pool.clone(),
        config.issuer.clone(),
        config.audience.clone(),
        Duration::from_secs(config.token_ttl_secs),
    )
    .await?;
    let rotation = tokio::spawn(
        service
            .clone()
            .rotate_forever(Duration::from_secs(config.signing_key_max_age_secs)),
    );
    let tls = config.mesh.tls().map_err(Error::Setup)?;
    let server = config.mesh.server(tls).map_err(Error::Setup)?.add_service(
        AuthServiceServer::new(service)
            .max_decoding_message_size(config.mesh.max_request_bytes)
            .max_encoding_message_size(config.mesh.max_response_bytes)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
    );
    shop_kit::serve(server, pool, listener, shutdown).await?;
    rotation.abort();
    Ok(())
}

/// The process entry point: `args` are the command line.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    shop_kit::service_main("auth", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
