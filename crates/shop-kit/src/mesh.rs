//! The mesh settings every shop process shares: identity (mTLS), the mesh
//! policy file, and how the server drains.

use std::{path::PathBuf, sync::Arc, time::Duration};

use mesh_client::{
    Mesh, MeshConfig, MeshError,
    server::{MeshServer, ServerConfig},
    tls::{MeshTls, SpiffeId, TlsError, TlsFiles},
};

/// Why the mesh flags could not be turned into a policy, an identity or a
/// server. Each keeps its cause as `source()`.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `--mesh-config` could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadPolicy {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// `--mesh-config` does not validate, or the mesh following it could
    /// not start.
    #[error("{}: {source}", path.display())]
    Policy {
        /// The file.
        path: PathBuf,
        /// What the mesh refused.
        #[source]
        source: MeshError,
    },
    /// `--tls-dir` holds no usable identity (fails closed).
    #[error("TLS: {0}")]
    Tls(#[source] TlsError),
    /// `--identity-addr`: no certificate could be had from the identity
    /// service (the message says why: its answer, or the local setup).
    #[error("identity service: {0}")]
    Identity(String),
    /// `--admin-addr` could not be bound.
    #[error("--admin-addr: cannot listen on {addr}: {source}")]
    AdminListen {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
}

/// Why [`wait_serving`] gave up: what the server last answered.
#[derive(Debug, thiserror::Error)]
pub enum NotServing {
    /// No health check was answered in time (none could even be sent).
    #[error("no answer yet")]
    NoAnswer,
    /// The server answered, but not SERVING.
    #[error("health is {0:?}")]
    Health(tonic_health::pb::health_check_response::ServingStatus),
    /// The health check failed.
    #[error(transparent)]
    Unreachable(#[from] tonic::Status),
}

/// Flags common to every shop process.
#[derive(Clone, Debug, clap::Args)]
pub struct MeshArgs {
    /// Directory with this workload's `tls.crt`, `tls.key` and `ca.crt`
    /// (a mounted Kubernetes TLS Secret). Without it the process speaks
    /// plaintext and says so loudly.
    #[arg(long, env = "TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Mesh policy file (JSON): timeouts, retries, balancing, authorization.
    /// Re-read when it changes (checked every 2 s); a change that does not
    /// validate is logged as an error and the last good policy stays.
    #[arg(long, env = "MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    /// SPIFFE trust domain of the shop's workloads.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "shop.local")]
    pub trust_domain: String,
    /// Namespace part of the shop's workload identities.
    #[arg(long, env = "MESH_NAMESPACE", default_value = "shop")]
    pub namespace: String,
    /// Milliseconds between reporting NOT_SERVING and closing on SIGTERM.
    #[arg(long, env = "DRAIN_GRACE_MS", default_value_t = 0)]
    pub drain_grace_ms: u64,
    /// Largest request message accepted, in bytes, after decompression.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Largest response message sent, in bytes.
    #[arg(long, env = "MAX_RESPONSE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_response_bytes: usize,
    /// Address of the admin HTTP port (`/metrics`, `/live`, `/ready`);
    /// none when unset.
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Milliseconds a TLS handshake may take before the connection is dropped.
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub tls_handshake_timeout_ms: u64,
    /// The mesh read from `--mesh-config`, made once and shared by the
    /// client ([`MeshArgs::mesh`]) and the server's authorization
    /// ([`MeshArgs::server`]): one file watcher, one policy in force.
    #[arg(skip)]
    file_mesh: Arc<std::sync::Mutex<Option<Mesh>>>,
    /// Identity from the mesh identity service instead of `--tls-dir`.
    #[command(flatten)]
    pub certify: crate::certify::CertifyArgs,
    /// The admin listener, bound early when the admin port must answer
    /// (not ready) while the identity service is asked for a certificate.
    #[arg(skip)]
    admin_listener: Arc<std::sync::Mutex<Option<std::net::TcpListener>>>,
}

impl MeshArgs {
    /// Everything wrong with these flags.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = self.config() {
            problems.push(format!("--mesh-config: {e}"));
        }
        if let Some(dir) = self.tls_dir.as_ref().filter(|d| !d.is_dir()) {
            problems.push(format!("--tls-dir: {} is not a directory", dir.display()));
        }
        if let Err(e) = SpiffeId::workload(&self.trust_domain, &self.namespace, "x") {
            problems.push(format!("--trust-domain/--namespace: {e}"));
        }
        if !(100..=60_000).contains(&self.tls_handshake_timeout_ms) {
            problems.push("--tls-handshake-timeout-ms: must be 100 to 60000".into());
        }
        for (flag, value) in [
            ("--max-request-bytes", self.max_request_bytes),
            ("--max-response-bytes", self.max_response_bytes),
        ] {
            if !(1024..=64 * 1024 * 1024).contains(&value) {
                problems.push(format!("{flag}: must be 1024 to 67108864, got {value}"));
            }
        }
        if self.drain_grace_ms > 60_000 {
            problems.push("--drain-grace-ms: must be at most 60000".into());
        }
        problems.extend(self.certify.problems(
            self.tls_dir.is_some(),
            &self.trust_domain,
            &self.namespace,
        ));
        problems
    }

    /// The mesh policy from the file, or the defaults.
    pub fn config(&self) -> Result<MeshConfig, SetupError> {
        match &self.mesh_config {
            None => Ok(MeshConfig::default()),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| SetupError::ReadPolicy {
                        path: path.clone(),
                        source,
                    })?;
                MeshConfig::from_json(&text).map_err(|source| SetupError::Policy {
                    path: path.clone(),
                    source,
                })
            }
        }
    }

    /// The SPIFFE ID of a shop service.
    pub fn identity_of(&self, service: &str) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{service}",
            self.trust_domain, self.namespace
        )
    }

    /// This workload's TLS identity, if configured (fails closed on bad or
    /// expired material). With `--identity-addr` it waits for the identity
    /// service's first certificate (the admin port answers not ready
    /// meanwhile), blocking this thread of the multi-threaded runtime
    /// every shop process runs on.
    pub fn tls(&self) -> Result<Option<Arc<MeshTls>>, SetupError> {
        if self.certify.enabled() {
            return self.tls_from_identity_service().map(Some);
        }
        self.tls_dir
            .as_ref()
            .map(|dir| {
                MeshTls::load_with_handshake_timeout(
                    TlsFiles::in_dir(dir),
                    Duration::from_millis(self.tls_handshake_timeout_ms),
                )
                .map_err(SetupError::Tls)
            })
            .transpose()
    }

    fn tls_from_identity_service(&self) -> Result<Arc<MeshTls>, SetupError> {
        let admin = match self.admin_addr {
            None => None,
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|source| SetupError::AdminListen { addr, source })?;
                let clone = listener
                    .try_clone()
                    .map_err(|source| SetupError::AdminListen { addr, source })?;
                *self.admin_listener.lock().expect("admin lock") = Some(listener);
                Some(clone)
            }
        };
        let wait = crate::certify::identity_from_service(
            &self.certify,
            &self.trust_domain,
            &self.namespace,
            Duration::from_millis(self.tls_handshake_timeout_ms),
            admin,
        );
        let handle = tokio::runtime::Handle::current();
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(SetupError::Identity(
                "--identity-addr needs the multi-threaded tokio runtime".into(),
            ));
        }
        tokio::task::block_in_place(|| handle.block_on(wait)).map_err(SetupError::Identity)
    }

    /// The mesh following `path`, started on first use.
    fn file_mesh(&self, path: &std::path::Path) -> Result<Mesh, MeshError> {
        let mut cached = self.file_mesh.lock().expect("mesh lock");
        if let Some(mesh) = cached.as_ref() {
            return Ok(mesh.clone());
        }
        let mesh = Mesh::from_file(path)?;
        *cached = Some(mesh.clone());
        Ok(mesh)
    }

    /// The process's mesh (client side), knowing the shop's contracts.
    pub fn mesh(&self, tls: Option<Arc<MeshTls>>) -> Result<Mesh, MeshError> {
        let mesh = match &self.mesh_config {
            Some(path) => self.file_mesh(path)?,
            None => Mesh::from_config(MeshConfig::default())?,
        }
        .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)?;
        Ok(match tls {
            Some(tls) => mesh.with_tls(tls),
            None => mesh,
        })
    }

    /// A mesh channel to a shop service at `target`, which must present
    /// that service's identity when mTLS is on.
    pub fn channel(
        &self,
        mesh: &Mesh,
        tls_on: bool,
        target: &str,
        service: &str,
    ) -> Result<mesh_client::MeshChannel, MeshError> {
        let identity = tls_on.then(|| self.identity_of(service));
        mesh.channel_named(service, target, identity.as_deref())
    }

    /// The server every shop service runs: TLS, authorization policy (kept
    /// current from `--mesh-config`) and drain from these flags, reflection
    /// of the shop's contracts.
    pub fn server(&self, tls: Option<Arc<MeshTls>>) -> Result<MeshServer, SetupError> {
        self.server_with(ServerConfig::default(), tls)
    }

    /// [`MeshArgs::server`] with other server limits.
    pub fn server_with(
        &self,
        limits: ServerConfig,
        tls: Option<Arc<MeshTls>>,
    ) -> Result<MeshServer, SetupError> {
        self.server_describing(limits, tls, shop_api::FILE_DESCRIPTOR_SET)
    }

    /// [`MeshArgs::server_with`] whose reflection describes `descriptors`
    /// instead of the shop's whole contract set.
    pub fn server_describing(
        &self,
        limits: ServerConfig,
        tls: Option<Arc<MeshTls>>,
        descriptors: &'static [u8],
    ) -> Result<MeshServer, SetupError> {
        let config = ServerConfig {
            drain_grace: Duration::from_millis(self.drain_grace_ms),
            ..limits
        };
        let mut server = MeshServer::new(config).descriptor_set(descriptors);
        server = match &self.mesh_config {
            // The policy follows the file as it changes (revocations apply
            // without a restart), through the mesh's one config watcher.
            Some(path) => {
                let mesh = self.file_mesh(path).map_err(|source| SetupError::Policy {
                    path: path.clone(),
                    source,
                })?;
                // serverFaults follow the same file (fault injection by caller).
                server.authorization_from(&mesh).server_faults_from(&mesh)
            }
            None => server.authorization(None),
        };
        if let Some(tls) = tls {
            server = server.tls(tls);
        }
        if let Some(addr) = self.admin_addr {
            let early = self.admin_listener.lock().expect("admin lock").take();
            let listener = match early {
                Some(listener) => listener,
                None => std::net::TcpListener::bind(addr)
                    .map_err(|source| SetupError::AdminListen { addr, source })?,
            };
            server = server.admin(listener);
        }
        Ok(server)
    }
}

/// Polls `grpc.health.v1.Health/Check` on `channel` until the server
/// answers SERVING, for at most `limit`; the error says what it last saw.
pub async fn wait_serving(
    channel: mesh_client::MeshChannel,
    limit: Duration,
) -> Result<(), NotServing> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let start = std::time::Instant::now();
    let mut last_error = NotServing::NoAnswer;
    let mut client = HealthClient::new(channel);
    while start.elapsed() < limit {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(1));
        match client.check(request).await {
            Ok(resp) if resp.get_ref().status() == ServingStatus::Serving => return Ok(()),
            Ok(resp) => last_error = NotServing::Health(resp.get_ref().status()),
            Err(status) => last_error = NotServing::Unreachable(status),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        mesh: MeshArgs,
    }

    fn flags(args: &[&str]) -> MeshArgs {
        Flags::parse_from(std::iter::once("t").chain(args.iter().copied())).mesh
    }

    #[test]
    fn setup_errors_keep_their_cause_through_the_service_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let err = flags(&["--mesh-config", missing.to_str().unwrap()])
            .config()
            .unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
        let err = crate::ServiceError::from(err);
        assert!(mesh_client::caused_by::<SetupError>(&err).is_some());
        assert_eq!(
            mesh_client::caused_by::<std::io::Error>(&err).map(std::io::Error::kind),
            Some(std::io::ErrorKind::NotFound)
        );

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"noSuchKey": 1}"#).unwrap();
        let err = flags(&["--mesh-config", bad.to_str().unwrap()])
            .config()
            .unwrap_err();
        assert!(mesh_client::caused_by::<MeshError>(&err).is_some(), "{err}");

        let err = flags(&["--tls-dir", dir.path().to_str().unwrap()])
            .tls()
            .unwrap_err();
        assert!(mesh_client::caused_by::<TlsError>(&err).is_some(), "{err}");
    }
}
