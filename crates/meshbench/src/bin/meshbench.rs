//! `meshbench`: measures the mesh against a raw tonic channel, in one run,
//! on the same `mesh-echo` server, contenders interleaved (A, B, A, B ...).
//!
//! ```sh
//! cargo build --release -p meshbench
//! target/release/meshbench overhead --concurrency 32 --duration 5s --rounds 3
//! ```
//!
//! Prints a table and the mesh/raw ratios; `--json FILE` writes them too.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use mesh_client::MeshChannel;
use mesh_client::{Mesh, MeshConfig};
use shop_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};
use tonic::transport::{Channel, Endpoint};

/// The channels under test.
#[derive(Clone)]
enum AnyChannel {
    Raw(Channel),
    Mesh(MeshChannel),
}

/// One closed loop of Echo calls until `end`, on any channel type.
macro_rules! drive {
    ($channel:expr, $payload:expr, $end:expr) => {{
        let mut client = EchoServiceClient::new($channel);
        let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        let (mut calls, mut errors) = (0u64, 0u64);
        while Instant::now() < $end {
            let t = Instant::now();
            match client
                .echo(EchoRequest {
                    payload: $payload.clone(),
                })
                .await
            {
                Ok(_) => {
                    calls += 1;
                    let _ = local.record((t.elapsed().as_micros() as u64).max(1));
                }
                Err(_) => errors += 1,
            }
        }
        (local, calls, errors)
    }};
}

#[derive(Parser)]
#[command(
    name = "meshbench",
    about = "Benchmarks of the mesh against a raw tonic channel"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Unary echo over one connection: raw tonic channel vs mesh channel.
    Overhead(Args),
}

#[derive(clap::Args, Clone)]
struct Args {
    /// Calls in flight at once (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured time per round per contender, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up per contender before the rounds.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Rounds; each round runs every contender once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Payload bytes per call.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| c.is_alphabetic()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 5s"))?;
    let d = match unit {
        "s" => Duration::from_secs_f64(n),
        "ms" => Duration::from_secs_f64(n / 1000.0),
        _ => return Err(format!("{text:?}: use s or ms")),
    };
    if d > Duration::from_secs(600) {
        return Err("at most 600s per round".into());
    }
    Ok(d)
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: utime is field 11, stime 12, at 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let echo = exe.with_file_name("mesh-echo");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    let child = Command::new(&echo)
        .args(["--listen", &addr.to_string(), "--id", "bench"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "starting {}: {e}; build it with cargo build --release -p meshbench",
                echo.display()
            )
        })?;
    Ok(Server { child, addr })
}

#[derive(Clone)]
struct Contender {
    name: &'static str,
    channel: AnyChannel,
    hist: Arc<Mutex<Histogram<u64>>>,
    calls: u64,
    errors: u64,
    elapsed: Duration,
    client_cpu: f64,
    server_cpu: f64,
}

impl Contender {
    fn new(name: &'static str, channel: AnyChannel) -> Self {
        Self {
            name,
            channel,
            hist: Arc::new(Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            )),
            calls: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            client_cpu: 0.0,
            server_cpu: 0.0,
        }
    }

    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn quantile_us(&self, q: f64) -> u64 {
        self.hist.lock().expect("histogram").value_at_quantile(q)
    }
}

/// A closed-loop round: `concurrency` loops of Echo for `duration`.
async fn round(c: &mut Contender, args: &Args, duration: Duration, record: bool, server_pid: u32) {
    let payload = vec![7u8; args.payload];
    let (cpu0, scpu0) = (cpu_seconds(std::process::id()), cpu_seconds(server_pid));
    let started = Instant::now();
    let end = started + duration;
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let channel = c.channel.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                match channel {
                    AnyChannel::Raw(ch) => drive!(ch, payload, end),
                    AnyChannel::Mesh(ch) => drive!(ch, payload, end),
                }
            })
        })
        .collect();
    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut calls, mut errors) = (0, 0);
    for task in tasks {
        let (local, n, e) = task.await.expect("load task");
        merged.add(&local).expect("same bounds");
        calls += n;
        errors += e;
    }
    if record {
        c.hist
            .lock()
            .expect("histogram")
            .add(&merged)
            .expect("same bounds");
        c.calls += calls;
        c.errors += errors;
        c.elapsed += started.elapsed();
        c.client_cpu += cpu_seconds(std::process::id()) - cpu0;
        c.server_cpu += cpu_seconds(server_pid) - scpu0;
    }
}

async fn overhead(args: Args) -> Result<(), String> {
    let server = start_server()?;
    // Wait for the server: a raw connect succeeds once it listens.
    let raw = {
        let endpoint =
            Endpoint::from_shared(format!("http://{}", server.addr)).map_err(|e| e.to_string())?;
        let start = Instant::now();
        loop {
            match endpoint.clone().tcp_nodelay(true).connect().await {
                Ok(channel) => break channel,
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(format!("server did not start: {e}")),
            }
        }
    };
    let mesh = Mesh::from_config(MeshConfig::default())
        .and_then(|m| m.with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET))
        .map_err(|e| e.to_string())?;
    let mesh_channel = mesh
        .channel(&format!("static:///{}", server.addr))
        .map_err(|e| e.to_string())?;
    let mut contenders = vec![
        Contender::new("raw tonic", AnyChannel::Raw(raw)),
        Contender::new("mesh", AnyChannel::Mesh(mesh_channel)),
    ];
    let pid = server.child.id();
    for c in contenders.iter_mut() {
        round(c, &args, args.warmup, false, pid).await;
    }
    for r in 0..args.rounds {
        for c in contenders.iter_mut() {
            round(c, &args, args.duration, true, pid).await;
            eprintln!(
                "round {}/{}: {:<10} {:>9.0} req/s",
                r + 1,
                args.rounds,
                c.name,
                c.rate()
            );
        }
    }

    println!(
        "\nunary echo, {} B payload, {} in flight, {} rounds × {:?} (interleaved), one connection, loopback",
        args.payload, args.concurrency, args.rounds, args.duration
    );
    println!(
        "{:<10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>12} {:>12}",
        "contender",
        "req/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "errors",
        "client CPU s",
        "server CPU s"
    );
    for c in &contenders {
        println!(
            "{:<10} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>7} {:>12.2} {:>12.2}",
            c.name,
            c.rate(),
            c.quantile_us(0.5),
            c.quantile_us(0.9),
            c.quantile_us(0.99),
            c.quantile_us(0.999),
            c.errors,
            c.client_cpu,
            c.server_cpu
        );
    }
    let (raw, mesh) = (&contenders[0], &contenders[1]);
    let throughput_ratio = mesh.rate() / raw.rate();
    let p50_ratio = mesh.quantile_us(0.5) as f64 / raw.quantile_us(0.5).max(1) as f64;
    let p99_ratio = mesh.quantile_us(0.99) as f64 / raw.quantile_us(0.99).max(1) as f64;
    println!(
        "\nmesh / raw: throughput {throughput_ratio:.3}×, p50 {p50_ratio:.3}×, p99 {p99_ratio:.3}× (goal: ≥ 0.97× throughput, ≤ 1.05× p99)"
    );
    if let Some(path) = &args.json {
        let rows: Vec<_> = contenders
            .iter()
            .map(|c| {
                serde_json::json!({
                    "contender": c.name, "rps": c.rate(), "calls": c.calls, "errors": c.errors,
                    "p50_us": c.quantile_us(0.5), "p90_us": c.quantile_us(0.9),
                    "p99_us": c.quantile_us(0.99), "p999_us": c.quantile_us(0.999),
                    "client_cpu_s": c.client_cpu, "server_cpu_s": c.server_cpu,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "scenario": "overhead", "concurrency": args.concurrency, "payload": args.payload,
            "rounds": args.rounds, "round_secs": args.duration.as_secs_f64(), "results": rows,
            "ratios": { "throughput": throughput_ratio, "p50": p50_ratio, "p99": p99_ratio },
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json"))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Overhead(args) => overhead(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshbench: {e}");
            ExitCode::FAILURE
        }
    }
}
