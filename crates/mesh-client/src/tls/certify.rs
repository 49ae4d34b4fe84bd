//! Certificates that renew themselves: a workload with no certificate on
//! disk gets one from the mesh's identity service (`mesh.identity.v1`) and
//! keeps it current.
//!
//! The private key is generated in memory (ECDSA P-256) and never written
//! anywhere; a new key is made for every renewal. The workload sends a CSR
//! for it together with its projected ServiceAccount token, read from a
//! file on every attempt (the kubelet rotates that file). The identity
//! service decides the identity from the token, so the CSR asks for
//! nothing. [`certify`] returns a [`MeshTls`] once the first certificate is
//! held (a server is built only then, so it never serves without one) and
//! renews in the background at about 70 % of the lifetime (jitter
//! ±5 %, so replicas started together do not renew together).
//!
//! When the identity service cannot be reached the current certificate
//! stays in use; renewals are retried with backoff (0.5 s doubling, at most
//! a fifth of the time left and never more than 30 s) and every failure is
//! a warning saying how long the certificate has left. Once it has
//! expired the workload fails closed (peers refuse it, its health is
//! `NOT_SERVING`: see `MeshServer`), logs why at error level, and keeps
//! retrying, so it recovers without a restart when the service is back.
//!
//! A new certificate goes into future handshakes only: connections already
//! established keep their session, so no call fails over a renewal. The
//! trust bundle is a file (a ConfigMap) re-read every second, so trust
//! anchors rotate in steps as they do in file mode.
//!
//! The identity service itself uses the same machinery with
//! [`CertificateSource`] implemented by its own CA.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock, Weak},
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use super::{
    Material, MeshTls, SpiffeId, TlsError, TlsFiles, build, identity::leaf_info, provider,
    verify::SpiffeServerVerifier,
};

/// A future a [`CertificateSource`] returns.
pub type CertifyFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, String>> + Send + 'a>>;

/// Where a workload's certificates come from: the identity service over
/// the network ([`IdentityClient`]) or, for the identity service itself,
/// its own CA.
pub trait CertificateSource: Send + Sync + 'static {
    /// Signs the PKCS#10 request `csr` (DER); returns the chain, leaf
    /// first, or a message saying why not that an operator can act on.
    fn certify<'a>(&'a self, csr: &'a [u8]) -> CertifyFuture<'a>;
    /// Names the source in logs and errors.
    fn describe(&self) -> String;
}

/// How a self-renewing identity behaves.
#[derive(Clone, Debug)]
pub struct CertifyOptions {
    /// PEM trust bundle (every CA whose workloads are trusted), re-read
    /// every second.
    pub bundle: PathBuf,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Renew at this fraction of the lifetime. Default 0.7.
    pub renew_fraction: f64,
    /// Plus or minus this fraction of the lifetime, at random. Default 0.05.
    pub jitter_fraction: f64,
    /// Accept inbound connections whose client presents no certificate
    /// (the identity service: its callers have none yet; they prove
    /// themselves with a token). Default false: mutual TLS as always.
    pub optional_client_auth: bool,
}

impl CertifyOptions {
    /// The defaults with the trust bundle at `bundle`.
    pub fn new(bundle: impl Into<PathBuf>) -> Self {
        Self {
            bundle: bundle.into(),
            handshake_timeout: Duration::from_secs(10),
            renew_fraction: 0.7,
            jitter_fraction: 0.05,
            optional_client_auth: false,
        }
    }
}

/// Longest wait between renewal attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Retry interval once the certificate has expired.
const EXPIRED_RETRY: Duration = Duration::from_secs(5);
/// How often the trust bundle file is checked.
const BUNDLE_EVERY: Duration = Duration::from_secs(1);

/// What a renewal keeps beside the [`MeshTls`]: the PEM material in use.
struct Held {
    chain_pem: Vec<u8>,
    key_pem: Vec<u8>,
    bundle: Vec<u8>,
    received: SystemTime,
    not_after: SystemTime,
}

/// The PEM material in use, for a process that hands its identity on to
/// another as files (the identity agent of `services/identity`, for
/// workloads that read `--tls-dir`). It holds the private key: keep it in
/// memory or in a file only its workload can read, and never log it
/// (`Debug` leaves it out).
#[derive(Clone)]
pub struct IssuedPem {
    /// The SPIFFE ID of the leaf.
    pub identity: SpiffeId,
    /// Serial of the leaf, hex.
    pub serial: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
    /// The chain, leaf first (`tls.crt`).
    pub chain_pem: Vec<u8>,
    /// The private key, PKCS#8 (`tls.key`).
    pub key_pem: Vec<u8>,
    /// The trust bundle the chain was checked against (`ca.crt`).
    pub bundle_pem: Vec<u8>,
}

impl std::fmt::Debug for IssuedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedPem")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn issued(material: &Material, held: &Held) -> Arc<IssuedPem> {
    Arc::new(IssuedPem {
        identity: material.identity.clone(),
        serial: material.serial.clone(),
        not_after: material.not_after,
        chain_pem: held.chain_pem.clone(),
        key_pem: held.key_pem.clone(),
        bundle_pem: held.bundle.clone(),
    })
}

/// Gets this workload's first certificate from `source`, retrying with
/// backoff until it succeeds (wrap it in a timeout or a shutdown select to
/// give up), and returns a [`MeshTls`] that renews itself until dropped.
/// Must be called inside a tokio runtime.
pub async fn certify(
    options: CertifyOptions,
    source: Arc<dyn CertificateSource>,
) -> Result<Arc<MeshTls>, TlsError> {
    certify_with_pem(options, source).await.map(|(tls, _)| tls)
}

/// [`certify`], plus a watch of the PEM material: it holds the first
/// certificate when this returns and changes on every renewal and every
/// trust bundle change, as the [`MeshTls`] switches to it.
pub async fn certify_with_pem(
    options: CertifyOptions,
    source: Arc<dyn CertificateSource>,
) -> Result<(Arc<MeshTls>, tokio::sync::watch::Receiver<Arc<IssuedPem>>), TlsError> {
    let files = TlsFiles {
        cert: PathBuf::from(format!("<certificate from {}>", source.describe())),
        key: PathBuf::from("<private key in memory>"),
        bundle: options.bundle.clone(),
    };
    let mut failures = 0u32;
    let (held, material) = loop {
        match obtain(&files, &options, &*source).await {
            Ok(got) => break got,
            Err(e) => {
                failures += 1;
                let wait = backoff(failures, MAX_BACKOFF);
                tracing::warn!(
                    source = %source.describe(),
                    attempt = failures,
                    retry_in = ?wait,
                    "no certificate yet, not serving: {e}"
                );
                tokio::time::sleep(wait).await;
            }
        }
    };
    tracing::info!(identity = %material.identity, serial = %material.serial, source = %source.describe(), "TLS identity issued");
    let (pem_tx, pem_rx) = tokio::sync::watch::channel(issued(&material, &held));
    let tls = Arc::new(MeshTls {
        files: files.clone(),
        current: RwLock::new(Arc::new(material)),
        handshake_timeout: options.handshake_timeout,
    });
    tokio::spawn(renew(
        Arc::downgrade(&tls),
        files,
        options,
        source,
        held,
        pem_tx,
    ));
    Ok((tls, pem_rx))
}

/// Exponential backoff with jitter (half to all of the step): workloads
/// that lost the identity service together must not come back in lockstep.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let step = FIRST_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(cap);
    step.mul_f64(0.5 + 0.5 * rand::random::<f64>())
}

/// One round trip: a new key, a CSR, a chain, validated material.
async fn obtain(
    files: &TlsFiles,
    options: &CertifyOptions,
    source: &dyn CertificateSource,
) -> Result<(Held, Material), TlsError> {
    let bundle = std::fs::read(&options.bundle).map_err(|e| TlsError::File {
        path: options.bundle.clone(),
        reason: e.to_string(),
    })?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::Invalid(format!("cannot generate a key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| TlsError::Invalid(format!("cannot make a CSR: {e}")))?;
    let chain = source
        .certify(csr.der())
        .await
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", source.describe())))?;
    let received = SystemTime::now();
    let held = Held {
        chain_pem: chain
            .iter()
            .map(|c| pem("CERTIFICATE", c))
            .collect::<String>()
            .into(),
        key_pem: key.serialize_pem().into_bytes(),
        bundle,
        received,
        not_after: received,
    };
    let material = material(files, options, &held)?;
    Ok((
        Held {
            not_after: material.not_after,
            ..held
        },
        material,
    ))
}

fn material(files: &TlsFiles, options: &CertifyOptions, held: &Held) -> Result<Material, TlsError> {
    let mut material = build(
        files,
        (
            held.chain_pem.clone(),
            held.key_pem.clone(),
            held.bundle.clone(),
        ),
        SystemTime::now(),
    )?;
    if options.optional_client_auth {
        material.server = optional_client_auth_config(&material)?;
    }
    Ok(material)
}

/// The server config of `material` with client certificates optional.
fn optional_client_auth_config(material: &Material) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(material.roots.clone(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|e| TlsError::Invalid(format!("key does not match the certificate: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// When to renew `held`: at `renew_fraction` ± `jitter_fraction` of the
/// lifetime counted from when it arrived (not from its backdated
/// `notBefore`, which would renew a short certificate at once).
fn renew_time(held: &Held, options: &CertifyOptions) -> SystemTime {
    let lifetime = held
        .not_after
        .duration_since(held.received)
        .unwrap_or_default();
    let jitter = options.jitter_fraction * (2.0 * rand::random::<f64>() - 1.0);
    let fraction = (options.renew_fraction + jitter).clamp(0.1, 0.95);
    held.received + lifetime.mul_f64(fraction)
}

async fn renew(
    tls: Weak<MeshTls>,
    files: TlsFiles,
    options: CertifyOptions,
    source: Arc<dyn CertificateSource>,
    mut held: Held,
    pem: tokio::sync::watch::Sender<Arc<IssuedPem>>,
) {
    let mut next = renew_time(&held, &options);
    let mut failures = 0u32;
    let mut failing_since: Option<SystemTime> = None;
    let mut refused_bundle = Vec::new();
    let mut expired_attempts = 0u32;
    let mut bundle_error: Option<String> = None;
    loop {
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(BUNDLE_EVERY);
        tokio::time::sleep(wait).await;
        let Some(tls) = tls.upgrade() else { return };

        // The trust bundle may change at any time (a CA rotation).
        match std::fs::read(&options.bundle) {
            Ok(bundle) if bundle != held.bundle => {
                let candidate = Held {
                    bundle: bundle.clone(),
                    chain_pem: held.chain_pem.clone(),
                    key_pem: held.key_pem.clone(),
                    ..held
                };
                match material(&files, &options, &candidate) {
                    Ok(material) => {
                        tracing::info!(bundle = %options.bundle.display(), "trust bundle changed; new handshakes use it");
                        pem.send_replace(issued(&material, &candidate));
                        *tls.current.write().expect("tls lock") = Arc::new(material);
                        held = candidate;
                    }
                    Err(e) => {
                        // Perhaps the issuer moved to a new CA: a new
                        // certificate may chain where this one does not.
                        if refused_bundle != bundle {
                            tracing::warn!(
                                "trust bundle changed but the current certificate does not fit it ({e}); renewing now"
                            );
                            refused_bundle = bundle;
                            next = SystemTime::now();
                        }
                    }
                }
            }
            Ok(_) => bundle_error = None,
            Err(e) => {
                // Once per distinct error, not every second.
                let text = e.to_string();
                if bundle_error.as_ref() != Some(&text) {
                    tracing::warn!(bundle = %options.bundle.display(), "cannot read the trust bundle, keeping the current one: {text}");
                    bundle_error = Some(text);
                }
            }
        }
        if SystemTime::now() < next {
            continue;
        }
        match obtain(&files, &options, &*source).await {
            Ok((got, material)) => {
                tracing::info!(
                    identity = %material.identity,
                    serial = %material.serial,
                    previous = %tls.serial(),
                    "TLS certificate renewed"
                );
                if failing_since.take().is_some() {
                    tracing::info!(source = %source.describe(), after_failures = failures, "identity service reachable again");
                }
                pem.send_replace(issued(&material, &got));
                *tls.current.write().expect("tls lock") = Arc::new(material);
                held = got;
                failures = 0;
                expired_attempts = 0;
                next = renew_time(&held, &options);
            }
            Err(e) => {
                failures += 1;
                let since = *failing_since.get_or_insert_with(SystemTime::now);
                let now = SystemTime::now();
                let left = held.not_after.duration_since(now).unwrap_or_default();
                // Retry sooner as the deadline nears; once expired, every
                // EXPIRED_RETRY (the workload is down until it succeeds).
                let cap = if left.is_zero() {
                    EXPIRED_RETRY
                } else {
                    (left / 5).clamp(Duration::from_secs(1), MAX_BACKOFF)
                };
                let wait = backoff(failures, cap);
                next = now + wait;
                let failing_for = now.duration_since(since).unwrap_or_default();
                // Every failure is logged until expiry; after it, the first
                // three and then one in ten (a line per ~50 s).
                if left.is_zero() {
                    expired_attempts += 1;
                }
                let quiet = expired_attempts > 3 && !expired_attempts.is_multiple_of(10);
                if quiet {
                    tracing::debug!("renewal failed again: {e}");
                } else if left.is_zero() {
                    tracing::error!(
                        identity = %tls.identity(),
                        serial = %tls.serial(),
                        ?failing_for,
                        retry_in = ?wait,
                        "TLS certificate EXPIRED and not renewed: peers refuse this workload and it reports NOT_SERVING until {} issues a new one: {e}",
                        source.describe()
                    );
                } else {
                    tracing::warn!(
                        identity = %tls.identity(),
                        serial = %tls.serial(),
                        expires_in = ?left,
                        ?failing_for,
                        retry_in = ?wait,
                        "TLS certificate renewal failed; keeping the current certificate: {e}"
                    );
                }
            }
        }
    }
}

/// The identity service over the network: server-only TLS (this workload
/// has no certificate yet) that checks the service presents `server_id`
/// and chains to the trust bundle, and the token from `token_file`, read
/// anew for every request.
#[derive(Clone, Debug)]
pub struct IdentityClient {
    /// `host:port` of the identity service (a Kubernetes Service name, or
    /// several addresses tried in turn).
    pub addrs: Vec<String>,
    /// The SPIFFE ID the identity service must present.
    pub server_id: SpiffeId,
    /// The workload's projected ServiceAccount token.
    pub token_file: PathBuf,
    /// PEM trust bundle the identity service's certificate must chain to.
    pub bundle: PathBuf,
    /// Deadline of one request, connection included.
    pub timeout: Duration,
}

/// `mesh.identity.v1.CertifyRequest`, by hand so that mesh-client needs no
/// generated code (`proto/mesh/identity/v1/identity.proto` is the contract).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CertifyRequest {
    /// PKCS#10 CSR, DER.
    #[prost(bytes = "vec", tag = "1")]
    pub csr: Vec<u8>,
    /// The ServiceAccount token.
    #[prost(string, tag = "2")]
    pub token: String,
}

/// `mesh.identity.v1.CertifyResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CertifyResponse {
    /// The identity issued.
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// DER chain, leaf first.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub certificate_chain: Vec<Vec<u8>>,
    /// Expiry, Unix seconds.
    #[prost(int64, tag = "3")]
    pub not_after_unix_seconds: i64,
    /// Serial, hex.
    #[prost(string, tag = "4")]
    pub serial: String,
}

/// The path of `Certify`.
pub const CERTIFY_PATH: &str = "/mesh.identity.v1.IdentityService/Certify";

impl IdentityClient {
    fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let pem =
            std::fs::read(&self.bundle).map_err(|e| format!("{}: {e}", self.bundle.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&pem) {
            let ca = ca.map_err(|e| format!("{}: not a PEM bundle: {e}", self.bundle.display()))?;
            roots
                .add(ca)
                .map_err(|e| format!("{}: unusable CA: {e}", self.bundle.display()))?;
        }
        let verifier = SpiffeServerVerifier {
            roots: Arc::new(roots),
            expected: Some(self.server_id.clone()),
            algorithms: provider().signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// One `Certify` call to the first address `addrs` resolves to, with
    /// this client's TLS checks: the gRPC status as it came (for tools and
    /// tests; renewals use [`CertificateSource::certify`]).
    pub async fn call(&self, request: CertifyRequest) -> Result<CertifyResponse, tonic::Status> {
        let config = self
            .client_config()
            .map_err(tonic::Status::failed_precondition)?;
        let target = self
            .addrs
            .first()
            .ok_or_else(|| tonic::Status::invalid_argument("no identity service address"))?;
        let addr = tokio::net::lookup_host(target.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| tonic::Status::unavailable(format!("{target}: cannot resolve")))?;
        self.certify_at(addr, config, request).await
    }

    async fn certify_at(
        &self,
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        request: CertifyRequest,
    ) -> Result<CertifyResponse, tonic::Status> {
        let connector = tower::service_fn(move |_: http::Uri| {
            let config = config.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                tonic::Status::unavailable(format!("cannot connect to {addr}: {}", error_chain(&e)))
            })?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{addr}: {}", error_chain(&e))))?;
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.timeout);
        let response: tonic::Response<CertifyResponse> = grpc
            .unary(
                request,
                http::uri::PathAndQuery::from_static(CERTIFY_PATH),
                tonic_prost::ProstCodec::default(),
            )
            .await?;
        Ok(response.into_inner())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

impl CertificateSource for IdentityClient {
    fn certify<'a>(&'a self, csr: &'a [u8]) -> CertifyFuture<'a> {
        Box::pin(async move {
            // Re-read on every attempt: the kubelet rotates projected tokens.
            let token = std::fs::read_to_string(&self.token_file)
                .map_err(|e| format!("cannot read the token {}: {e}", self.token_file.display()))?;
            let token = token.trim().to_owned();
            if token.is_empty() {
                return Err(format!(
                    "the token file {} is empty",
                    self.token_file.display()
                ));
            }
            let config = self.client_config()?;
            let mut errors = Vec::new();
            for target in &self.addrs {
                let addrs = match tokio::net::lookup_host(target.as_str()).await {
                    Ok(addrs) => addrs.collect::<Vec<_>>(),
                    Err(e) => {
                        errors.push(format!("{target}: cannot resolve: {e}"));
                        continue;
                    }
                };
                for addr in addrs {
                    let request = CertifyRequest {
                        csr: csr.to_vec(),
                        token: token.clone(),
                    };
                    match self
                        .certify_at(addr, config.clone(), request)
                        .await
                        .map_err(|s| format!("{addr}: {:?}: {}", s.code(), s.message()))
                    {
                        Ok(response) => {
                            if response.certificate_chain.is_empty() {
                                return Err(format!("{addr} answered with no certificate"));
                            }
                            return Ok(response
                                .certificate_chain
                                .into_iter()
                                .map(CertificateDer::from)
                                .collect());
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(errors.join("; "))
        })
    }

    fn describe(&self) -> String {
        format!(
            "identity service {} ({})",
            self.addrs.join(","),
            self.server_id
        )
    }
}

/// The identity in the leaf of `chain`, if it has exactly one SPIFFE ID.
pub fn chain_identity(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    chain.first().and_then(|c| leaf_info(c).ok()?.identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_stops_at_the_cap_and_is_jittered() {
        let within = |got: Duration, step: Duration| got >= step / 2 && got <= step;
        for _ in 0..100 {
            assert!(within(backoff(1, MAX_BACKOFF), Duration::from_millis(500)));
            assert!(within(backoff(2, MAX_BACKOFF), Duration::from_secs(1)));
            assert!(within(backoff(4, MAX_BACKOFF), Duration::from_secs(4)));
            assert!(within(backoff(40, MAX_BACKOFF), MAX_BACKOFF));
            assert!(within(
                backoff(40, Duration::from_secs(2)),
                Duration::from_secs(2)
            ));
        }
        let waits: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(5, MAX_BACKOFF)).collect();
        assert!(
            waits.len() > 1,
            "twenty workloads would retry in lockstep: {waits:?}"
        );
    }

    #[test]
    fn renewal_is_at_seventy_percent_of_what_is_left_at_arrival() {
        let received = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let held = Held {
            chain_pem: Vec::new(),
            key_pem: Vec::new(),
            bundle: Vec::new(),
            received,
            not_after: received + Duration::from_secs(100),
        };
        let options = CertifyOptions::new("ca.crt");
        for _ in 0..100 {
            let at = renew_time(&held, &options)
                .duration_since(received)
                .unwrap();
            assert!(
                at >= Duration::from_secs(64) && at <= Duration::from_secs(76),
                "{at:?}"
            );
        }
    }

    #[test]
    fn pem_round_trips() {
        let der = vec![7u8; 200];
        let text = pem("CERTIFICATE", &der);
        let back = CertificateDer::pem_slice_iter(text.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
