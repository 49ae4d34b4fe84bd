//! Mutual TLS with SPIFFE workload identity, rustls on both sides.
//!
//! One crypto provider for the whole workspace: *ring* (the workspace turns
//! off rustls' aws-lc-rs default everywhere; two providers compiled in make
//! rustls refuse to pick one at run time, and ring builds far faster here).
//!
//! [`MeshTls`] holds the workload's certificate, key and trust bundle, read
//! from PEM files the way a Kubernetes Secret volume presents them
//! (`tls.crt`, `tls.key`, `ca.crt`). It re-reads them every second and
//! swaps in new material atomically when they change (Kubernetes updates a
//! Secret volume with a symlink swap), so certificates and the CA rotate
//! without a restart and without failing a call: established connections
//! keep their session, new handshakes use the new material. The bundle may
//! hold several CAs at once, which is how a CA is rotated in steps. Material
//! that does not validate (unreadable, key not matching, expired, not
//! chaining to the bundle) is refused and the old material stays.

pub mod certify;
#[cfg(feature = "dev-ca")]
pub mod dev;
pub(crate) mod identity;
pub(crate) mod io;
#[cfg(all(test, feature = "dev-ca"))]
mod reload_tests;
mod verify;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

pub use identity::{SpiffeId, SpiffeIdError};
pub use io::{PeerInfo, caller_identity};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use identity::leaf_info;
use verify::SpiffeServerVerifier;

use crate::telemetry::metrics::{GaugeSource, Scrape};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The material is readable but unusable.
    #[error("{0}")]
    Invalid(String),
}

/// Server-only TLS for a port that faces the outside: clients (browsers,
/// apps) present no certificate; the server presents a certificate from
/// any CA (a public one, typically). ALPN offers h2 and http/1.1 (for
/// gRPC-Web). Loaded once; restart to change it.
#[derive(Clone)]
pub struct PublicTls {
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for PublicTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicTls").finish_non_exhaustive()
    }
}

impl PublicTls {
    /// The PEM certificate chain at `cert` (leaf first) and the PEM
    /// private key at `key`.
    pub fn load(cert: &Path, key: &Path, handshake_timeout: Duration) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::File {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        let chain = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::File {
                path: cert.to_owned(),
                reason: format!("not a PEM certificate chain: {e}"),
            })?;
        if chain.is_empty() {
            return Err(TlsError::File {
                path: cert.to_owned(),
                reason: "holds no certificate".into(),
            });
        }
        let private = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| TlsError::File {
            path: key.to_owned(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| TlsError::Invalid(format!("key does not match the certificate: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            handshake_timeout,
        })
    }
}

/// The TLS a server's port speaks: the mesh's mTLS, or public server-only TLS.
#[derive(Clone, Debug)]
pub(crate) enum ServerTls {
    Mesh(Arc<MeshTls>),
    Public(Arc<PublicTls>),
}

impl ServerTls {
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        match self {
            ServerTls::Mesh(tls) => tls.server_config(),
            ServerTls::Public(tls) => tls.config.clone(),
        }
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        match self {
            ServerTls::Mesh(tls) => tls.handshake_timeout(),
            ServerTls::Public(tls) => tls.handshake_timeout,
        }
    }
}

/// Where the workload's TLS files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM trust bundle: every CA whose workloads are trusted.
    pub bundle: PathBuf,
}

impl TlsFiles {
    /// `tls.crt`, `tls.key` and `ca.crt` in `dir` (a Kubernetes TLS Secret
    /// mounted as a volume).
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            bundle: dir.join("ca.crt"),
        }
    }
}

/// The provider every rustls config in the mesh uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loaded, validated material.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    identity: SpiffeId,
    not_after: SystemTime,
    serial: String,
    server: Arc<ServerConfig>,
    raw: (Vec<u8>, Vec<u8>, Vec<u8>),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn load(files: &TlsFiles, now: SystemTime) -> Result<Material, TlsError> {
    let raw = (read(&files.cert)?, read(&files.key)?, read(&files.bundle)?);
    build(files, raw, now)
}

fn build(
    files: &TlsFiles,
    raw: (Vec<u8>, Vec<u8>, Vec<u8>),
    now: SystemTime,
) -> Result<Material, TlsError> {
    let file_err = |path: &Path, reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&raw.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(&files.cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(&files.cert, "holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&raw.1)
        .map_err(|e| file_err(&files.key, format!("not a PEM private key: {e}")))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&raw.2) {
        let ca = ca.map_err(|e| file_err(&files.bundle, format!("not a PEM bundle: {e}")))?;
        roots
            .add(ca)
            .map_err(|e| file_err(&files.bundle, format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(file_err(&files.bundle, "holds no CA certificate".into()));
    }
    let info = leaf_info(&chain[0]).map_err(|e| file_err(&files.cert, e))?;
    let identity = info.identity.ok_or_else(|| {
        file_err(
            &files.cert,
            "has no (or more than one) spiffe:// URI SAN".into(),
        )
    })?;
    if now >= info.not_after {
        return Err(TlsError::Invalid(format!(
            "certificate {} for {identity} expired at {}; refusing to use it",
            info.serial,
            humantime(info.not_after)
        )));
    }
    if now < info.not_before {
        return Err(TlsError::Invalid(format!(
            "certificate {} for {identity} is not valid before {}",
            info.serial,
            humantime(info.not_before)
        )));
    }
    let roots = Arc::new(roots);
    // The leaf must chain to the bundle it will be checked against.
    let algorithms = provider().signature_verification_algorithms;
    webpki::EndEntityCert::try_from(&chain[0])
        .and_then(|ee| {
            ee.verify_for_usage(
                algorithms.all,
                &roots.roots,
                &chain[1..],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(drop)
        })
        .map_err(|e| {
            TlsError::Invalid(format!(
                "certificate for {identity} does not chain to the trust bundle: {e}"
            ))
        })?;

    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::Invalid(format!("key does not match the certificate: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        chain,
        key: Arc::new(key),
        roots,
        identity,
        not_after: info.not_after,
        serial: info.serial,
        server: Arc::new(server),
        raw,
    })
}

/// When the first certificate in a PEM chain expires, if it can be read.
pub fn certificate_expiry(pem: &[u8]) -> Option<SystemTime> {
    let cert = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    leaf_info(&cert).ok().map(|info| info.not_after)
}

fn humantime(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs} (Unix seconds)")
}

/// A workload's TLS identity, kept current from its files.
pub struct MeshTls {
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("files", &self.files)
            .field("identity", &self.identity())
            .finish_non_exhaustive()
    }
}

/// Warn when the certificate has less than this left.
const EXPIRY_WARNING: Duration = Duration::from_secs(3600);
/// How often the files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

impl MeshTls {
    /// Reports this identity's certificate expiry
    /// (`mesh_certificate_expiry_timestamp`) in `metrics` at every scrape
    /// while it lives: for a process that holds an identity without serving
    /// or calling with it (the identity agent). Meshes and servers report
    /// theirs already.
    pub fn report_expiry_to(self: &Arc<Self>, metrics: &crate::telemetry::metrics::Metrics) {
        metrics.add_source(self);
    }

    /// Loads and validates the files; fails closed (an error that says
    /// why) on missing, mismatched or expired material. Starts watching the
    /// files for rotation; must be called inside a tokio runtime.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        Self::load_with_handshake_timeout(files, Duration::from_secs(10))
    }

    /// [`MeshTls::load`] with a TLS handshake timeout other than 10 s.
    pub fn load_with_handshake_timeout(
        files: TlsFiles,
        handshake_timeout: Duration,
    ) -> Result<Arc<Self>, TlsError> {
        let material = load(&files, SystemTime::now())?;
        tracing::info!(identity = %material.identity, serial = %material.serial, "TLS identity loaded");
        let tls = Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(material)),
            handshake_timeout,
        });
        tokio::spawn(watch(Arc::downgrade(&tls)));
        Ok(tls)
    }

    fn material(&self) -> Arc<Material> {
        self.current.read().expect("tls lock").clone()
    }

    /// This workload's SPIFFE ID.
    pub fn identity(&self) -> SpiffeId {
        self.material().identity.clone()
    }

    /// Serial number (hex) of the certificate in use.
    pub fn serial(&self) -> String {
        self.material().serial.clone()
    }

    /// When the certificate in use expires.
    pub fn expires_at(&self) -> SystemTime {
        self.material().not_after
    }

    /// Whether the certificate in use is valid now.
    pub fn is_valid(&self) -> bool {
        SystemTime::now() < self.material().not_after
    }

    /// How long a TLS handshake may take before the connection is dropped.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.material().server.clone()
    }

    /// A client config presenting this workload's certificate and accepting
    /// only a server that presents `expected` (or any identity in the trust
    /// bundle when `None`).
    pub(crate) fn client_config(
        &self,
        expected: Option<SpiffeId>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let material = self.material();
        let verifier = SpiffeServerVerifier {
            roots: material.roots.clone(),
            expected,
            algorithms: provider().signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-reads the files now; swaps in valid new material.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let raw = (
            read(&self.files.cert)?,
            read(&self.files.key)?,
            read(&self.files.bundle)?,
        );
        if raw == self.material().raw {
            return Ok(false);
        }
        let next = build(&self.files, raw, SystemTime::now())?;
        tracing::info!(identity = %next.identity, serial = %next.serial, "TLS material rotated");
        *self.current.write().expect("tls lock") = Arc::new(next);
        Ok(true)
    }
}

async fn watch(tls: std::sync::Weak<MeshTls>) {
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let Some(tls) = tls.upgrade() else { return };
        if let Err(e) = tls.reload() {
            tracing::warn!("TLS files changed but cannot be used, keeping the current ones: {e}");
        }
        let left = tls
            .expires_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left < EXPIRY_WARNING
            && last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(600))
        {
            if left.is_zero() {
                tracing::error!(identity = %tls.identity(), "TLS certificate has expired; peers will refuse this workload until it is rotated");
            } else {
                tracing::warn!(identity = %tls.identity(), ?left, "TLS certificate expires soon");
            }
            last_warning = Some(tokio::time::Instant::now());
        }
    }
}

/// The owner of the certificate reports its expiry (and the process's
/// identity) at each scrape of the metrics it is registered with.
impl GaugeSource for MeshTls {
    fn collect(&self, scrape: &mut Scrape<'_>) {
        scrape.certificate(self.identity().as_str().to_owned(), self.expires_at());
    }
}
