//! A throwaway CA for the TLS scenarios, and the plain rustls client that
//! raw tonic uses as the TLS baseline.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_client::tls::{
    MeshTls, SpiffeId, TlsFiles,
    dev::{DevCa, LeafSpec, write_workload},
};

/// The trust domain of every benchmark certificate.
pub const TRUST_DOMAIN: &str = "bench.local";

/// The SPIFFE ID of a benchmark workload in namespace `ns`.
pub fn identity(ns: &str, workload: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{workload}")
}

/// A dev CA and the directory its workloads' certificates go to.
pub struct Pki {
    ca: DevCa,
    pub root: PathBuf,
}

impl Pki {
    /// A fresh CA whose workloads are written under `root`.
    pub fn new(root: &Path) -> Result<Pki, String> {
        let ca =
            DevCa::generate(TRUST_DOMAIN, Duration::from_secs(3600)).map_err(|e| e.to_string())?;
        Ok(Pki {
            ca,
            root: root.to_path_buf(),
        })
    }

    /// Issues `workload` in namespace `ns` into `<root>/<workload>`.
    pub fn issue(&self, ns: &str, workload: &str) -> Result<PathBuf, String> {
        let id: SpiffeId = identity(ns, workload).parse().map_err(|e| format!("{e}"))?;
        let issued = self
            .ca
            .issue(&LeafSpec::local(id))
            .map_err(|e| e.to_string())?;
        let dir = self.root.join(workload);
        write_workload(&dir, &issued, &self.ca.cert_pem).map_err(|e| e.to_string())?;
        Ok(dir)
    }

    /// `workload`'s identity material as the mesh loads it.
    pub fn load(&self, workload: &str) -> Result<Arc<MeshTls>, String> {
        MeshTls::load(TlsFiles::in_dir(self.root.join(workload))).map_err(|e| e.to_string())
    }
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A plain rustls client (standard WebPKI verification of "localhost",
/// client certificate presented) for a raw tonic channel: the TLS baseline
/// without the mesh.
pub fn raw_tls_connector(
    dir: &Path,
) -> Result<
    impl tower::Service<
        http::Uri,
        Response = TlsIo,
        Error = std::io::Error,
        Future = impl std::future::Future<Output = std::io::Result<TlsIo>> + Send,
    > + Clone
    + Send
    + 'static,
    String,
> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join("ca.crt")).map_err(|e| e.to_string())? {
        roots
            .add(ca.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain = CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(dir.join("tls.key")).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Ok(tower::service_fn(move |uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("valid name");
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    }))
}
