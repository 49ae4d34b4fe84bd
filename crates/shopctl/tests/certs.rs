//! `shopctl certs` makes a dev CA (key private) and SPIFFE workload
//! certificates, and Kubernetes Secrets of them.

use std::process::Command;

#[test]
fn certs_writes_private_ca_spiffe_certificates_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let secrets = dir.path().join("secrets.yaml");
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
        .arg("--k8s-secrets")
        .arg(&secrets)
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
    assert_eq!(mode(&secrets), 0o600);

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

    let yaml = std::fs::read_to_string(&secrets).unwrap();
    assert_eq!(yaml.matches("kind: Secret").count(), 6, "{yaml}");
    assert!(yaml.contains("name: gateway-tls"));
    assert!(yaml.contains("name: payments-tls") && yaml.contains("type: kubernetes.io/tls"));

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
