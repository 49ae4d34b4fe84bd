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
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{
    Db, Proc, Shop, TestPki, authed, free_addr, http_get, identity, shop_policy, skip_or_fail,
};
use mesh_client::{Mesh, MeshConfig, MeshChannel};
use nix::sys::signal::{Signal, kill};
use shop_api::recommendations::v1::{
    RecommendRequest, RecordOrderRequest,
    recommendations_service_client::RecommendationsServiceClient,
};
use tonic::Code;

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
    for _ in 0..40 {
        let answer = recs.recommend(recommend(&["a"])).await.unwrap().into_inner();
        assert_eq!(answer.product_ids, ["b", "c"], "best first, the cart excluded");
        assert!(!answer.fallback, "the service never sets fallback");
    }
    let (on_a, on_b) = (
        inbound_recommends(&a.metrics().await),
        inbound_recommends(&b.metrics().await),
    );
    println!("P2C over two Python replicas: {on_a} and {on_b} of 40 calls");
    assert_eq!(on_a + on_b, 40.0);
    assert!(on_a > 0.0 && on_b > 0.0, "both replicas served: {on_a} / {on_b}");

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
    assert!(took < Duration::from_secs(3), "the deadline did not bound the call: {took:?}");
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
    let mut anonymous = client(plain.channel(&format!("static:///{}", a.proc.addr)).unwrap());
    assert!(anonymous.recommend(recommend(&["a"])).await.is_err());

    // Health watch and drain: SIGTERM one replica while calling; it goes
    // NOT_SERVING, the mesh stops choosing it, no call fails, it exits 0.
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
    let code = a.proc.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "a drained process exits 0");
    let (n, failures) = calls.await.unwrap();
    println!("{n} calls while one replica drained, {} failed", failures.len());
    assert!(failures.is_empty(), "calls failed during the drain: {failures:?}");
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
    let answer = client.recommend(recommend(&["b"])).await.unwrap().into_inner();
    assert_eq!(answer.product_ids, ["a"]);
    // A second process on the same database sees what the first learned.
    drop(recs);
    let again = Recs::start(dir.path(), &pki, Some(url), &[]);
    wait_ready(&operator, &again.target()).await;
    let mut client2 = self::client(
        operator
            .channel_with_identity(&again.target(), &identity("recommendations"))
            .unwrap(),
    );
    let answer = client2.recommend(recommend(&["a", "b"])).await.unwrap().into_inner();
    assert_eq!(answer.product_ids, ["c"]);
}
