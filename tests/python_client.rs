//! A client generated from proto/ in another language (Python, with
//! grpcio-tools) runs the shop flow against the real services.

mod common;

use std::{path::Path, process::Command};

use common::{Db, Shop, skip_or_fail};

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn python_generated_client_runs_the_shop_flow() {
    if !python_has_grpc() {
        skip_or_fail(
            "python3 with grpcio and grpcio-tools is not installed (pip install grpcio grpcio-tools)",
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let mut protos = Vec::new();
    for service in ["common", "auth", "inventory", "payments", "orders"] {
        let dir = root.join("proto/mesh").join(service).join("v1");
        for entry in std::fs::read_dir(&dir).unwrap() {
            protos.push(entry.unwrap().path());
        }
    }
    let generated = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", root.join("proto").display()))
        .arg(format!("--python_out={}", out.path().display()))
        .arg(format!("--grpc_python_out={}", out.path().display()))
        .args(&protos)
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );

    let shop = Shop::start(&Db::Sqlite).await;
    let script = root.join("tests/python/shop_flow.py");
    let addrs = [
        shop.auth.addr,
        shop.inventory.addr,
        shop.payments.addr,
        shop.orders.addr,
    ]
    .map(|a| a.to_string());
    let run = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(&addrs)
            .env("PYTHONPATH", out.path())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("CONFIRMED"), "{stdout}");
}
