//! The client side of the gRPC interop test cases (grpc/grpc
//! `doc/interop-test-descriptions.md`, "Client") on a
//! [`mesh_client::MeshChannel`], so every call goes through the mesh's
//! client layers (deadline, retry, balancing, telemetry).
//!
//! `--test_case` takes one case, a comma-separated list, or `all`; each
//! case prints `PASS <case>` or `FAIL <case>: <reason>`, and the process
//! exits 0 only when every case passed.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{ArgAction, Parser};
use mesh_client::{Mesh, MeshChannel, MeshConfig, tls::MeshTls};
use meshbench::interop::{ECHO_INITIAL, ECHO_TRAILING, RecordingChannel, decode_bin, zeros};
use shop_api::grpc::testing::{
    BoolValue, EchoStatus, Empty, Payload, ResponseParameters, SimpleRequest,
    StreamingInputCallRequest, StreamingOutputCallRequest, test_service_client::TestServiceClient,
    unimplemented_service_client::UnimplementedServiceClient,
};
use tonic::{Code, Request, Status, codec::CompressionEncoding, metadata::MetadataValue};

/// Every case this client implements, in the order `all` runs them.
const CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_compressed_unary",
    "server_compressed_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "cancel_after_begin",
    "cancel_after_first_response",
    "timeout_on_sleeping_server",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
    "custom_metadata",
];

/// The longest one case may take before it fails as hung.
const CASE_LIMIT: Duration = Duration::from_secs(15);

/// Flags of `interop-client`, named as the spec names them.
#[derive(Debug, Parser)]
#[command(
    name = "interop-client",
    about = "gRPC interop test cases over a mesh channel"
)]
struct Config {
    /// The server host to connect to (an IP address or a DNS name).
    #[arg(long = "server_host", default_value = "127.0.0.1")]
    server_host: String,
    /// The server host to claim to be connecting to. The mesh verifies
    /// servers by SPIFFE ID, not host name (see `--server_identity`), so
    /// this is accepted for compatibility and must equal `--server_host`
    /// when given.
    #[arg(long = "server_host_override")]
    server_host_override: Option<String>,
    /// The server port to connect to.
    #[arg(long = "server_port")]
    server_port: u16,
    /// The case to run, a comma-separated list, or `all`.
    #[arg(long = "test_case", default_value = "all")]
    test_case: String,
    /// Whether to use an encrypted connection: the mesh's mutual TLS, with
    /// this workload's certificate from `--tls-dir`.
    #[arg(long = "use_tls", default_value_t = false, action = ArgAction::Set)]
    use_tls: bool,
    /// Directory with the client's `tls.crt`, `tls.key` and `ca.crt`.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// SPIFFE ID the server must present (with `--use_tls=true`).
    #[arg(long = "server_identity")]
    server_identity: Option<String>,
}

type Client = TestServiceClient<RecordingChannel<MeshChannel>>;

fn fail(reason: impl Into<String>) -> Result<(), String> {
    Err(reason.into())
}

fn check(ok: bool, reason: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(reason()) }
}

fn status_text(s: &Status) -> String {
    format!("{:?} {:?}", s.code(), s.message())
}

fn expect_code<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    what: &str,
) -> Result<Status, String> {
    match result {
        Ok(v) => Err(format!("{what}: expected {code:?}, got OK {v:?}")),
        Err(s) if s.code() == code => Ok(s),
        Err(s) => Err(format!(
            "{what}: expected {code:?}, got {}",
            status_text(&s)
        )),
    }
}

fn large_request(expect_compressed: Option<bool>) -> SimpleRequest {
    SimpleRequest {
        response_size: 314_159,
        payload: Some(Payload {
            body: zeros(271_828),
            ..Payload::default()
        }),
        expect_compressed: expect_compressed.map(|value| BoolValue { value }),
        ..SimpleRequest::default()
    }
}

fn check_zeros(payload: Option<&Payload>, len: usize, what: &str) -> Result<(), String> {
    let body = payload.map(|p| p.body.as_slice()).unwrap_or_default();
    check(body.len() == len, || {
        format!("{what}: payload is {} bytes, expected {len}", body.len())
    })?;
    check(body.iter().all(|b| *b == 0), || {
        format!("{what}: payload is not all zeros")
    })
}

fn output_request(sizes: &[i32], body: usize) -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_parameters: sizes
            .iter()
            .map(|&size| ResponseParameters {
                size,
                ..ResponseParameters::default()
            })
            .collect(),
        payload: (body > 0).then(|| Payload {
            body: zeros(body),
            ..Payload::default()
        }),
        ..StreamingOutputCallRequest::default()
    }
}

async fn empty_unary(client: &mut Client) -> Result<(), String> {
    client
        .empty_call(Empty {})
        .await
        .map_err(|s| status_text(&s))?;
    Ok(())
}

async fn large_unary(client: &mut Client) -> Result<(), String> {
    let response = client
        .unary_call(large_request(None))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    check_zeros(response.payload.as_ref(), 314_159, "response")
}

async fn client_compressed_unary(client: &mut Client) -> Result<(), String> {
    // The feature probe: an uncompressed request that claims compression.
    expect_code(
        client.unary_call(large_request(Some(true))).await,
        Code::InvalidArgument,
        "probe (uncompressed, expect_compressed=true)",
    )?;
    let mut compressing = client.clone().send_compressed(CompressionEncoding::Gzip);
    let response = compressing
        .unary_call(large_request(Some(true)))
        .await
        .map_err(|s| format!("compressed request: {}", status_text(&s)))?
        .into_inner();
    check_zeros(response.payload.as_ref(), 314_159, "compressed request")?;
    let response = client
        .unary_call(large_request(Some(false)))
        .await
        .map_err(|s| format!("uncompressed request: {}", status_text(&s)))?
        .into_inner();
    check_zeros(response.payload.as_ref(), 314_159, "uncompressed request")
}

async fn server_compressed_unary(
    client: &mut Client,
    channel: &RecordingChannel<MeshChannel>,
) -> Result<(), String> {
    let mut accepting = client.clone().accept_compressed(CompressionEncoding::Gzip);
    for compressed in [true, false] {
        let request = SimpleRequest {
            response_compressed: Some(BoolValue { value: compressed }),
            ..large_request(None)
        };
        let response = accepting
            .unary_call(request)
            .await
            .map_err(|s| format!("response_compressed={compressed}: {}", status_text(&s)))?
            .into_inner();
        check_zeros(
            response.payload.as_ref(),
            314_159,
            &format!("response_compressed={compressed}"),
        )?;
        let flag = channel.seen().flags.compressed(0);
        check(flag == Some(compressed), || {
            format!("response_compressed={compressed}: the message's compressed flag was {flag:?}")
        })?;
    }
    Ok(())
}

async fn client_streaming(client: &mut Client) -> Result<(), String> {
    let requests = [27_182, 8, 1_828, 45_904].map(|n| StreamingInputCallRequest {
        payload: Some(Payload {
            body: zeros(n),
            ..Payload::default()
        }),
        ..StreamingInputCallRequest::default()
    });
    let response = client
        .streaming_input_call(tokio_stream::iter(requests))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    check(response.aggregated_payload_size == 74_922, || {
        format!(
            "aggregated_payload_size is {}, expected 74922",
            response.aggregated_payload_size
        )
    })
}

const SIZES: [i32; 4] = [31_415, 9, 2_653, 58_979];
const BODIES: [usize; 4] = [27_182, 8, 1_828, 45_904];

async fn server_streaming(client: &mut Client) -> Result<(), String> {
    let mut stream = client
        .streaming_output_call(output_request(&SIZES, 0))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let mut got = Vec::new();
    while let Some(response) = stream.message().await.map_err(|s| status_text(&s))? {
        got.push(response.payload.map_or(0, |p| p.body.len()));
    }
    let want: Vec<usize> = SIZES.iter().map(|&s| s as usize).collect();
    check(got == want, || {
        format!("response sizes {got:?}, expected {want:?}")
    })
}

async fn ping_pong(client: &mut Client) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // The first request is queued before the call starts: a server may
    // hold its response headers until it has something to answer (grpcio
    // does), and tonic returns the call only once they arrive.
    tx.send(output_request(&[SIZES[0]], BODIES[0]))
        .await
        .map_err(|_| "request not queued".to_string())?;
    let mut responses = client
        .full_duplex_call(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    for (i, (size, body)) in SIZES.into_iter().zip(BODIES).enumerate() {
        if i > 0 {
            tx.send(output_request(&[size], body))
                .await
                .map_err(|_| format!("the call ended before request for {size} bytes was sent"))?;
        }
        let response = responses
            .message()
            .await
            .map_err(|s| status_text(&s))?
            .ok_or_else(|| format!("stream ended before the {size}-byte response"))?;
        check_zeros(response.payload.as_ref(), size as usize, "response")?;
    }
    drop(tx);
    match responses.message().await.map_err(|s| status_text(&s))? {
        None => Ok(()),
        Some(_) => fail("a fifth response after half-close"),
    }
}

async fn empty_stream(client: &mut Client) -> Result<(), String> {
    let mut responses = client
        .full_duplex_call(tokio_stream::empty())
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    match responses.message().await.map_err(|s| status_text(&s))? {
        None => Ok(()),
        Some(_) => fail("a response to an empty stream"),
    }
}

async fn cancel_after_begin(client: &mut Client) -> Result<(), String> {
    // The request stream reports when it is first polled, which is after the
    // headers were handed to the connection, then never yields.
    let (began_tx, began) = tokio::sync::oneshot::channel::<()>();
    let mut began_tx = Some(began_tx);
    let requests = futures::stream::poll_fn(move |_| {
        if let Some(tx) = began_tx.take() {
            let _ = tx.send(());
        }
        std::task::Poll::<Option<StreamingInputCallRequest>>::Pending
    });
    let mut call_client = client.clone();
    let call = tokio::spawn(async move { call_client.streaming_input_call(requests).await });
    tokio::time::timeout(Duration::from_secs(5), began)
        .await
        .map_err(|_| "the call did not start within 5 s".to_string())?
        .map_err(|_| "the call ended before it began".to_string())?;
    // Cancelling a tonic call is dropping it.
    call.abort();
    match call.await {
        Err(e) if e.is_cancelled() => {}
        Err(e) => return fail(format!("the call panicked: {e}")),
        Ok(result) => return fail(format!("the call completed before cancel: {result:?}")),
    }
    // The channel must be usable after a cancelled call.
    empty_unary(client)
        .await
        .map_err(|e| format!("after cancel: {e}"))
}

async fn cancel_after_first_response(client: &mut Client) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // Queued first, as in ping_pong.
    tx.send(output_request(&[31_415], 27_182))
        .await
        .map_err(|_| "request not queued".to_string())?;
    let mut responses = client
        .full_duplex_call(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let first = responses
        .message()
        .await
        .map_err(|s| status_text(&s))?
        .ok_or("stream ended before the first response")?;
    check_zeros(first.payload.as_ref(), 31_415, "first response")?;
    // Cancel: drop both halves without half-closing.
    drop(responses);
    drop(tx);
    empty_unary(client)
        .await
        .map_err(|e| format!("after cancel: {e}"))
}

async fn timeout_on_sleeping_server(client: &mut Client) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(output_request(&[], 27_182))
        .await
        .map_err(|_| "request not queued".to_string())?;
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.set_timeout(Duration::from_millis(1));
    let result = match client.full_duplex_call(request).await {
        Err(status) => Err(status),
        Ok(response) => {
            let mut responses = response.into_inner();
            // Keep the request side open ("client waits"): only the
            // deadline may end this call.
            let outcome = responses.message().await;
            drop(tx);
            outcome.map(|_| ())
        }
    };
    expect_code(result, Code::DeadlineExceeded, "1 ms deadline")?;
    Ok(())
}

const STATUS_MESSAGE: &str = "test status message";
const SPECIAL_MESSAGE: &str = "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n";

fn echo_status(message: &str) -> Option<EchoStatus> {
    Some(EchoStatus {
        code: 2,
        message: message.to_owned(),
    })
}

fn check_status(status: &Status, message: &str, what: &str) -> Result<(), String> {
    check(
        status.code() == Code::Unknown && status.message() == message,
        || {
            format!(
                "{what}: expected Unknown {message:?}, got {}",
                status_text(status)
            )
        },
    )
}

async fn status_code_and_message(client: &mut Client) -> Result<(), String> {
    let request = SimpleRequest {
        response_status: echo_status(STATUS_MESSAGE),
        ..SimpleRequest::default()
    };
    let status = expect_code(client.unary_call(request).await, Code::Unknown, "UnaryCall")?;
    check_status(&status, STATUS_MESSAGE, "UnaryCall")?;
    let request = StreamingOutputCallRequest {
        response_status: echo_status(STATUS_MESSAGE),
        ..StreamingOutputCallRequest::default()
    };
    let result = match client.full_duplex_call(tokio_stream::iter([request])).await {
        Err(status) => Err(status),
        Ok(response) => {
            let mut responses = response.into_inner();
            let mut seen = Vec::new();
            loop {
                match responses.message().await {
                    Ok(Some(r)) => seen.push(r),
                    Ok(None) => break Ok(seen),
                    Err(status) => break Err(status),
                }
            }
        }
    };
    let status = expect_code(result, Code::Unknown, "FullDuplexCall")?;
    check_status(&status, STATUS_MESSAGE, "FullDuplexCall")
}

async fn special_status_message(client: &mut Client) -> Result<(), String> {
    let request = SimpleRequest {
        response_status: echo_status(SPECIAL_MESSAGE),
        ..SimpleRequest::default()
    };
    let status = expect_code(client.unary_call(request).await, Code::Unknown, "UnaryCall")?;
    check_status(&status, SPECIAL_MESSAGE, "UnaryCall")
}

async fn unimplemented_method(client: &mut Client) -> Result<(), String> {
    expect_code(
        client.unimplemented_call(Empty {}).await,
        Code::Unimplemented,
        "TestService/UnimplementedCall",
    )?;
    Ok(())
}

async fn unimplemented_service(channel: RecordingChannel<MeshChannel>) -> Result<(), String> {
    expect_code(
        UnimplementedServiceClient::new(channel)
            .unimplemented_call(Empty {})
            .await,
        Code::Unimplemented,
        "UnimplementedService/UnimplementedCall",
    )?;
    Ok(())
}

const INITIAL_VALUE: &str = "test_initial_metadata_value";
const TRAILING_VALUE: [u8; 3] = [0xab, 0xab, 0xab];

fn with_echo_metadata<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(ECHO_INITIAL, MetadataValue::from_static(INITIAL_VALUE));
    request
        .metadata_mut()
        .insert_bin(ECHO_TRAILING, MetadataValue::from_bytes(&TRAILING_VALUE));
    request
}

fn check_echoed(channel: &RecordingChannel<MeshChannel>, what: &str) -> Result<(), String> {
    let seen = channel.seen();
    let initial = seen.headers.get(ECHO_INITIAL);
    check(
        initial.is_some_and(|v| v.as_bytes() == INITIAL_VALUE.as_bytes()),
        || format!("{what}: initial metadata {ECHO_INITIAL} is {initial:?}"),
    )?;
    let trailing = seen
        .trailers
        .as_ref()
        .and_then(|t| t.get(ECHO_TRAILING))
        .and_then(decode_bin);
    check(trailing.as_deref() == Some(&TRAILING_VALUE[..]), || {
        format!(
            "{what}: trailing metadata {ECHO_TRAILING} is {trailing:?} (trailers: {:?})",
            seen.trailers
        )
    })
}

async fn custom_metadata(
    client: &mut Client,
    channel: &RecordingChannel<MeshChannel>,
) -> Result<(), String> {
    let response = client
        .unary_call(with_echo_metadata(large_request(None)))
        .await
        .map_err(|s| format!("UnaryCall: {}", status_text(&s)))?
        .into_inner();
    check_zeros(response.payload.as_ref(), 314_159, "UnaryCall")?;
    check_echoed(channel, "UnaryCall")?;

    let request = output_request(&[314_159], 271_828);
    let mut responses = client
        .full_duplex_call(with_echo_metadata(tokio_stream::iter([request])))
        .await
        .map_err(|s| format!("FullDuplexCall: {}", status_text(&s)))?
        .into_inner();
    let mut count = 0;
    while let Some(response) = responses
        .message()
        .await
        .map_err(|s| format!("FullDuplexCall: {}", status_text(&s)))?
    {
        check_zeros(response.payload.as_ref(), 314_159, "FullDuplexCall")?;
        count += 1;
    }
    check(count == 1, || {
        format!("FullDuplexCall: {count} responses, expected 1")
    })?;
    check_echoed(channel, "FullDuplexCall")
}

async fn run_case(case: &str, mesh_channel: &MeshChannel) -> Result<(), String> {
    let channel = RecordingChannel::new(mesh_channel.clone());
    let mut client = TestServiceClient::new(channel.clone())
        .max_decoding_message_size(4 * 1024 * 1024)
        .max_encoding_message_size(4 * 1024 * 1024);
    let run = async {
        match case {
            "empty_unary" => empty_unary(&mut client).await,
            "large_unary" => large_unary(&mut client).await,
            "client_compressed_unary" => client_compressed_unary(&mut client).await,
            "server_compressed_unary" => server_compressed_unary(&mut client, &channel).await,
            "client_streaming" => client_streaming(&mut client).await,
            "server_streaming" => server_streaming(&mut client).await,
            "ping_pong" => ping_pong(&mut client).await,
            "empty_stream" => empty_stream(&mut client).await,
            "cancel_after_begin" => cancel_after_begin(&mut client).await,
            "cancel_after_first_response" => cancel_after_first_response(&mut client).await,
            "timeout_on_sleeping_server" => timeout_on_sleeping_server(&mut client).await,
            "status_code_and_message" => status_code_and_message(&mut client).await,
            "special_status_message" => special_status_message(&mut client).await,
            "unimplemented_method" => unimplemented_method(&mut client).await,
            "unimplemented_service" => unimplemented_service(channel.clone()).await,
            "custom_metadata" => custom_metadata(&mut client, &channel).await,
            other => fail(format!("unknown test case {other:?}")),
        }
    };
    tokio::time::timeout(CASE_LIMIT, run)
        .await
        .unwrap_or_else(|_| fail(format!("no outcome within {CASE_LIMIT:?} (hung)")))
}

fn channel(config: &Config) -> Result<MeshChannel, String> {
    if let Some(name) = &config.server_host_override
        && name != &config.server_host
    {
        return Err(format!(
            "--server_host_override={name}: the mesh verifies servers by SPIFFE ID (--server_identity), not host name"
        ));
    }
    let host = &config.server_host;
    let target = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("static:///[{ip}]:{}", config.server_port),
        Ok(ip) => format!("static:///{ip}:{}", config.server_port),
        Err(_) => format!("dns:///{host}:{}", config.server_port),
    };
    let mesh = Mesh::from_config(MeshConfig::default())
        .and_then(|m| m.with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET))
        .map_err(|e| e.to_string())?;
    if !config.use_tls {
        return mesh.channel(&target).map_err(|e| e.to_string());
    }
    let dir = config
        .tls_dir
        .as_ref()
        .ok_or("--use_tls=true needs --tls-dir (the client's tls.crt, tls.key, ca.crt)")?;
    let identity = config
        .server_identity
        .as_ref()
        .ok_or("--use_tls=true needs --server_identity (the server's SPIFFE ID)")?;
    let tls = MeshTls::load(mesh_client::tls::TlsFiles::in_dir(dir))
        .map_err(|e| format!("--tls-dir: {e}"))?;
    mesh.with_tls(tls)
        .channel_with_identity(&target, identity)
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let config = Config::parse();
    let cases: Vec<&str> = if config.test_case == "all" {
        CASES.to_vec()
    } else {
        config.test_case.split(',').map(str::trim).collect()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("interop-client: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let channel = match channel(&config) {
            Ok(channel) => channel,
            Err(e) => {
                eprintln!("interop-client: {e}");
                return ExitCode::from(64);
            }
        };
        let mut failed = 0;
        for case in cases {
            match run_case(case, &channel).await {
                Ok(()) => println!("PASS {case}"),
                Err(reason) => {
                    failed += 1;
                    println!("FAIL {case}: {}", reason.replace('\n', "\\n"));
                }
            }
        }
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}
