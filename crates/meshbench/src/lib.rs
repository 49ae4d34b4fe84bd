//! The echo server that the mesh's tests and benchmarks run against.
//!
//! It answers `mesh.echo.v1.EchoService` on a [`MeshServer`], so it has the
//! same health, reflection, deadline capture and drain as every shop
//! service, and its faults (added latency, `UNAVAILABLE`, retry pushback)
//! can be switched at run time with `SetFault`.

#![forbid(unsafe_code)]

pub mod interop;
pub mod sim;

use std::{
    ffi::OsString,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use mesh_client::{MeshChannel, server::ServerConfig};
use shop_api::echo::v1::{
    ChainRequest, ChainResponse, EchoRequest, EchoResponse, EchoStreamRequest, Fault,
    GetStatsRequest, Hop, Stats,
    echo_service_client::EchoServiceClient,
    echo_service_server::{EchoService, EchoServiceServer},
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Flags of `mesh-echo`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "mesh-echo",
    about = "Echo server for mesh tests and benchmarks"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50100")]
    pub listen: SocketAddr,
    /// Name reported in answers.
    #[arg(long, default_value = "echo")]
    pub id: String,
    /// Initial added latency, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: i64,
    /// Mesh target of the next hop for Chain.
    #[arg(long)]
    pub next: Option<String>,
    /// SPIFFE ID the next hop must present (with mTLS).
    #[arg(long)]
    pub next_identity: Option<String>,
    /// Identity, mesh policy and drain.
    #[command(flatten)]
    pub mesh: shop_kit::MeshArgs,
    /// Calls handled at once before shedding with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub concurrency_limit: usize,
}

impl shop_kit::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(Err(e)) = self.next.as_ref().map(|n| n.parse::<mesh_client::Target>()) {
            problems.push(format!("--next: {e}"));
        }
        if self.delay_ms < 0 {
            problems.push("--delay-ms: must not be negative".into());
        }
        if self.next.is_some() && self.mesh.tls_dir.is_some() && self.next_identity.is_none() {
            problems
                .push("--next-identity: required with --next and --tls-dir (secure naming)".into());
        }
        problems.extend(self.mesh.problems());
        problems
    }
}

/// The echo service.
#[derive(Clone)]
pub struct Echo {
    id: String,
    calls: Arc<AtomicI64>,
    fault: Arc<Mutex<Fault>>,
    next: Option<EchoServiceClient<MeshChannel>>,
}

fn timeout_ms<T>(request: &Request<T>) -> i64 {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(mesh_client::deadline::decode_grpc_timeout)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Echo {
    /// A server named `id` starting with `delay_ms` of added latency.
    pub fn new(id: String, delay_ms: i64, next: Option<EchoServiceClient<MeshChannel>>) -> Self {
        Self {
            id,
            calls: Arc::default(),
            fault: Arc::new(Mutex::new(Fault {
                delay_ms,
                ..Fault::default()
            })),
            next,
        }
    }

    /// Counts the call and applies the current fault.
    async fn enter(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let fault = *self.fault.lock().expect("fault lock");
        if fault.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(fault.delay_ms as u64)).await;
        }
        if fault.unavailable {
            let mut status = Status::unavailable(format!("{} is failing on purpose", self.id));
            if let Some(Ok(value)) = fault.pushback_ms.map(|ms| ms.to_string().parse()) {
                status
                    .metadata_mut()
                    .insert("grpc-retry-pushback-ms", value);
            }
            return Err(status);
        }
        Ok(())
    }

    fn answer(&self, payload: Vec<u8>, timeout_ms: i64) -> EchoResponse {
        EchoResponse {
            payload,
            server_id: self.id.clone(),
            timeout_ms,
        }
    }
}

type EchoStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let timeout = timeout_ms(&request);
        self.enter().await?;
        Ok(Response::new(
            self.answer(request.into_inner().payload, timeout),
        ))
    }

    async fn record(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<EchoResponse>, Status> {
        let timeout = timeout_ms(&request);
        self.enter().await?;
        Ok(Response::new(
            self.answer(request.into_inner().payload, timeout),
        ))
    }

    async fn chain(
        &self,
        request: Request<ChainRequest>,
    ) -> Result<Response<ChainResponse>, Status> {
        let timeout = timeout_ms(&request);
        self.enter().await?;
        let mut hops = vec![Hop {
            server_id: self.id.clone(),
            timeout_ms: timeout,
        }];
        if let Some(next) = &self.next {
            // The mesh channel propagates what is left of this call's deadline.
            let rest = next.clone().chain(ChainRequest {}).await?.into_inner();
            hops.extend(rest.hops);
        }
        Ok(Response::new(ChainResponse { hops }))
    }

    type EchoStreamStream = EchoStream;

    async fn echo_stream(
        &self,
        request: Request<EchoStreamRequest>,
    ) -> Result<Response<Self::EchoStreamStream>, Status> {
        let req = request.into_inner();
        if !(0..=10_000).contains(&req.count) || !(0..=10_000).contains(&req.interval_ms) {
            return Err(Status::invalid_argument(
                "count and interval_ms must be 0 to 10000",
            ));
        }
        self.enter().await?;
        let this = self.clone();
        let stream = async_stream_of(
            req.count,
            Duration::from_millis(req.interval_ms as u64),
            move |i| this.answer(i.to_le_bytes().to_vec(), 0),
        );
        Ok(Response::new(stream))
    }

    async fn set_fault(&self, request: Request<Fault>) -> Result<Response<Stats>, Status> {
        let fault = request.into_inner();
        if fault.delay_ms < 0 || fault.delay_ms > 60_000 {
            return Err(Status::invalid_argument("delay_ms: must be 0 to 60000"));
        }
        tracing::info!(id = %self.id, ?fault, "fault set");
        *self.fault.lock().expect("fault lock") = fault;
        self.get_stats(Request::new(GetStatsRequest {})).await
    }

    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<Stats>, Status> {
        Ok(Response::new(Stats {
            calls: self.calls.load(Ordering::Relaxed),
            server_id: self.id.clone(),
        }))
    }
}

fn async_stream_of(
    count: i32,
    interval: Duration,
    make: impl Fn(i32) -> EchoResponse + Send + 'static,
) -> EchoStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for i in 0..count {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if tx.send(Ok(make(i))).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Why the process stopped.
pub use shop_kit::ServiceError as Error;

/// Runs the echo server until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let tls = config.mesh.tls()?;
    let next = match &config.next {
        Some(target) => {
            let mesh = config.mesh.mesh(tls.clone())?;
            let channel = match &config.next_identity {
                Some(identity) => mesh.channel_with_identity(target, identity)?,
                None => mesh.channel(target)?,
            };
            Some(EchoServiceClient::new(channel))
        }
        None => None,
    };
    let limits = ServerConfig {
        concurrency_limit: config.concurrency_limit,
        ..ServerConfig::default()
    };
    config
        .mesh
        .server_with(limits, tls)?
        .add_service(
            EchoServiceServer::new(Echo::new(config.id, config.delay_ms, next))
                .max_decoding_message_size(config.mesh.max_request_bytes)
                .max_encoding_message_size(config.mesh.max_response_bytes)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// The `mesh-echo` entry point.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    shop_kit::service_main("mesh-echo", args, |config: Config, listener, shutdown| {
        run(config, listener, shutdown)
    })
}
