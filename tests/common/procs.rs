//! Service processes on loopback: binaries from the target directory,
//! free ports, start, SIGTERM and SIGKILL.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// The directory holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of a workspace binary; `cargo test --workspace` builds them all.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing; run the tests with `cargo test --workspace` so every service binary is built",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 for a process to bind (loopback only).
///
/// Ports come from a counter below Linux's ephemeral range (32768+), so an
/// address handed out here is never handed out again in this test binary,
/// nor picked by the kernel for someone's port 0, before its process binds
/// it; each is checked free when handed out.
pub fn free_addr() -> SocketAddr {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    };
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(LOW + rand::random_range(0..(HIGH - LOW))));
    for _ in 0..(HIGH - LOW) {
        let port = LOW + next.fetch_add(1, Ordering::Relaxed) % (HIGH - LOW);
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in {LOW}..{HIGH}");
}

/// A service process, SIGKILLed when dropped.
pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
}

impl Proc {
    /// Starts `bin` with `args` plus `--listen addr`.
    pub fn spawn(name: &str, addr: SocketAddr, args: &[String]) -> Proc {
        Proc::spawn_env(name, addr, args, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(
        name: &str,
        addr: SocketAddr,
        args: &[String],
        env: &[(String, String)],
    ) -> Proc {
        let child = Command::new(bin(name))
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.into(),
            addr,
            child,
        }
    }

    /// Wraps an already spawned child.
    pub fn adopt(name: &str, addr: SocketAddr, child: Child) -> Proc {
        Proc {
            name: name.into(),
            addr,
            child,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends SIGTERM and waits for the process to exit; returns its code.
    /// Async so this process's client connections keep running: a drain
    /// waits for clients to close their connections.
    pub async fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = nix::sys::signal::kill(self.pid(), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} did not exit within {limit:?} of SIGTERM", self.name);
    }

    /// SIGKILL, no drain.
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
