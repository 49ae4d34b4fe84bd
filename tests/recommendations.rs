//! The Python recommendations service on the mesh's wire contract
//! (docs/joining-the-mesh.md), with real processes: a Rust mesh client
//! calls it over mTLS with secure naming, health watching, P2C and
//! deadlines, and a wrong identity is refused; one trace runs from the Rust
//! gateway into Python, received by a real OTLP receiver; the gateway
//! degrades instead of failing when recommendations is killed, hung, slow
//! or failing; its metrics parse with the reference OpenMetrics parser and
//! carry the Rust services' names and labels.

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    Db, Proc, Shop, TestPki, authed, free_addr, http_get, identity, shop_policy, skip_or_fail,
};
use mesh_client::{Mesh, MeshChannel, MeshConfig};
use nix::sys::signal::{Signal, kill};
use shop_api::recommendations::v1::{
    RecommendRequest, RecordOrderRequest,
    recommendations_service_client::RecommendationsServiceClient,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Whether python3 has what the service needs (`services/recommendations/requirements.txt`).
fn python_ready(postgres: bool) -> bool {
    let mut modules = "import grpc, grpc_tools, grpc_health.v1, grpc_reflection.v1alpha, cryptography, prometheus_client, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc".to_owned();
    if postgres {
        modules.push_str(", psycopg");
    }
    let ok = Command::new("python3")
        .args(["-c", &modules])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail(
            "python3 lacks the recommendations service's packages (pip install -r services/recommendations/requirements.txt)",
        );
    }
    ok
}

fn service_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("services/recommendations")
}

/// One recommendations process.
struct Recs {
    proc: Proc,
    admin: SocketAddr,
    fault: PathBuf,
}

impl Recs {
    /// Starts it with `workload`'s certificate (mTLS) and the shop's
    /// policy for recommendations, on its own SQLite file in `dir`.
    fn start(dir: &Path, pki: &TestPki, db_url: Option<String>, env: &[(String, String)]) -> Recs {
        let addr = free_addr();
        let admin = free_addr();
        let policy = dir.join("recommendations.policy.json");
        std::fs::write(&policy, shop_policy("recommendations")).unwrap();
        let fault = dir.join(format!("fault-{}.json", addr.port()));
        let db = db_url.unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                dir.join(format!("recs-{}.db", addr.port())).display()
            )
        });
        let child = Command::new("python3")
            .args(["-m", "recommendations"])
            .current_dir(service_dir())
            .args(["--listen", &addr.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--database-url", &db])
            .arg("--tls-dir")
            .arg(pki.issue("recommendations"))
            .arg("--mesh-config")
            .arg(&policy)
            .args(["--trust-domain", common::TRUST_DOMAIN])
            .args(["--drain-grace-ms", "1000"])
            .arg("--fault-file")
            .arg(&fault)
            .env("LOG_LEVEL", "WARNING")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 -m recommendations");
        Recs {
            proc: Proc::adopt("recommendations", addr, child),
            admin,
            fault,
        }
    }

    fn target(&self) -> String {
        format!("static:///{}", self.proc.addr)
    }

    /// Sets the chaos hook (`{}` clears it).
    fn fault(&self, json: &str) {
        // Written whole, then renamed: the service never reads half a file.
        let tmp = self.fault.with_extension("tmp");
        std::fs::write(&tmp, json).unwrap();
        std::fs::rename(&tmp, &self.fault).unwrap();
    }

    async fn metrics(&self) -> String {
        let (status, text) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200);
        text
    }
}

/// A mesh calling as `workload` (mTLS with its certificate).
fn mesh_as(pki: &TestPki, workload: &str, config: MeshConfig) -> Mesh {
    pki.issue(workload);
    Mesh::from_config(config)
        .unwrap()
        .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
        .unwrap()
        .with_tls(pki.load(workload))
}

fn client(channel: MeshChannel) -> RecommendationsServiceClient<MeshChannel> {
    RecommendationsServiceClient::new(channel)
}

fn recommend(products: &[&str]) -> tonic::Request<RecommendRequest> {
    let mut request = tonic::Request::new(RecommendRequest {
        user_id: "u1".into(),
        product_ids: products.iter().map(|p| p.to_string()).collect(),
        max_results: 0,
    });
    request.set_timeout(Duration::from_secs(5));
    request
}

/// Teaches `recs` (as the operator) three orders: a+b twice, a+c once.
async fn teach(operator: &Mesh, target: &str) {
    let mut recs = client(
        operator
            .channel_with_identity(target, &identity("recommendations"))
            .unwrap(),
    );
    for (id, products) in [("o1", ["a", "b"]), ("o2", ["a", "b"]), ("o3", ["a", "c"])] {
        let answer = recs
            .record_order(RecordOrderRequest {
                order_id: id.into(),
                product_ids: products.iter().map(|p| p.to_string()).collect(),
            })
            .await
            .expect("RecordOrder")
            .into_inner();
        assert!(answer.recorded);
    }
    // The same order again changes nothing.
    let again = recs
        .record_order(RecordOrderRequest {
            order_id: "o1".into(),
            product_ids: vec!["a".into(), "b".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.recorded, "an order id counts once");
}

/// Waits until `addr` answers health SERVING over mTLS as the operator.
async fn wait_ready(operator: &Mesh, target: &str) {
    common::wait_serving_on(
        operator
            .channel_with_identity(target, &identity("recommendations"))
            .unwrap(),
    )
    .await;
}

/// `mesh_requests_total` of inbound Recommend calls in a Python process.
fn inbound_recommends(text: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("mesh_requests_total{")
                && l.contains(r#"direction="inbound""#)
                && l.contains(r#"rpc_method="Recommend""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_mesh_client_calls_python_over_mtls_with_secure_naming() {
    if !python_ready(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("certs"));
    let mut a = Recs::start(dir.path(), &pki, None, &[]);
    let b = Recs::start(dir.path(), &pki, None, &[]);
    let operator = mesh_as(&pki, "operator", MeshConfig::default());
    wait_ready(&operator, &a.target()).await;
    wait_ready(&operator, &b.target()).await;
    // Each replica has its own database file here; teach both.
    teach(&operator, &a.target()).await;
    teach(&operator, &b.target()).await;

    // The gateway's identity may call Recommend, over both replicas.
    let gateway = mesh_as(&pki, "gateway", MeshConfig::default());
    let both = format!("static:///{},{}", a.proc.addr, b.proc.addr);
    let mut recs = client(
        gateway
            .channel_with_identity(&both, &identity("recommendations"))
            .unwrap(),
    );
    // Eight callers at once: P2C spreads the load over both replicas.
    let mut callers = Vec::new();
    for _ in 0..8 {
        let mut recs = recs.clone();
        callers.push(tokio::spawn(async move {
            for _ in 0..10 {
                let answer = recs
                    .recommend(recommend(&["a"]))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(
                    answer.product_ids,
                    ["b", "c"],
                    "best first, the cart excluded"
                );
                assert!(!answer.fallback, "the service never sets fallback");
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let (on_a, on_b) = (
        inbound_recommends(&a.metrics().await),
        inbound_recommends(&b.metrics().await),
    );
    println!("P2C over two Python replicas, 8 callers: {on_a} and {on_b} of 80 calls");
    assert_eq!(on_a + on_b, 80.0);
    assert!(
        on_a > 0.0 && on_b > 0.0,
        "both replicas served: {on_a} / {on_b}"
    );
    // One replica 100 ms slow: P2C sends most calls to the other.
    a.fault(r#"{"delayMs": 100}"#);
    let mut callers = Vec::new();
    for _ in 0..4 {
        let mut recs = recs.clone();
        callers.push(tokio::spawn(async move {
            for _ in 0..15 {
                recs.recommend(recommend(&["a"])).await.unwrap();
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    a.fault("{}");
    let (slow, fast) = (
        inbound_recommends(&a.metrics().await) - on_a,
        inbound_recommends(&b.metrics().await) - on_b,
    );
    println!("with replica a 100 ms slow: a {slow}, b {fast} of 60 calls");
    assert!(
        fast > slow,
        "P2C preferred the slow replica: {slow} vs {fast}"
    );

    // Bad input: a precise status naming the field.
    let mut bad = recommend(&["a"]);
    bad.get_mut().max_results = 99;
    common::assert_status(
        recs.recommend(bad).await,
        Code::InvalidArgument,
        "max_results: must be 0 to 20, got 99",
    );

    // Deadlines: the caller's grpc-timeout bounds the call.
    a.fault(r#"{"delayMs": 3000}"#);
    b.fault(r#"{"delayMs": 3000}"#);
    let started = Instant::now();
    let mut late = recommend(&["a"]);
    late.set_timeout(Duration::from_millis(200));
    let err = recs.recommend(late).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let took = started.elapsed();
    println!("a 200 ms deadline against a 3 s fault ended after {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "the deadline did not bound the call: {took:?}"
    );
    a.fault("{}");
    b.fault("{}");

    // Wrong identities. A workload the policy does not list: refused with
    // PERMISSION_DENIED naming it.
    let orders = mesh_as(&pki, "orders", MeshConfig::default());
    let mut as_orders = client(
        orders
            .channel_with_identity(&a.target(), &identity("recommendations"))
            .unwrap(),
    );
    common::assert_status(
        as_orders.recommend(recommend(&["a"])).await,
        Code::PermissionDenied,
        &format!(
            "{} is not allowed to call mesh.recommendations.v1.RecommendationsService/Recommend",
            identity("orders")
        ),
    );
    let denials: f64 = a
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("mesh_authorization_denials_total{") && l.contains("sa/orders"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(denials, 1.0);
    // A policy edit is enforced within seconds without a restart; a file
    // that does not validate is refused and the last good policy stays.
    let mut policy: serde_json::Value =
        serde_json::from_str(&shop_policy("recommendations")).unwrap();
    policy["authorization"]["rules"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "callers": [identity("orders")],
            "methods": ["mesh.recommendations.v1.RecommendationsService/Recommend"],
        }));
    let policy_path = dir.path().join("recommendations.policy.json");
    std::fs::write(&policy_path, policy.to_string()).unwrap();
    let started = Instant::now();
    while as_orders.recommend(recommend(&["a"])).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the policy edit was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("policy edit enforced after {:?}", started.elapsed());
    std::fs::write(
        &policy_path,
        r#"{"authorization": {"rules": [{"callers": ["nobody"]}]}}"#,
    )
    .unwrap();
    let started = Instant::now();
    loop {
        let refused = a
            .metrics()
            .await
            .lines()
            .any(|l| l.starts_with(r#"mesh_config_reloads_total{outcome="refused"}"#));
        if refused {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the bad policy file was not refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    as_orders
        .recommend(recommend(&["a"]))
        .await
        .expect("the last good policy stays");
    // Secure naming: a server that is not the identity the caller expects
    // is refused by the caller, whatever it answers.
    let mut impostor = client(
        gateway
            .channel_with_identity(&a.target(), &identity("inventory"))
            .unwrap(),
    );
    let err = impostor.recommend(recommend(&["a"])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // No client certificate at all: no handshake.
    let plain = Mesh::from_config(MeshConfig::default()).unwrap();
    let mut anonymous = client(
        plain
            .channel(&format!("static:///{}", a.proc.addr))
            .unwrap(),
    );
    assert!(anonymous.recommend(recommend(&["a"])).await.is_err());

    // Health watch and drain: SIGTERM one replica while calling; its
    // Health/Watch says NOT_SERVING, the mesh stops choosing it, no call
    // fails, the watch ends and the process exits 0.
    let mut watch = tonic_health::pb::health_client::HealthClient::new(
        operator
            .channel_with_identity(&a.target(), &identity("recommendations"))
            .unwrap(),
    )
    .watch(tonic_health::pb::HealthCheckRequest {
        service: "mesh.recommendations.v1.RecommendationsService".into(),
    })
    .await
    .expect("Health/Watch")
    .into_inner();
    let first = watch.message().await.unwrap().expect("a first status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let calls = {
        let mut recs = recs.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed() < Duration::from_secs(4) {
                n += 1;
                if let Err(e) = recs.recommend(recommend(&["a"])).await {
                    failures.push(e);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (n, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watched = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(status)) = watch.message().await {
            seen.push(status.status());
        }
        seen
    });
    let code = a.proc.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "a drained process exits 0");
    let seen = tokio::time::timeout(Duration::from_secs(10), watched)
        .await
        .expect("the watch ended with the drain")
        .unwrap();
    assert_eq!(
        seen,
        [ServingStatus::NotServing],
        "statuses watched during the drain"
    );
    let (n, failures) = calls.await.unwrap();
    println!(
        "{n} calls while one replica drained, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "calls failed during the drain: {failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_store_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    if !python_ready(true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("certs"));
    let url = db.create(dir.path(), "recommendations").await;
    let recs = Recs::start(dir.path(), &pki, Some(url.clone()), &[]);
    let operator = mesh_as(&pki, "operator", MeshConfig::default());
    wait_ready(&operator, &recs.target()).await;
    teach(&operator, &recs.target()).await;
    let mut client = client(
        operator
            .channel_with_identity(&recs.target(), &identity("recommendations"))
            .unwrap(),
    );
    let answer = client
        .recommend(recommend(&["b"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.product_ids, ["a"]);
    // A second process on the same database sees what the first learned.
    drop(recs);
    let again = Recs::start(dir.path(), &pki, Some(url.clone()), &[]);
    wait_ready(&operator, &again.target()).await;
    let mut client2 = self::client(
        operator
            .channel_with_identity(&again.target(), &identity("recommendations"))
            .unwrap(),
    );
    let answer = client2
        .recommend(recommend(&["a", "b"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.product_ids, ["c"]);

    // Its database goes away: UNAVAILABLE at once and NOT_SERVING, then
    // back by itself when the database is.
    use sqlx::Connection;
    let Db::Postgres(admin_url) = &db else {
        unreachable!()
    };
    let name = url.rsplit('/').next().unwrap().to_owned();
    let mut admin = sqlx::AnyConnection::connect(admin_url).await.unwrap();
    for sql in [
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    common::assert_status(
        client2.recommend(recommend(&["a"])).await,
        Code::Unavailable,
        "the recommendations database is unavailable; retry shortly",
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        operator
            .channel_with_identity(&again.target(), &identity("recommendations"))
            .unwrap(),
    );
    let status = async |health: &mut tonic_health::pb::health_client::HealthClient<MeshChannel>| {
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    };
    let started = Instant::now();
    while status(&mut health).await != ServingStatus::NotServing {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still SERVING without its database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let started = Instant::now();
    while status(&mut health).await != ServingStatus::Serving {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "back to SERVING {:?} after the database was",
        started.elapsed()
    );
    let answer = client2
        .recommend(recommend(&["a", "b"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.product_ids, ["c"]);
}

/// The gateway in front of `shop`, asking `recs` for recommendations with
/// its defaults (50 ms budget) and the mesh config the shop gives it
/// (no retries, 50 ms deadline), generous rate limits for the test's
/// many calls. Returns the process and its admin address.
fn gateway_for(shop: &Shop, recs_target: &str, env: &[(String, String)]) -> (Proc, SocketAddr) {
    let pki = shop.pki.as_ref().expect("the shop runs mTLS");
    let config = shop.dir.path().join("gateway.mesh.json");
    std::fs::write(
        &config,
        serde_json::json!({ "targets": { recs_target: {
            "timeout": "50ms", "maxTimeout": "50ms",
            "retryPolicy": { "maxAttempts": 1 } } } })
        .to_string(),
    )
    .unwrap();
    let (addr, admin) = (free_addr(), free_addr());
    let args: Vec<String> = [
        "--tls-dir",
        &pki.issue("gateway").display().to_string(),
        "--trust-domain",
        common::TRUST_DOMAIN,
        "--mesh-config",
        &config.display().to_string(),
        "--auth-target",
        &format!("static:///{}", shop.auth.addr),
        "--inventory-target",
        &format!("static:///{}", shop.inventory.addr),
        "--orders-target",
        &format!("static:///{}", shop.orders.addr),
        "--payments-target",
        &format!("static:///{}", shop.payments.addr),
        "--recommendations-target",
        recs_target,
        "--rate-limit-per-second",
        "100000",
        "--rate-limit-burst",
        "100000",
        "--max-calls-in-flight-per-client",
        "100000",
        "--admin-addr",
        &admin.to_string(),
    ]
    .map(str::to_owned)
    .into();
    (Proc::spawn_env("gateway", addr, &args, env), admin)
}

fn recommend_through(token: &str, products: &[&str]) -> tonic::Request<RecommendRequest> {
    let mut request = authed(
        token,
        RecommendRequest {
            // Whatever a caller claims, the gateway asks for the token's user.
            user_id: "someone-else".into(),
            product_ids: products.iter().map(|p| p.to_string()).collect(),
            max_results: 0,
        },
    );
    request.set_timeout(Duration::from_secs(10));
    request
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Parses OpenMetrics text with the Python reference parser
/// (`prometheus_client.openmetrics.parser`) into `(name, labels, value)`.
fn parse_with_reference(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
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
    assert!(
        output.status.success(),
        "the reference parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The sum of the samples named `name` whose labels include `want`.
fn sum(
    samples: &[(String, HashMap<String, String>, f64)],
    name: &str,
    want: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_degrades_when_recommendations_is_killed_hung_slow_or_failing() {
    if !python_ready(false) {
        return;
    }
    let shop = Shop::start_mtls().await;
    let pki = shop.pki.as_ref().unwrap();
    let mut recs = Recs::start(shop.dir.path(), pki, None, &[]);
    wait_ready(&shop.mesh, &recs.target()).await;
    teach(&shop.mesh, &recs.target()).await;
    let (gateway, gateway_admin) = gateway_for(&shop, &recs.target(), &[]);
    common::wait_serving(gateway.addr).await;
    let gw = common::channel(gateway.addr).await;
    let (_, token) = common::gateway_login(&gw, "degrader").await;
    let mut through = RecommendationsServiceClient::new(gw.clone());

    // Each phase: sequential user calls; every one must succeed.
    let mut fallbacks = 0u32;
    let mut report = Vec::new();
    let phase =
        async |name: &str,
               calls: usize,
               through: &mut RecommendationsServiceClient<tonic::transport::Channel>| {
            let mut latencies = Vec::new();
            let mut fell_back = 0;
            let mut answered = 0;
            for _ in 0..calls {
                let started = Instant::now();
                let answer = through
                    .recommend(recommend_through(&token, &["a"]))
                    .await
                    .unwrap_or_else(|e| panic!("{name}: a user call failed: {e:?}"))
                    .into_inner();
                latencies.push(started.elapsed());
                if answer.fallback {
                    assert!(answer.product_ids.is_empty());
                    fell_back += 1;
                } else {
                    assert_eq!(answer.product_ids, ["b", "c"], "{name}");
                    answered += 1;
                }
            }
            latencies.sort();
            let line = format!(
                "{name:<22} calls {calls:>3}  answered {answered:>3}  fallback {fell_back:>3}  p50 {:>7.1?}  p99 {:>7.1?}  max {:>7.1?}",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                latencies.last().unwrap()
            );
            println!("{line}");
            (fell_back, answered, line, *latencies.last().unwrap())
        };

    // Between faults: heal, and wait (bounded) until it answers again, so
    // each fault starts from a closed breaker and a ready endpoint.
    // Returns the fallbacks met on the way.
    let recover =
        async |what: &str,
               through: &mut RecommendationsServiceClient<tonic::transport::Channel>| {
            let started = Instant::now();
            let mut fell_back = 0;
            loop {
                let answer = through
                    .recommend(recommend_through(&token, &["a"]))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("a user call failed while recovering from {what}: {e:?}")
                    })
                    .into_inner();
                if !answer.fallback {
                    println!("recovered from {what} within {:?}", started.elapsed());
                    return fell_back;
                }
                fell_back += 1;
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "recommendations never came back after {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };

    let (f, answered, line, _) = phase("healthy", 100, &mut through).await;
    fallbacks += f;
    report.push(line);
    assert!(
        answered > 0,
        "no call was answered with recommendations while healthy"
    );

    recs.fault(r#"{"delayMs": 200}"#);
    let (f, answered, line, worst) = phase("slow (+200 ms)", 60, &mut through).await;
    fallbacks += f;
    report.push(line);
    assert_eq!(
        answered, 0,
        "a 200 ms answer came back within a 50 ms budget"
    );
    // Never as slow as the fault: the budget bounds the wait (generous
    // margin for a busy machine; the numbers are printed above).
    assert!(
        worst < Duration::from_secs(2),
        "a user call waited {worst:?}"
    );

    recs.fault("{}");
    fallbacks += recover("the slow fault", &mut through).await;

    for code in ["UNAVAILABLE", "INTERNAL"] {
        recs.fault(&format!(r#"{{"error": "{code}"}}"#));
        let (f, answered, line, _) = phase(&format!("errors ({code})"), 30, &mut through).await;
        fallbacks += f;
        report.push(line);
        assert_eq!(answered, 0);
        recs.fault("{}");
        fallbacks += recover(code, &mut through).await;
    }

    kill(recs.proc.pid(), Signal::SIGSTOP).unwrap();
    let (f, answered, line, worst) = phase("hung (SIGSTOP)", 60, &mut through).await;
    fallbacks += f;
    report.push(line);
    assert_eq!(answered, 0);
    assert!(
        worst < Duration::from_secs(2),
        "a user call waited {worst:?}"
    );
    kill(recs.proc.pid(), Signal::SIGCONT).unwrap();
    // It comes back by itself: answers again without a restart of anyone
    // (after the breaker's probe, and the mesh re-admitting the endpoint
    // if it ejected it).
    fallbacks += recover("SIGSTOP", &mut through).await;

    recs.proc.kill();
    let (f, answered, line, worst) = phase("killed (SIGKILL)", 60, &mut through).await;
    fallbacks += f;
    report.push(line);
    assert_eq!(answered, 0);
    assert!(
        worst < Duration::from_secs(2),
        "a user call waited {worst:?}"
    );

    // Every fallback answer was counted once, by reason, at the gateway.
    let (status, text) = http_get(gateway_admin, "/metrics").await;
    assert_eq!(status, 200);
    let samples = parse_with_reference(&text);
    let peer = [
        ("peer", "recommendations"),
        (
            "rpc_service",
            "mesh.recommendations.v1.RecommendationsService",
        ),
        ("rpc_method", "Recommend"),
    ];
    let counted = sum(&samples, "mesh_fallbacks_total", &peer);
    let by_reason: Vec<(&str, f64)> = ["deadline", "unavailable", "error", "open"]
        .into_iter()
        .map(|r| {
            let mut want = peer.to_vec();
            want.push(("reason", r));
            (r, sum(&samples, "mesh_fallbacks_total", &want))
        })
        .collect();
    println!("fallbacks answered {fallbacks}, counted {counted} {by_reason:?}");
    assert_eq!(counted, f64::from(fallbacks));
    // Each fault's first calls met it (and were counted by its reason);
    // then the breaker spared the rest the budget.
    for (reason, n) in &by_reason {
        assert!(*n > 0.0, "no fallback for {reason}: {by_reason:?}");
    }
    // (The breaker opens before the mesh sees enough failures in a row to
    // eject the endpoint; printed for the record.)
    let ejections = sum(
        &samples,
        "mesh_endpoint_ejections_total",
        &[("peer", "recommendations")],
    );
    println!("ejections of recommendations' endpoint: {ejections}");
    // No retries of an optional dependency: its trouble is not amplified.
    assert_eq!(
        sum(
            &samples,
            "mesh_retries_total",
            &[("peer", "recommendations")]
        ),
        0.0
    );
    assert_eq!(
        sum(
            &samples,
            "mesh_hedges_total",
            &[("peer", "recommendations")]
        ),
        0.0
    );
    println!("{}", report.join("\n"));
}

use common::otlp::{Collector, Received};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const SERVER: SpanKind = SpanKind::Server;
const CLIENT: SpanKind = SpanKind::Client;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_rust_and_python_and_metrics_with_the_rust_names() {
    if !python_ready(false) {
        return;
    }
    let (collector, otlp) = Collector::start().await;
    let otel: Vec<(String, String)> = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://{otlp}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let mut shop = Shop::start_opts(
        &Db::Sqlite,
        common::ShopOptions {
            tls: true,
            env: otel.clone(),
        },
    )
    .await;
    let recs = Recs::start(shop.dir.path(), shop.pki.as_ref().unwrap(), None, &otel);
    wait_ready(&shop.mesh, &recs.target()).await;
    // Orders tells recommendations about confirmed orders.
    shop.args
        .get_mut("orders")
        .unwrap()
        .extend(["--recommendations-target".into(), recs.target()]);
    shop.restore("orders").await;

    // Rust (the test, then orders) → Python: a confirmed order's
    // RecordOrder is in PlaceOrder's trace.
    let (token, product, account) = shop.customer("tracy").await;
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
    let (record, spans) = collector
        .wait_for("recommendations RecordOrder", |s| {
            s.service == "recommendations"
                && s.kind == SERVER
                && s.name == "mesh.recommendations.v1.RecommendationsService/RecordOrder"
        })
        .await;
    assert_eq!(
        record.trace_id, trace_id,
        "RecordOrder continues PlaceOrder's trace"
    );
    assert_eq!(record.attributes["rpc.system"], "grpc");
    assert_eq!(record.attributes["rpc.method"], "RecordOrder");
    assert_eq!(record.attributes["rpc.grpc.status_code"], "0");
    assert_eq!(record.attributes["client.identity"], identity("orders"));
    let by_id: HashMap<&[u8], &Received> = spans.iter().map(|s| (&s.span_id[..], s)).collect();
    let caller = by_id
        .get(&record.parent[..])
        .unwrap_or_else(|| panic!("RecordOrder's parent was not exported: {spans:#?}"));
    assert_eq!((caller.service.as_str(), caller.kind), ("orders", CLIENT));
    assert_eq!(caller.attributes["mesh.peer"], "recommendations");
    let place = spans
        .iter()
        .find(|s| s.service == "orders" && s.kind == SERVER && s.name.ends_with("/PlaceOrder"))
        .expect("PlaceOrder's server span");
    assert_eq!(place.parent, root);
    println!(
        "trace {}: {} spans from {:?}",
        hex(&trace_id),
        spans.len(),
        spans
            .iter()
            .map(|s| s.service.as_str())
            .collect::<HashSet<_>>()
    );
    wait_confirmed(&mut orders, &token, &placed.order_id).await;

    // Learning from confirmed orders: one order of two products, and each
    // is recommended with the other.
    let second = shop
        .inventory()
        .await
        .create_product(shop_api::inventory::v1::CreateProductRequest {
            sku: "SKU-tracy-2".into(),
            name: "the other product".into(),
            price: Some(shop_api::common::v1::Money {
                currency_code: "USD".into(),
                amount_minor: 100,
            }),
            initial_stock: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .product_id;
    let mut pair = common::place_request(&token, &product, &account, "pair-1".into());
    pair.get_mut()
        .items
        .push(shop_api::orders::v1::PlaceOrderItem {
            product_id: second.clone(),
            quantity: 1,
        });
    let paired = orders.place_order(pair).await.unwrap().into_inner();
    wait_confirmed(&mut orders, &token, &paired.order_id).await;

    // Rust gateway → Python: Recommend's server span in Python is the
    // child of the gateway's client span, in the gateway's trace.
    let (gateway, gateway_admin) = gateway_for(&shop, &recs.target(), &otel);
    common::wait_serving(gateway.addr).await;
    let gw = common::channel(gateway.addr).await;
    let (user_id, token) = common::gateway_login(&gw, "viewer").await;
    let mut through = RecommendationsServiceClient::new(gw.clone());
    // Answered (not a fallback) at least once; a busy machine may make a
    // first call miss the 50 ms budget, and orders tells recommendations
    // in the background, so the pair may take a moment to be learned.
    let mut answered = 0;
    let mut fell_back = 0;
    let started = Instant::now();
    while answered < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the confirmed pair was never recommended ({answered} answered, {fell_back} fell back)"
        );
        let answer = through
            .recommend(recommend_through(&token, &[&product]))
            .await
            .unwrap()
            .into_inner();
        if answer.fallback {
            fell_back += 1;
        } else if answer.product_ids == [second.clone()] {
            answered += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (served, spans) = collector
        .wait_for("recommendations Recommend", |s| {
            s.service == "recommendations"
                && s.kind == SERVER
                && s.name == "mesh.recommendations.v1.RecommendationsService/Recommend"
                && s.attributes.get("rpc.grpc.status_code").map(String::as_str) == Some("0")
        })
        .await;
    assert_eq!(served.attributes["client.identity"], identity("gateway"));
    let by_id: HashMap<&[u8], &Received> = spans.iter().map(|s| (&s.span_id[..], s)).collect();
    let caller = by_id
        .get(&served.parent[..])
        .unwrap_or_else(|| panic!("Recommend's parent was not exported: {spans:#?}"));
    assert_eq!((caller.service.as_str(), caller.kind), ("gateway", CLIENT));
    let edge = by_id
        .get(&caller.parent[..])
        .expect("the gateway's client span sits in its server span");
    assert_eq!((edge.service.as_str(), edge.kind), ("gateway", SERVER));

    // Golden metrics: the reference parser reads Python's; names, types,
    // units and label names are the Rust services' own; the counts agree
    // on both sides of the call.
    let python_text = recs.metrics().await;
    let (_, rust_text) = http_get(gateway_admin, "/metrics").await;
    let python = parse_with_reference(&python_text);
    let rust = parse_with_reference(&rust_text);
    let meta = |text: &str, family: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with('#') && l.split(' ').nth(2) == Some(family))
            .map(str::to_owned)
            .collect()
    };
    for family in [
        "mesh_requests",
        "mesh_responses",
        "mesh_response_latency_seconds",
        "mesh_in_flight_requests",
        "mesh_process_info",
        "mesh_certificate_expiry_timestamp_seconds",
    ] {
        let (p, r) = (meta(&python_text, family), meta(&rust_text, family));
        assert!(!p.is_empty(), "Python has no {family}");
        assert_eq!(p, r, "{family}: HELP/TYPE/UNIT differ");
    }
    let label_names =
        |samples: &[(String, HashMap<String, String>, f64)], name: &str, direction: &str| {
            samples
                .iter()
                .filter(|(n, l, _)| {
                    n == name && l.get("direction").map(String::as_str) == Some(direction)
                })
                .map(|(_, l, _)| {
                    let mut keys: Vec<String> = l.keys().cloned().collect();
                    keys.sort();
                    keys
                })
                .collect::<HashSet<_>>()
        };
    for name in [
        "mesh_requests_total",
        "mesh_responses_total",
        "mesh_response_latency_seconds_bucket",
        "mesh_in_flight_requests",
    ] {
        let (p, r) = (
            label_names(&python, name, "inbound"),
            label_names(&rust, name, "inbound"),
        );
        assert!(!p.is_empty() && !r.is_empty(), "{name} missing");
        assert_eq!(p, r, "{name}: label names differ");
    }
    let method = [
        (
            "rpc_service",
            "mesh.recommendations.v1.RecommendationsService",
        ),
        ("rpc_method", "Recommend"),
    ];
    let python_ok = sum(
        &python,
        "mesh_responses_total",
        &[
            &method[..],
            &[
                ("direction", "inbound"),
                ("peer", &identity("gateway")),
                ("grpc_code", "OK"),
            ],
        ]
        .concat(),
    );
    let rust_ok = sum(
        &rust,
        "mesh_responses_total",
        &[
            &method[..],
            &[
                ("direction", "outbound"),
                ("peer", "recommendations"),
                ("grpc_code", "OK"),
            ],
        ]
        .concat(),
    );
    println!(
        "Recommend through the gateway: {answered} answered, {fell_back} fell back; OK seen by Python {python_ok}, by the gateway {rust_ok}"
    );
    assert!(
        python_ok >= f64::from(answered),
        "Python counted {python_ok} OK for {answered} answers"
    );
    assert_eq!(
        sum(
            &python,
            "mesh_response_latency_seconds_count",
            &[&method[..], &[("direction", "inbound")]].concat()
        ),
        sum(
            &python,
            "mesh_requests_total",
            &[&method[..], &[("direction", "inbound")]].concat()
        ),
    );
    assert_eq!(
        sum(
            &python,
            "mesh_in_flight_requests",
            &[("direction", "inbound"), ("rpc_method", "Recommend")]
        ),
        0.0
    );
    assert!(python.iter().any(|(n, l, v)| n == "mesh_process_info"
        && l.get("service").map(String::as_str) == Some("recommendations")
        && l.get("identity").map(String::as_str) == Some(identity("recommendations").as_str())
        && *v == 1.0));
    // The confirmed orders reached it (orders → RecordOrder, OK once each).
    assert_eq!(
        sum(
            &python,
            "mesh_responses_total",
            &[
                ("rpc_method", "RecordOrder"),
                ("peer", &identity("orders")),
                ("grpc_code", "OK")
            ]
        ),
        2.0
    );
    let _ = user_id;
}

#[test]
fn bad_configuration_exits_64_naming_every_problem() {
    if !python_ready(false) {
        return;
    }
    let out = Command::new("python3")
        .args(["-m", "recommendations"])
        .current_dir(service_dir())
        .args([
            "--drain-grace-ms",
            "soon",
            "--database-url",
            "mysql://x",
            "--listen",
            "nowhere",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for problem in [
        "--drain-grace-ms: must be a whole number, got 'soon'",
        "--database-url: 'mysql://x' is neither sqlite://PATH nor postgres://...",
        "--listen: 'nowhere' is not host:port",
    ] {
        assert!(stderr.contains(problem), "{problem:?} not in {stderr}");
    }
}

/// Waits (bounded) until the order is CONFIRMED.
async fn wait_confirmed(
    orders: &mut shop_api::orders::v1::orders_service_client::OrdersServiceClient<MeshChannel>,
    token: &str,
    order_id: &str,
) {
    use shop_api::orders::v1::{GetOrderRequest, OrderStatus};
    let started = Instant::now();
    loop {
        let status = orders
            .get_order(authed(
                token,
                GetOrderRequest {
                    order_id: order_id.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == OrderStatus::Confirmed {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "order stuck in {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Health watches never end, gRPC Python counts them against its limit of
/// calls at once, and health is open to every caller: one workload with no
/// grant here, watching on many streams, must not take every place. It
/// gets a quarter of them, and the gateway's calls still find one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_health_watches_cannot_take_every_call_place() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    if !python_ready(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("certs"));
    let recs = Recs::start(
        dir.path(),
        &pki,
        None,
        &[("MAX_CONCURRENT_CALLS".into(), "8".into())],
    );
    // No mesh here watches health on its own, so every watch is one the
    // test opens (a watch of the operator's would hold a place).
    let quiet = || MeshConfig::from_json(r#"{"healthChecks": false}"#).unwrap();
    let operator = mesh_as(&pki, "operator", quiet());
    wait_ready(&operator, &recs.target()).await;
    let inventory = mesh_as(&pki, "inventory", quiet());
    let channel = inventory
        .channel_with_identity(&recs.target(), &identity("recommendations"))
        .unwrap();
    let mut watches = Vec::new();
    for _ in 0..8 {
        let watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        match watch {
            Ok(stream) => watches.push(stream),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("too many health watches"), "{s:?}");
            }
        }
    }
    assert_eq!(watches.len(), 2, "a quarter of the 8 places");
    let gateway = mesh_as(&pki, "gateway", MeshConfig::default());
    let mut recs_client = client(
        gateway
            .channel_with_identity(&recs.target(), &identity("recommendations"))
            .unwrap(),
    );
    recs_client
        .recommend(recommend(&["a"]))
        .await
        .expect("the gateway's call finds a place");
    drop(watches);
}

/// The Python service refuses every caller and method pattern mesh-client
/// refuses (the lists of `authz.rs`' tests), so a policy file means the
/// same in both: a prefix cut inside a segment (`spiffe://shop.local*`
/// also matches `shop.local.evil`) or a `*` that is not at the end.
#[test]
fn python_refuses_the_patterns_mesh_client_refuses() {
    if !python_ready(false) {
        return;
    }
    let cases = serde_json::json!([
        ["callers", "spiffe://shop.local*"],
        ["callers", "spiffe://shop.local/ns/shop/sa/orders*"],
        ["callers", "spiffe://*"],
        ["callers", "spiffe:///*"],
        ["callers", "spiffe://shop.local/*/sa/*"],
        ["callers", "spiffe://shop.local//*"],
        ["methods", "shop.*/Get"],
        ["methods", "*/Get"],
        ["methods", "shop.Orders/G*t"],
        ["methods", "shop.Orders/**"],
        ["methods", "/x"],
    ]);
    const SCRIPT: &str = r#"
import json, sys
from recommendations.policy import Policy, PolicyError
def policy(callers, methods):
    return json.dumps({"authorization": {"rules": [{"callers": callers, "methods": methods}]}})
for field, pattern in json.loads(sys.argv[1]):
    rule = {"callers": ["*"], "methods": ["*"]}
    rule[field] = [pattern]
    try:
        Policy.parse(policy(rule["callers"], rule["methods"]))
    except PolicyError as e:
        assert f"rules[0].{field}[0]" in str(e), (pattern, str(e))
    else:
        sys.exit(f"{field} {pattern!r} was accepted")
good = Policy.parse(policy(["spiffe://shop.local/ns/shop/*"], ["p.S/Get*"]))
assert good.allows("spiffe://shop.local/ns/shop/sa/orders", "p.S/GetOrder")
assert not good.allows("spiffe://shop.local/ns/shop-evil/sa/x", "p.S/GetOrder")
assert not good.allows("spiffe://shop.local/ns/shop/sa/orders", "p.S/PutOrder")
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &cases.to_string()])
        .current_dir(service_dir())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
