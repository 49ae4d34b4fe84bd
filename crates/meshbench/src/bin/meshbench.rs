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
    /// Also run raw tonic over TLS and the mesh over mTLS (against a second
    /// server with a certificate from a throwaway dev CA).
    #[arg(long)]
    tls: bool,
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

fn start_server(extra: &[String]) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let echo = exe.with_file_name("mesh-echo");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    let child = Command::new(&echo)
        .args(["--listen", &addr.to_string(), "--id", "bench"])
        .args(extra)
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

/// Retries `connect` until the server listens.
async fn connect_retrying<F, Fut>(connect: F) -> Result<Channel, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, tonic::transport::Error>>,
{
    let start = Instant::now();
    loop {
        match connect().await {
            Ok(channel) => return Ok(channel),
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(format!("server did not start: {e}")),
        }
    }
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A plain rustls client (standard WebPKI verification of "localhost",
/// client certificate presented) under a raw tonic channel: the TLS
/// baseline without the mesh.
fn raw_tls_connector(
    dir: &std::path::Path,
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
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
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

async fn overhead(args: Args) -> Result<(), String> {
    let server = start_server(&[])?;
    let raw = {
        let endpoint =
            Endpoint::from_shared(format!("http://{}", server.addr)).map_err(|e| e.to_string())?;
        let endpoint = endpoint.tcp_nodelay(true);
        connect_retrying(|| endpoint.connect()).await?
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
    // TLS contenders talk to a second server of the same binary, with a
    // certificate: raw tonic over rustls, and the mesh over mTLS.
    let pki = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tls_server = if args.tls {
        use mesh_client::tls::{
            SpiffeId,
            dev::{DevCa, LeafSpec, write_workload},
        };
        let ca =
            DevCa::generate("bench.local", Duration::from_secs(3600)).map_err(|e| e.to_string())?;
        for who in ["server", "client"] {
            let id: SpiffeId = format!("spiffe://bench.local/ns/bench/sa/{who}").parse()?;
            let issued = ca.issue(&LeafSpec::local(id)).map_err(|e| e.to_string())?;
            write_workload(&pki.path().join(who), &issued, &ca.cert_pem)
                .map_err(|e| e.to_string())?;
        }
        let server = start_server(&[
            "--tls-dir".into(),
            pki.path().join("server").display().to_string(),
            "--trust-domain".into(),
            "bench.local".into(),
            "--namespace".into(),
            "bench".into(),
        ])?;
        let connector = raw_tls_connector(&pki.path().join("client"))?;
        let endpoint =
            Endpoint::from_shared(format!("http://{}", server.addr)).map_err(|e| e.to_string())?;
        let raw_tls =
            connect_retrying(|| endpoint.connect_with_connector(connector.clone())).await?;
        let tls = mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(
            pki.path().join("client"),
        ))
        .map_err(|e| e.to_string())?;
        let mesh_tls = mesh
            .clone()
            .with_tls(tls)
            .channel_with_identity(
                &format!("static:///{}", server.addr),
                "spiffe://bench.local/ns/bench/sa/server",
            )
            .map_err(|e| e.to_string())?;
        contenders.push(Contender::new("raw TLS", AnyChannel::Raw(raw_tls)));
        contenders.push(Contender::new("mesh mTLS", AnyChannel::Mesh(mesh_tls)));
        Some(server)
    } else {
        None
    };
    let pids = (server.child.id(), tls_server.as_ref().map(|s| s.child.id()));
    let pid_of = |c: &Contender| {
        if c.name.contains("TLS") {
            pids.1.unwrap_or(pids.0)
        } else {
            pids.0
        }
    };
    for c in contenders.iter_mut() {
        let pid = pid_of(c);
        round(c, &args, args.warmup, false, pid).await;
    }
    for r in 0..args.rounds {
        for c in contenders.iter_mut() {
            let pid = pid_of(c);
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
    if contenders.len() == 4 {
        let (raw_tls, mesh_tls) = (&contenders[2], &contenders[3]);
        println!(
            "mesh mTLS / mesh plaintext: throughput {:.3}× (goal ≥ 0.90×); mesh mTLS / raw TLS: throughput {:.3}×, p99 {:.3}×",
            mesh_tls.rate() / mesh.rate(),
            mesh_tls.rate() / raw_tls.rate(),
            mesh_tls.quantile_us(0.99) as f64 / raw_tls.quantile_us(0.99).max(1) as f64,
        );
    }
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
