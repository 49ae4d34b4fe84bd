//! `grpc.testing.TestService` on a [`mesh_client::server::MeshServer`]: the
//! server side of the gRPC interop test cases (grpc/grpc
//! `doc/interop-test-descriptions.md`, "Server"), with the mesh's whole
//! server stack (health, reflection, deadline capture, limits, TLS).
//!
//! Flags as the spec names them (`--port`, `--use_tls`), plus the mesh's
//! own (`--tls-dir` for mTLS inside the mesh, `--public-tls-dir` for the
//! server-only TLS that `--use_tls=true` speaks to other implementations).

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    process::ExitCode,
    time::Duration,
};

use clap::{ArgAction, Parser};
use mesh_client::server::ServerConfig;
use meshbench::interop::{InteropService, MessageFlags};
use shop_api::grpc::testing::{
    BoolValue, EchoStatus, Empty, Payload, PayloadType, ResponseParameters, SimpleRequest,
    SimpleResponse, StreamingInputCallRequest, StreamingInputCallResponse,
    StreamingOutputCallRequest, StreamingOutputCallResponse,
    test_service_server::{TestService, TestServiceServer},
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming, codec::CompressionEncoding};

/// Flags of `interop-server`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "interop-server",
    about = "grpc.testing.TestService on a MeshServer, for the gRPC interop test cases"
)]
struct Config {
    /// The port to listen on.
    #[arg(long, default_value_t = 10000)]
    port: u16,
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Whether to use a plaintext or encrypted connection: server-only TLS
    /// with the certificate in `--public-tls-dir`.
    #[arg(long = "use_tls", default_value_t = false, action = ArgAction::Set)]
    use_tls: bool,
    /// Directory with `tls.crt` and `tls.key` for `--use_tls=true`.
    #[arg(long)]
    public_tls_dir: Option<PathBuf>,
    /// Identity, mesh policy, limits and drain.
    #[command(flatten)]
    mesh: shop_kit::MeshArgs,
}

impl shop_kit::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = self.mesh.problems();
        if self.use_tls && self.public_tls_dir.is_none() {
            problems.push("--use_tls=true: needs --public-tls-dir (tls.crt, tls.key)".into());
        }
        if self.use_tls && self.mesh.tls_dir.is_some() {
            problems.push("--use_tls and --tls-dir: a port speaks server-only TLS or the mesh's mTLS, not both".into());
        }
        problems
    }
}

/// The TestService.
struct Interop {
    /// Largest payload a response may carry (`--max-response-bytes`).
    max_response_bytes: usize,
}

/// Paths whose responses may be compressed (per call, on request).
const UNARY_PATHS: &[&str] = &[
    "/grpc.testing.TestService/UnaryCall",
    "/grpc.testing.TestService/CacheableUnaryCall",
];

impl Interop {
    fn payload(&self, response_type: i32, size: i32) -> Result<Payload, Status> {
        if response_type != PayloadType::Compressable as i32 {
            return Err(Status::invalid_argument(format!(
                "response_type: only COMPRESSABLE (0) is supported, got {response_type}"
            )));
        }
        let size = usize::try_from(size).map_err(|_| {
            Status::invalid_argument(format!("response size: must not be negative, got {size}"))
        })?;
        if size > self.max_response_bytes {
            return Err(Status::invalid_argument(format!(
                "response size: at most {} bytes (--max-response-bytes), got {size}",
                self.max_response_bytes
            )));
        }
        Ok(Payload {
            r#type: PayloadType::Compressable as i32,
            body: vec![0; size],
        })
    }
}

/// "Echo Status": a requested non-OK status ends the call with exactly
/// that code and message.
fn echo_status(status: Option<&EchoStatus>) -> Result<(), Status> {
    match status {
        Some(s) if s.code != 0 => Err(Status::new(Code::from_i32(s.code), s.message.clone())),
        _ => Ok(()),
    }
}

/// "CompressedRequest": with `expect_compressed` set, the message's
/// compressed flag must say so, else `INVALID_ARGUMENT`.
fn check_compression(
    expect: Option<&BoolValue>,
    flags: Option<&MessageFlags>,
    index: usize,
) -> Result<(), Status> {
    let Some(expect) = expect else { return Ok(()) };
    let compressed = flags.and_then(|f| f.compressed(index)).unwrap_or(false);
    match (expect.value, compressed) {
        (true, false) => Err(Status::invalid_argument(
            "expect_compressed: the request was expected compressed but was not",
        )),
        (false, true) => Err(Status::invalid_argument(
            "expect_compressed: the request was expected uncompressed but was compressed",
        )),
        _ => Ok(()),
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send>>;
type Sender = tokio::sync::mpsc::Sender<Result<StreamingOutputCallResponse, Status>>;

impl Interop {
    /// Sends one response per parameter, each after its `interval_us`.
    /// False when the client has gone (cancelled).
    async fn respond(
        &self,
        response_type: i32,
        parameters: &[ResponseParameters],
        tx: &Sender,
    ) -> bool {
        for p in parameters {
            if p.interval_us > 0 {
                tokio::time::sleep(Duration::from_micros(p.interval_us as u64)).await;
            }
            let item =
                self.payload(response_type, p.size)
                    .map(|payload| StreamingOutputCallResponse {
                        payload: Some(payload),
                    });
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return false;
            }
        }
        true
    }

    fn spawn_stream<F>(&self, work: impl FnOnce(Interop, Sender) -> F) -> ResponseStream
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(work(
            Interop {
                max_response_bytes: self.max_response_bytes,
            },
            tx,
        ));
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl TestService for Interop {
    async fn empty_call(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn unary_call(
        &self,
        request: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        let flags = request.extensions().get::<MessageFlags>().cloned();
        let req = request.into_inner();
        echo_status(req.response_status.as_ref())?;
        check_compression(req.expect_compressed.as_ref(), flags.as_ref(), 0)?;
        let mut response = Response::new(SimpleResponse {
            payload: Some(self.payload(req.response_type, req.response_size)?),
            ..SimpleResponse::default()
        });
        // "CompressedResponse": compressed only when asked.
        if !req.response_compressed.is_some_and(|c| c.value) {
            response.disable_compression();
        }
        Ok(response)
    }

    async fn cacheable_unary_call(
        &self,
        _request: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut response = Response::new(SimpleResponse {
            payload: Some(Payload {
                r#type: PayloadType::Compressable as i32,
                body: nanos.to_string().into_bytes(),
            }),
            ..SimpleResponse::default()
        });
        response.disable_compression();
        response.metadata_mut().insert(
            "cache-control",
            tonic::metadata::MetadataValue::from_static("max-age=60, public"),
        );
        Ok(response)
    }

    type StreamingOutputCallStream = ResponseStream;

    async fn streaming_output_call(
        &self,
        request: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<Self::StreamingOutputCallStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.spawn_stream(|this, tx| async move {
            if this
                .respond(req.response_type, &req.response_parameters, &tx)
                .await
                && let Err(status) = echo_status(req.response_status.as_ref())
            {
                let _ = tx.send(Err(status)).await;
            }
        })))
    }

    async fn streaming_input_call(
        &self,
        request: Request<Streaming<StreamingInputCallRequest>>,
    ) -> Result<Response<StreamingInputCallResponse>, Status> {
        let flags = request.extensions().get::<MessageFlags>().cloned();
        let mut inbound = request.into_inner();
        let mut total: usize = 0;
        let mut index = 0;
        while let Some(req) = inbound.message().await? {
            check_compression(req.expect_compressed.as_ref(), flags.as_ref(), index)?;
            total += req.payload.map_or(0, |p| p.body.len());
            index += 1;
        }
        let aggregated_payload_size = i32::try_from(total).map_err(|_| {
            Status::invalid_argument(format!("payloads total {total} bytes, over i32"))
        })?;
        Ok(Response::new(StreamingInputCallResponse {
            aggregated_payload_size,
        }))
    }

    type FullDuplexCallStream = ResponseStream;

    async fn full_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::FullDuplexCallStream>, Status> {
        let mut inbound = request.into_inner();
        let deadline = mesh_client::deadline::inbound_deadline();
        // Printed on stdout so a test can check that a client's
        // cancellation reached the handler (not the deadline: that is
        // the server's own doing).
        let report_cancelled = move || {
            if deadline.is_none_or(|d| tokio::time::Instant::now() < d) {
                println!("cancelled FullDuplexCall");
            }
        };
        Ok(Response::new(self.spawn_stream(|this, tx| async move {
            loop {
                match inbound.message().await {
                    Ok(Some(req)) => {
                        if let Err(status) = echo_status(req.response_status.as_ref()) {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        if !this
                            .respond(req.response_type, &req.response_parameters, &tx)
                            .await
                        {
                            if tx.is_closed() {
                                report_cancelled();
                            }
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        report_cancelled();
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        })))
    }

    type HalfDuplexCallStream = ResponseStream;

    async fn half_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::HalfDuplexCallStream>, Status> {
        let mut inbound = request.into_inner();
        let mut buffered = Vec::new();
        // Bounded like any request: the messages are limited in size by
        // --max-request-bytes, their number here.
        const MAX_BUFFERED: usize = 1024;
        while let Some(req) = inbound.message().await? {
            if buffered.len() == MAX_BUFFERED {
                return Err(Status::resource_exhausted(format!(
                    "HalfDuplexCall buffers at most {MAX_BUFFERED} requests"
                )));
            }
            buffered.push(req);
        }
        Ok(Response::new(self.spawn_stream(|this, tx| async move {
            for req in buffered {
                if let Err(status) = echo_status(req.response_status.as_ref()) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                if !this
                    .respond(req.response_type, &req.response_parameters, &tx)
                    .await
                {
                    return;
                }
            }
        })))
    }

    async fn unimplemented_call(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Empty>, Status> {
        // The spec's server leaves this method out; tonic's generated trait
        // has every method, so answer exactly as a missing one would.
        Err(Status::unimplemented(
            "grpc.testing.TestService/UnimplementedCall is not implemented",
        ))
    }
}

async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), shop_kit::ServiceError> {
    use shop_kit::ServiceError as Error;
    let tls = config.mesh.tls()?;
    let public_tls = match (&config.public_tls_dir, config.use_tls) {
        (Some(dir), true) => Some(
            mesh_client::tls::PublicTls::load(
                &dir.join("tls.crt"),
                &dir.join("tls.key"),
                Duration::from_millis(config.mesh.tls_handshake_timeout_ms),
            )
            .map_err(|e| Error::Flag {
                flag: "--public-tls-dir",
                source: e.into(),
            })?,
        ),
        _ => None,
    };
    let service = TestServiceServer::new(Interop {
        max_response_bytes: config.mesh.max_response_bytes,
    })
    .max_decoding_message_size(config.mesh.max_request_bytes)
    .max_encoding_message_size(config.mesh.max_response_bytes)
    .accept_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Gzip);
    let mut server = config
        .mesh
        .server_with(ServerConfig::default(), tls)?
        .add_service(InteropService::new(service, UNARY_PATHS));
    if let Some(public) = public_tls {
        server = server.public_tls(public);
    }
    server.serve(listener, shutdown).await?;
    Ok(())
}

fn main() -> ExitCode {
    shop_kit::service_main(
        "interop-server",
        std::env::args_os(),
        |config: Config, listener, shutdown| run(config, listener, shutdown),
    )
}
