//! The mesh identity service: issues short-lived SPIFFE workload
//! certificates, so no workload certificate is ever made by hand or kept
//! in a Secret.
//!
//! A workload calls `mesh.identity.v1.IdentityService/Certify` with a CSR
//! for a key it generated in memory and its Kubernetes projected
//! ServiceAccount token. The service verifies the token against the
//! cluster issuer's keys ([`tokens`]) and signs a certificate for
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>` — the
//! identity the *token* proves; the CSR contributes only its public key
//! ([`ca`]). Certificates live `--cert-ttl-secs` (default 24 h) and are
//! backdated `--backdate-secs` for clock skew; workloads renew at about
//! 70 % of the lifetime (`mesh_client::tls::certify`).
//!
//! The service holds the issuing CA (key and certificate from files, a
//! mounted Secret in Kubernetes; the key is never logged) and gives itself
//! its own serving certificate from it, renewed the same way. Callers
//! connect with server-only TLS (they have no certificate yet) and check
//! the service's SPIFFE ID against their trust bundle.
//!
//! Every issuance is logged with identity and serial and counted
//! (`mesh_identity_certificates_issued_total`); refusals are counted by
//! reason. Calls are limited per client address before any token work and
//! per proven identity after it (`RESOURCE_EXHAUSTED` with `retry-after`).

#![forbid(unsafe_code)]

pub mod agent;
pub mod ca;
mod http;
pub mod service;
pub mod tokens;

use std::{
    ffi::OsString, future::Future, net::SocketAddr, num::NonZeroU32, path::PathBuf,
    process::ExitCode, sync::Arc, time::Duration,
};

use clap::Parser;
use mesh_client::{
    server::{MeshServer, ServerConfig},
    tls::{
        SpiffeId,
        certify::{CertifyOptions, certify},
    },
};
use shop_api::identity::v1::identity_service_server::IdentityServiceServer;
use tokio::net::TcpListener;

use crate::{
    ca::{IssuingCa, SelfIssuer},
    service::{IdentityService, Policy, Rate},
    tokens::{KeySource, TokenVerifier},
};

/// Configuration of the identity service, from flags or environment.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "identity",
    about = "The mesh identity service: workload certificates from ServiceAccount tokens"
)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50060")]
    pub listen: SocketAddr,
    /// Address of the admin HTTP port (`/metrics`, `/live`, `/ready`).
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// PEM certificate of the issuing CA (then, for an intermediate, its
    /// parents up to but not including the root).
    #[arg(long, env = "CA_CERT")]
    pub ca_cert: PathBuf,
    /// PEM private key of the issuing CA. Never logged.
    #[arg(long, env = "CA_KEY")]
    pub ca_key: PathBuf,
    /// PEM trust bundle the service's own certificate is checked against
    /// (every root workloads trust; during a CA rotation, old and new).
    /// Default: `--ca-cert`.
    #[arg(long, env = "TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "shop.local")]
    pub trust_domain: String,
    /// Namespace of the service's own identity.
    #[arg(long, env = "MESH_NAMESPACE", default_value = "shop")]
    pub namespace: String,
    /// ServiceAccount of the service's own identity.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "identity")]
    pub service_account: String,
    /// Lifetime of issued certificates, seconds (10 to 2592000; default 24 h).
    #[arg(long, env = "CERT_TTL_SECS", default_value_t = 86_400)]
    pub cert_ttl_secs: u64,
    /// Issued certificates are valid from this many seconds ago, for
    /// workloads whose clocks are behind (0 to 3600).
    #[arg(long, env = "BACKDATE_SECS", default_value_t = 60)]
    pub backdate_secs: u64,
    /// The cluster's ServiceAccount issuer (`iss` of the tokens), e.g.
    /// `https://kubernetes.default.svc.cluster.local`.
    #[arg(long, env = "TOKEN_ISSUER")]
    pub token_issuer: String,
    /// The audience tokens must be bound to (the projected volume's
    /// `audience`).
    #[arg(long, env = "TOKEN_AUDIENCE", default_value = "mesh-identity")]
    pub token_audience: String,
    /// The issuer's keys as a JWKS file or a directory of `*.json` JWKS
    /// files (dev and tests). Exactly one of this and `--oidc-discovery-url`.
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// The issuer's OIDC discovery document, e.g.
    /// `https://kubernetes.default.svc.cluster.local/.well-known/openid-configuration`.
    #[arg(long, env = "OIDC_DISCOVERY_URL")]
    pub oidc_discovery_url: Option<String>,
    /// CA bundle for an `https://` discovery URL.
    #[arg(
        long,
        env = "OIDC_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub oidc_ca_file: PathBuf,
    /// Bearer token sent to the discovery endpoints, if the file exists.
    #[arg(
        long,
        env = "OIDC_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub oidc_token_file: PathBuf,
    /// How often the issuer's keys are re-read, seconds (10 to 86400).
    #[arg(long, env = "JWKS_REFRESH_SECS", default_value_t = 300)]
    pub jwks_refresh_secs: u64,
    /// Certify calls per second per proven identity (sustained).
    #[arg(long, env = "RATE_PER_IDENTITY", default_value_t = 2)]
    pub rate_per_identity: u32,
    /// Burst of Certify calls per identity (all replicas of a Deployment
    /// restarting at once share it).
    #[arg(long, env = "BURST_PER_IDENTITY", default_value_t = 20)]
    pub burst_per_identity: u32,
    /// Certify calls per second per client address, checked before any
    /// token work.
    #[arg(long, env = "RATE_PER_ADDRESS", default_value_t = 20)]
    pub rate_per_address: u32,
    /// Burst of Certify calls per client address.
    #[arg(long, env = "BURST_PER_ADDRESS", default_value_t = 50)]
    pub burst_per_address: u32,
    /// Milliseconds between reporting NOT_SERVING and closing on SIGTERM.
    #[arg(long, env = "DRAIN_GRACE_MS", default_value_t = 0)]
    pub drain_grace_ms: u64,
}

impl Config {
    /// The service's own SPIFFE ID.
    pub fn own_identity(&self) -> Result<SpiffeId, String> {
        SpiffeId::workload(&self.trust_domain, &self.namespace, &self.service_account)
            .map_err(|e| e.to_string())
    }

    fn key_source(&self) -> Result<KeySource, String> {
        match (&self.jwks_file, &self.oidc_discovery_url) {
            (Some(path), None) => Ok(KeySource::Files(path.clone())),
            (None, Some(url)) => Ok(KeySource::Discovery {
                url: url.clone(),
                ca_file: url
                    .starts_with("https://")
                    .then(|| self.oidc_ca_file.clone()),
                token_file: self
                    .oidc_token_file
                    .is_file()
                    .then(|| self.oidc_token_file.clone()),
            }),
            _ => Err("give exactly one of --jwks-file and --oidc-discovery-url".into()),
        }
    }

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second)?,
            burst: NonZeroU32::new(burst)?,
        })
    }
}

impl shop_kit::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(10..=30 * 86_400).contains(&self.cert_ttl_secs) {
            problems.push(format!(
                "--cert-ttl-secs: must be 10 to 2592000, got {}",
                self.cert_ttl_secs
            ));
        }
        if self.backdate_secs > 3600 {
            problems.push("--backdate-secs: must be at most 3600".into());
        }
        if !(10..=86_400).contains(&self.jwks_refresh_secs) {
            problems.push("--jwks-refresh-secs: must be 10 to 86400".into());
        }
        if let Some(url) = &self.oidc_discovery_url
            && let Err(e) = crate::http::check_url(url)
        {
            problems.push(format!("--oidc-discovery-url: {e}"));
        }
        if self.token_issuer.is_empty() {
            problems.push("--token-issuer: must not be empty".into());
        }
        if self.token_audience.is_empty() {
            problems.push("--token-audience: must not be empty".into());
        }
        if let Err(e) = self.key_source() {
            problems.push(e);
        }
        if let Err(e) = self.own_identity() {
            problems.push(format!("--trust-domain/--namespace/--service-account: {e}"));
        }
        for (flag, rate, burst) in [
            (
                "--rate-per-identity/--burst-per-identity",
                self.rate_per_identity,
                self.burst_per_identity,
            ),
            (
                "--rate-per-address/--burst-per-address",
                self.rate_per_address,
                self.burst_per_address,
            ),
        ] {
            if Self::rate(rate, burst).is_none() || rate > 10_000 || burst > 10_000 {
                problems.push(format!("{flag}: must be 1 to 10000"));
            }
        }
        if self.drain_grace_ms > 60_000 {
            problems.push("--drain-grace-ms: must be at most 60000".into());
        }
        problems
    }
}

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CA, the keys or the server's own certificate could not be used.
    #[error("{0}")]
    Setup(String),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] mesh_client::MeshError),
}

/// Runs the service on `listener` until `shutdown` completes, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let ca = Arc::new(IssuingCa::load(&config.ca_cert, &config.ca_key).map_err(Error::Setup)?);
    tracing::info!(ca = %ca.subject(), "issuing CA loaded");
    let own = config.own_identity().map_err(Error::Setup)?;
    let ttl = Duration::from_secs(config.cert_ttl_secs);
    let backdate = Duration::from_secs(config.backdate_secs);

    let tokens = Arc::new(TokenVerifier::new(
        &config.token_issuer,
        &config.token_audience,
        config.key_source().map_err(Error::Setup)?,
    ));
    match tokens.refresh().await {
        Ok(n) => {
            tracing::info!(keys = n, issuer = %config.token_issuer, "token issuer keys loaded")
        }
        // Not fatal: the API server may be starting too. Certify answers
        // UNAVAILABLE until the keys load.
        Err(e) => tracing::warn!("cannot load the token issuer's keys yet: {e}"),
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    tokio::spawn(
        tokens
            .clone()
            .refresh_until(Duration::from_secs(config.jwks_refresh_secs), stop.clone()),
    );

    let mut options = CertifyOptions::new(
        config
            .trust_bundle
            .clone()
            .unwrap_or_else(|| config.ca_cert.clone()),
    );
    options.optional_client_auth = true;
    let tls = certify(
        options,
        Arc::new(SelfIssuer {
            ca: ca.clone(),
            identity: own.clone(),
            ttl,
            backdate,
        }),
    )
    .await
    .map_err(|e| Error::Setup(format!("own certificate: {e}")))?;

    let service = IdentityService::new(
        ca,
        tokens,
        Policy {
            trust_domain: config.trust_domain.clone(),
            ttl,
            backdate,
            per_identity: Config::rate(config.rate_per_identity, config.burst_per_identity)
                .ok_or_else(|| Error::Setup("rate".into()))?,
            per_address: Config::rate(config.rate_per_address, config.burst_per_address)
                .ok_or_else(|| Error::Setup("rate".into()))?,
            reserved: vec![
                own.clone(),
                SpiffeId::workload(&config.trust_domain, &config.namespace, "operator")
                    .map_err(|e| Error::Setup(e.to_string()))?,
            ],
        },
    );
    {
        let (service, stop) = (service.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => service.prune(),
                }
            }
        });
    }

    let mut server = MeshServer::new(ServerConfig {
        drain_grace: Duration::from_millis(config.drain_grace_ms),
        ..ServerConfig::default()
    })
    .descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
    // Callers have no certificate yet: the token is the authentication.
    .authorization(None)
    .tls(tls)
    .add_service(
        IdentityServiceServer::new(service::Grpc(service))
            .max_decoding_message_size(64 * 1024)
            .max_encoding_message_size(64 * 1024),
    );
    if let Some(addr) = config.admin_addr {
        let admin = std::net::TcpListener::bind(addr)
            .map_err(|e| Error::Setup(format!("--admin-addr: cannot listen on {addr}: {e}")))?;
        server = server.admin(admin);
    }
    server.serve(listener, shutdown).await?;
    Ok(())
}

/// The process entry point: `args` are the command line; `identity agent
/// ...` runs the identity agent ([`agent`]).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    if args.get(1).is_some_and(|a| a == "agent") {
        return agent::main(
            std::iter::once(OsString::from("identity agent")).chain(args.into_iter().skip(2)),
        );
    }
    shop_kit::service_main("identity", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
