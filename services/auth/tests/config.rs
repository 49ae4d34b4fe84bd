//! Bad configuration exits with code 64 and says what is wrong.

use std::process::Command;

#[test]
fn bad_config_exits_64_naming_every_problem() {
    let out = Command::new(env!("CARGO_BIN_EXE_auth"))
        .args(["--database-url", "mysql://x", "--token-ttl-secs", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--database-url"), "{stderr}");
    assert!(
        stderr.contains("--token-ttl-secs: must be 60 to 86400, got 5"),
        "{stderr}"
    );
}
