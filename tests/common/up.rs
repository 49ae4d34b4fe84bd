//! `shopctl up` as a child process of a test: a block of free ports for its
//! services, readiness, a clean SIGTERM stop, and a kill of everything it
//! started when the test fails.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

/// A base port with `span` free loopback ports from it, in `low..high`.
/// Each test file using `shopctl up` gets its own range (below
/// `free_addr`'s and Linux's ephemeral ports), so no other test's process
/// is handed one of them; one counter per binary, so two tests of a file
/// never try the same block.
pub fn free_port_block(low: u16, high: u16, span: u16) -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(u64::MAX);
    let slots = u64::from(high - low) / u64::from(span);
    let seed = u64::from(std::process::id())
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
        );
    let _ = NEXT.compare_exchange(u64::MAX, seed % slots, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..slots {
        let base = u64::from(low) + (NEXT.fetch_add(1, Ordering::SeqCst) % slots) * u64::from(span);
        let all_free = (0..u64::from(span)).all(|i| {
            TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], (base + i) as u16))).is_ok()
        });
        if all_free {
            return base as u16;
        }
    }
    panic!("no block of {span} free loopback ports in {low}..{high}");
}

/// A running `shopctl up`; SIGKILLed with every service it started if the
/// test fails.
pub struct Up {
    pub child: Child,
    pub state: PathBuf,
    log: PathBuf,
}

impl Up {
    /// Starts `shopctl up --state-dir DIR/state` with `args`, logging to
    /// `DIR/up.log`, and waits until it has written endpoints.json (after
    /// every replica served), at most 180 s.
    pub async fn start(dir: &Path, args: &[String]) -> Up {
        let state = dir.join("state");
        let log = dir.join("up.log");
        let child = Command::new(super::bin("shopctl"))
            .arg("up")
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut up = Up { child, state, log };
        let path = up.endpoints_path();
        let start = Instant::now();
        while !path.exists() {
            if let Some(exit) = up.child.try_wait().unwrap() {
                panic!(
                    "shopctl up exited ({exit}) before it was ready:\n{}",
                    up.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "shopctl up was not ready in 180 s:\n{}",
                up.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        up
    }

    /// Where `shopctl up` writes the services' addresses.
    pub fn endpoints_path(&self) -> PathBuf {
        self.state.join("endpoints.json")
    }

    /// endpoints.json, parsed.
    pub fn endpoints(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.endpoints_path()).unwrap()).unwrap()
    }

    /// status.json, parsed (`Null` while it is missing or half-written).
    pub fn status(&self) -> Value {
        std::fs::read_to_string(self.state.join("status.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    /// What `shopctl up` wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pids of the services it supervises, from status.json.
    pub fn pids(&self) -> Vec<i32> {
        self.status()["processes"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["pid"].as_i64().map(|p| p as i32))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGTERM drains everything: exit 0 within 60 s, no service process
    /// left.
    pub async fn stop(mut self) {
        let pids = self.pids();
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let start = Instant::now();
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "shopctl up did not stop in 60 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(exit.success(), "{exit}:\n{}", self.log());
        for pid in pids {
            assert!(
                nix::sys::signal::kill(Pid::from_raw(pid), None).is_err(),
                "service pid {pid} outlived shopctl up"
            );
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // Kill the services too: a test failure must not leave them running.
            for pid in self.pids() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
