//! The local shop's workload identities come from the mesh identity
//! service, as in the cluster: `shopctl up` runs it with the dev CA as its
//! issuer and a dev token issuer standing in for the cluster's
//! ServiceAccount issuer. Workloads get no certificate files; each has a
//! token file (re-minted before it expires, as the kubelet rotates
//! projected tokens) and the trust bundle.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use shop_kit::sa_token::DevTokenIssuer;

/// The `iss` of the dev tokens.
pub const DEV_ISSUER: &str = "https://dev-token-issuer.shop.local";
/// The audience the identity service accepts.
pub const AUDIENCE: &str = "mesh-identity";
/// Lifetime of the dev tokens; they are re-minted at half of it.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// What `up` needs to run the identity service and point workloads at it.
pub struct LocalIdentity {
    issuer: DevTokenIssuer,
    tokens_dir: PathBuf,
    jwks: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    /// Where the identity service listens.
    pub addr: SocketAddr,
    /// Its admin port.
    pub admin: SocketAddr,
    trust_domain: String,
    workloads: Vec<String>,
}

impl LocalIdentity {
    /// Prepares the dev token issuer (created under `state_dir` on first
    /// use) and a token per workload; the CA is the one in `certs_dir`
    /// (`ca/ca.crt`, `ca/ca.key`, made by `certs::issue`).
    pub fn prepare(
        state_dir: &Path,
        certs_dir: &Path,
        trust_domain: &str,
        addr: SocketAddr,
        admin: SocketAddr,
        workloads: &[&str],
    ) -> anyhow::Result<Self> {
        let issuer_dir = state_dir.join("token-issuer");
        let issuer = DevTokenIssuer::load_or_create(&issuer_dir, DEV_ISSUER)
            .context("the dev token issuer")?;
        let this = Self {
            issuer,
            tokens_dir: state_dir.join("tokens"),
            jwks: issuer_dir.join("jwks.json"),
            ca_cert: certs_dir.join("ca").join("ca.crt"),
            ca_key: certs_dir.join("ca").join("ca.key"),
            addr,
            admin,
            trust_domain: trust_domain.to_owned(),
            workloads: workloads.iter().map(|w| w.to_string()).collect(),
        };
        this.mint_tokens()?;
        Ok(this)
    }

    /// Writes a fresh token for every workload (0600).
    pub fn mint_tokens(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.tokens_dir)
            .with_context(|| format!("creating {}", self.tokens_dir.display()))?;
        for workload in &self.workloads {
            let token = self
                .issuer
                .mint("shop", workload, AUDIENCE, TOKEN_TTL)
                .map_err(anyhow::Error::msg)?;
            mesh_client::tls::dev::write_file(&self.token_path(workload), &token, true)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    fn token_path(&self, workload: &str) -> PathBuf {
        self.tokens_dir.join(format!("{workload}.token"))
    }

    /// The identity service's command line after `shopctl`.
    pub fn service_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &dyn AsRef<std::ffi::OsStr>| args.push(a.as_ref().to_owned());
        push(&"serve");
        push(&"identity");
        push(&"--listen");
        push(&self.addr.to_string());
        push(&"--admin-addr");
        push(&self.admin.to_string());
        push(&"--ca-cert");
        push(&self.ca_cert);
        push(&"--ca-key");
        push(&self.ca_key);
        push(&"--trust-domain");
        push(&self.trust_domain);
        push(&"--token-issuer");
        push(&DEV_ISSUER);
        push(&"--token-audience");
        push(&AUDIENCE);
        push(&"--jwks-file");
        push(&self.jwks);
        args
    }

    /// The flags that make `workload` get its identity from the service.
    pub fn workload_args(&self, workload: &str) -> Vec<OsString> {
        vec![
            "--identity-addr".into(),
            self.addr.to_string().into(),
            "--trust-bundle".into(),
            self.ca_cert.clone().into(),
            "--identity-token-file".into(),
            self.token_path(workload).into(),
        ]
    }

    /// Re-mints every token at half its lifetime, forever.
    pub async fn rotate_tokens(self) {
        loop {
            tokio::time::sleep(TOKEN_TTL / 2).await;
            if let Err(e) = self.mint_tokens() {
                eprintln!("shopctl: cannot rotate the dev ServiceAccount tokens: {e:#}");
            }
        }
    }
}
