//! Seeing the mesh: one trace across processes (received by a real OTLP
//! gRPC receiver), exact golden metrics on the admin port (checked with the
//! reference OpenMetrics parser), trace ids in log lines, and the live view.

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Db, Proc, Shop, ShopOptions, authed, bin, free_addr, http_get, skip_or_fail};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use shop_api::{
    common::v1::Money,
    echo::v1::{ChainRequest, EchoRequest, Fault, echo_service_client::EchoServiceClient},
    orders::v1::{GetOrderRequest, OrderStatus},
};
use tonic::Code;

use common::otlp::{Collector, Received};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn usd(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".into(),
        amount_minor,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_place_order_is_one_trace_across_three_processes() {
    let (collector, otlp) = Collector::start().await;
    let shop = Shop::start_opts(
        &Db::Sqlite,
        ShopOptions {
            tls: true,
            env: vec![
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                    format!("http://{otlp}"),
                ),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            ],
        },
    )
    .await;
    let (token, product, account) = shop.customer("tracy").await;

    // The test is the root of the trace: its own span id is the parent the
    // orders server span must name.
    let trace_id: [u8; 16] = rand::random();
    let root: [u8; 8] = rand::random();
    let mut request = common::place_request(&token, &product, &account, "traced-1".into());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{}-{}-01", hex(&trace_id), hex(&root))
            .parse()
            .unwrap(),
    );
    let mut orders = shop.orders().await;
    let placed = orders.place_order(request).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = orders
            .get_order(authed(
                &token,
                GetOrderRequest {
                    order_id: placed.order_id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == OrderStatus::Confirmed {
            break;
        }
        assert!(Instant::now() < deadline, "order stuck in {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Spans arrive in batches; wait until both callees' server spans are in.
    let served_by = |spans: &[Received], service: &str| {
        spans
            .iter()
            .any(|s| s.service == service && s.kind == SpanKind::Server)
    };
    let spans = loop {
        let spans = collector.spans_of(&trace_id);
        if ["orders", "inventory", "payments"]
            .iter()
            .all(|s| served_by(&spans, s))
        {
            // One more batch interval for the remaining spans.
            tokio::time::sleep(Duration::from_millis(500)).await;
            break collector.spans_of(&trace_id);
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "spans of the trace never arrived; got {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let by_id: HashMap<&[u8], &Received> = spans.iter().map(|s| (&s.span_id[..], s)).collect();
    let place = spans
        .iter()
        .find(|s| {
            s.service == "orders"
                && s.kind == SpanKind::Server
                && s.name == "mesh.orders.v1.OrdersService/PlaceOrder"
        })
        .unwrap_or_else(|| panic!("no PlaceOrder server span in {spans:#?}"));
    assert_eq!(
        place.parent, root,
        "PlaceOrder's parent is the caller's span"
    );
    assert_eq!(place.attributes["rpc.system"], "grpc");
    assert_eq!(
        place.attributes["rpc.service"],
        "mesh.orders.v1.OrdersService"
    );
    assert_eq!(place.attributes["rpc.method"], "PlaceOrder");
    assert_eq!(place.attributes["rpc.grpc.status_code"], "0");
    assert_eq!(
        place.attributes["client.identity"],
        common::identity("operator")
    );
    for (callee, method) in [
        ("inventory", "ReserveStock"),
        ("payments", "CreateCharge"),
        ("inventory", "CommitReservation"),
    ] {
        let server = spans
            .iter()
            .find(|s| s.service == callee && s.kind == SpanKind::Server && s.name.ends_with(method))
            .unwrap_or_else(|| panic!("no {callee} {method} server span in {spans:#?}"));
        let client = by_id
            .get(&server.parent[..])
            .unwrap_or_else(|| panic!("{callee} {method}'s parent span was not exported"));
        assert_eq!(client.service, "orders", "{callee} was called by orders");
        assert_eq!(client.kind, SpanKind::Client);
        assert_eq!(client.attributes["mesh.peer"], callee);
        assert_eq!(
            server.attributes["client.identity"],
            common::identity("orders"),
            "the callee saw the caller's verified identity"
        );
        assert!(
            descends(&by_id, client, &place.span_id),
            "the orders → {callee} call is inside PlaceOrder's trace tree"
        );
    }
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for service in ["orders", "inventory", "payments"] {
        assert!(services.contains(service), "{service} exported no span");
    }
}

/// Whether `span` is `ancestor` or below it.
fn descends<'a>(
    by_id: &HashMap<&[u8], &'a Received>,
    mut span: &'a Received,
    ancestor: &[u8],
) -> bool {
    loop {
        if span.span_id == ancestor {
            return true;
        }
        match by_id.get(&span.parent[..]) {
            Some(parent) => span = parent,
            None => return false,
        }
    }
}

/// Parses OpenMetrics text with the Python reference parser
/// (`prometheus_client.openmetrics.parser`) into `(name, labels, value)`.
fn parse_with_reference(text: &str) -> Option<Vec<(String, HashMap<String, String>, f64)>> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let output = common::run_with_input(
        Command::new("python3").args(["-c", SCRIPT]),
        text.as_bytes(),
    );
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        if err.contains("No module named 'prometheus_client'") {
            return None;
        }
        panic!("the reference parser rejected /metrics: {err}\n{text}");
    }
    let rows: Vec<(String, HashMap<String, String>, f64)> =
        serde_json::from_slice(&output.stdout).unwrap();
    Some(rows)
}

/// The value of the one sample named `name` whose labels include `want`.
fn value(
    samples: &[(String, HashMap<String, String>, f64)],
    name: &str,
    want: &[(&str, &str)],
) -> f64 {
    let hits: Vec<f64> = samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    match hits.as_slice() {
        [] => 0.0,
        [one] => *one,
        _ => panic!("{name} {want:?} matches {} samples", hits.len()),
    }
}

fn echo_proc(
    id: &str,
    admin: SocketAddr,
    extra: &[String],
    log: Option<&std::path::Path>,
    env: &[(&str, String)],
) -> Proc {
    let addr = free_addr();
    let mut cmd = Command::new(bin("mesh-echo"));
    cmd.args(["--listen", &addr.to_string(), "--id", id])
        .args(["--admin-addr", &admin.to_string()])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    match log {
        Some(path) => {
            cmd.env("RUST_LOG", "info,mesh_client=debug")
                .stderr(std::fs::File::create(path).unwrap());
        }
        None => {
            cmd.env("RUST_LOG", "warn");
        }
    }
    Proc::adopt(id, addr, cmd.spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_counts_every_call_exactly() {
    let logs = tempfile::tempdir().unwrap();
    let (back_admin, front_admin) = (free_addr(), free_addr());
    let back = echo_proc(
        "back",
        back_admin,
        &[],
        Some(&logs.path().join("back.log")),
        &[],
    );
    let front_log = logs.path().join("front.log");
    let front = echo_proc(
        "front",
        front_admin,
        &["--next".into(), format!("static:///{}", back.addr)],
        Some(&front_log),
        &[],
    );
    common::wait_serving(back.addr).await;
    common::wait_serving(front.addr).await;

    let mut to_front = EchoServiceClient::new(common::channel(front.addr).await);
    let mut to_back = EchoServiceClient::new(common::channel(back.addr).await);
    // 5 echoes, 4 chains (front → back), then back fails: 3 failed chains.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    for _ in 0..5 {
        let mut request = tonic::Request::new(EchoRequest {
            payload: b"hi".to_vec(),
        });
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{trace_id}-00f067aa0ba902b7-01")
                .parse()
                .unwrap(),
        );
        to_front.echo(request).await.unwrap();
    }
    for _ in 0..4 {
        to_front.chain(ChainRequest {}).await.unwrap();
    }
    to_back
        .set_fault(Fault {
            unavailable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..3 {
        let err = to_front.chain(ChainRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }
    // A path no server has: counted under `unknown`, not under its name.
    let mut raw = tonic::client::Grpc::new(common::channel(front.addr).await);
    for _ in 0..2 {
        raw.ready().await.unwrap();
        let err = raw
            .unary::<_, EchoRequest, _>(
                tonic::Request::new(EchoRequest::default()),
                "/attacker.Chosen/Name".parse().unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
    }

    let (status, front_text) = http_get(front_admin, "/metrics").await;
    assert_eq!(status, 200);
    let (_, back_text) = http_get(back_admin, "/metrics").await;
    let Some(front_m) = parse_with_reference(&front_text) else {
        skip_or_fail("python3 -m pip install prometheus-client (the reference parser)");
        return;
    };
    let back_m = parse_with_reference(&back_text).unwrap();

    let echo = "mesh.echo.v1.EchoService";
    let inbound = |m: &str, code: &str| {
        value(
            &front_m,
            "mesh_responses_total",
            &[
                ("direction", "inbound"),
                ("rpc_service", echo),
                ("rpc_method", m),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(inbound("Echo", "OK"), 5.0);
    assert_eq!(inbound("Chain", "OK"), 4.0);
    assert_eq!(inbound("Chain", "UNAVAILABLE"), 3.0);
    assert_eq!(
        value(
            &front_m,
            "mesh_requests_total",
            &[("direction", "inbound"), ("rpc_method", "Chain")]
        ),
        7.0
    );
    assert_eq!(
        value(
            &front_m,
            "mesh_response_latency_seconds_count",
            &[("direction", "inbound"), ("rpc_method", "Echo")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &front_m,
            "mesh_response_latency_seconds_bucket",
            &[
                ("direction", "inbound"),
                ("rpc_method", "Echo"),
                ("le", "+Inf")
            ]
        ),
        5.0
    );
    assert_eq!(
        value(
            &front_m,
            "mesh_in_flight_requests",
            &[("direction", "inbound"), ("rpc_method", "Echo")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &front_m,
            "mesh_responses_total",
            &[("rpc_service", "unknown"), ("grpc_code", "UNIMPLEMENTED")]
        ),
        2.0
    );
    assert!(
        !front_text.contains("attacker"),
        "a caller-chosen path became a label"
    );

    // Outbound from front to back: one logical call per chain; the
    // attempts back saw are those calls plus front's retries.
    let peer = format!("static:///{}", back.addr);
    let outbound = |code: &str| {
        value(
            &front_m,
            "mesh_responses_total",
            &[
                ("direction", "outbound"),
                ("peer", &peer),
                ("rpc_method", "Chain"),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(outbound("OK"), 4.0);
    assert_eq!(outbound("UNAVAILABLE"), 3.0);
    let retries = value(
        &front_m,
        "mesh_retries_total",
        &[("peer", &peer), ("rpc_method", "Chain")],
    );
    assert!(
        retries >= 3.0,
        "UNAVAILABLE is retried for an idempotent method"
    );
    let back_chain = |code: &str| {
        value(
            &back_m,
            "mesh_responses_total",
            &[
                ("direction", "inbound"),
                ("rpc_method", "Chain"),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(back_chain("OK"), 4.0);
    assert_eq!(back_chain("UNAVAILABLE"), 3.0 + retries);
    // back's one endpoint is in exactly one state; the failures may have
    // ejected it, and then the ejection was counted.
    let state = |s: &str| value(&front_m, "mesh_endpoints", &[("peer", &peer), ("state", s)]);
    let states = ["ready", "ejected", "reconnecting", "unhealthy"].map(state);
    assert_eq!(states.iter().sum::<f64>(), 1.0, "{states:?}");
    let ejections = value(
        &front_m,
        "mesh_endpoint_ejections_total",
        &[("peer", &peer)],
    );
    assert!(
        state("ejected") <= ejections,
        "{states:?}, {ejections} ejections"
    );
    assert!(front_m.iter().any(|(n, l, v)| n == "mesh_process_info"
        && l.get("service").map(String::as_str) == Some("mesh-echo")
        && *v == 1.0));

    // What a kubelet gRPC probe does: Health/Check over plaintext HTTP/2
    // on the admin port (the gRPC port wants a client certificate).
    let mut probe =
        tonic_health::pb::health_client::HealthClient::new(common::channel(front_admin).await);
    let health = probe
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("gRPC health on the admin port")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    assert_eq!(http_get(front_admin, "/live").await.0, 200);
    assert_eq!(http_get(front_admin, "/ready").await.0, 200);
    assert_eq!(http_get(front_admin, "/nope").await.0, 404);

    // Log lines of the traced calls carry their trace id (JSON on request
    // is checked in the live-view test's processes; here the text format),
    // in front and, propagated, in back.
    let front_lines = std::fs::read_to_string(&front_log).unwrap();
    assert!(
        front_lines
            .lines()
            .any(|l| l.contains(&format!("trace_id={trace_id}")) && l.contains("Echo")),
        "no log line of the traced call carries its trace id:\n{front_lines}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_id_reaches_the_next_hop_and_json_logs() {
    let logs = tempfile::tempdir().unwrap();
    let (back_admin, front_admin) = (free_addr(), free_addr());
    let back_log = logs.path().join("back.log");
    let back_addr = free_addr();
    let back = Proc::adopt(
        "back",
        back_addr,
        Command::new(bin("mesh-echo"))
            .args(["--listen", &back_addr.to_string(), "--id", "back"])
            .args(["--admin-addr", &back_admin.to_string()])
            .env("RUST_LOG", "info,mesh_client=debug")
            .env("LOG_FORMAT", "json")
            .stderr(std::fs::File::create(&back_log).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let front = echo_proc(
        "front",
        front_admin,
        &["--next".into(), format!("static:///{}", back.addr)],
        None,
        &[],
    );
    common::wait_serving(back.addr).await;
    common::wait_serving(front.addr).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(ChainRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    EchoServiceClient::new(common::channel(front.addr).await)
        .chain(request)
        .await
        .unwrap();
    // Front propagated the trace to back; back's JSON log lines of the call
    // carry it in their span fields.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = std::fs::read_to_string(&back_log).unwrap();
        let found = lines
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["span"]["trace_id"] == trace_id);
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no JSON log line in back carries the propagated trace id:\n{lines}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_view_shows_every_edge_under_load() {
    let shop = Shop::start_mtls().await;
    let (token, product, account) = shop.customer("viewer").await;
    let account_of_view = account.clone();
    // Bounded load: orders for at most 20 s, stopped once the view is taken.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let placed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = {
        let (stop, placed) = (stop.clone(), placed.clone());
        let mut orders = shop.orders().await;
        tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(20)
            {
                n += 1;
                orders
                    .place_order(common::place_request(
                        &token,
                        &product,
                        &account,
                        format!("view-{n}"),
                    ))
                    .await
                    .expect("place order");
                placed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut cmd = tokio::process::Command::new(bin("shopctl"));
    cmd.args(["top", "--once", "--json", "--interval", "2"]);
    for addr in shop.admin.values() {
        cmd.args(["--admin", &addr.to_string()]);
    }
    let before = placed.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let output = cmd.output().await.expect("run shopctl top");
    let client_rate = (placed.load(std::sync::atomic::Ordering::Relaxed) - before) as f64
        / started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        output.status.success(),
        "shopctl top failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("top --json printed {:?}: {e}", output.stdout));
    assert!(view["unreachable"].as_array().unwrap().is_empty());
    let rps_of = |rows: &serde_json::Value, pick: &dyn Fn(&serde_json::Value) -> bool| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| pick(r))
            .unwrap_or_else(|| panic!("missing row in {view:#}"))
            .clone()
    };
    let orders = rps_of(&view["services"], &|r| r["service"] == "orders");
    let orders_rps = orders["rps"].as_f64().unwrap();
    assert!(client_rate > 1.0, "the load ran ({client_rate:.1}/s)");
    assert!(
        orders_rps > client_rate * 0.4 && orders_rps < client_rate * 2.5,
        "orders at {orders_rps:.1}/s in the view, {client_rate:.1}/s placed"
    );
    assert_eq!(orders["success_rate"].as_f64(), Some(1.0));
    assert!(orders["p99_ms"].as_f64().unwrap() > 0.0);
    // Every edge of the shop, at a rate that follows from the orders'.
    // Tokens are checked in process: orders asks auth only for its keys,
    // not once per call.
    if let Some(auth) = view["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["from"] == "orders" && r["to"] == "auth")
    {
        let rps = auth["rps"].as_f64().unwrap_or_default();
        assert!(
            rps < orders_rps * 0.2,
            "orders -> auth at {rps:.1}/s with orders at {orders_rps:.1}/s: {view:#}"
        );
    }
    for (callee, per_order) in [("inventory", 2.0), ("payments", 1.0)] {
        let edge = rps_of(&view["edges"], &|r| {
            r["from"] == "orders" && r["to"] == callee
        });
        let rps = edge["rps"].as_f64().unwrap();
        assert!(
            rps > orders_rps * per_order * 0.4,
            "orders -> {callee} at {rps:.1}/s with orders at {orders_rps:.1}/s: {view:#}"
        );
        assert_eq!(edge["success_rate"].as_f64(), Some(1.0), "{view:#}");
    }

    // A workload the policy does not allow: denied, and counted.
    let inventory_tls = mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(
        shop.dir.path().join("certs/inventory"),
    ))
    .unwrap();
    let as_inventory = mesh_client::Mesh::new(mesh_client::MeshConfig::default())
        .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
        .unwrap()
        .with_tls(inventory_tls);
    let channel = as_inventory
        .channel_with_identity(
            &format!("static:///{}", shop.payments.addr),
            &common::identity("payments"),
        )
        .unwrap();
    let err = shop_api::payments::v1::payments_service_client::PaymentsServiceClient::new(channel)
        .create_charge(shop_api::payments::v1::CreateChargeRequest {
            account_id: account_of_view.clone(),
            amount: usd(1),
            idempotency_key: "not-allowed".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let (_, text) = http_get(shop.admin["payments"], "/metrics").await;
    let samples = parse_with_reference(&text).expect("prometheus-client is installed");
    assert_eq!(
        value(
            &samples,
            "mesh_authorization_denials_total",
            &[
                ("caller", &common::identity("inventory")),
                ("rpc_method", "CreateCharge"),
                ("mode", "enforce"),
            ]
        ),
        1.0
    );
    let expiry = value(
        &samples,
        "mesh_certificate_expiry_timestamp_seconds",
        &[("identity", &common::identity("payments"))],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now,
        "payments' certificate expiry {expiry} is in the future"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_ejections_are_span_events() {
    let (collector, otlp) = Collector::start().await;
    let back = echo_proc("back", free_addr(), &[], None, &[]);
    let front = echo_proc(
        "front",
        free_addr(),
        &["--next".into(), format!("static:///{}", back.addr)],
        None,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    );
    common::wait_serving(back.addr).await;
    common::wait_serving(front.addr).await;
    EchoServiceClient::new(common::channel(back.addr).await)
        .set_fault(Fault {
            unavailable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let trace_id: [u8; 16] = rand::random();
    let mut to_front = EchoServiceClient::new(common::channel(front.addr).await);
    // 3 attempts per call: the fifth failure in a row ejects back.
    for _ in 0..2 {
        let mut request = tonic::Request::new(ChainRequest {});
        let parent: [u8; 8] = rand::random();
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{}-{}-01", hex(&trace_id), hex(&parent))
                .parse()
                .unwrap(),
        );
        let err = to_front.chain(request).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let clients: Vec<Received> = collector
            .spans_of(&trace_id)
            .into_iter()
            .filter(|s| s.kind == SpanKind::Client)
            .collect();
        let retried = clients
            .iter()
            .filter(|s| s.events.iter().filter(|e| *e == "retrying").count() == 2)
            .count();
        let ejected = clients
            .iter()
            .any(|s| s.events.iter().any(|e| e.starts_with("endpoint ejected")));
        if retried == 2 && ejected {
            for span in &clients {
                assert_eq!(span.attributes["rpc.grpc.status_code"], "14");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected two client spans with two retry events each and an ejection event: {clients:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_stays_serving_while_readiness_drains() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let admin = free_addr();
    let mut echo = echo_proc(
        "drainer",
        admin,
        &["--drain-grace-ms".into(), "3000".into()],
        None,
        &[],
    );
    common::wait_serving(echo.addr).await;
    let mut probe = HealthClient::new(common::channel(admin).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let status = |r: Result<
        tonic::Response<tonic_health::pb::HealthCheckResponse>,
        tonic::Status,
    >| { r.ok().map(|r| r.into_inner().status()) };
    assert_eq!(
        status(probe.check(check("")).await),
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        status(
            probe
                .check(check(mesh_client::server::LIVENESS_SERVICE))
                .await
        ),
        Some(ServingStatus::Serving)
    );
    // SIGTERM: during the drain grace the process is not ready but alive.
    let _ = nix::sys::signal::kill(echo.pid(), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while status(probe.check(check("")).await) == Some(ServingStatus::Serving) {
        assert!(
            Instant::now() < deadline,
            "readiness did not drop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(admin, "/ready").await.0, 503);
    assert_eq!(
        status(
            probe
                .check(check(mesh_client::server::LIVENESS_SERVICE))
                .await
        ),
        Some(ServingStatus::Serving),
        "a liveness probe must not restart a draining pod"
    );
    assert_eq!(http_get(admin, "/live").await.0, 200);
    let code = echo.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
}
