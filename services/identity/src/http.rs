//! A minimal HTTP/1.1 GET client for the OIDC discovery document and the
//! JWKS (`http://` to a loopback host for dev, `https://` with a given CA
//! bundle, such as the cluster CA, in Kubernetes).

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

/// Checks that `url` may be fetched: `https://` anywhere, `http://` only
/// to a loopback host. Keys fetched in plaintext could be swapped by anyone
/// on the path, who could then mint any workload's identity.
pub fn check_url(url: &str) -> Result<(), String> {
    parse(url).map(|_| ())
}

/// Whether `a` and `b` have the same scheme, host and port: the bearer token
/// is sent only to the discovery document's origin, never to wherever the
/// document points.
pub fn same_origin(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `(https, host, port)` of an allowed URL.
fn parse(url: &str) -> Result<(bool, String, u16), String> {
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
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !https && !loopback {
        return Err(format!(
            "{url}: plain http:// is allowed only to a loopback host; use https:// \
             (keys fetched in plaintext could be replaced on the way)"
        ));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok((https, host, port))
}

async fn get_inner(
    url: &str,
    ca_file: Option<&Path>,
    bearer: Option<&str>,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let (https, host, port) = parse(url)?;
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: not a URL: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
    let mut request = http::Request::get(path).header(http::header::HOST, authority);
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
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("{url}: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        for ok in [
            "https://kubernetes.default.svc/.well-known/openid-configuration",
            "http://127.0.0.1:8080/jwks",
            "http://[::1]:8080/jwks",
            "http://localhost/jwks",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://kubernetes.default.svc/jwks",
            "http://10.0.0.1/jwks",
            "ftp://127.0.0.1/jwks",
            "/jwks",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let message = check_url("http://issuer.example/jwks").unwrap_err();
        assert!(message.contains("https://"), "{message}");
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let discovery = "https://api.example:6443/.well-known/openid-configuration";
        assert!(same_origin(
            discovery,
            "https://API.example:6443/openid/v1/jwks"
        ));
        assert!(!same_origin(
            discovery,
            "https://api.example/openid/v1/jwks"
        ));
        assert!(!same_origin(discovery, "https://evil.example:6443/jwks"));
        assert!(!same_origin(
            "https://127.0.0.1/a",
            "http://127.0.0.1:443/a"
        ));
    }
}
