//! The one implementation of `mesh.echo.v1` (`proto/mesh/echo/v1/echo.proto`),
//! served by mesh-client's behaviour tests (in process) and by meshbench's
//! `mesh-echo` binary: answers with its id, counts calls, and applies the
//! fault a caller set with `SetFault` (added latency, `UNAVAILABLE`, retry
//! pushback). Chain calls the next hop over a mesh channel, which passes on
//! what is left of the deadline.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use crate::echo::{
    ChainRequest, ChainResponse, EchoRequest, EchoResponse, EchoStreamRequest, Fault,
    GetStatsRequest, Hop, Stats, echo_service_client::EchoServiceClient,
    echo_service_server::EchoService,
};
use mesh_client::MeshChannel;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The echo service.
#[derive(Clone)]
pub struct Echo {
    id: String,
    calls: Arc<AtomicI64>,
    fault: Arc<Mutex<Fault>>,
    next: Option<MeshChannel>,
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
    pub fn new(id: String, delay_ms: i64, next: Option<MeshChannel>) -> Self {
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
            let rest = EchoServiceClient::new(next.clone())
                .chain(ChainRequest {})
                .await?
                .into_inner();
            hops.extend(rest.hops);
        }
        Ok(Response::new(ChainResponse { hops }))
    }

    async fn echo_stream(
        &self,
        request: Request<EchoStreamRequest>,
    ) -> Result<Response<EchoStream>, Status> {
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
