//! The shop's edge gateway: the one entry that faces the outside.
//!
//! It serves the public methods of the shop (a route table, checked
//! against the contracts at start) and forwards each call over the mesh,
//! with the gateway's own workload identity, to the service that owns it;
//! internal methods (charges, reservations, token checks) answer
//! `PERMISSION_DENIED`. Routes marked `auth: required` need a valid token
//! from auth: the gateway verifies it with auth's public keys (refreshed on
//! rotation), refuses bad ones with `UNAUTHENTICATED`, and forwards the
//! verified subject in `x-verified-subject` (services still verify the
//! token themselves). Every source address has a token bucket, and every
//! user too (a call with a valid token takes from both); over it,
//! `RESOURCE_EXHAUSTED` with `retry-after`. The source address goes to the
//! services in `x-shop-client`, for auth's per-client login limits. Browsers call it with gRPC-Web on the same port, with
//! CORS for the configured origins (with `--static-dir` it also serves a
//! built web app, the storefront, on a second port, whose origin CORS then
//! allows too). Health, reflection of the public
//! surface only, metrics and traces come from the mesh server. An outside
//! caller's deadline is cut to `--max-inbound-deadline-ms` before it
//! travels into the mesh, and failures inside the mesh reach it as generic
//! messages (no addresses, targets or identities; the detail is logged).
//! Headers pass by an allow-list each way ([`headers`]): an outside caller
//! cannot steer a route (`x-canary`) or send mesh metadata in, and no
//! `mesh-*` header of the shop's comes out.

#![forbid(unsafe_code)]

/// Token checks at the edge: the same cache of auth's keys the services use.
pub use shop_kit::token as keys;
pub mod headers;
pub mod proxy;
pub mod recommend;
pub mod routes;

use std::{
    collections::HashMap, ffi::OsString, future::Future, net::SocketAddr, num::NonZeroU32,
    path::PathBuf, process::ExitCode,
};

use clap::Parser;
use mesh_client::server::ServerConfig;
use shop_api::auth::v1::auth_service_client::AuthServiceClient;
use tokio::net::TcpListener;

pub use proxy::{Gateway, RateLimit};
pub use routes::{AuthMode, DEFAULT_ROUTES, RouteTable, UPSTREAMS};

/// Configuration of the gateway, from flags or environment.
#[derive(Clone, Debug, Parser)]
#[command(name = "gateway", about = "The shop's edge gateway")]
pub struct Config {
    /// Address the public gRPC (and gRPC-Web) port listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50050")]
    pub listen: SocketAddr,
    /// Where the auth service is, as a mesh target.
    #[arg(long, env = "AUTH_TARGET", default_value = "static:///127.0.0.1:50051")]
    pub auth_target: String,
    /// Where the inventory service is, as a mesh target.
    #[arg(
        long,
        env = "INVENTORY_TARGET",
        default_value = "static:///127.0.0.1:50052"
    )]
    pub inventory_target: String,
    /// Where the orders service is, as a mesh target.
    #[arg(
        long,
        env = "ORDERS_TARGET",
        default_value = "static:///127.0.0.1:50054"
    )]
    pub orders_target: String,
    /// Where the payments service is, as a mesh target.
    #[arg(
        long,
        env = "PAYMENTS_TARGET",
        default_value = "static:///127.0.0.1:50053"
    )]
    pub payments_target: String,
    /// Where the recommendations service is, as a mesh target. An optional
    /// dependency: when it is slow, failing or absent, `Recommend` answers
    /// without recommendations (`fallback: true`).
    #[arg(
        long,
        env = "RECOMMENDATIONS_TARGET",
        default_value = "static:///127.0.0.1:50056"
    )]
    pub recommendations_target: String,
    /// Milliseconds the gateway waits for recommendations before answering
    /// without them (5 to 1000). Give the target the same `timeout` and
    /// `maxTimeout`, and no retries, in the mesh config.
    #[arg(long, env = "RECOMMENDATIONS_BUDGET_MS", default_value_t = 50)]
    pub recommendations_budget_ms: u64,
    /// Route table (JSON); the built-in one when unset (see `routes.json`).
    #[arg(long, env = "ROUTES")]
    pub routes: Option<PathBuf>,
    /// Sustained requests per second allowed per caller.
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value_t = 20)]
    pub rate_limit_per_second: u32,
    /// Requests a caller may make at once above the sustained rate.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 40)]
    pub rate_limit_burst: u32,
    /// Calls a caller (an address, and a user) may have in flight at once,
    /// each until its answer is read to its end. What a caller holds, not
    /// how often it calls: unread answers, watches and unfinished requests
    /// hold upstream streams and the windows of connections every caller
    /// shares (a mesh connection takes 32 unread answers to stall).
    #[arg(long, env = "MAX_CALLS_IN_FLIGHT_PER_CLIENT", default_value_t = 24)]
    pub max_calls_in_flight_per_client: u32,
    /// Web origins allowed to call with gRPC-Web (CORS), e.g.
    /// `https://shop.example`; repeat or separate with commas.
    #[arg(
        long = "cors-allowed-origin",
        env = "CORS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_allowed_origins: Vec<String>,
    /// Directory with `tls.crt` and `tls.key` for server-only TLS on the
    /// public port (any CA; clients present no certificate). Without it the
    /// public port is plaintext, for TLS terminated in front of it.
    #[arg(long, env = "PUBLIC_TLS_DIR")]
    pub public_tls_dir: Option<PathBuf>,
    /// Proxies (addresses or CIDR ranges) in front of the gateway whose
    /// `x-forwarded-for` names the real client, for per-address limits;
    /// from anyone else the header is ignored. Repeat or separate with commas.
    #[arg(long = "trusted-proxy", env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// Which tokens are accepted.
    #[command(flatten)]
    pub tokens: shop_kit::token::TokenArgs,
    /// Longest deadline, in milliseconds, an outside caller's `grpc-timeout`
    /// may give the calls the gateway makes for it; a longer one (even
    /// `99999999H`) is cut to this at the edge. Calls into the mesh are
    /// also cut to the mesh config's `maxTimeout` (default 30 s).
    #[arg(long, env = "MAX_INBOUND_DEADLINE_MS", default_value_t = 30_000)]
    pub max_inbound_deadline_ms: u64,
    /// A built web app (the storefront, `web/dist/shop`) to serve on
    /// `--static-listen`, a second, plain HTTP/1.1 port: its pages call
    /// this gateway with gRPC-Web, and its own origin is allowed by CORS.
    #[arg(long, env = "STATIC_DIR", requires = "static_listen")]
    pub static_dir: Option<PathBuf>,
    /// Address the web app of `--static-dir` is served on.
    #[arg(long, env = "STATIC_LISTEN", requires = "static_dir")]
    pub static_listen: Option<SocketAddr>,
    /// The gateway's URL as the web app's browsers reach it (given to the
    /// pages in `/config.json`); by default `http://` (or `https://` with
    /// `--public-tls-dir`) and `--listen`. Set it when browsers reach the
    /// gateway by another name (a wildcard `--listen`, an ingress).
    #[arg(long, env = "STATIC_GATEWAY_URL", requires = "static_dir")]
    pub static_gateway_url: Option<String>,
    /// Identity (for calls into the mesh), mesh policy, admin port, drain.
    #[command(flatten)]
    pub mesh: shop_kit::MeshArgs,
}

impl Config {
    /// The route table from `--routes` or the built-in one, validated.
    pub fn route_table(&self) -> Result<RouteTable, Vec<String>> {
        let text = match &self.routes {
            None => DEFAULT_ROUTES.to_owned(),
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| vec![format!("--routes: cannot read {}: {e}", path.display())])?,
        };
        RouteTable::from_json(&text, shop_api::FILE_DESCRIPTOR_SET)
    }

    /// `--trusted-proxy` as networks (a bare address is a one-address network).
    pub fn trusted(&self) -> Result<Vec<ipnet::IpNet>, BadTrustedProxy> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|source| BadTrustedProxy {
                        given: p.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// The gateway URL the web app calls (see `--static-gateway-url`).
    pub fn gateway_url(&self) -> String {
        self.static_gateway_url.clone().unwrap_or_else(|| {
            let scheme = if self.public_tls_dir.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", self.listen)
        })
    }

    /// The origins CORS allows: `--cors-allowed-origin`, and the web app's
    /// own when the gateway serves one (as `http://` and the address, and
    /// for a loopback address also as `http://localhost`).
    pub fn allowed_origins(&self) -> Vec<String> {
        let mut origins = self.cors_allowed_origins.clone();
        if let Some(at) = self.static_listen {
            origins.push(format!("http://{at}"));
            if at.ip().is_loopback() {
                origins.push(format!("http://localhost:{}", at.port()));
            }
        }
        origins.sort();
        origins.dedup();
        origins
    }

    fn targets(&self) -> [(&'static str, &str); 5] {
        [
            ("auth", &self.auth_target),
            ("inventory", &self.inventory_target),
            ("orders", &self.orders_target),
            ("payments", &self.payments_target),
            ("recommendations", &self.recommendations_target),
        ]
    }
}

impl shop_kit::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(mut route_problems) = self.route_table() {
            problems.append(&mut route_problems);
        }
        for (flag, value) in [
            ("--rate-limit-per-second", self.rate_limit_per_second),
            ("--rate-limit-burst", self.rate_limit_burst),
            (
                "--max-calls-in-flight-per-client",
                self.max_calls_in_flight_per_client,
            ),
        ] {
            if !(1..=1_000_000).contains(&value) {
                problems.push(format!("{flag}: must be 1 to 1000000, got {value}"));
            }
        }
        for origin in &self.cors_allowed_origins {
            let ok = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && http::HeaderValue::from_str(origin).is_ok();
            if !ok {
                problems.push(format!(
                    "--cors-allowed-origin: {origin:?} is not an origin like https://shop.example"
                ));
            }
        }
        if !(100..=600_000).contains(&self.max_inbound_deadline_ms) {
            problems.push(format!(
                "--max-inbound-deadline-ms: must be 100 to 600000, got {}",
                self.max_inbound_deadline_ms
            ));
        }
        if !(5..=1000).contains(&self.recommendations_budget_ms) {
            problems.push(format!(
                "--recommendations-budget-ms: must be 5 to 1000, got {}",
                self.recommendations_budget_ms
            ));
        }
        if let Err(e) = self.trusted() {
            problems.push(format!("--trusted-proxy: {e}"));
        }
        if let Some(url) = &self.static_gateway_url {
            let ok = (url.starts_with("https://") || url.starts_with("http://"))
                && !url.ends_with('/')
                && !url.contains(|c: char| c.is_whitespace() || c == ';' || c == '\'');
            if !ok {
                problems.push(format!(
                    "--static-gateway-url: {url:?} is not a URL like https://api.shop.example"
                ));
            }
        }
        if let Some(dir) = self.static_dir.as_ref().filter(|d| !d.is_dir()) {
            problems.push(format!(
                "--static-dir: {} is not a directory (build it: `npm ci && npm run build` in web/)",
                dir.display()
            ));
        }
        if self.static_listen.is_some_and(|at| at == self.listen) {
            problems.push("--static-listen: must differ from --listen".to_owned());
        }
        if let Some(dir) = self.public_tls_dir.as_ref().filter(|d| !d.is_dir()) {
            problems.push(format!(
                "--public-tls-dir: {} is not a directory",
                dir.display()
            ));
        }
        for (name, target) in self.targets() {
            if let Err(e) = target.parse::<mesh_client::Target>() {
                problems.push(format!("--{name}-target: {e}"));
            }
        }
        problems.extend(self.mesh.problems());
        problems
    }
}

/// Why the process stopped.
pub use shop_kit::ServiceError as Error;

/// A `--trusted-proxy` value that is neither an address nor a CIDR range.
#[derive(Debug, thiserror::Error)]
#[error("{given:?} is not an address or CIDR range like 10.0.0.0/8")]
pub struct BadTrustedProxy {
    /// The value as given.
    pub given: String,
    /// Why it is not an address (as a bare address).
    #[source]
    pub source: std::net::AddrParseError,
}

/// Runs the gateway on `listener` until `shutdown` completes, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let routes = config.route_table().map_err(Error::Config)?;
    let tls = config.mesh.tls()?;
    let mesh = config.mesh.mesh(tls.clone())?;
    let mut upstreams = HashMap::new();
    for (name, target) in config.targets() {
        upstreams.insert(
            name,
            config.mesh.channel(&mesh, tls.is_some(), target, name)?,
        );
    }
    // Upstreams with a public method answered by a stream also get a
    // channel of their own for those calls (its own connections, dialled
    // at start by its health watches; see `Gateway::with_stream_upstreams`).
    let mut stream_upstreams = HashMap::new();
    for (name, target) in config.targets() {
        if routes.streams_to(name) {
            // Named apart in metrics (`orders-streams`), verified as the
            // same service.
            let identity = tls.is_some().then(|| config.mesh.identity_of(name));
            let peer = format!("{name}-streams");
            stream_upstreams.insert(
                name,
                mesh.channel_named(&peer, target, identity.as_deref())?,
            );
        }
    }
    let keys = config
        .tokens
        .key_cache(AuthServiceClient::new(upstreams["auth"].clone()));
    let limit = RateLimit {
        per_second: NonZeroU32::new(config.rate_limit_per_second).expect("checked"),
        burst: NonZeroU32::new(config.rate_limit_burst).expect("checked"),
        in_flight: NonZeroU32::new(config.max_calls_in_flight_per_client).expect("checked"),
    };
    // Reflection and health name the public services; the strings live as
    // long as the process (built once at start).
    let names: Vec<&'static str> = routes
        .services()
        .into_iter()
        .map(|s| &*Box::leak(s.to_owned().into_boxed_str()))
        .collect();
    let public: &'static [u8] = Box::leak(
        routes
            .public_descriptors(shop_api::FILE_DESCRIPTOR_SET)
            .into_boxed_slice(),
    );
    let trusted = config.trusted().map_err(|e| Error::Flag {
        flag: "--trusted-proxy",
        source: e.into(),
    })?;
    let recommender = recommend::Recommender::new(
        upstreams["recommendations"].clone(),
        std::time::Duration::from_millis(config.recommendations_budget_ms),
    );
    let gateway = Gateway::new(routes, upstreams, keys, limit, trusted)
        .with_stream_upstreams(stream_upstreams)
        .with_recommender(recommender);
    let origins = config
        .allowed_origins()
        .iter()
        .map(|o| http::HeaderValue::from_str(o).expect("checked"))
        .collect();
    // The storefront's port is bound before the gRPC server starts, so a
    // bad address fails the start, not a background task.
    let site = match (&config.static_dir, config.static_listen) {
        (Some(dir), Some(at)) => {
            let gateway_url = config.gateway_url();
            let site = shop_kit::site::Site::load(dir, std::slice::from_ref(&gateway_url))
                .map_err(|e| Error::Flag {
                    flag: "--static-dir",
                    source: e.into(),
                })?
                .with_asset(
                    "/config.json",
                    shop_kit::site::Asset {
                        content_type: "application/json",
                        body: serde_json::json!({ "gatewayUrl": gateway_url })
                            .to_string()
                            .into(),
                    },
                );
            let listener = TcpListener::bind(at).await.map_err(|e| Error::Flag {
                flag: "--static-listen",
                source: e.into(),
            })?;
            tracing::info!(%at, dir = %dir.display(), "serving the web app");
            Some((site, listener))
        }
        _ => None,
    };
    // The public port speaks server-only TLS with --public-tls-dir, else
    // plaintext behind a load balancer or ingress that terminates TLS.
    // Calls into the mesh use the gateway's own identity over mTLS.
    let public_tls = config
        .public_tls_dir
        .as_ref()
        .map(|dir| {
            mesh_client::tls::PublicTls::load(
                &dir.join("tls.crt"),
                &dir.join("tls.key"),
                std::time::Duration::from_millis(config.mesh.tls_handshake_timeout_ms),
            )
            .map_err(|e| Error::Flag {
                flag: "--public-tls-dir",
                source: e.into(),
            })
        })
        .transpose()?;
    let mut server = config
        .mesh
        .server_describing(
            ServerConfig {
                trust_trace_context: false,
                // Outsiders do not choose how long the shop works for them.
                max_inbound_deadline: std::time::Duration::from_millis(
                    config.max_inbound_deadline_ms,
                ),
                ..ServerConfig::default()
            },
            None,
            public,
        )?
        .grpc_web(origins)
        .fallback(&names, gateway.clone());
    if let Some(tls) = public_tls {
        server = server.public_tls(tls);
    }
    let web = site.map(|(site, listener)| {
        let draining = server.draining();
        tokio::spawn(async move { site.serve(listener, draining.cancelled_owned()).await })
    });
    let housekeeping = {
        let (gateway, draining) = (gateway.clone(), server.draining());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(keys::REFRESH_EVERY);
            loop {
                tokio::select! {
                    _ = draining.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = gateway.keys().refresh(true).await {
                    tracing::warn!("token keys not refreshed: {}", e.message());
                }
                gateway.forget_idle_callers();
            }
        })
    };
    server.serve(listener, shutdown).await?;
    housekeeping.abort();
    if let Some(web) = web {
        web.abort();
    }
    Ok(())
}

/// The process entry point: `args` are the command line.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    shop_kit::service_main("gateway", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
