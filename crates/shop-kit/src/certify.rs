//! A shop process's identity from the mesh identity service instead of
//! files (`--identity-addr`): see `mesh_client::tls::certify`.
//!
//! Until the first certificate arrives the process serves only its admin
//! port, where `/ready` answers 503 and the plaintext gRPC health check
//! `NOT_SERVING` (`liveness` stays `SERVING`, so a liveness probe does not
//! kill a pod waiting for the identity service); the gRPC port opens once
//! the certificate is held.

use std::{path::PathBuf, sync::Arc, time::Duration};

use mesh_client::tls::{
    MeshTls, SpiffeId,
    certify::{CertifyOptions, IdentityClient, certify},
};

/// Flags of the identity-service mode.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CertifyArgs {
    /// `host:port` of the mesh identity service (several comma-separated,
    /// tried in turn). With it the workload generates its key in memory and
    /// gets (and renews) its certificate from the identity service; not
    /// with `--tls-dir`.
    #[arg(long, env = "IDENTITY_ADDR", value_delimiter = ',')]
    pub identity_addr: Vec<String>,
    /// The projected ServiceAccount token sent to the identity service,
    /// re-read for every request (the kubelet rotates it).
    #[arg(
        long,
        env = "IDENTITY_TOKEN_FILE",
        default_value = "/var/run/secrets/mesh/identity-token"
    )]
    pub identity_token_file: PathBuf,
    /// PEM trust bundle (the mesh's roots; a ConfigMap), re-read every
    /// second. Required with `--identity-addr`.
    #[arg(long, env = "TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// SPIFFE ID the identity service must present. Default: the
    /// `identity` ServiceAccount of `--trust-domain` and `--namespace`.
    #[arg(long, env = "IDENTITY_SERVER_ID")]
    pub identity_server_id: Option<String>,
}

impl CertifyArgs {
    /// Whether the identity service is the source of this process's identity.
    pub fn enabled(&self) -> bool {
        !self.identity_addr.is_empty()
    }

    /// Everything wrong with these flags (`tls_dir`: whether `--tls-dir` is set).
    pub fn problems(&self, tls_dir: bool, trust_domain: &str, namespace: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.enabled() {
            return problems;
        }
        if tls_dir {
            problems.push(
                "--identity-addr and --tls-dir: give one source of the workload's identity".into(),
            );
        }
        match &self.trust_bundle {
            None => problems.push("--trust-bundle: required with --identity-addr".into()),
            Some(path) if !path.is_file() => {
                problems.push(format!("--trust-bundle: {} is not a file", path.display()))
            }
            Some(_) => {}
        }
        if let Err(e) = self.server_id(trust_domain, namespace) {
            problems.push(format!("--identity-server-id: {e}"));
        }
        problems
    }

    /// The client for the identity service these flags name, and the
    /// trust bundle (`--trust-bundle`, required).
    pub fn client(
        &self,
        trust_domain: &str,
        namespace: &str,
    ) -> Result<(IdentityClient, PathBuf), String> {
        let bundle = self
            .trust_bundle
            .clone()
            .ok_or("--trust-bundle: required with --identity-addr")?;
        let client = IdentityClient {
            addrs: self.identity_addr.clone(),
            server_id: self.server_id(trust_domain, namespace)?,
            token_file: self.identity_token_file.clone(),
            bundle: bundle.clone(),
            timeout: Duration::from_secs(10),
        };
        Ok((client, bundle))
    }

    fn server_id(&self, trust_domain: &str, namespace: &str) -> Result<SpiffeId, String> {
        match &self.identity_server_id {
            Some(id) => id.parse().map_err(|e| format!("--identity-server-id: {e}")),
            None => SpiffeId::workload(trust_domain, namespace, "identity")
                .map_err(|e| format!("--trust-domain/--namespace: {e}")),
        }
    }
}

/// Gets the first certificate (serving the admin port as not ready
/// meanwhile, on `admin`, a clone of the listener the server takes over
/// later) and returns the self-renewing identity. Stops waiting, with an
/// error, on SIGTERM or SIGINT.
pub(crate) async fn identity_from_service(
    args: &CertifyArgs,
    trust_domain: &str,
    namespace: &str,
    handshake_timeout: Duration,
    admin: Option<std::net::TcpListener>,
) -> Result<Arc<MeshTls>, String> {
    let (client, bundle) = args.client(trust_domain, namespace)?;
    let stop_admin = tokio_util::sync::CancellationToken::new();
    let _stop_admin_on_return = stop_admin.clone().drop_guard();
    if let Some(listener) = admin {
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("--admin-addr: {e}"))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("--admin-addr: {e}"))?;
        let reporter = tonic_health::server::HealthReporter::new();
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(
                mesh_client::server::LIVENESS_SERVICE,
                tonic_health::ServingStatus::Serving,
            )
            .await;
        tokio::spawn(mesh_client::telemetry::admin::serve(
            listener,
            mesh_client::telemetry::metrics().clone(),
            Arc::new(|| Box::pin(async { false })),
            Some(tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(reporter),
            )),
            stop_admin.clone(),
        ));
    }
    let mut options = CertifyOptions::new(bundle);
    options.handshake_timeout = handshake_timeout;
    tracing::info!(identity_service = %client.addrs.join(","), "getting this workload's certificate from the identity service; not serving until it is issued");
    tokio::select! {
        tls = certify(options, Arc::new(client)) => tls.map_err(|e| format!("TLS: {e}")),
        () = crate::shutdown_signal() => Err("stopped before the identity service issued a certificate".into()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        mesh: crate::MeshArgs,
    }

    fn problems(args: &[&str]) -> Vec<String> {
        Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .mesh
            .problems()
    }

    #[test]
    fn identity_mode_needs_a_bundle_and_excludes_tls_files() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.crt");
        std::fs::write(&bundle, "x").unwrap();
        let bundle = bundle.display().to_string();
        let d = dir.path().display().to_string();
        assert!(
            problems(&[
                "--identity-addr",
                "identity:50051",
                "--trust-bundle",
                &bundle
            ])
            .is_empty()
        );
        let p = problems(&["--identity-addr", "identity:50051"]);
        assert!(
            p.iter().any(|p| p.contains("--trust-bundle: required")),
            "{p:?}"
        );
        let p = problems(&[
            "--identity-addr",
            "i:1",
            "--trust-bundle",
            &bundle,
            "--tls-dir",
            &d,
        ]);
        assert!(p.iter().any(|p| p.contains("give one source")), "{p:?}");
        let p = problems(&[
            "--identity-addr",
            "i:1",
            "--trust-bundle",
            &bundle,
            "--identity-server-id",
            "nope",
        ]);
        assert!(
            p.iter().any(|p| p.contains("--identity-server-id")),
            "{p:?}"
        );
    }
}
