//! Bad configuration exits with code 64 and names every problem: a route
//! table that does not match the contracts, limits, origins, targets.

use std::process::Command;

#[test]
fn bad_config_exits_64_naming_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        r#"{"routes": [
            {"methods": ["mesh.payments.v1.PaymentsService/Refund"], "upstream": "billing", "auth": "none"}
        ]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--routes")
        .arg(&routes)
        .args(["--rate-limit-per-second", "0"])
        .args(["--cors-allowed-origin", "shop.example"])
        .args(["--orders-target", "tcp://nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "routes[0].upstream: \"billing\" is not one of",
        "--rate-limit-per-second: must be 1 to 1000000, got 0",
        "--cors-allowed-origin: \"shop.example\" is not an origin",
        "--orders-target",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn the_built_in_routes_start() {
    // --help exits 0 without serving; a bad flag after valid routes still
    // exits 64, so the built-in table itself passed validation.
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--rate-limit-burst", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("routes"),
        "the built-in routes are valid: {stderr}"
    );
    assert!(stderr.contains("--rate-limit-burst"), "{stderr}");
}
