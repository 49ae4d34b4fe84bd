//! Bad configuration exits with code 64 and says what is wrong.
//!
//! Being an integration test also makes `cargo test --workspace` build the
//! `identity` binary, which the workspace's own tests (tests/identity.rs)
//! start as a process: on an empty target directory nothing else builds it.

use std::process::Command;

#[test]
fn bad_config_exits_64_naming_every_problem() {
    let out = Command::new(env!("CARGO_BIN_EXE_identity"))
        .args([
            "--ca-cert",
            "/nonexistent/ca.pem",
            "--ca-key",
            "/nonexistent/ca.key",
            "--token-issuer",
            "https://issuer.test",
            "--cert-ttl-secs",
            "5",
            "--backdate-secs",
            "7200",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for problem in [
        "--cert-ttl-secs: must be 10 to 2592000, got 5",
        "--backdate-secs: must be at most 3600",
        "give exactly one of --jwks-file and --oidc-discovery-url",
    ] {
        assert!(stderr.contains(problem), "{problem:?} not in {stderr}");
    }
}

#[test]
fn the_agent_without_its_output_directory_exits_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_identity"))
        .arg("agent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--out"), "{stderr}");
}
