//! The gRPC project's interop test cases (grpc/grpc
//! `doc/interop-test-descriptions.md`) between the mesh and grpcio, the
//! reference implementation, in both directions: the mesh's client
//! (`interop-client` on a `MeshChannel`) against grpcio's TestService, and
//! grpcio's client against the mesh's (`interop-server` on a
//! `MeshServer`), plus mesh → mesh and grpcio → grpcio (the control: what
//! the reference does with itself).
//!
//! Each client runs every case and prints one line per case; the table of
//! case × direction is printed at the end, and the test fails on any
//! failure not listed in [`KNOWN_DIFFERENCES`].

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Proc, bin, free_addr, skip_or_fail, wait_serving};

/// Every case both clients run, in the spec's order.
const CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_compressed_unary",
    "server_compressed_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "cancel_after_begin",
    "cancel_after_first_response",
    "timeout_on_sleeping_server",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
    "custom_metadata",
];

/// Known differences between the mesh and the reference, as (direction,
/// case, why). A failure listed here is reported but does not fail the
/// test. Empty: every difference the matrix found was fixed.
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[];

/// Cases a peer cannot take part in, as (server, case, why): a limit of
/// the peer, not a difference of the mesh. They are not run against that
/// server.
const NOT_APPLICABLE: &[(&str, &str, &str)] = &[(
    "grpcio",
    "client_compressed_unary",
    "grpcio's Python server cannot see whether a request was compressed, so it cannot \
     implement CompressedRequest (the probe must fail with INVALID_ARGUMENT); gRPC's own \
     interop runner skips the compression cases against Python servers too",
)];

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success())
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(name)
}

/// Waits until `addr` accepts TCP connections (grpcio's server has no
/// health service), for at most 30 s.
async fn wait_listening(addr: SocketAddr, what: &str) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not listen on {addr} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each case's outcome in one direction: `Ok(())` or the failure's reason.
type Outcomes = BTreeMap<String, Result<(), String>>;

fn parse(output: &Output, cases: &[&str]) -> Outcomes {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut outcomes = Outcomes::new();
    for line in stdout.lines() {
        if let Some(case) = line.strip_prefix("PASS ") {
            outcomes.insert(case.trim().to_owned(), Ok(()));
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            let (case, reason) = rest.split_once(": ").unwrap_or((rest, "no reason given"));
            outcomes.insert(case.to_owned(), Err(reason.to_owned()));
        }
    }
    for case in cases {
        outcomes.entry((*case).to_owned()).or_insert_with(|| {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: String = stderr
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(format!(
                "no result (client exited {:?}): {tail}",
                output.status.code()
            ))
        });
    }
    outcomes
}

/// Runs a client process (blocking, on its own thread) for `cases`.
async fn run_client(mut command: Command, cases: Vec<&'static str>) -> Outcomes {
    command.arg(format!("--test_case={}", cases.join(",")));
    command.stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("client thread")
        .expect("starting the client");
    parse(&output, &cases)
}

/// How a client reaches its server: plaintext, or TLS with what it needs.
enum Security<'a> {
    Plaintext,
    /// The mesh's mutual TLS: the client's certificate directory and the
    /// SPIFFE ID the server must present.
    MeshTls {
        client_dir: &'a Path,
        server_identity: &'a str,
    },
    /// Server-only TLS, the server verified by name against this CA.
    Tls {
        ca_file: &'a Path,
    },
}

fn mesh_client(port: u16, security: Security<'_>) -> Command {
    let mut command = Command::new(bin("interop-client"));
    command.args(["--server_host=127.0.0.1", &format!("--server_port={port}")]);
    if let Security::MeshTls {
        client_dir,
        server_identity,
    } = security
    {
        command.args([
            "--use_tls=true".to_owned(),
            format!("--tls-dir={}", client_dir.display()),
            format!("--server_identity={server_identity}"),
        ]);
    }
    command.env("RUST_LOG", "error");
    command
}

fn grpcio_client(port: u16, security: Security<'_>) -> Command {
    let mut command = Command::new("python3");
    command.arg(script("client.py")).args([
        "--server_host=127.0.0.1".to_owned(),
        format!("--server_port={port}"),
    ]);
    if let Security::Tls { ca_file } = security {
        command.args([
            "--use_tls=true".to_owned(),
            format!("--ca_file={}", ca_file.display()),
            // The certificate names localhost and 127.0.0.1; verify by name.
            "--server_host_override=localhost".to_owned(),
        ]);
    }
    command
}

/// The lines a server process printed, collected as it runs.
type Printed = Arc<Mutex<Vec<String>>>;

/// A grpcio TestService process, with server-only TLS from `tls_dir`, and
/// what it prints (it reports each call its client cancelled).
fn grpcio_server(addr: SocketAddr, tls_dir: Option<&Path>) -> (Proc, Printed) {
    let mut command = Command::new("python3");
    command
        .arg(script("server.py"))
        .arg(format!("--port={}", addr.port()));
    if let Some(dir) = tls_dir {
        command.args([
            "--use_tls=true".to_owned(),
            format!("--tls_cert_file={}", dir.join("tls.crt").display()),
            format!("--tls_key_file={}", dir.join("tls.key").display()),
        ]);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the grpcio server");
    let printed = collect_stdout(&mut child);
    (Proc::adopt("grpcio interop server", addr, child), printed)
}

/// Collects what `child` prints on stdout, line by line, as it runs.
fn collect_stdout(child: &mut std::process::Child) -> Printed {
    let printed = Printed::default();
    let stdout = child.stdout.take().expect("piped stdout");
    let sink = printed.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    printed
}

/// Waits (at most 10 s) until the server printed `line`.
async fn printed(printed: &Printed, line: &str) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if printed.lock().unwrap().iter().any(|l| l == line) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A mesh `interop-server` process with these extra flags, and what it
/// prints (it reports each call its client cancelled).
fn mesh_server(addr: SocketAddr, flags: &[String]) -> (Proc, Printed) {
    let mut child = Command::new(bin("interop-server"))
        .arg(format!("--port={}", addr.port()))
        .args(flags)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting interop-server");
    let printed = collect_stdout(&mut child);
    (Proc::adopt("interop-server", addr, child), printed)
}

fn applicable(server: &str) -> Vec<&'static str> {
    CASES
        .iter()
        .copied()
        .filter(|case| {
            !NOT_APPLICABLE
                .iter()
                .any(|(s, c, _)| *s == server && c == case)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interop_cases_pass_between_the_mesh_and_grpcio_both_ways() {
    if !python_has_grpc() {
        skip_or_fail(
            "python3 with grpcio and grpcio-tools is not installed (pip install grpcio grpcio-tools)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = common::TestPki::new(dir.path());
    let grpcio_tls = pki.issue("interop-grpcio");
    let mesh_public_tls = pki.issue("interop-mesh-public");
    let mesh_mtls = pki.issue("interop-mesh");
    let client_tls = pki.issue("interop-client");
    let ca_file = client_tls.join("ca.crt");

    // Each client has servers of its own, so what a server saw comes from
    // one client.
    let (mesh_plain, mesh_plain_printed) = mesh_server(free_addr(), &[]);
    let (mesh_for_mesh, mesh_for_mesh_printed) = mesh_server(free_addr(), &[]);
    let (mesh_public, mesh_public_printed) = mesh_server(
        free_addr(),
        &[
            "--use_tls=true".into(),
            format!("--public-tls-dir={}", mesh_public_tls.display()),
        ],
    );
    let (mesh_secure, mesh_secure_printed) =
        mesh_server(free_addr(), &[format!("--tls-dir={}", mesh_mtls.display())]);
    let (grpcio_plain, plain_printed) = grpcio_server(free_addr(), None);
    let (grpcio_secure, secure_printed) = grpcio_server(free_addr(), Some(&grpcio_tls));
    let (control_plain, _) = grpcio_server(free_addr(), None);
    let (control_secure, _) = grpcio_server(free_addr(), Some(&grpcio_tls));
    // Health answers over plaintext only on the plaintext server; the
    // others are ready once they listen.
    wait_serving(mesh_plain.addr).await;
    wait_serving(mesh_for_mesh.addr).await;
    for (proc, what) in [
        (&mesh_public, "interop-server (TLS)"),
        (&mesh_secure, "interop-server (mTLS)"),
        (&grpcio_plain, "the grpcio server"),
        (&grpcio_secure, "the grpcio server (TLS)"),
        (&control_plain, "the grpcio server (control)"),
        (&control_secure, "the grpcio server (control, TLS)"),
    ] {
        wait_listening(proc.addr, what).await;
    }

    let grpcio_identity: &'static str = common::identity("interop-grpcio").leak();
    let mesh_identity: &'static str = common::identity("interop-mesh").leak();
    let mesh_tls = |server_identity: &'static str| Security::MeshTls {
        client_dir: &client_tls,
        server_identity,
    };
    let tls = || Security::Tls { ca_file: &ca_file };
    let port = |p: &Proc| p.addr.port();
    let runs: Vec<(&str, Command, &str)> = vec![
        (
            "mesh→grpcio",
            mesh_client(port(&grpcio_plain), Security::Plaintext),
            "grpcio",
        ),
        (
            "grpcio→mesh",
            grpcio_client(port(&mesh_plain), Security::Plaintext),
            "mesh",
        ),
        (
            "mesh→mesh",
            mesh_client(port(&mesh_for_mesh), Security::Plaintext),
            "mesh",
        ),
        (
            "grpcio→grpcio",
            grpcio_client(port(&control_plain), Security::Plaintext),
            "grpcio",
        ),
        (
            "mesh→grpcio TLS",
            mesh_client(port(&grpcio_secure), mesh_tls(grpcio_identity)),
            "grpcio",
        ),
        (
            "grpcio→mesh TLS",
            grpcio_client(port(&mesh_public), tls()),
            "mesh",
        ),
        (
            "mesh→mesh mTLS",
            mesh_client(port(&mesh_secure), mesh_tls(mesh_identity)),
            "mesh",
        ),
        (
            "grpcio→grpcio TLS",
            grpcio_client(port(&control_secure), tls()),
            "grpcio",
        ),
    ];
    let directions: Vec<&str> = runs.iter().map(|r| r.0).collect();
    let started = Instant::now();
    let results: Vec<Outcomes> = futures::future::join_all(
        runs.into_iter()
            .map(|(_, command, server)| run_client(command, applicable(server))),
    )
    .await;
    let took = started.elapsed();

    // The table: case × direction.
    let width = CASES.iter().map(|c| c.len()).max().unwrap_or(0);
    let column = directions
        .iter()
        .map(|d| d.chars().count())
        .max()
        .unwrap_or(0)
        .max(12);
    let mut table = format!("\n{:width$}", "case");
    for direction in &directions {
        table.push_str(&format!(" | {direction:column$}"));
    }
    table.push('\n');
    let mut failures = Vec::new();
    let mut known = Vec::new();
    for case in CASES {
        table.push_str(&format!("{case:width$}"));
        for (direction, outcomes) in directions.iter().zip(&results) {
            let cell = match outcomes.get(*case) {
                None => "n/a",
                Some(Ok(())) => "pass",
                Some(Err(reason)) => {
                    let listed = KNOWN_DIFFERENCES
                        .iter()
                        .any(|(d, c, _)| d == direction && c == case);
                    let entry = format!("{direction} {case}: {reason}");
                    if listed {
                        known.push(entry);
                        "FAIL (known)"
                    } else {
                        failures.push(entry);
                        "FAIL"
                    }
                }
            };
            table.push_str(&format!(" | {cell:column$}"));
        }
        table.push('\n');
    }
    // A cancellation must reach the server: after cancel_after_first_response
    // the server's handler was running, so it must see the cancel.
    for (direction, lines) in [
        ("mesh→grpcio", &plain_printed),
        ("mesh→grpcio TLS", &secure_printed),
        ("grpcio→mesh", &mesh_plain_printed),
        ("grpcio→mesh TLS", &mesh_public_printed),
        ("mesh→mesh", &mesh_for_mesh_printed),
        ("mesh→mesh mTLS", &mesh_secure_printed),
    ] {
        let case = "cancel_after_first_response";
        let ran = results[directions.iter().position(|d| *d == direction).unwrap()]
            .get(case)
            .is_some_and(|r| r.is_ok());
        if !ran {
            continue;
        }
        let seen = printed(lines, "cancelled FullDuplexCall").await;
        table.push_str(&format!(
            "{direction} {case}: the server saw the cancellation: {}\n",
            if seen { "yes" } else { "NO" }
        ));
        if !seen {
            failures.push(format!(
                "{direction} {case}: the server never saw the cancellation (10 s)"
            ));
        }
    }
    for (server, case, why) in NOT_APPLICABLE {
        table.push_str(&format!("n/a: {case} against {server}: {why}\n"));
    }
    for entry in &known {
        table.push_str(&format!("known difference: {entry}\n"));
    }
    for entry in &failures {
        table.push_str(&format!("FAILED: {entry}\n"));
    }
    table.push_str(&format!("clients took {took:.1?} (run side by side)\n"));
    println!("{table}");
    assert!(
        failures.is_empty(),
        "{} interop failure(s) not listed as known differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
    drop((
        mesh_plain,
        mesh_for_mesh,
        mesh_public,
        mesh_secure,
        grpcio_plain,
        grpcio_secure,
        control_plain,
        control_secure,
    ));
}
