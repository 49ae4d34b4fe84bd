//! Bad configuration exits with code 64 and says what is wrong.

use std::process::Command;

#[test]
fn bad_config_exits_64_naming_the_problem() {
    let out = Command::new(env!("CARGO_BIN_EXE_payments"))
        .env("DATABASE_URL", "redis://localhost")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("must start with sqlite: or postgres://"),
        "{stderr}"
    );
}
