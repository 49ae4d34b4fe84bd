//! A small HTTP/1.1 server for a built web app (the storefront the gateway
//! serves, the dashboard `shopctl` serves): every file of a directory,
//! read once at start into memory, plus a few answers made by the caller
//! (`/config.json`, a JSON API).
//!
//! Files are loaded at start, not looked up per request, so a request can
//! only ever name a file that was in the directory then: no path from the
//! outside reaches the file system. Limits are explicit ([`MAX_FILES`],
//! [`MAX_TOTAL_BYTES`], [`MAX_CONNECTIONS`], [`HEADER_READ_TIMEOUT`],
//! [`MAX_CONNECTION_AGE`]); only
//! `GET` and `HEAD` are served; every answer carries a strict
//! `Content-Security-Policy`, `nosniff`, `no-referrer` and `DENY` framing.
//! A server on a loopback address answers only requests whose `Host` is a
//! loopback name (`localhost`, `127.0.0.1`, `[::1]`), so a web page from
//! elsewhere cannot read it through DNS rebinding.

use std::{
    collections::HashMap, convert::Infallible, future::Future, path::Path, sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Most files a site may have.
pub const MAX_FILES: usize = 512;
/// Most bytes all of a site's files may have together.
pub const MAX_TOTAL_BYTES: u64 = 32 * 1024 * 1024;
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection is served; then it is closed gracefully (the
/// answer in progress finishes, within [`CLOSE_GRACE`]), so idle
/// keep-alive connections cannot hold every slot for good.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// How long a connection past its age may finish its answer.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// One answer: its content type and body.
#[derive(Clone, Debug)]
pub struct Asset {
    /// The `Content-Type` header.
    pub content_type: &'static str,
    /// The bytes sent.
    pub body: Bytes,
}

/// Answers for paths the directory does not have (an API), or `None` for
/// 404; called with the request's path.
pub type Dynamic = Arc<dyn Fn(&str) -> BoxFuture<'static, Option<Asset>> + Send + Sync>;

/// A site: the files of a directory by URL path, and extra answers.
#[derive(Clone)]
pub struct Site {
    files: HashMap<String, Asset>,
    dynamic: Option<Dynamic>,
    csp: String,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("files", &self.files.len())
            .field("csp", &self.csp)
            .finish_non_exhaustive()
    }
}

impl Site {
    /// Every file under `dir` (symbolic links are not followed), served at
    /// its path relative to `dir`; `/` serves `index.html`. `connect_src`
    /// are the origins the pages may call besides their own (the CSP's
    /// `connect-src`).
    pub fn load(dir: &Path, connect_src: &[String]) -> Result<Site, String> {
        if !dir.join("index.html").is_file() {
            return Err(format!(
                "{} has no index.html (build the web app first: `npm ci && npm run build` in web/)",
                dir.display()
            ));
        }
        let mut files = HashMap::new();
        let mut total = 0u64;
        let mut pending = vec![dir.to_path_buf()];
        while let Some(at) = pending.pop() {
            let entries =
                std::fs::read_dir(&at).map_err(|e| format!("cannot read {}: {e}", at.display()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot read {}: {e}", at.display()))?;
                let kind = entry
                    .file_type()
                    .map_err(|e| format!("{}: {e}", entry.path().display()))?;
                let path = entry.path();
                if kind.is_dir() {
                    pending.push(path);
                    continue;
                }
                if !kind.is_file() {
                    continue;
                }
                let body = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                total += body.len() as u64;
                if files.len() >= MAX_FILES || total > MAX_TOTAL_BYTES {
                    return Err(format!(
                        "{} has more than {MAX_FILES} files or {MAX_TOTAL_BYTES} bytes",
                        dir.display()
                    ));
                }
                let relative = path.strip_prefix(dir).expect("under dir");
                let url = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                files.insert(
                    format!("/{url}"),
                    Asset {
                        content_type: content_type(&url),
                        body: body.into(),
                    },
                );
            }
        }
        let connect = std::iter::once("'self'".to_owned())
            .chain(connect_src.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Site {
            files,
            dynamic: None,
            csp: format!(
                "default-src 'self'; connect-src {connect}; img-src 'self' data:; \
                 style-src 'self'; script-src 'self'; object-src 'none'; \
                 base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
            ),
        })
    }

    /// Also serves `asset` at `path` (e.g. `/config.json`).
    pub fn with_asset(mut self, path: &str, asset: Asset) -> Site {
        self.files.insert(path.to_owned(), asset);
        self
    }

    /// Answers paths the files do not have with `dynamic`.
    pub fn with_dynamic(mut self, dynamic: Dynamic) -> Site {
        self.dynamic = Some(dynamic);
        self
    }

    /// Serves the site on `listener` until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let site = Arc::new(self);
        let loopback_only = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                _ = &mut shutdown => return,
                slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            };
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("web site: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let site = site.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let site = site.clone();
                    async move { Ok::<_, Infallible>(site.answer(req, loopback_only).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
                    }
                }
                drop(slot);
            });
        }
    }

    async fn answer(&self, req: Request<Incoming>, loopback_only: bool) -> Response<Full<Bytes>> {
        if loopback_only && !host_is_loopback(&req) {
            return self.plain(
                StatusCode::MISDIRECTED_REQUEST,
                "this server answers only to localhost, 127.0.0.1 or [::1]\n",
            );
        }
        let head = req.method() == Method::HEAD;
        if !head && req.method() != Method::GET {
            let mut response = self.plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are served\n",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let path = match req.uri().path() {
            "/" => "/index.html",
            p => p,
        };
        let asset = match self.files.get(path) {
            Some(asset) => Some(asset.clone()),
            None => match &self.dynamic {
                Some(dynamic) => dynamic(path).await,
                None => None,
            },
        };
        let Some(asset) = asset else {
            return self.plain(StatusCode::NOT_FOUND, "not found\n");
        };
        // Vite names built assets by content hash: they never change.
        let cache = if path.starts_with("/assets/") {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        };
        let length = asset.body.len();
        let body = if head { Bytes::new() } else { asset.body };
        let mut response = self.response(StatusCode::OK, asset.content_type, body);
        let headers = response.headers_mut();
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static(cache),
        );
        headers.insert(header::CONTENT_LENGTH, length.into());
        response
    }

    fn plain(&self, status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
        self.response(
            status,
            "text/plain; charset=utf-8",
            Bytes::from_static(text.as_bytes()),
        )
    }

    fn response(
        &self,
        status: StatusCode,
        content_type: &'static str,
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        let value = header::HeaderValue::from_static;
        headers.insert(header::CONTENT_TYPE, value(content_type));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, value("nosniff"));
        headers.insert(header::REFERRER_POLICY, value("no-referrer"));
        headers.insert(header::X_FRAME_OPTIONS, value("DENY"));
        if let Ok(csp) = header::HeaderValue::from_str(&self.csp) {
            headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        response
    }
}

/// Whether the request's `Host` names this machine by a loopback name.
fn host_is_loopback<B>(req: &Request<B>) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        // `[::1]:8080`, `127.0.0.1:8080`, `localhost:8080`
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The content type of a built web app's file, by its extension.
fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit('.').next().unwrap_or("");
    match ext.to_ascii_lowercase().as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: Option<&str>) -> Request<()> {
        let mut b = Request::get("/");
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_loopback_host_names_pass() {
        for ok in [
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "LOCALHOST",
            "127.0.0.2",
        ] {
            assert!(host_is_loopback(&request(Some(ok))), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "192.168.1.2:80",
            "localhost.evil.example",
            "",
        ] {
            assert!(!host_is_loopback(&request(Some(bad))), "{bad}");
        }
        assert!(!host_is_loopback(&request(None)));
    }

    #[test]
    fn loads_files_by_url_path_and_refuses_a_directory_without_index() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            Site::load(dir.path(), &[])
                .unwrap_err()
                .contains("index.html")
        );
        std::fs::write(dir.path().join("index.html"), "<p>hi</p>").unwrap();
        std::fs::create_dir(dir.path().join("assets")).unwrap();
        std::fs::write(dir.path().join("assets/app-1.js"), "1").unwrap();
        let site = Site::load(dir.path(), &["http://127.0.0.1:1".into()]).unwrap();
        assert_eq!(
            site.files["/assets/app-1.js"].content_type,
            "text/javascript; charset=utf-8"
        );
        assert!(site.files.contains_key("/index.html"));
        assert!(site.csp.contains("connect-src 'self' http://127.0.0.1:1;"));
    }
}
