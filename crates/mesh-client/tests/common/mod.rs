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

use std::{
    net::{SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use mesh_client::{
    Mesh, MeshChannel, MeshConfig,
    server::{MeshServer, ServerConfig},
};
use mesh_fixture::echo::echo_service_server::EchoServiceServer;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub use mesh_fixture::Echo;

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
}

/// One echo replica, killed (no drain) when dropped.
pub struct Replica {
    pub id: String,
    pub addr: SocketAddr,
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
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let name = id.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("replica-{id}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("replica runtime");
                let result = runtime.block_on(serve(name, listener, options, stop_rx));
                // Dropping the runtime drops every connection task: a kill
                // closes all connections at once.
                drop(runtime);
                let _ = done_tx.send(result);
            })
            .expect("replica thread");
        Replica {
            id: id.to_owned(),
            addr,
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

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(
    id: String,
    listener: TcpListener,
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
    let service = EchoServiceServer::new(Echo::new(id, options.delay_ms, next));
    let server = MeshServer::new(options.server)
        .descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .add_service(service);
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
    let channel: MeshChannel = mesh(MeshConfig::default())
        .channel(&format!("static:///{addr}"))
        .unwrap();
    let mut health = HealthClient::new(channel);
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(2));
        match health.check(request).await {
            Ok(r) if r.get_ref().status() == ServingStatus::Serving => return,
            Ok(r) => last = format!("{:?}", r.get_ref().status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} not serving after 30 s: {last}");
}
