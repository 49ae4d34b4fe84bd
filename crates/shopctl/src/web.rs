//! The browser side of `shopctl up`: the storefront, served by the first
//! gateway process on its own port (`--static-dir`), and the mesh
//! dashboard, served by shopctl itself; both from the built web apps
//! (`npm ci && npm run build` in web/). Each is left out, with a note,
//! when it has not been built or its port is taken (the shop itself
//! matters more than its pages), and without one when its port is 0.

use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context;

/// Where the built web apps are and where they are served.
pub(crate) struct WebApps {
    /// The storefront's directory and address, when it is built.
    storefront: Option<(PathBuf, SocketAddr)>,
    /// The dashboard's directory and its port, bound already, when it is built.
    dashboard: Option<(PathBuf, std::net::TcpListener)>,
}

/// `host` when it is loopback, else the loopback address of its family.
fn loopback_like(host: IpAddr) -> IpAddr {
    match host {
        _ if host.is_loopback() => host,
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

impl WebApps {
    /// The apps built under `dir` (`shop/`, `dashboard/`), to serve on
    /// `host` at the two ports.
    pub(crate) fn find(dir: &Path, host: IpAddr, storefront: u16, dashboard: u16) -> WebApps {
        let built = |app: &str, host: IpAddr, port: u16| {
            let at = dir.join(app);
            if port == 0 {
                return None;
            }
            if !at.join("index.html").is_file() {
                eprintln!(
                    "shopctl: no {app} at {} (build it: `npm ci && npm run build` in web/, \
                     or pass --web-dir); starting without it",
                    at.display()
                );
                return None;
            }
            let addr = SocketAddr::new(host, port);
            match std::net::TcpListener::bind(addr) {
                Ok(listener) => Some((at.canonicalize().unwrap_or(at), listener)),
                Err(e) => {
                    eprintln!(
                        "shopctl: {app} not served: cannot bind {addr} ({e}); starting without it"
                    );
                    None
                }
            }
        };
        WebApps {
            // The gateway binds the storefront's port itself: only checked
            // here, and let go.
            storefront: built("shop", host, storefront).map(|(dir, listener)| {
                let at = listener
                    .local_addr()
                    .expect("a bound listener has an address");
                (dir, at)
            }),
            // The dashboard has no login and shows the shop's topology,
            // pids and error rates: loopback only, whatever --host says.
            dashboard: built("dashboard", loopback_like(host), dashboard),
        }
    }

    /// The flags that make a gateway process serve the storefront.
    pub(crate) fn gateway_args(&self) -> Vec<OsString> {
        match &self.storefront {
            Some((dir, at)) => vec![
                "--static-dir".into(),
                dir.into(),
                "--static-listen".into(),
                at.to_string().into(),
            ],
            None => Vec::new(),
        }
    }

    /// Serves the dashboard on the current runtime until `stop` turns
    /// true, scraping `admins` and the supervisor's `status` file.
    pub(crate) fn start_dashboard(
        &self,
        admins: Vec<SocketAddr>,
        status: PathBuf,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let Some((dir, listener)) = &self.dashboard else {
            return Ok(());
        };
        let listener = listener.try_clone().context("the dashboard's port")?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        crate::dashboard::spawn(dir, listener, admins, status, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
    }

    /// Prints where a browser finds the apps.
    pub(crate) fn print_urls(&self) {
        if let Some((_, at)) = &self.storefront {
            println!("Storefront (in a browser; gRPC-Web to the gateway): http://{at}/");
        }
        if let Some(at) = self
            .dashboard
            .as_ref()
            .and_then(|(_, l)| l.local_addr().ok())
        {
            println!("Mesh dashboard (service graph, live): http://{at}/");
        }
    }
}
