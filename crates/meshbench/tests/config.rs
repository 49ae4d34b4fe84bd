//! Bad flags exit with code 64 and say what is wrong.

use std::process::Command;

#[test]
fn bad_config_exits_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-echo"))
        .args(["--next", "dns:///nohost", "--delay-ms=-5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--next"), "{stderr}");
    assert!(
        stderr.contains("--delay-ms: must not be negative"),
        "{stderr}"
    );
}
