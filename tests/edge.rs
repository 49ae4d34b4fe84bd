//! What an outside caller can and cannot learn or choose through the edge
//! gateway: a deadline it picks is cut at the edge, and failures inside the
//! mesh reach it as generic messages (the detail stays in the gateway's
//! log), while the services' own answers pass through unchanged.
//!
//! The gateway is the real process over mTLS; behind it, an in-process
//! "inventory" that never answers listings and refuses a bad GetProduct,
//! and an auth address where nothing listens.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Proc, TestPki, free_addr, identity};
use mesh_client::{
    authz::AuthorizationPolicy,
    server::{MeshServer, ServerConfig},
};
use shop_api::{
    auth::v1::{RegisterRequest, auth_service_client::AuthServiceClient},
    inventory::v1::{
        GetProductRequest, ListProductsRequest, inventory_service_client::InventoryServiceClient,
    },
};
use tonic::{Code, Status, body::Body};

/// The validation message the stand-in inventory answers GetProduct with.
const VALIDATION: &str = "product_id: must be a UUID, got \"nope\"";

/// The stand-in inventory: refuses GetProduct as the real one refuses a
/// bad id, and never answers anything else.
#[derive(Clone)]
struct StandIn {
    seen: Arc<Mutex<Vec<Option<Duration>>>>,
    /// The request headers of every call, in order.
    headers: Arc<Mutex<Vec<http::HeaderMap>>>,
    /// Answers to [`BIG`] still being sent (their bodies not yet dropped).
    live: Arc<AtomicUsize>,
}

/// The product id for which the stand-in answers GetProduct in full
/// (headers, a message, trailers), with `mesh-*` metadata in both the
/// headers and the trailers.
const FULL: &str = "full-answer";

/// The product id for which the stand-in answers GetProduct with more
/// than the HTTP/2 windows between it and a caller hold: [`BIG_MESSAGES`]
/// messages of 32 KiB (8 MiB; the gateway's stream window is 256 KiB), so
/// the stand-in is still sending while its caller does not read.
const BIG: &str = "big-answer";
const BIG_MESSAGES: usize = 256;

/// Counts an answer as live until its body is dropped (sent in full, or
/// its stream reset).
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A big answer to GetProduct ([`BIG`]), counted in `live` while its body lives.
fn big_answer(live: Arc<AtomicUsize>) -> http::Response<Body> {
    use hyper::body::Frame;
    let live = Live::new(live);
    let mut message = vec![0u8; 5 + 32 * 1024];
    message[1..5].copy_from_slice(&(32u32 * 1024).to_be_bytes());
    let message = bytes::Bytes::from(message);
    let frames = futures::stream::iter((0..=BIG_MESSAGES).map(move |i| {
        let _counted = &live;
        Ok::<_, Status>(if i < BIG_MESSAGES {
            Frame::data(message.clone())
        } else {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            Frame::trailers(trailers)
        })
    }));
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .unwrap()
}

/// A whole answer to GetProduct: an empty `Product`, with internal
/// metadata in the headers and the trailers beside what may leave.
fn full_answer() -> http::Response<Body> {
    use hyper::body::Frame;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("retry-after", "7".parse().unwrap());
    trailers.insert("mesh-fault-injected", "abort".parse().unwrap());
    trailers.insert("x-internal-trailer", "secret".parse().unwrap());
    let frames = futures::stream::iter([
        Ok::<_, Status>(Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\0"))),
        Ok(Frame::trailers(trailers)),
    ]);
    http::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-accept-encoding", "identity")
        .header("mesh-fault-injected", "delay")
        .header("mesh-mirrored", "true")
        .header("x-internal-header", "secret")
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .unwrap()
}

impl tonic::codegen::Service<http::Request<Body>> for StandIn {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (seen, live) = (self.seen.clone(), self.live.clone());
        self.headers.lock().unwrap().push(req.headers().clone());
        Box::pin(async move {
            if req.uri().path().ends_with("/GetProduct") {
                use http_body_util::BodyExt;
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let has =
                    |b: &bytes::Bytes, id: &str| b.windows(id.len()).any(|w| w == id.as_bytes());
                match body {
                    Ok(b) if has(&b, FULL) => return Ok(full_answer()),
                    Ok(b) if has(&b, BIG) => return Ok(big_answer(live)),
                    _ => {}
                }
                let mut refused = Status::invalid_argument(VALIDATION).into_http();
                refused
                    .headers_mut()
                    .insert("mesh-fault-injected", "abort".parse().unwrap());
                return Ok(refused);
            }
            seen.lock().unwrap().push(
                req.headers()
                    .get("grpc-timeout")
                    .and_then(|v| v.to_str().ok())
                    .and_then(mesh_client::deadline::decode_grpc_timeout),
            );
            // A backend that hangs; the call ends when the caller gives up.
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(Status::internal("still here after 10 minutes").into_http())
        })
    }
}

struct Edge {
    _dir: tempfile::TempDir,
    _gateway: Proc,
    gateway: SocketAddr,
    /// Auth's target: where nothing listens, or the stand-in auth.
    dead: SocketAddr,
    inventory: SocketAddr,
    /// The `grpc-timeout` of each listing the inventory received.
    seen: Arc<Mutex<Vec<Option<Duration>>>>,
    /// The request headers of every call the inventory received.
    headers: Arc<Mutex<Vec<http::HeaderMap>>>,
    /// The inventory's [`BIG`] answers still being sent.
    live: Arc<AtomicUsize>,
    _stop: (
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Sender<()>,
    ),
}

/// A gateway cutting inbound deadlines to 1 s, in front of a stand-in
/// inventory (mTLS, identity `inventory`) and a dead auth.
async fn edge() -> Edge {
    edge_with(None).await
}

/// [`edge`], with a stand-in auth enforcing `auth_policy` instead of a dead one.
async fn edge_with(auth_policy: Option<AuthorizationPolicy>) -> Edge {
    edge_with_args(auth_policy, &["--max-inbound-deadline-ms", "1000"]).await
}

/// [`edge_with`], the gateway started with `flags` instead of a 1 s
/// inbound deadline maximum.
async fn edge_with_args(auth_policy: Option<AuthorizationPolicy>, flags: &[&str]) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    pki.issue("inventory");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let headers = Arc::new(Mutex::new(Vec::new()));
    let live = Arc::new(AtomicUsize::new(0));
    let inventory = StandIn {
        seen: seen.clone(),
        headers: headers.clone(),
        live: live.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inventory_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        MeshServer::new(ServerConfig::default())
            .tls(pki.load("inventory"))
            .fallback(&["mesh.inventory.v1.InventoryService"], inventory)
            .serve(listener, async {
                let _ = stopped.await;
            }),
    );

    let (addr, mut dead) = (free_addr(), free_addr());
    let (_stop_auth, stopped_auth) = tokio::sync::oneshot::channel::<()>();
    if let Some(policy) = auth_policy {
        pki.issue("auth");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        dead = listener.local_addr().unwrap();
        tokio::spawn(
            MeshServer::new(ServerConfig::default())
                .tls(pki.load("auth"))
                .authorization(Some(policy))
                .fallback(
                    &["mesh.auth.v1.AuthService"],
                    StandIn {
                        seen: Arc::default(),
                        headers: Arc::default(),
                        live: Arc::default(),
                    },
                )
                .serve(listener, async {
                    let _ = stopped_auth.await;
                }),
        );
    }
    let args: Vec<String> = [
        "--tls-dir",
        pki.issue("gateway").to_str().unwrap(),
        "--trust-domain",
        common::TRUST_DOMAIN,
        "--auth-target",
        &format!("static:///{dead}"),
        "--inventory-target",
        &format!("static:///{inventory_addr}"),
        "--orders-target",
        &format!("static:///{dead}"),
    ]
    .iter()
    .chain(flags)
    .map(|s| s.to_string())
    .collect();
    let gateway = Proc::spawn("gateway", addr, &args);
    common::wait_serving(addr).await;
    Edge {
        _dir: dir,
        _gateway: gateway,
        gateway: addr,
        dead,
        inventory: inventory_addr,
        seen,
        headers,
        live,
        _stop: (stop, _stop_auth),
    }
}

impl Edge {
    /// Panics if `message` names anything inside the mesh.
    fn assert_generic(&self, message: &str) {
        for inside in [
            self.dead.to_string(),
            self.dead.port().to_string(),
            self.inventory.to_string(),
            self.inventory.port().to_string(),
            "127.0.0.1".into(),
            "static:".into(),
            "spiffe:".into(),
            identity("inventory"),
            identity("gateway"),
        ] {
            assert!(
                !message.contains(&inside),
                "{message:?} names {inside:?} inside the mesh"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_an_outside_caller_picks_is_cut_at_the_edge() {
    let edge = edge().await;
    let mut inventory = InventoryServiceClient::new(common::channel(edge.gateway).await);
    let mut request = tonic::Request::new(ListProductsRequest::default());
    request
        .metadata_mut()
        .insert("grpc-timeout", "99999999H".parse().unwrap());
    let err = tokio::time::timeout(Duration::from_secs(25), inventory.list_products(request))
        .await
        .expect("the call ran past the gateway's 1 s inbound maximum")
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    edge.assert_generic(err.message());
    let seen = edge.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let passed_on = seen[0].expect("the gateway sent a deadline");
    assert!(
        passed_on <= Duration::from_secs(1),
        "the gateway passed on {passed_on:?}"
    );

    // The service's own answer passes through as it was.
    let err = inventory
        .get_product(GetProductRequest {
            product_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), VALIDATION);
}

/// One outside caller that asks for big answers and never reads them must
/// not hold the upstream's streams (on the connection the gateway shares
/// with every caller) past the call's deadline: the gateway's server stops
/// reading the upstream answer once the caller's window is full, so only a
/// release that needs no reader frees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_reads_holds_no_upstream_stream_past_its_deadline() {
    const HELD: usize = 3;
    let edge = edge().await;
    let (held, _connection) = unread_big_answers(&edge, HELD).await;
    assert_eq!(
        edge.live.load(Ordering::SeqCst),
        HELD,
        "the answers are being sent"
    );
    // The gateway cut each call's deadline to 1 s; well after it, with the
    // caller still connected and still not reading, no answer is held.
    let released = tokio::time::timeout(Duration::from_secs(20), async {
        while edge.live.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "{} of {HELD} upstream answers still held 20 s after their 1 s deadline",
        edge.live.load(Ordering::SeqCst)
    );
    // The connection every caller shares still serves the others.
    let mut inventory = InventoryServiceClient::new(common::channel(edge.gateway).await);
    let err = inventory
        .get_product(GetProductRequest {
            product_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    drop(held);
}

/// `count` calls for [`BIG`] answers over one raw HTTP/2 connection to the
/// gateway, their answers' headers received and their bodies never read;
/// and the task driving that connection (abort it to hang up).
async fn unread_big_answers(
    edge: &Edge,
    count: usize,
) -> (
    Vec<http::Response<h2::RecvStream>>,
    tokio::task::JoinHandle<()>,
) {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(edge.gateway).await.unwrap();
    // h2 itself, not a gRPC client: a client that never reads sends no
    // WINDOW_UPDATE, which h2 leaves to the application.
    let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = GetProductRequest {
        product_id: BIG.into(),
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(request.len() as u32).to_be_bytes());
    framed.extend_from_slice(&request);
    let mut held = Vec::new();
    for _ in 0..count {
        let call = http::Request::post(format!(
            "http://{}/mesh.inventory.v1.InventoryService/GetProduct",
            edge.gateway
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "5S")
        .body(())
        .unwrap();
        send = send.ready().await.unwrap();
        let (response, mut body) = send.send_request(call, false).unwrap();
        body.send_data(bytes::Bytes::from(framed.clone()), true)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(20), response)
            .await
            .expect("the gateway passed no answer on")
            .unwrap();
        assert_eq!(response.status(), 200, "{response:?}");
        // Kept, never read.
        held.push(response);
    }
    (held, connection)
}

/// A caller holds at most `--max-calls-in-flight-per-client` calls, each
/// until its answer is read to its end or dropped: answers it never reads
/// count (the rate limit alone let one caller hold hundreds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_holds_at_most_its_calls_in_flight_until_their_answers_end() {
    let edge = edge_with_args(
        None,
        &[
            "--max-inbound-deadline-ms",
            "20000",
            "--max-calls-in-flight-per-client",
            "2",
        ],
    )
    .await;
    let (held, connection) = unread_big_answers(&edge, 2).await;
    // Their headers came back long ago; their answers are still unread.
    let mut inventory = InventoryServiceClient::new(common::channel(edge.gateway).await);
    let get = |id: &str| GetProductRequest {
        product_id: id.into(),
    };
    let err = inventory.get_product(get("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("2 calls in flight"), "{err:?}");
    // The caller hangs up: its calls end, and it may call again.
    connection.abort();
    drop(held);
    let admitted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match inventory.get_product(get("nope")).await {
                Err(e) if e.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => return other,
            }
        }
    })
    .await
    .expect("the slots were never given back");
    assert_eq!(admitted.unwrap_err().code(), Code::InvalidArgument);
}

/// A trace context an outside caller sends, sampled.
const OUTSIDE_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_send_mesh_metadata_in_nor_see_the_shop_s_come_out() {
    let edge = edge().await;
    let mut inventory = InventoryServiceClient::new(common::channel(edge.gateway).await);
    let mut request = tonic::Request::new(GetProductRequest {
        product_id: FULL.into(),
    });
    for (name, value) in [
        ("x-canary", "true"),
        ("mesh-mirrored", "true"),
        ("mesh-fault-injected", "abort"),
        ("traceparent", OUTSIDE_TRACE),
        ("tracestate", "vendor=outside"),
        ("baggage", "tenant=admin"),
        ("grpc-previous-rpc-attempts", "4"),
        ("x-verified-subject", "someone-else"),
        ("x-shop-client", "address 203.0.113.9"),
        ("x-spiffe-id", "spiffe://shop.local/ns/shop/sa/orders"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-app-anything", "1"),
        ("user-agent", "outside/1.0"),
        ("authorization", "Bearer not-checked-on-this-route"),
    ] {
        request.metadata_mut().insert(name, value.parse().unwrap());
    }
    let answer = inventory.get_product(request).await.unwrap();

    // What reached the backend: the allow-list and what the gateway set.
    let received = edge.headers.lock().unwrap().last().cloned().unwrap();
    for name in [
        "x-canary",
        "mesh-mirrored",
        "mesh-fault-injected",
        "baggage",
        "grpc-previous-rpc-attempts",
        "x-verified-subject",
        "x-spiffe-id",
        "x-forwarded-for",
        "x-app-anything",
    ] {
        assert!(
            !received.contains_key(name),
            "{name} reached the backend: {received:?}"
        );
    }
    assert_ne!(
        received.get("traceparent").map(|v| v.to_str().unwrap()),
        Some(OUTSIDE_TRACE),
        "the outside trace context reached the backend"
    );
    // The gateway's own (empty) tracestate, if any.
    assert_ne!(
        received.get("tracestate").map(|v| v.to_str().unwrap()),
        Some("vendor=outside")
    );
    assert_ne!(
        received["x-shop-client"], "address 203.0.113.9",
        "the gateway's own key"
    );
    assert_eq!(
        received["authorization"],
        "Bearer not-checked-on-this-route"
    );
    assert!(received.contains_key("grpc-timeout"));

    // What came back: headers and trailers (tonic merges them), without
    // anything internal.
    let metadata = answer.metadata().clone().into_headers();
    for name in [
        "mesh-fault-injected",
        "mesh-mirrored",
        "x-internal-header",
        "x-internal-trailer",
    ] {
        assert!(
            !metadata.contains_key(name),
            "{name} reached the client: {metadata:?}"
        );
    }
    assert_eq!(metadata["retry-after"], "7", "allowed trailers pass");
    assert_eq!(
        metadata["grpc-accept-encoding"], "identity",
        "allowed headers pass"
    );

    // A trailers-only refusal keeps its status and loses its mesh metadata.
    let err = inventory
        .get_product(GetProductRequest {
            product_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, VALIDATION)
    );
    assert!(
        err.metadata().get("mesh-fault-injected").is_none(),
        "{:?}",
        err.metadata()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_is_reported_without_internal_detail() {
    let edge = edge().await;
    let mut auth = AuthServiceClient::new(common::channel(edge.gateway).await);
    let err = auth
        .register(RegisterRequest {
            username: "ann".into(),
            password: "correct-horse-battery".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.message(),
        "auth is temporarily unavailable; retry shortly"
    );
    edge.assert_generic(err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_the_gateway_does_not_reveal_its_identity() {
    // auth's policy lets only the operator in, not the gateway.
    let policy: AuthorizationPolicy = serde_json::from_value(serde_json::json!(
        {"rules": [{"callers": [identity("operator")], "methods": ["*"]}]}
    ))
    .unwrap();
    let edge = edge_with(Some(policy)).await;
    let mut auth = AuthServiceClient::new(common::channel(edge.gateway).await);
    let err = auth
        .register(RegisterRequest {
            username: "ann".into(),
            password: "correct-horse-battery".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().starts_with("auth could not serve the call"),
        "{}",
        err.message()
    );
    edge.assert_generic(err.message());
    assert!(
        err.metadata()
            .get(mesh_client::authz::REFUSED_BY_HEADER)
            .is_none(),
        "{:?}",
        err.metadata()
    );
}

/// A stand-in echo server admitting 2 streams per connection: EchoStream
/// sends its headers and then holds the stream open; Echo answers at once.
#[derive(Clone)]
struct Echoes;

impl tonic::codegen::Service<http::Request<Body>> for Echoes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            if req.uri().path().ends_with("/EchoStream") {
                // A watch: open until the caller gives up.
                let forever =
                    futures::stream::pending::<Result<hyper::body::Frame<bytes::Bytes>, Status>>();
                return Ok(http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(Body::new(http_body_util::StreamBody::new(forever)))
                    .unwrap());
            }
            Ok(full_answer())
        })
    }
}

/// Calls answered with a stream go over connections of their own: streams
/// held open through the gateway (a watch lives for minutes) cannot take
/// every stream of the connection unary calls to the same service share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_streams_leave_the_unary_calls_to_the_same_service_their_connection() {
    use shop_api::echo::v1::{
        EchoRequest, EchoStreamRequest, echo_service_client::EchoServiceClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    pki.issue("inventory");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        MeshServer::new(ServerConfig {
            max_concurrent_streams: 2,
            ..ServerConfig::default()
        })
        .tls(pki.load("inventory"))
        .fallback(&["mesh.echo.v1.EchoService"], Echoes)
        .serve(listener, async {
            let _ = stopped.await;
        }),
    );
    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        r#"{"routes": [{"methods": ["mesh.echo.v1.EchoService/*"], "upstream": "inventory", "auth": "none"}]}"#,
    )
    .unwrap();
    let (addr, dead) = (free_addr(), free_addr());
    let args: Vec<String> = [
        "--tls-dir",
        pki.issue("gateway").to_str().unwrap(),
        "--trust-domain",
        common::TRUST_DOMAIN,
        "--routes",
        routes.to_str().unwrap(),
        "--auth-target",
        &format!("static:///{dead}"),
        "--inventory-target",
        &format!("static:///{upstream}"),
        "--orders-target",
        &format!("static:///{dead}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _gateway = Proc::spawn("gateway", addr, &args);
    common::wait_serving(addr).await;
    let mut echo = EchoServiceClient::new(common::channel(addr).await);
    // Every stream the upstream admits on a connection (2, one of them
    // perhaps the gateway's health watch), held open: streams are opened
    // until one waits, which is then given up.
    let mut held = Vec::new();
    loop {
        let mut request = tonic::Request::new(EchoStreamRequest::default());
        request.set_timeout(Duration::from_secs(25));
        match tokio::time::timeout(Duration::from_secs(3), echo.echo_stream(request)).await {
            Ok(stream) => held.push(stream.unwrap()),
            Err(_waits) => break,
        }
        assert!(held.len() <= 2, "the upstream admitted more than 2 streams");
    }
    assert!(!held.is_empty(), "no stream was admitted");
    // A unary call to the same service still gets a stream.
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(10));
    let answered = echo.echo(request).await;
    assert!(
        answered.is_ok(),
        "a unary call waited behind the held streams: {answered:?}"
    );
    drop(held);
}
