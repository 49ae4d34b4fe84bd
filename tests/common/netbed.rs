//! A test bed of pods as Linux network namespaces, for faults loopback
//! cannot show: silent blackholes, one-way partitions, dropped SYNs, lossy,
//! slow and distant links.
//!
//! Layout of one bed (every name starts with the bed's prefix
//! `mnb-<pid>-<n>-`, so beds of parallel tests and test binaries never
//! meet, and a crashed run's leftovers are recognised by their dead pid):
//!
//! - a bridge namespace `<prefix>br` holding bridge `br0`;
//! - one namespace per pod, its `eth0` a veth whose peer `v<i>` is a port
//!   of `br0`; pod `i` has address `198.18.0.<10+i>/24` (RFC 2544's
//!   benchmarking range). The machine's own namespace gets no interface
//!   and no route into the bed, and load clients run in a pod too (see
//!   [`NsRuntime`]), so no packet can leave the bed;
//! - faults live in the bridge namespace, so the pods' own stacks see
//!   nothing but silence, as with a vanished node: `iptables` (with
//!   `br_netfilter`) drops a pod's packets per direction ([`NetBed::blackhole`],
//!   [`NetBed::drop_to`], [`NetBed::drop_from`], [`NetBed::drop_syn_to`]) and
//!   shapes them ([`NetBed::shape`]): loss with the `statistic` match, a
//!   bandwidth limit with `tc tbf`, and latency/jitter with
//!   `tests/netbed/nfq_delay.py` on an NFQUEUE queue, because this kernel
//!   (like many CI kernels) has no `sch_netem`.
//!
//! Setup and teardown are idempotent: [`NetBed::new`] first removes the
//! namespaces (and their processes, veths, rules and `/etc/netns` files)
//! of beds whose process is gone, and dropping a bed removes its own. A
//! bed needs root, `ip` (iproute2), `iptables` and `python3`; without them
//! [`NetBed::new`] skips the test (`SKIPPED:`), or fails it under
//! `MESH_TEST_REQUIRE_ALL=1`.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

/// Every bed's namespace names start with this.
const FAMILY: &str = "mnb-";

/// Finds a system tool on PATH or in the sbin directories.
fn tool(name: &str) -> Option<PathBuf> {
    super::which(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Runs a command; panics with its output when it fails.
fn run(program: &Path, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {} failed: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs a command, ignoring failure (teardown of what may not exist).
fn run_quiet(program: &Path, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The bed's namespaces that exist now, by name.
fn namespaces(ip: &Path) -> Vec<String> {
    let out = Command::new(ip)
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(FAMILY))
        .map(str::to_owned)
        .collect()
}

/// Kills every process in namespace `ns` and deletes it (its veths and
/// iptables rules go with it) and its `/etc/netns` directory.
fn remove_namespace(ip: &Path, ns: &str) {
    for _ in 0..50 {
        let pids = Command::new(ip)
            .args(["netns", "pids", ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run_quiet(ip, &["netns", "del", ns]);
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// Removes the namespaces of beds whose test process no longer runs (a
/// crashed or killed run), whatever binary made them.
fn remove_stale(ip: &Path) {
    for ns in namespaces(ip) {
        let pid = ns[FAMILY.len()..].split('-').next().unwrap_or("");
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            remove_namespace(ip, &ns);
        }
    }
    // /etc/netns entries whose namespace is gone (a crash between the two).
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(FAMILY) && !Path::new("/run/netns").join(&name).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// One pod: a namespace with one address on the bed's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The pod's short name in the test.
    pub name: String,
    /// Its namespace (for `ip netns exec`).
    pub ns: String,
    /// Its address.
    pub addr: Ipv4Addr,
    index: u32,
}

/// How a pod's link is degraded; every field applies to both directions.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    /// One-way delay per direction (a round trip gets twice this).
    pub delay: Duration,
    /// Each packet's delay is `delay ± jitter`, uniform and independent
    /// (so packets may be reordered, as with netem).
    pub jitter: Duration,
    /// Share of packets dropped per direction, percent.
    pub loss_percent: f64,
    /// Bandwidth limit per direction, kbit/s (`tc tbf`).
    pub rate_kbit: Option<u32>,
}

/// A test bed; dropping it removes every namespace, process and rule it made.
pub struct NetBed {
    /// The prefix of every namespace of this bed.
    pub prefix: String,
    bridge: String,
    ip: PathBuf,
    iptables: PathBuf,
    tc: PathBuf,
    python: PathBuf,
    pods: Mutex<Vec<Pod>>,
    /// Delay processes, by pod index.
    delayers: Mutex<Vec<(u32, Child)>>,
    /// The address pods' `/etc/resolv.conf` names (see [`NetBed::set_nameserver`]).
    nameserver: Mutex<Option<Ipv4Addr>>,
}

static BEDS: AtomicU32 = AtomicU32::new(0);

impl NetBed {
    /// A new, empty bed, or `None` (the test skips) without root or the tools.
    pub fn new() -> Option<NetBed> {
        let missing = |what: &str| -> Option<NetBed> {
            super::skip_or_fail(&format!("the network-namespace test bed needs {what}"))?;
            unreachable!()
        };
        if !is_root() {
            return missing("root (ip netns, iptables)");
        }
        let (Some(ip), Some(iptables), Some(tc), Some(python)) =
            (tool("ip"), tool("iptables"), tool("tc"), tool("python3"))
        else {
            return missing(
                "ip and tc (iproute2), iptables and python3 (apt-get install -y iproute2 iptables)",
            );
        };
        remove_stale(&ip);
        let prefix = format!(
            "{FAMILY}{}-{}-",
            std::process::id(),
            BEDS.fetch_add(1, Ordering::Relaxed)
        );
        let bed = NetBed {
            bridge: format!("{prefix}br"),
            prefix,
            ip,
            iptables,
            tc,
            python,
            pods: Mutex::default(),
            delayers: Mutex::default(),
            nameserver: Mutex::default(),
        };
        // Anything of the same name (a reused pid) goes first.
        for ns in namespaces(&bed.ip) {
            if ns.starts_with(&bed.prefix) {
                remove_namespace(&bed.ip, &ns);
            }
        }
        let made = Command::new(&bed.ip)
            .args(["netns", "add", &bed.bridge])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !made {
            return missing("network namespaces (`ip netns add` failed)");
        }
        bed.ip_in(&bed.bridge, &["link", "add", "br0", "type", "bridge"]);
        bed.ip_in(&bed.bridge, &["link", "set", "br0", "up"]);
        // Bridged packets pass through iptables, where the faults are.
        let sysctl = Command::new(&bed.ip)
            .args(["netns", "exec", &bed.bridge, "sh", "-c"])
            .arg("echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !sysctl {
            return missing("br_netfilter (net.bridge.bridge-nf-call-iptables)");
        }
        let probe = Command::new(&bed.ip)
            .args(["netns", "exec", &bed.bridge])
            .arg(&bed.iptables)
            .args([
                "-A",
                "FORWARD",
                "-m",
                "physdev",
                "--physdev-is-bridged",
                "-j",
                "ACCEPT",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !probe {
            return missing("iptables with the physdev match in a network namespace");
        }
        bed.iptables_in(&["-F", "FORWARD"]);
        Some(bed)
    }

    fn ip_in(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run(&self.ip, &all);
    }

    fn iptables_in(&self, args: &[&str]) {
        let mut all = vec![
            "netns",
            "exec",
            &self.bridge,
            self.iptables.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        run(&self.ip, &all);
    }

    /// Adds pod `name` with the next address.
    pub fn pod(&self, name: &str) -> Pod {
        let mut pods = self.pods.lock().unwrap();
        let index = pods.len() as u32 + 1;
        assert!(index < 200, "a bed holds at most 199 pods");
        let pod = Pod {
            name: name.to_owned(),
            ns: format!("{}{}", self.prefix, index),
            addr: Ipv4Addr::new(198, 18, 0, 10 + index as u8),
            index,
        };
        run(&self.ip, &["netns", "add", &pod.ns]);
        let peer = format!("v{index}");
        // Created inside the pod and moved straight to the bridge
        // namespace: no end ever exists in the machine's namespace.
        self.ip_in(
            &pod.ns,
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &self.bridge,
            ],
        );
        self.ip_in(&self.bridge, &["link", "set", &peer, "master", "br0", "up"]);
        self.ip_in(
            &pod.ns,
            &["addr", "add", &format!("{}/24", pod.addr), "dev", "eth0"],
        );
        self.ip_in(&pod.ns, &["link", "set", "eth0", "up"]);
        self.ip_in(&pod.ns, &["link", "set", "lo", "up"]);
        // Per-pod chains: drops first (inserted at the top of FORWARD),
        // shaping after (appended), so a drop rule of the receiving pod
        // wins over the sender's shaping queue.
        let (to, from, shape) = chains(index);
        for chain in [&to, &from, &shape] {
            self.iptables_in(&["-N", chain]);
        }
        self.iptables_in(&[
            "-I",
            "FORWARD",
            "-m",
            "physdev",
            "--physdev-out",
            &peer,
            "-j",
            &to,
        ]);
        self.iptables_in(&[
            "-I",
            "FORWARD",
            "-m",
            "physdev",
            "--physdev-in",
            &peer,
            "-j",
            &from,
        ]);
        self.iptables_in(&[
            "-A",
            "FORWARD",
            "-m",
            "physdev",
            "--physdev-out",
            &peer,
            "-j",
            &shape,
        ]);
        self.iptables_in(&[
            "-A",
            "FORWARD",
            "-m",
            "physdev",
            "--physdev-in",
            &peer,
            "-j",
            &shape,
        ]);
        if let Some(server) = *self.nameserver.lock().unwrap() {
            write_resolv_conf(&pod.ns, server);
        }
        pods.push(pod.clone());
        pod
    }

    /// Makes `server` the nameserver of every pod's `/etc/resolv.conf`, as
    /// `ip netns exec` shows it (`/etc/netns/<ns>/resolv.conf`), so a process
    /// started with [`NetBed::command`] resolves `dns:///` targets there.
    pub fn set_nameserver(&self, server: Ipv4Addr) {
        *self.nameserver.lock().unwrap() = Some(server);
        for pod in self.pods.lock().unwrap().iter() {
            write_resolv_conf(&pod.ns, server);
        }
    }

    /// A command that runs `program` inside `pod`'s namespace.
    pub fn command(&self, pod: &Pod, program: &Path) -> Command {
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", &pod.ns]).arg(program);
        cmd
    }

    /// Drops every packet to and from `pod`: no RST, no ICMP, only silence.
    pub fn blackhole(&self, pod: &Pod) {
        self.drop_to(pod);
        self.drop_from(pod);
    }

    /// Drops packets towards `pod` (its peers' requests); its replies pass.
    pub fn drop_to(&self, pod: &Pod) {
        let (to, _, _) = chains(pod.index);
        self.iptables_in(&["-A", &to, "-j", "DROP"]);
    }

    /// Drops packets from `pod` (its replies); packets to it pass.
    pub fn drop_from(&self, pod: &Pod) {
        let (_, from, _) = chains(pod.index);
        self.iptables_in(&["-A", &from, "-j", "DROP"]);
    }

    /// Drops TCP SYNs towards `pod`: new connections hang, established
    /// ones keep working.
    pub fn drop_syn_to(&self, pod: &Pod) {
        let (to, _, _) = chains(pod.index);
        self.iptables_in(&["-A", &to, "-p", "tcp", "--syn", "-j", "DROP"]);
    }

    /// Removes every drop rule of `pod` (shaping stays).
    pub fn heal(&self, pod: &Pod) {
        let (to, from, _) = chains(pod.index);
        self.iptables_in(&["-F", &to]);
        self.iptables_in(&["-F", &from]);
    }

    /// Degrades `pod`'s link as `shape` says, replacing any earlier shape.
    pub fn shape(&self, pod: &Pod, shape: Shape) {
        self.unshape(pod);
        let (_, _, chain) = chains(pod.index);
        let peer = format!("v{}", pod.index);
        if shape.loss_percent > 0.0 {
            let p = format!("{:.4}", shape.loss_percent / 100.0);
            self.iptables_in(&[
                "-A",
                &chain,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ]);
        }
        if !shape.delay.is_zero() || !shape.jitter.is_zero() {
            let queue = pod.index.to_string();
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/netbed/nfq_delay.py");
            let mut child = Command::new(&self.ip)
                .args(["netns", "exec", &self.bridge])
                .arg(&self.python)
                .arg(&script)
                .arg(&queue)
                .arg(format!("{}", shape.delay.as_secs_f64() * 1000.0))
                .arg(format!("{}", shape.jitter.as_secs_f64() * 1000.0))
                .arg("0")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting nfq_delay.py");
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.take().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(
                line.trim(),
                "ready",
                "nfq_delay.py did not bind queue {queue}"
            );
            self.delayers.lock().unwrap().push((pod.index, child));
            self.iptables_in(&["-A", &chain, "-j", "NFQUEUE", "--queue-num", &queue]);
        }
        if let Some(kbit) = shape.rate_kbit {
            let rate = format!("{kbit}kbit");
            // A burst of at least one full-size packet, about 20 ms of rate.
            let burst = format!("{}", (kbit as usize * 1000 / 8 / 50).max(3028));
            for (ns, dev) in [(&self.bridge, peer.as_str()), (&pod.ns, "eth0")] {
                self.ip_tc(
                    ns,
                    &[
                        "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                        &burst, "latency", "400ms",
                    ],
                );
            }
        }
    }

    /// Removes `pod`'s shaping (loss, delay, bandwidth).
    pub fn unshape(&self, pod: &Pod) {
        let (_, _, chain) = chains(pod.index);
        self.iptables_in(&["-F", &chain]);
        let mut delayers = self.delayers.lock().unwrap();
        delayers.retain_mut(|(index, child)| {
            if *index == pod.index {
                let _ = child.kill();
                let _ = child.wait();
                false
            } else {
                true
            }
        });
        let peer = format!("v{}", pod.index);
        let del = |ns: &str, dev: &str| {
            let _ = Command::new(&self.tc)
                .args(["-n", ns, "qdisc", "del", "dev", dev, "root"])
                .stderr(Stdio::null())
                .status();
        };
        del(&self.bridge, &peer);
        del(&pod.ns, "eth0");
    }

    fn ip_tc(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run(&self.tc, &all);
    }

    /// The bed's namespaces that exist now (for teardown checks).
    pub fn leftovers(prefix: &str) -> Vec<String> {
        let ip = tool("ip").expect("ip");
        namespaces(&ip)
            .into_iter()
            .filter(|ns| ns.starts_with(prefix))
            .collect()
    }
}

fn chains(index: u32) -> (String, String, String) {
    (
        format!("TO{index}"),
        format!("FROM{index}"),
        format!("SHAPE{index}"),
    )
}

fn write_resolv_conf(ns: &str, server: Ipv4Addr) {
    let dir = Path::new("/etc/netns").join(ns);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("resolv.conf"),
        format!("nameserver {server}\noptions timeout:1 attempts:2\n"),
    )
    .unwrap();
}

impl Drop for NetBed {
    fn drop(&mut self) {
        for (_, mut child) in self.delayers.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut all: Vec<String> = self
            .pods
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.ns.clone())
            .collect();
        all.push(self.bridge.clone());
        for ns in all {
            remove_namespace(&self.ip, &ns);
        }
    }
}

/// A tokio runtime whose threads live in a pod's network namespace: every
/// socket its tasks open (mesh channels, DNS servers, load clients) is the
/// pod's. Futures spawned on it can be awaited from the test's runtime.
pub struct NsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn enter_namespace(ns: &str) {
    let file = std::fs::File::open(Path::new("/run/netns").join(ns))
        .unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("entering namespace {ns}: {e}"));
}

impl NsRuntime {
    /// A two-thread runtime inside `pod`'s namespace.
    pub fn new(pod: &Pod) -> NsRuntime {
        let ns = pod.ns.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter_namespace(&ns);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start({
                    let ns = ns.clone();
                    move || enter_namespace(&ns)
                })
                .build()
                .expect("runtime");
            tx.send(runtime.handle().clone()).unwrap();
            runtime.block_on(async {
                let _ = stopped.await;
            });
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        let handle = rx.recv().expect("namespace runtime started");
        NsRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs `future` on this runtime (in the namespace).
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// Runs `future` in the namespace and waits for its output.
    pub async fn run<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(future)
            .await
            .expect("task in the namespace panicked")
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
