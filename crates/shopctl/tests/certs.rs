//! `shopctl certs` makes a dev CA (key private) and SPIFFE workload
//! certificates, and never Kubernetes Secrets of workload keys.

use std::process::Command;

#[test]
fn certs_writes_private_ca_and_spiffe_certificates_but_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = Command::new(env!("CARGO_BIN_EXE_shopctl"))
        .arg("certs")
        .arg("--out")
        .arg(&out)
        .args([
            "--trust-domain",
            "shop.example",
            "--dns",
            "shop.example.com",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("spiffe://shop.example/ns/shop/sa/payments"),
        "{stdout}"
    );

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out.join("ca/ca.key")), 0o600);
    assert_eq!(mode(&out.join("orders/tls.key")), 0o600);

    // The certificate is usable by the mesh, names the workload, and is short-lived.
    let pem = std::fs::read(out.join("orders/tls.crt")).unwrap();
    let expires = mesh_client::tls::certificate_expiry(&pem).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left <= std::time::Duration::from_secs(24 * 3600)
            && left > std::time::Duration::from_secs(23 * 3600)
    );
    let text = String::from_utf8_lossy(&pem).to_string();
    assert!(text.starts_with("-----BEGIN CERTIFICATE-----"));

    assert!(
        !out.join("operator").exists(),
        "no operator certificate unless asked"
    );
    // Workload keys never go into Secrets: in a cluster they live in
    // memory (or the identity agent's memory emptyDir).
    let secrets = dir.path().join("secrets.yaml");
    let refused = Command::new(env!("CARGO_BIN_EXE_shopctl"))
        .arg("certs")
        .arg("--out")
        .arg(&out)
        .arg("--k8s-secrets")
        .arg(&secrets)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "--k8s-secrets was accepted");
    assert!(!secrets.exists());

    // Running it again keeps the CA (certificates from both runs verify together).
    let ca_before = std::fs::read(out.join("ca/ca.crt")).unwrap();
    let again = Command::new(env!("CARGO_BIN_EXE_shopctl"))
        .arg("certs")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(std::fs::read(out.join("ca/ca.crt")).unwrap(), ca_before);
}

/// The operator's all-access identity is issued on demand, locally, for an
/// hour, and never as a Kubernetes Secret.
#[test]
fn operator_certificate_is_local_short_lived_and_never_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let shopctl = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shopctl"));
        cmd.arg("certs").arg("--out").arg(&out);
        cmd
    };
    let run = shopctl().arg("--operator").output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let pem = std::fs::read(out.join("operator/tls.crt")).unwrap();
    let left = mesh_client::tls::certificate_expiry(&pem)
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left <= std::time::Duration::from_secs(3600) && left > std::time::Duration::from_secs(3000),
        "{left:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::metadata(out.join("operator/tls.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    // Only the operator: no workload certificates came with it.
    assert!(!out.join("orders").exists());

    // Asking for it as a workload is refused.
    for args in [
        vec!["--workloads", "orders,operator"],
        vec!["--workloads", "operator"],
    ] {
        let run = shopctl().args(&args).output().unwrap();
        assert!(!run.status.success(), "{args:?} was accepted");
    }
}
