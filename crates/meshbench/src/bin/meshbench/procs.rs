//! The processes a scenario runs: echo replicas, HAProxy sidecars and the
//! shop's services, with their CPU time and resident memory from /proc.

use std::{
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
        let common = "global\n  maxconn 4000\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n";
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
