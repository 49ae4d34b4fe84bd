//! The admin port: `/metrics` (OpenMetrics text), `/live` and `/ready`
//! over HTTP/1.1, and `grpc.health.v1.Health` over plaintext HTTP/2.
//!
//! Its own plaintext port, so Prometheus, kubelet probes (HTTP or native
//! gRPC, which cannot present a workload certificate) and the live view
//! reach it. It exposes no request data, only aggregates and health.

use std::{convert::Infallible, future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tower::ServiceExt;

use super::metrics::Metrics;

/// Connections the admin port serves at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;
/// The longest one connection is served.
const MAX_CONNECTION_TIME: Duration = Duration::from_secs(60);

/// Answers whether the process is ready for traffic.
pub type Readiness = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// The gRPC health service the admin port answers (the server's own).
pub type HealthGrpc =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

/// Serves the admin endpoints on `listener` until `stop` is cancelled.
///
/// `/live` answers 200 while the process runs; `/ready` answers 200 when
/// `ready` says so and 503 otherwise (while draining, or while a
/// dependency is down); `/metrics` serves `metrics` ([`Metrics::encode`]);
/// HTTP/2 requests to `/grpc.health.v1.Health/Check` go to `health`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    ready: Readiness,
    health: Option<HealthGrpc>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("admin port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (ready, health, stop) = (ready.clone(), health.clone(), stop.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let (ready, health, metrics) = (ready.clone(), health.clone(), metrics.clone());
                async move {
                    // Probes need Check only; a Watch stream would hold a slot.
                    if let Some(health) =
                        health.filter(|_| req.uri().path() == "/grpc.health.v1.Health/Check")
                    {
                        return health.oneshot(req.map(Body::new)).await;
                    }
                    Ok::<_, Infallible>(respond(req, ready, &metrics).await.map(Body::new))
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            builder.http2().max_concurrent_streams(16);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // A connection that sends nothing, or stays open, gives its slot
            // back after a while: probes and scrapes are short.
            tokio::select! {
                _ = tokio::time::timeout(MAX_CONNECTION_TIME, conn) => {}
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

async fn respond<B>(
    req: http::Request<B>,
    ready: Readiness,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(metrics.encode())))
            .expect("static headers are valid"),
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if ready().await {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /live or /ready\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static headers are valid")
}
