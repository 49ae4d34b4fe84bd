//! `shopctl up` as a user runs it: real processes, mTLS, SQLite. It keeps
//! the shop up (a SIGKILLed replica is restarted while its peer serves, and
//! the restart shows in `shopctl top`), keeps its state private, and
//! refuses to expose the shop by accident.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{bin, up::Up};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;
use shop_api::inventory::v1::{
    CreateProductRequest, GetProductRequest, ListProductsRequest,
    inventory_service_client::InventoryServiceClient,
};

const REPLICAS: u16 = 2;
/// Ports each of the gRPC and admin blocks needs: 6 services × replicas,
/// then the identity service.
const SPAN: u16 = 6 * REPLICAS + 1;

/// A base port with `2 * SPAN` free ports from it (gRPC, then admin), in
/// 12000..20000 (tests/browser.rs takes 8100..12000).
fn free_block() -> u16 {
    common::up::free_port_block(12_000, 20_000, 2 * SPAN)
}

fn status(state: &Path) -> Value {
    std::fs::read_to_string(state.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn process<'a>(status: &'a Value, service: &str, replica: u64) -> &'a Value {
    status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == service && p["replica"] == replica)
        .unwrap_or_else(|| panic!("{service}[{replica}] is not in status.json: {status}"))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_restarts_a_killed_replica_while_its_peer_serves_every_read() {
    tokio::time::timeout(Duration::from_secs(300), restart_under_traffic())
        .await
        .expect("the test took more than 300 s");
}

/// Starts `shopctl up` in `dir/state` on a free block of ports with
/// `extra` flags and waits until it has written endpoints.json.
async fn start_up(dir: &Path, extra: &[&str]) -> (Up, PathBuf) {
    let base = free_block();
    let mut args = vec![
        "--base-port".to_string(),
        base.to_string(),
        "--admin-base-port".into(),
        (base + SPAN).to_string(),
        // The web apps have fixed default ports that parallel runs would
        // fight over; tests/browser.rs covers them.
        "--storefront-port".into(),
        "0".into(),
        "--dashboard-port".into(),
        "0".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let up = Up::start(dir, &args).await;
    let endpoints_path = up.endpoints_path();
    (up, endpoints_path)
}

/// SIGTERM drains everything: exit 0, no service process left.
async fn stop_up(up: Up) {
    up.stop().await
}

async fn restart_under_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (up, endpoints_path) = start_up(dir.path(), &["--replicas", &REPLICAS.to_string()]).await;
    let state = up.state.clone();
    let endpoints: Value =
        serde_json::from_str(&std::fs::read_to_string(&endpoints_path).unwrap()).unwrap();
    let inventory = &endpoints["services"]["inventory"];
    assert_eq!(inventory["replicas"].as_array().unwrap().len(), 2);
    let replica_addrs: Vec<String> = inventory["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        inventory["target"],
        format!("static:///{}", replica_addrs.join(",")),
        "callers balance over every replica"
    );

    // The operator stocks the shop, inside the mesh, with the certificate
    // shopctl issued.
    let tls = &endpoints["tls"];
    let operator = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
        .unwrap()
        .with_tls(
            mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(
                Path::new(tls["cert"].as_str().unwrap()).parent().unwrap(),
            ))
            .unwrap(),
        );
    let inventory_identity = inventory["identity"].as_str().unwrap().to_owned();
    let operator_channel = |target: &str| {
        operator
            .channel_with_identity(target, &inventory_identity)
            .unwrap()
    };
    let product =
        InventoryServiceClient::new(operator_channel(inventory["target"].as_str().unwrap()))
            .create_product(CreateProductRequest {
                sku: "MUG-1".into(),
                name: "Mug".into(),
                price: Some(shop_api::common::v1::Money {
                    currency_code: "USD".into(),
                    amount_minor: 1250,
                }),
                initial_stock: 10,
            })
            .await
            .expect("CreateProduct as the operator")
            .into_inner();

    // Users read products through the gateway, all the while.
    let gateway = endpoints["services"]["gateway"]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let id = product.product_id.clone();
        tokio::spawn(async move {
            let mut client =
                InventoryServiceClient::new(common::channel(gateway.parse().unwrap()).await);
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: at most 4 000 calls (5 min), or until told to stop.
            for i in 0..4_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let result = if i % 2 == 0 {
                    let mut request = tonic::Request::new(GetProductRequest {
                        product_id: id.clone(),
                    });
                    request.set_timeout(Duration::from_secs(10));
                    client.get_product(request).await.map(|_| ())
                } else {
                    let mut request = tonic::Request::new(ListProductsRequest::default());
                    request.set_timeout(Duration::from_secs(10));
                    client.list_products(request).await.map(|_| ())
                };
                match result {
                    Ok(()) => ok += 1,
                    Err(status) => failed.push(status.to_string()),
                }
                // Under the gateway's per-address limit (20/s, burst 40).
                tokio::time::sleep(Duration::from_millis(75)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGKILL one inventory replica.
    let before = status(&state);
    let victim = process(&before, "inventory", 0);
    let peer_pid = process(&before, "inventory", 1)["pid"].as_i64().unwrap();
    let old_pid = victim["pid"].as_i64().unwrap() as i32;
    assert_eq!(victim["restarts"], 0);
    nix::sys::signal::kill(Pid::from_raw(old_pid), Signal::SIGKILL).unwrap();

    // The supervisor restarts it: a new pid, counted, serving again.
    let start = Instant::now();
    let (new_pid, restarted_after) = loop {
        let now = status(&state);
        if !now.is_null() {
            let p = process(&now, "inventory", 0);
            if p["state"] == "running" && p["pid"].as_i64().is_some_and(|pid| pid as i32 != old_pid)
            {
                assert_eq!(p["restarts"], 1, "{now}");
                assert!(
                    p["last_exit"].as_str().unwrap().contains("SIGKILL"),
                    "{now}"
                );
                break (p["pid"].as_i64().unwrap(), start.elapsed());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "inventory[0] was not restarted in 60 s:\n{}",
            up.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    common::wait_serving_on(operator_channel(&format!("static:///{}", replica_addrs[0]))).await;
    let again =
        InventoryServiceClient::new(operator_channel(&format!("static:///{}", replica_addrs[0])))
            .get_product(GetProductRequest {
                product_id: product.product_id.clone(),
            })
            .await
            .expect("the restarted replica serves");
    assert_eq!(again.into_inner().sku, "MUG-1");
    // Its peer was never touched.
    assert_eq!(
        process(&status(&state), "inventory", 1)["pid"].as_i64(),
        Some(peer_pid)
    );
    assert_ne!(new_pid as i32, old_pid);

    // Reads go on a little longer over both replicas, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = reader.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} reads failed (idempotent reads are retried on the other replica): {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 20, "only {ok} reads ran");
    eprintln!(
        "{ok} reads through the gateway, none failed; inventory[0] restarted as pid {new_pid} \
         {:.1} s after its SIGKILL",
        restarted_after.as_secs_f64()
    );

    // `shopctl top` shows the restart.
    let top = Command::new(bin("shopctl"))
        .args([
            "top",
            "--once",
            "--json",
            "--interval",
            "0.5",
            "--endpoints",
        ])
        .arg(&endpoints_path)
        .output()
        .unwrap();
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let view: Value = serde_json::from_slice(&top.stdout).unwrap();
    let restarted = process(&view, "inventory", 0);
    assert_eq!(restarted["restarts"], 1, "{view}");
    assert_eq!(restarted["pid"].as_i64(), Some(new_pid));
    assert_eq!(
        view["processes"].as_array().unwrap().len(),
        usize::from(SPAN)
    );

    // Private state: the directory 0700, databases, endpoints, status,
    // policies and private keys 0600.
    assert_eq!(mode(&state), 0o700);
    let mut private = vec![
        state.join("endpoints.json"),
        state.join("status.json"),
        state.join("mesh/inventory.json"),
        state.join("certs/ca/ca.key"),
        state.join("certs/operator/tls.key"),
    ];
    for name in ["auth", "inventory", "payments", "orders", "recommendations"] {
        private.push(state.join(format!("{name}.db")));
        private.push(state.join(format!("{name}.db-wal")));
    }
    for path in private {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }

    assert!(up.log().contains("restarted inventory-1"), "{}", up.log());
    stop_up(up).await;
}
/// Exposing the shop takes an explicit flag, and plaintext never leaves
/// loopback: both refused with exit code 64 and a message saying why,
/// before anything is started or written.
#[test]
fn up_refuses_non_loopback_hosts_unless_asked_and_plaintext_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = |extra: &[&str]| {
        Command::new(bin("shopctl"))
            .arg("up")
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for (args, says) in [
        (&["--host", "0.0.0.0"][..], "--allow-non-loopback"),
        (&["--host", "192.0.2.1"][..], "not a loopback address"),
        (
            &["--host", "0.0.0.0", "--plaintext", "--allow-non-loopback"][..],
            "--plaintext is loopback only",
        ),
        (&["--base-port", "65533"][..], "--base-port 65533"),
        (
            &["--base-port", "9000", "--admin-base-port", "9003"][..],
            "overlap",
        ),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!state.exists(), "{args:?} created the state directory");
    }
    let out = run(&["--replicas", "9"]);
    assert!(!out.status.success(), "--replicas 9 was accepted");
}

/// Plaintext has no identities, so `shopctl up --plaintext` writes no
/// authorization policy at all (and removes one a TLS run left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_up_writes_no_authorization_policy() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("state/mesh/payments.json");
        std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
        std::fs::write(&stale, r#"{"authorization":{"mode":"enforce","rules":[]}}"#).unwrap();
        let (up, endpoints_path) = start_up(dir.path(), &["--plaintext"]).await;
        let endpoints: Value =
            serde_json::from_str(&std::fs::read_to_string(&endpoints_path).unwrap()).unwrap();
        assert!(endpoints["tls"].is_null());
        assert!(
            !up.state.join("mesh").exists(),
            "a policy directory is left"
        );
        for pid in up.pids() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !cmdline.contains("--mesh-config") && !cmdline.contains("--tls-dir"),
                "{cmdline}"
            );
        }
        assert!(up.log().contains("no authorization policy"), "{}", up.log());
        stop_up(up).await;
    })
    .await
    .expect("the test took more than 240 s");
}

/// Processes whose command line names `dir` (the services of one test's
/// `shopctl up`, whose database and certificate paths are under it).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && cmdline.contains(" serve ") {
            found.push(cmdline);
        }
    }
    found
}

/// SIGTERM while the shop is still starting drains what was started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_stops_what_was_started() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let base = free_block();
    let mut child = Command::new(bin("shopctl"))
        .arg("up")
        .arg("--state-dir")
        .arg(&state)
        .args(["--base-port", &base.to_string()])
        .args(["--admin-base-port", &(base + SPAN).to_string()])
        .args(["--storefront-port", "0", "--dashboard-port", "0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first service process runs, then stop mid-start.
    let start = Instant::now();
    while processes_under(&state).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "shopctl up exited");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing started in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("shopctl up did not stop in 60 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
    let left = processes_under(&state);
    assert!(left.is_empty(), "left running: {left:?}");
}
