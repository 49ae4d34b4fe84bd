//! The auth service: users with argon2id password hashes, and Ed25519-signed
//! JWTs that the rest of the shop verifies.
//!
//! Signing keys live in the service's own database and are created on first
//! start, so every replica pointing at the same database signs with the same
//! key and any of them verifies any token. Rotation is one database
//! decision that a single replica wins; every replica signs with the newest
//! active key and adopts a new one as soon as its own is retired.
//!
//! Logins and registrations are limited per *end client*: the verified
//! caller, or, when the caller is the edge gateway (its verified mTLS
//! identity, [`Config::trusted_gateway`]), the client the gateway names in
//! [`CLIENT_HEADER`]. Password hashes running at once are bounded
//! ([`Config::max_concurrent_hashes`]).

#![forbid(unsafe_code)]

mod limit;
mod password;
mod service;
mod tokens;

use std::{ffi::OsString, future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use shop_api::auth::v1::auth_service_server::AuthServiceServer;
use tokio::net::TcpListener;

pub use service::{AuthService, Options};

/// Metadata in which the edge gateway names the end client of a call; auth
/// believes it only from [`Config::trusted_gateway`].
pub use shop_kit::token::CLIENT_HEADER;
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
    /// days). The old key keeps verifying until its last token expires and
    /// is deleted from the database then (retirement + token lifetime +
    /// 30 s leeway); replicas sharing a database must share
    /// `--token-ttl-secs`.
    ///
    /// Signing keys are stored in the `signing_keys` table as unencrypted
    /// PKCS#8 documents, readable by anyone who can read the database.
    /// What protects them is access to it: the database login is the
    /// `auth-db` Kubernetes Secret, mounted only into auth, and keys are
    /// short-lived (this flag) and deleted after use. Production
    /// should also encrypt the volume and backups and, to withstand a
    /// leaked dump, wrap each key with an envelope key held outside the
    /// database (a KMS, or a Secret mounted only into auth); that wrapping
    /// is not built.
    #[arg(long, env = "SIGNING_KEY_MAX_AGE_SECS", default_value_t = 30 * 86_400)]
    pub signing_key_max_age_secs: u64,
    /// SPIFFE ID of the edge gateway, the only caller whose
    /// `x-shop-client` (the end client it serves) is believed for the
    /// login and registration limits. Default: the `gateway` service
    /// account in `--trust-domain` and `--namespace`.
    #[arg(long, env = "TRUSTED_GATEWAY")]
    pub trusted_gateway: Option<String>,
    /// Password hashes (argon2id, 19 MiB each) allowed to run at once;
    /// over it Register and Login answer `RESOURCE_EXHAUSTED` with
    /// `retry-after` instead of queueing (1 to 256; default: twice the
    /// number of CPUs, 4 on 2 cores, about 76 MiB of hashing memory).
    #[arg(long, env = "MAX_CONCURRENT_HASHES")]
    pub max_concurrent_hashes: Option<usize>,
}

impl Config {
    /// The SPIFFE ID of the gateway whose end-client header is believed.
    pub fn trusted_gateway(&self) -> Result<mesh_client::tls::SpiffeId, Error> {
        let id = self
            .trusted_gateway
            .clone()
            .unwrap_or_else(|| self.mesh.identity_of("gateway"));
        id.parse()
            .map_err(|source| Error::TrustedGateway { id, source })
    }

    /// The bound on password hashes running at once.
    pub fn max_concurrent_hashes(&self) -> usize {
        self.max_concurrent_hashes.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            (2 * cpus).min(MAX_HASHES)
        })
    }
}

/// The largest `--max-concurrent-hashes` (about 4.8 GiB of hashing memory).
const MAX_HASHES: usize = 256;

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
        if let Err(e) = self.trusted_gateway() {
            problems.push(e.to_string());
        }
        if !(1..=MAX_HASHES).contains(&self.max_concurrent_hashes()) {
            problems.push(format!(
                "--max-concurrent-hashes: must be 1 to {MAX_HASHES}, got {}",
                self.max_concurrent_hashes()
            ));
        }
        problems.extend(self.mesh.problems());
        problems
    }
}

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS material, the mesh policy or the admin port could not be used.
    #[error("{0}")]
    Setup(#[from] shop_kit::mesh::SetupError),
    /// `--trusted-gateway` (or the gateway's default identity) is not a SPIFFE ID.
    #[error("--trusted-gateway: {id:?} is not a SPIFFE ID: {source}")]
    TrustedGateway {
        /// The identity as given.
        id: String,
        /// What is wrong with it.
        #[source]
        source: mesh_client::tls::SpiffeIdError,
    },
    /// `--max-concurrent-hashes` allows no hash at all.
    #[error("--max-concurrent-hashes must be at least 1")]
    NoHashPermits,
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
        Options {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            ttl: Duration::from_secs(config.token_ttl_secs),
            trusted_gateway: config.trusted_gateway()?,
            max_concurrent_hashes: config.max_concurrent_hashes(),
        },
    )
    .await?;
    let rotation = tokio::spawn(
        service
            .clone()
            .rotate_forever(Duration::from_secs(config.signing_key_max_age_secs)),
    );
    let tls = config.mesh.tls()?;
    let server = config.mesh.server(tls)?.add_service(shop_kit::db::guard(
        AuthServiceServer::new(service)
            .max_decoding_message_size(config.mesh.max_request_bytes)
            .max_encoding_message_size(config.mesh.max_response_bytes)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
    ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use shop_kit::ServiceConfig;

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("auth").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_trusted_gateway_defaults_to_the_gateway_of_the_trust_domain() {
        let c = config(&["--trust-domain", "shop.test", "--namespace", "prod"]);
        assert_eq!(
            c.trusted_gateway().unwrap().to_string(),
            "spiffe://shop.test/ns/prod/sa/gateway"
        );
        let c = config(&["--trusted-gateway", "spiffe://shop.test/ns/edge/sa/public"]);
        assert_eq!(
            c.trusted_gateway().unwrap().to_string(),
            "spiffe://shop.test/ns/edge/sa/public"
        );
    }

    #[test]
    fn hashing_bound_and_gateway_identity_are_checked() {
        let c = config(&[]);
        assert!((2..=MAX_HASHES).contains(&c.max_concurrent_hashes()));
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let problems = config(&[
            "--max-concurrent-hashes",
            "0",
            "--trusted-gateway",
            "not-a-spiffe-id",
        ])
        .problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("--max-concurrent-hashes: must be 1 to 256, got 0")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("--trusted-gateway")),
            "{problems:?}"
        );
    }
}
