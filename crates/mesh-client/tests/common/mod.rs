//! mesh-client's own test fixture: echo replicas served in process on
//! [`MeshServer`], each on its own OS thread and tokio runtime.
//!
//! Why in process and not a fixture binary: the tests need nothing a
//! process gives beyond what a thread with its own runtime gives. A replica
//! has its own scheduler (so a busy replica does not stall the test's
//! clients any more than a process would on the same cores), its own
//! sockets on loopback, and is killed by dropping its runtime, which drops
//! every connection at once without a drain, as SIGKILL would. Binding the
//! listener before the replica starts means no port races and no waiting
//! for a process to come up; and mesh-client's tests need no binary from
//! another crate built first. The contracts come from `mesh-fixture`
//! (compiled from the workspace's one `proto/` tree).

#![allow(dead_code)] // each test binary uses a different part

pub mod dns;
#[cfg(feature = "dev-ca")]
pub mod pki;
pub mod probe;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_client::{
    Mesh, MeshConfig,
    server::{MeshServer, ServerConfig},
};
use mesh_fixture::echo::echo_service_server::EchoServiceServer;

pub use mesh_fixture::Echo;
#[cfg(feature = "dev-ca")]
#[allow(unused_imports)]
pub use pki::{TRUST_DOMAIN, TestPki, identity};
#[allow(unused_imports)]
pub use probe::{http_get, wait_serving_on};

/// How to run one echo replica.
#[derive(Clone, Debug, Default)]
pub struct EchoOptions {
    /// Latency added to Echo, Record and Chain from the start, in ms.
    pub delay_ms: i64,
    /// The next hop's mesh target, for Chain.
    pub next: Option<String>,
    /// The config of the mesh that calls the next hop.
    pub next_config: MeshConfig,
    /// The server's limits (concurrency, drain grace, ...).
    pub server: ServerConfig,
    /// Largest request message accepted, in bytes (tonic's 4 MiB if unset).
    pub max_request_bytes: Option<usize>,
    /// Serve mutual TLS with the workload files (`tls.crt`, `tls.key`,
    /// `ca.crt`) in this directory, re-read as they change.
    pub tls_dir: Option<PathBuf>,
    /// The TLS handshake timeout with `tls_dir` (10 s if unset).
    pub handshake_timeout: Option<Duration>,
    /// Enforce the authorization policy and the `serverFaults` of this mesh
    /// config file, followed as it changes (`Mesh::from_file`).
    pub mesh_config: Option<PathBuf>,
    /// Serve the admin port (`/metrics`, ...) on a free port: `Replica::admin`.
    pub admin: bool,
    /// Keep the replica's log lines (info and above): `Replica::logged`.
    pub capture_log: bool,
}

/// Log lines of one replica.
pub type Log = Arc<Mutex<Vec<String>>>;

/// One echo replica, killed (no drain) when dropped.
pub struct Replica {
    pub id: String,
    pub addr: SocketAddr,
    /// The admin port, with `EchoOptions::admin`.
    pub admin: Option<SocketAddr>,
    /// What the replica logged, with `EchoOptions::capture_log`.
    pub log: Log,
    /// Ends the server at once (`kill`) or after a drain (`terminate`).
    stop: Option<tokio::sync::oneshot::Sender<Stop>>,
    /// What `serve` returned, sent by the replica's thread when it ends.
    done: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Stop {
    Kill,
    Drain,
}

/// Binds `addr` (port 0 for any free port) on loopback.
pub fn listen(addr: SocketAddr) -> TcpListener {
    assert!(addr.ip().is_loopback(), "tests listen on loopback only");
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"))
}

/// A loopback listener on a free port.
pub fn listen_any() -> TcpListener {
    listen(SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Replica {
    /// Starts replica `id` on a free loopback port.
    pub fn start(id: &str, options: EchoOptions) -> Replica {
        Replica::start_on(id, listen_any(), options)
    }

    /// Starts replica `id` serving `listener`.
    pub fn start_on(id: &str, listener: TcpListener, options: EchoOptions) -> Replica {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let admin = options.admin.then(listen_any);
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let log = Log::default();
        let sink = options.capture_log.then(|| log.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let name = id.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("replica-{id}"))
            .spawn(move || {
                // The runtime is current-thread: every task of the replica
                // logs on this thread, into its own subscriber.
                let _logging = sink.map(|sink| {
                    tracing::subscriber::set_default(
                        tracing_subscriber::fmt()
                            .with_max_level(tracing::Level::INFO)
                            .with_ansi(false)
                            .with_writer(LogSink(sink))
                            .finish(),
                    )
                });
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("replica runtime");
                let result = runtime.block_on(serve(name, listener, admin, options, stop_rx));
                // Dropping the runtime drops every connection task: a kill
                // closes all connections at once.
                drop(runtime);
                let _ = done_tx.send(result);
            })
            .expect("replica thread");
        Replica {
            id: id.to_owned(),
            addr,
            admin: admin_addr,
            log,
            stop: Some(stop_tx),
            done: Some(done_rx),
            thread: Some(thread),
        }
    }

    /// Stops at once: no drain, every connection dropped, as SIGKILL does.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Kill);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Drains as on SIGTERM (health NOT_SERVING, drain grace, GOAWAY,
    /// in-flight calls finish) and returns what `serve` returned. Async so
    /// the test's own connections keep running while it drains.
    pub async fn terminate(&mut self, limit: Duration) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Drain);
        }
        let done = self.done.take().expect("terminated once");
        let result = tokio::time::timeout(limit, done)
            .await
            .unwrap_or_else(|_| panic!("{} did not drain within {limit:?}", self.id))
            .expect("replica thread ended without a result");
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        result
    }
}

impl Replica {
    /// Whether the replica still serves (it was neither stopped nor ended
    /// on its own): the in-process counterpart of an unchanged pid.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether a log line so far contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logged_times(needle) > 0
    }

    fn logged_times(&self, needle: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits (at most `limit`) until `needle` was logged at least `times` times.
    pub async fn wait_logged_times(&self, needle: &str, times: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.logged_times(needle) >= times {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.logged_times(needle) >= times
    }

    /// Waits (at most 5 s) until `needle` is logged.
    pub async fn wait_logged(&self, needle: &str) -> bool {
        self.wait_logged_times(needle, 1, Duration::from_secs(5))
            .await
    }
}

/// Writes each formatted event as one line of a replica's [`Log`].
struct LogSink(Log);

/// One event being formatted; pushed as a line when done.
struct LogLine(Log, Vec<u8>);

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.1).trim_end().to_owned();
        self.0.lock().unwrap().push(line);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine(self.0.clone(), Vec::new())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(
    id: String,
    listener: TcpListener,
    admin: Option<TcpListener>,
    options: EchoOptions,
    stop: tokio::sync::oneshot::Receiver<Stop>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    // The next hop's channel lives on this replica's runtime, as it would
    // in the replica's own process.
    let next = match &options.next {
        Some(target) => Some(
            mesh(options.next_config.clone())
                .channel(target)
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let mut service = EchoServiceServer::new(Echo::new(id, options.delay_ms, next))
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    if let Some(limit) = options.max_request_bytes {
        service = service.max_decoding_message_size(limit);
    }
    let mut server =
        MeshServer::new(options.server).descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET);
    if let Some(dir) = &options.tls_dir {
        let tls = mesh_client::tls::MeshTls::load_with_handshake_timeout(
            mesh_client::tls::TlsFiles::in_dir(dir),
            options.handshake_timeout.unwrap_or(Duration::from_secs(10)),
        )
        .map_err(|e| e.to_string())?;
        server = server.tls(tls);
    }
    // Held while serving: its watch follows the file.
    let policy_mesh = match &options.mesh_config {
        Some(path) => Some(Mesh::from_file(path).map_err(|e| e.to_string())?),
        None => None,
    };
    if let Some(mesh) = &policy_mesh {
        server = server.authorization_from(mesh).server_faults_from(mesh);
    }
    if let Some(admin) = admin {
        server = server.admin(admin);
    }
    let server = server.add_service(service);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = server.serve(listener, async {
        let _ = drain_rx.await;
    });
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result.map_err(|e| e.to_string()),
        how = stop => match how {
            Ok(Stop::Drain) => {}
            // Killed (or the handle dropped): stop polling the server.
            Ok(Stop::Kill) | Err(_) => return Ok(()),
        },
    }
    let _ = drain_tx.send(());
    serving.await.map_err(|e| e.to_string())
}

/// `n` replicas `r0`, `r1`, ... on free ports, each answering health.
pub async fn replicas(n: usize) -> Vec<Replica> {
    let replicas: Vec<Replica> = (0..n)
        .map(|i| Replica::start(&format!("r{i}"), EchoOptions::default()))
        .collect();
    for r in &replicas {
        wait_serving(r.addr).await;
    }
    replicas
}

/// `static:///a,b,c` for these replicas.
pub fn static_target(replicas: &[Replica]) -> String {
    let list: Vec<String> = replicas.iter().map(|r| r.addr.to_string()).collect();
    format!("static:///{}", list.join(","))
}

/// A mesh with `config` that knows the fixture's contracts (which methods
/// are idempotent).
pub fn mesh(config: MeshConfig) -> Mesh {
    Mesh::from_config(config)
        .unwrap()
        .with_descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .unwrap()
}

/// A plain tonic channel (no mesh) to `addr`.
pub fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// Waits (at most 30 s) until `addr` answers health SERVING.
pub async fn wait_serving(addr: SocketAddr) {
    wait_serving_on(
        mesh(MeshConfig::default())
            .channel(&format!("static:///{addr}"))
            .unwrap(),
    )
    .await
}
