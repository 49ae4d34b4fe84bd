//! A minimal HTTP/1.1 GET client for the OIDC discovery document and the
//! JWKS (`http://` for dev, `https://` with a given CA bundle, such as the
//! cluster CA, in Kubernetes).

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};

/// The whole exchange may take this long.
const TIMEOUT: Duration = Duration::from_secs(10);

/// GETs `url`, returning the body (at most `limit` bytes) of a 200 answer.
pub async fn get(
    url: &str,
    ca_file: Option<&Path>,
    bearer: Option<&str>,
    limit: usize,
) -> Result<Vec<u8>, String> {
    tokio::time::timeout(TIMEOUT, get_inner(url, ca_file, bearer, limit))
        .await
        .map_err(|_| format!("{url}: no answer in {TIMEOUT:?}"))?
}

async fn get_inner(
    url: &str,
    ca_file: Option<&Path>,
    bearer: Option<&str>,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "{url}: only http:// and https:// URLs are supported"
            ));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let mut request = http::Request::get(path).header(http::header::HOST, &host);
    if let Some(token) = bearer.filter(|t| !t.is_empty()) {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    if https {
        let ca_file =
            ca_file.ok_or_else(|| format!("{url}: https needs a CA bundle (--oidc-ca-file)"))?;
        let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&pem) {
            let ca = ca.map_err(|e| format!("{}: {e}", ca_file.display()))?;
            roots
                .add(ca)
                .map_err(|e| format!("{}: {e}", ca_file.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| format!("{url}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        send(url, TokioIo::new(tls), request, limit).await
    } else {
        send(url, TokioIo::new(tcp), request, limit).await
    }
}

async fn send<T>(
    url: &str,
    io: T,
    request: http::Request<Empty<Bytes>>,
    limit: usize,
) -> Result<Vec<u8>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the body: {e}"))?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}"));
    }
    Ok(body.to_vec())
}
