//! Zero trust on real TLS handshakes over loopback: client certificates are
//! required, servers are checked by SPIFFE ID, calls are authorized per
//! method, and certificates and the CA rotate under load without a failed
//! call. The servers are in-process echo replicas (`common::Replica`) on
//! `MeshServer`, each logging into its own captured log.
//!
//! The config reload counts asserted at the end of the revocation test are
//! the process default's (`Mesh::from_file` records there), so no other
//! test of this binary may rewrite a watched mesh config file.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use common::{EchoOptions, Replica, TestPki, identity, wait_serving_on};
use mesh_client::{Mesh, MeshConfig, tls::dev::DevCa};
use mesh_fixture::echo::{EchoRequest, echo_service_client::EchoServiceClient};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{io::AsyncReadExt, net::TcpStream, time::Instant};
use tonic::Code;

/// An echo replica over mTLS, enforcing `policy` (a mesh config file
/// written beside `tls_dir`, followed as it changes) if given, whose log
/// lines are kept; `tweak` sets anything else.
fn tls_echo(tls_dir: &Path, policy: Option<&str>, tweak: impl FnOnce(&mut EchoOptions)) -> Replica {
    let mut options = EchoOptions {
        tls_dir: Some(tls_dir.to_owned()),
        capture_log: true,
        ..EchoOptions::default()
    };
    if let Some(policy) = policy {
        let path = tls_dir.with_extension("policy.json");
        std::fs::write(&path, policy).unwrap();
        options.mesh_config = Some(path);
    }
    tweak(&mut options);
    Replica::start("tls-echo", options)
}

fn mesh_as(pki: &TestPki, workload: &str) -> Mesh {
    pki.issue(workload);
    Mesh::from_config(MeshConfig::default())
        .unwrap()
        .with_descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .unwrap()
        .with_tls(pki.load(workload))
}

fn client(
    mesh: &Mesh,
    addr: SocketAddr,
    expected: &str,
) -> EchoServiceClient<mesh_client::MeshChannel> {
    EchoServiceClient::new(
        mesh.channel_with_identity(&format!("static:///{addr}"), expected)
            .unwrap(),
    )
}

/// A bare rustls client trusting `ca_pem`, with a client certificate and
/// key (PEM) if given, offering HTTP/2.
fn raw_client_config(ca_pem: &str, client: Option<(&str, &str)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// A bare rustls handshake with an optional client certificate; returns the
/// server's leaf certificate if the server kept the connection.
async fn raw_handshake(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<CertificateDer<'static>, String> {
    let config = raw_client_config(ca_pem, client);
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    // TLS 1.3 servers judge the client certificate after the handshake: a
    // refusal arrives as an alert on the first read. An accepted client
    // gets the server's HTTP/2 SETTINGS frame.
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(leaf),
        Ok(Ok(_)) => Err("closed by the server".into()),
        Ok(Err(e)) => Err(format!("refused: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_from_the_mesh_ca_and_unexpired() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let echo = tls_echo(&pki.issue("echo"), None, |_| {});
    let operator = mesh_as(&pki, "operator");
    wait_serving_on(
        operator
            .channel_with_identity(&format!("static:///{}", echo.addr), &identity("echo"))
            .unwrap(),
    )
    .await;

    // A valid client certificate gets in.
    let good = pki
        .ca
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity("orders").parse().unwrap(),
        ))
        .unwrap();
    raw_handshake(
        echo.addr,
        &pki.ca.cert_pem,
        Some((&good.cert_pem, &good.key_pem)),
    )
    .await
    .unwrap();

    // No client certificate.
    let err = raw_handshake(echo.addr, &pki.ca.cert_pem, None)
        .await
        .unwrap_err();
    assert!(err.contains("refused") || err.contains("closed"), "{err}");
    assert!(echo.wait_logged("TLS handshake refused").await);

    // A certificate from another CA.
    let stranger = DevCa::generate(common::TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let foreign = stranger
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity("orders").parse().unwrap(),
        ))
        .unwrap();
    let err = raw_handshake(
        echo.addr,
        &pki.ca.cert_pem,
        Some((&foreign.cert_pem, &foreign.key_pem)),
    )
    .await
    .unwrap_err();
    assert!(err.contains("refused") || err.contains("closed"), "{err}");
    assert!(
        echo.wait_logged("invalid peer certificate").await,
        "reason in the log: {:?}",
        echo.log.lock().unwrap()
    );

    // An expired certificate.
    let mut spec = mesh_client::tls::dev::LeafSpec::local(identity("orders").parse().unwrap());
    spec.not_before = SystemTime::now() - Duration::from_secs(48 * 3600);
    spec.valid_for = Duration::from_secs(3600);
    let expired = pki.ca.issue(&spec).unwrap();
    let err = raw_handshake(
        echo.addr,
        &pki.ca.cert_pem,
        Some((&expired.cert_pem, &expired.key_pem)),
    )
    .await
    .unwrap_err();
    assert!(err.contains("refused") || err.contains("closed"), "{err}");
    assert!(
        echo.wait_logged("certificate expired").await,
        "reason in the log: {:?}",
        echo.log.lock().unwrap()
    );

    // The mesh itself refuses to run on expired material (fails closed).
    let expired_dir = dir.path().join("expired");
    mesh_client::tls::dev::write_workload(&expired_dir, &expired, &pki.ca.cert_pem).unwrap();
    let err = mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(&expired_dir))
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = tls_echo(&pki.issue("inventory"), None, |_| {});
    let orders = mesh_as(&pki, "orders");
    // Expecting the right identity works...
    wait_serving_on(
        orders
            .channel_with_identity(
                &format!("static:///{}", server.addr),
                &identity("inventory"),
            )
            .unwrap(),
    )
    .await;
    let mut right = client(&orders, server.addr, &identity("inventory"));
    right.echo(EchoRequest::default()).await.unwrap();
    // ...expecting payments from a valid inventory certificate fails.
    let mut wrong = client(&orders, server.addr, &identity("payments"));
    let err = wrong.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let debug = format!("{err:?}");
    assert!(debug.contains("secure naming"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_denies_audits_and_ignores_spoofed_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let policy = |mode: &str| {
        serde_json::json!({"authorization": {"mode": mode, "rules": [
            {"callers": [identity("orders")], "methods": ["mesh.echo.v1.EchoService/Echo"]},
            {"callers": [identity("operator")], "methods": ["*"]}]}})
        .to_string()
    };
    let enforcing = tls_echo(&pki.issue("echo"), Some(&policy("enforce")), |_| {});
    let orders = mesh_as(&pki, "orders");
    let gateway = mesh_as(&pki, "gateway");
    let addr = enforcing.addr;
    wait_serving_on(
        orders
            .channel_with_identity(&format!("static:///{addr}"), &identity("echo"))
            .unwrap(),
    )
    .await;

    client(&orders, addr, &identity("echo"))
        .echo(EchoRequest::default())
        .await
        .unwrap();
    let err = client(&orders, addr, &identity("echo"))
        .record(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains(&identity("orders")) && err.message().contains("EchoService/Record"),
        "{}",
        err.message()
    );
    let err = client(&gateway, addr, &identity("echo"))
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains(&identity("gateway")),
        "{}",
        err.message()
    );

    // A header claiming to be orders changes nothing.
    let mut spoofed = tonic::Request::new(EchoRequest::default());
    for header in ["x-spiffe-id", "x-forwarded-client-cert", "x-mesh-caller"] {
        spoofed
            .metadata_mut()
            .insert(header, identity("orders").parse().unwrap());
    }
    let err = client(&gateway, addr, &identity("echo"))
        .echo(spoofed)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Audit mode lets the call through and logs it.
    let audit_dir = dir.path().join("audit");
    let issued = pki
        .ca
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity("echo").parse().unwrap(),
        ))
        .unwrap();
    mesh_client::tls::dev::write_workload(&audit_dir, &issued, &pki.ca.cert_pem).unwrap();
    let auditing = tls_echo(&audit_dir, Some(&policy("audit")), |_| {});
    wait_serving_on(
        gateway
            .channel_with_identity(&format!("static:///{}", auditing.addr), &identity("echo"))
            .unwrap(),
    )
    .await;
    client(&gateway, auditing.addr, &identity("echo"))
        .echo(EchoRequest::default())
        .await
        .unwrap();
    assert!(auditing.wait_logged("would deny").await);
}

/// Points `link` at `target` atomically, the way Kubernetes updates a
/// mounted Secret (a new directory, then a symlink swap).
fn swap_symlink(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

fn issue_into(ca: &DevCa, workload: &str, bundle: &str, dir: &Path) {
    let issued = ca
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity(workload).parse().unwrap(),
        ))
        .unwrap();
    mesh_client::tls::dev::write_workload(dir, &issued, bundle).unwrap();
}

fn leaf_der(dir: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_and_ca_rotation_under_load_fail_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca1 = DevCa::generate(common::TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let ca2 = DevCa::generate(common::TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let both = format!("{}{}", ca1.cert_pem, ca2.cert_pem);
    let version = |n: u32, who: &str| -> PathBuf { root.join(format!("{who}-v{n}")) };
    let (server_link, client_link) = (root.join("server"), root.join("client"));

    issue_into(&ca1, "echo", &ca1.cert_pem, &version(1, "server"));
    issue_into(&ca1, "orders", &ca1.cert_pem, &version(1, "client"));
    swap_symlink(&server_link, &version(1, "server"));
    swap_symlink(&client_link, &version(1, "client"));

    let server = tls_echo(&server_link, None, |_| {});
    let tls =
        mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(&client_link)).unwrap();
    let mesh = Mesh::from_config(MeshConfig::default())
        .unwrap()
        .with_descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .unwrap()
        .with_tls(tls.clone());
    let channel = mesh
        .channel_with_identity(&format!("static:///{}", server.addr), &identity("echo"))
        .unwrap();
    wait_serving_on(channel.clone()).await;
    let first_serial = tls.serial();

    let end = Instant::now() + Duration::from_secs(12);
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (channel, failures) = (channel.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = EchoServiceClient::new(channel);
            let mut ok = 0u64;
            while Instant::now() < end && ok < 1_000_000 {
                match client.echo(EchoRequest::default()).await {
                    Ok(_) => ok += 1,
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
            ok
        }));
    }

    // Step by step, each applied by swapping the mounted directory.
    let steps: Vec<(u32, &DevCa, &str)> = vec![
        (2, &ca1, ca1.cert_pem.as_str()), // new leaves, same CA
        (3, &ca1, both.as_str()),         // trust both CAs
        (4, &ca2, both.as_str()),         // leaves from the new CA
        (5, &ca2, ca2.cert_pem.as_str()), // drop the old CA
    ];
    for (n, ca, bundle) in steps {
        tokio::time::sleep(Duration::from_secs(2)).await;
        issue_into(ca, "echo", bundle, &version(n, "server"));
        issue_into(ca, "orders", bundle, &version(n, "client"));
        swap_symlink(&server_link, &version(n, "server"));
        swap_symlink(&client_link, &version(n, "client"));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed calls, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(total > 100, "{total}");

    // A new connection sees the last certificate, issued by the new CA.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(
        tls.serial(),
        first_serial,
        "the client rotated its own certificate"
    );
    let fresh = ca2
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity("orders").parse().unwrap(),
        ))
        .unwrap();
    let seen = raw_handshake(
        server.addr,
        &ca2.cert_pem,
        Some((&fresh.cert_pem, &fresh.key_pem)),
    )
    .await
    .unwrap();
    assert_eq!(
        seen,
        leaf_der(&version(5, "server")),
        "the server presents the newest certificate"
    );
    // The old CA is no longer trusted by the server.
    let old = ca1
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity("orders").parse().unwrap(),
        ))
        .unwrap();
    assert!(
        raw_handshake(
            server.addr,
            &ca2.cert_pem,
            Some((&old.cert_pem, &old.key_pem))
        )
        .await
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_tls_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let echo = tls_echo(&pki.issue("echo"), None, |o| {
        o.handshake_timeout = Some(Duration::from_millis(500))
    });
    let operator = mesh_as(&pki, "operator");
    wait_serving_on(
        operator
            .channel_with_identity(&format!("static:///{}", echo.addr), &identity("echo"))
            .unwrap(),
    )
    .await;
    let mut idle = TcpStream::connect(echo.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the server kept a silent connection: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "dropped only after {:?}",
        started.elapsed()
    );
    assert!(echo.wait_logged("TLS handshake timed out").await);
}

/// Replaces `path` whole (write beside it, then rename), as a config
/// management tool or a Kubernetes ConfigMap update does.
fn rewrite(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Calls Echo as `mesh`'s workload until the outcome is `want` (Ok, or an
/// error code), for at most 30 s; returns the last outcome.
async fn echo_until(
    mesh: &Mesh,
    addr: SocketAddr,
    want: Option<Code>,
) -> Result<(), tonic::Status> {
    let start = Instant::now();
    loop {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.set_timeout(Duration::from_secs(5));
        let got = client(mesh, addr, &identity("echo"))
            .echo(request)
            .await
            .map(drop);
        if got.as_ref().err().map(|e| e.code()) == want || start.elapsed() > Duration::from_secs(30)
        {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_caller_is_denied_without_a_restart_and_a_broken_policy_keeps_the_last_good_one()
{
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let policy = |callers: &[String]| {
        serde_json::json!({"authorization": {"rules": [
            {"callers": callers, "methods": ["mesh.echo.v1.EchoService/*"]}]}})
        .to_string()
    };
    let (orders_id, operator_id) = (identity("orders"), identity("operator"));
    let tls_dir = pki.issue("echo");
    let echo = tls_echo(
        &tls_dir,
        Some(&policy(&[orders_id.clone(), operator_id.clone()])),
        |o| o.admin = true,
    );
    let admin = echo.admin.unwrap();
    let policy_file = tls_dir.with_extension("policy.json");
    let (orders, operator) = (mesh_as(&pki, "orders"), mesh_as(&pki, "operator"));
    let addr = echo.addr;
    wait_serving_on(
        operator
            .channel_with_identity(&format!("static:///{addr}"), &identity("echo"))
            .unwrap(),
    )
    .await;
    echo_until(&orders, addr, None)
        .await
        .expect("orders is allowed at first");

    // Revoked in the file: denied on a later call, the server untouched.
    rewrite(&policy_file, &policy(std::slice::from_ref(&operator_id)));
    let err = echo_until(&orders, addr, Some(Code::PermissionDenied))
        .await
        .expect_err("orders still allowed 30 s after its revocation");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(&orders_id), "{}", err.message());
    assert!(echo.is_running(), "the server was not restarted");
    echo_until(&operator, addr, None)
        .await
        .expect("the operator is still allowed");

    // A broken file and one that drops the policy are refused loudly; the
    // revocation stays in force.
    let refused = "mesh config change REFUSED";
    rewrite(
        &policy_file,
        r#"{"authorization": {"rules": [{"callers": ["#,
    );
    assert!(
        echo.wait_logged_times(refused, 1, Duration::from_secs(30))
            .await,
        "no error logged for a broken policy file: {:?}",
        echo.log.lock().unwrap()
    );
    rewrite(&policy_file, "{}");
    assert!(
        echo.wait_logged_times(refused, 2, Duration::from_secs(30))
            .await,
        "no error logged for a file without a policy: {:?}",
        echo.log.lock().unwrap()
    );
    assert!(echo.logged("removes the authorization policy"));
    let err = client(&orders, addr, &identity("echo"))
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    echo_until(&operator, addr, None)
        .await
        .expect("the operator is still allowed");

    // The watcher survived the bad files: allowing orders again works.
    rewrite(&policy_file, &policy(&[orders_id, operator_id]));
    echo_until(&orders, addr, None)
        .await
        .expect("orders allowed again after the policy was restored");
    let (_, metrics) = common::http_get(admin, "/metrics").await;
    for line in [
        "mesh_config_reloads_total{outcome=\"applied\"} 2",
        "mesh_config_reloads_total{outcome=\"refused\"} 2",
    ] {
        assert!(metrics.contains(line), "no {line:?} in {metrics}");
    }
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_that_never_handshake_cannot_pin_more_than_the_handshake_limit() {
    use mesh_client::server::{MeshServer, ServerConfig};
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    const LIMIT: usize = 4;
    const IDLE: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let tls = mesh_client::tls::MeshTls::load_with_handshake_timeout(
        mesh_client::tls::TlsFiles::in_dir(pki.issue("echo")),
        Duration::from_secs(1),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        MeshServer::new(ServerConfig {
            max_concurrent_handshakes: LIMIT,
            ..ServerConfig::default()
        })
        .tls(tls)
        .serve(listener, async {
            let _ = stopped.await;
        }),
    );

    // A patient client: its connection waits in the backlog behind the idle
    // ones (IDLE / LIMIT handshake timeouts), and its own handshake timer
    // runs meanwhile.
    let orders = Mesh::from_config(
        MeshConfig::from_json(r#"{"maxTimeout":"120s","endpoint":{"connectTimeout":"100s"}}"#)
            .unwrap(),
    )
    .unwrap()
    .with_tls(
        mesh_client::tls::MeshTls::load_with_handshake_timeout(
            mesh_client::tls::TlsFiles::in_dir(pki.issue("orders")),
            Duration::from_secs(100),
        )
        .unwrap(),
    );
    let target = format!("static:///{addr}");
    wait_serving_on(
        orders
            .channel_with_identity(&target, &identity("echo"))
            .unwrap(),
    )
    .await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let (tasks_before, fds_before) = (metrics.num_alive_tasks(), open_fds());

    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // A second channel makes its own connection, queued behind the idle ones.
    let mut health = HealthClient::new(
        orders
            .channel_with_identity(&target, &identity("echo"))
            .unwrap(),
    );
    let call = tokio::spawn(async move {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(110));
        health.check(request).await
    });
    let (mut peak_tasks, mut peak_fds) = (0, 0);
    let start = Instant::now();
    while !call.is_finished() && start.elapsed() < Duration::from_secs(120) {
        peak_tasks = peak_tasks.max(metrics.num_alive_tasks());
        peak_fds = peak_fds.max(open_fds());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{IDLE} idle connections, limit {LIMIT}: served after {:?}; tasks {tasks_before} -> peak {peak_tasks}, descriptors {fds_before} -> peak {peak_fds}",
        start.elapsed()
    );
    let answer = call.await.unwrap().expect("the real client was served");
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
    // Each handshaking connection is a task and a descriptor on the server
    // side; the idle ones beyond the limit wait in the kernel's backlog.
    // Slack: the second channel's tasks (resolver, endpoint, health watch,
    // connection) and the test's.
    assert!(
        peak_tasks <= tasks_before + LIMIT + 16,
        "{peak_tasks} tasks alive with {IDLE} idle connections (before: {tasks_before}, limit {LIMIT})"
    );
    // Every idle connection ahead of the client timed out, and each is
    // counted though the log says only a few lines a second.
    let timed_out = mesh_client::telemetry::metrics()
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix("mesh_tls_handshake_failures_total{outcome=\"timed_out\"} ")
                .map(|n| n.parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    assert!(timed_out >= IDLE - LIMIT, "{timed_out} timeouts counted");
    assert!(
        peak_fds <= fds_before + IDLE + LIMIT + 16,
        "{peak_fds} descriptors open with {IDLE} idle connections (before: {fds_before}, limit {LIMIT})"
    );
    drop(idle);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
}

/// The value of the Prometheus series `line_prefix` (name and labels) in
/// `metrics`, 0 if absent.
fn series(metrics: &str, line_prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_faults_for_one_caller_leave_other_callers_untouched_and_follow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let (orders_id, operator_id) = (identity("orders"), identity("operator"));
    let config = |faults: serde_json::Value| {
        serde_json::json!({
            "authorization": {"rules": [
                {"callers": [&orders_id, &operator_id], "methods": ["mesh.echo.v1.EchoService/*"]}]},
            "serverFaults": faults,
        })
        .to_string()
    };
    // Every Echo from orders aborted; nobody else's.
    let aborts = serde_json::json!([{
        "name": "orders-unavailable", "callers": [&orders_id],
        "methods": ["mesh.echo.v1.EchoService/Echo"],
        "abort": {"percentage": 100, "grpcStatus": "UNAVAILABLE"}}]);
    let tls_dir = pki.issue("echo");
    let echo = tls_echo(&tls_dir, Some(&config(aborts)), |o| o.admin = true);
    let admin = echo.admin.expect("the replica serves its admin port");
    let config_file = tls_dir.with_extension("policy.json");
    let operator = mesh_as(&pki, "operator");
    // Orders' balancer may eject its only endpoint: were the injected
    // aborts charged to the server, it would be after five.
    pki.issue("orders");
    let orders = Mesh::from_config(
        MeshConfig::from_json(
            r#"{"outlierDetection":{"maxEjectionPercent":100,"trustInjectedFaults":true}}"#,
        )
        .unwrap(),
    )
    .unwrap()
    .with_descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
    .unwrap()
    .with_tls(pki.load("orders"))
    .with_metrics(mesh_client::telemetry::Metrics::new());
    let addr = echo.addr;
    wait_serving_on(
        operator
            .channel_with_identity(&format!("static:///{addr}"), &identity("echo"))
            .unwrap(),
    )
    .await;

    let orders_channel = orders
        .channel_with_identity(&format!("static:///{addr}"), &identity("echo"))
        .unwrap();
    let mut as_orders = EchoServiceClient::new(orders_channel.clone());
    let mut as_operator = client(&operator, addr, &identity("echo"));
    let call = |timeout: Duration| {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.set_timeout(timeout);
        request
    };
    for i in 0..20 {
        let err = as_orders
            .echo(call(Duration::from_secs(5)))
            .await
            .expect_err("orders' Echo is aborted");
        assert_eq!(err.code(), Code::Unavailable, "call {i}: {err:?}");
        // Marked as the mesh's, without the operator's rule name: callers
        // outside the shop see these messages through the gateway.
        assert!(
            err.message().contains("serverFaults") && !err.message().contains("orders-unavailable"),
            "{}",
            err.message()
        );
        as_operator
            .echo(call(Duration::from_secs(5)))
            .await
            .unwrap_or_else(|e| panic!("the operator's call {i} failed: {e:?}"));
    }
    // Orders' other methods are untouched, and so is the endpoint in
    // orders' own balancer: 60 injected UNAVAILABLE (20 calls x 3
    // attempts) are not failures of the server.
    assert!(
        orders_channel.endpoint_states().iter().all(|e| !e.ejected),
        "{:?}",
        orders_channel.endpoint_states()
    );
    let client_metrics = orders.metrics().encode();
    assert!(
        !client_metrics.contains("mesh_endpoint_ejections_total{"),
        "{client_metrics}"
    );
    as_orders
        .get_stats(mesh_fixture::echo::GetStatsRequest::default())
        .await
        .expect("only Echo is faulted");
    let (_, metrics) = common::http_get(admin, "/metrics").await;
    let aborted = series(
        &metrics,
        "mesh_server_faults_injected_total{rule=\"orders-unavailable\",kind=\"abort\"}",
    );
    assert_eq!(aborted, 60, "20 calls, each tried 3 times: {metrics}");

    // Reloaded: a delay longer than the call's deadline, for orders only.
    let delays = serde_json::json!([{
        "name": "orders-slow", "callers": [&orders_id],
        "delay": {"percentage": 100, "fixedDelay": "5s"}}]);
    rewrite(&config_file, &config(delays));
    let start = Instant::now();
    let mut outcome = None;
    while start.elapsed() < Duration::from_secs(30) {
        let begun = Instant::now();
        match as_orders.echo(call(Duration::from_millis(300))).await {
            Err(e) if e.code() == Code::DeadlineExceeded => {
                outcome = Some(begun.elapsed());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let took = outcome.expect("orders' calls never hit the reloaded delay");
    assert!(
        took < Duration::from_secs(4),
        "ended at the deadline, not after the delay: {took:?}"
    );
    as_operator
        .echo(call(Duration::from_secs(5)))
        .await
        .expect("the operator is not delayed");

    // Rules removed: orders is served again, without a restart.
    rewrite(&config_file, &config(serde_json::json!([])));
    echo_until(&orders, addr, None)
        .await
        .expect("orders served again once the rule is gone");
    let (_, metrics) = common::http_get(admin, "/metrics").await;
    assert!(
        series(
            &metrics,
            "mesh_server_faults_injected_total{rule=\"orders-slow\",kind=\"delay\"}"
        ) >= 1,
        "{metrics}"
    );
}

/// An mTLS echo replica as `echo`, once it serves (seen by an `operator`).
async fn echo_serving(pki: &TestPki, tweak: impl FnOnce(&mut EchoOptions)) -> Replica {
    let echo = tls_echo(&pki.issue("echo"), None, tweak);
    let operator = mesh_as(pki, "operator");
    wait_serving_on(
        operator
            .channel_with_identity(&format!("static:///{}", echo.addr), &identity("echo"))
            .unwrap(),
    )
    .await;
    echo
}

/// A workload certificate valid from an hour ago until `left` from now.
fn expiring_in(left: Duration) -> impl FnOnce(&mut mesh_client::tls::dev::LeafSpec) {
    move |spec| {
        spec.not_before = SystemTime::now() - Duration::from_secs(3600);
        spec.valid_for = Duration::from_secs(3600) + left;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_cut_when_its_client_certificate_expires() {
    // TLS checks a certificate once, at the handshake: without the cut, a
    // connection (and the identity its calls are authorised as) outlives
    // the certificate until the server's maxConnectionAge.
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let echo = echo_serving(&pki, |_| {}).await;
    let client_dir = pki.issue_with("orders", expiring_in(Duration::from_secs(4)));
    let read = |p: &str| std::fs::read_to_string(client_dir.join(p)).unwrap();
    let (cert, key) = (read("tls.crt"), read("tls.key"));
    let expires = Instant::now() + Duration::from_secs(4);

    let config = raw_client_config(&pki.ca.cert_pem, Some((&cert, &key)));
    let tcp = TcpStream::connect(echo.addr).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    // Accepted: the server's HTTP/2 SETTINGS arrive.
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the server's SETTINGS")
        .expect("accepted");
    assert!(n > 0, "accepted");
    // Open (nothing more to read) until the certificate expires, then cut
    // (with no cut the server would wait for our HTTP/2 preface forever).
    let cut = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => break Instant::now(),
            Err(_) => panic!("the connection outlived its client certificate by 20 s"),
        }
    };
    // notAfter has whole seconds: the certificate may expire up to 1 s
    // before `expires`.
    assert!(
        cut + Duration::from_millis(1500) >= expires,
        "cut {:?} before the certificate expired",
        expires - cut
    );
    assert!(
        echo.wait_logged("the client's certificate expired").await,
        "{:?}",
        echo.log.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_to_its_renewed_certificate_before_the_old_one_expires() {
    // The connection made with a certificate about to expire takes no new
    // calls from shortly before then; the next one carries the renewed
    // certificate, and the server never has to cut a connection in use.
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let echo = echo_serving(&pki, |o| o.delay_ms = 50).await;
    // 20 s: the first call and the renewal below finish well before the
    // retirement (5 s before expiry) even on a busy machine.
    pki.issue_with("orders", expiring_in(Duration::from_secs(20)));
    let tls = pki.load("orders");
    let mesh = Mesh::from_config(MeshConfig::default())
        .unwrap()
        .with_descriptor_set(mesh_fixture::FILE_DESCRIPTOR_SET)
        .unwrap()
        .with_tls(tls.clone());
    let echo_client = client(&mesh, echo.addr, &identity("echo"));
    echo_client
        .clone()
        .echo(EchoRequest::default())
        .await
        .expect("a first call");
    // Renewed (as the certificate agent would) before the old one expires.
    pki.issue("orders");
    assert!(tls.reload().unwrap(), "the renewed certificate is taken");

    // Four callers, one 50 ms call after another, until 4 s past the first
    // certificate's expiry.
    let until = Instant::now() + Duration::from_secs(24);
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = echo_client.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while Instant::now() < until {
                    let mut request = tonic::Request::new(EchoRequest::default());
                    request.set_timeout(Duration::from_secs(5));
                    match c.echo(request).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut ok = 0;
    for caller in callers {
        let (n, failed) = caller.await.unwrap();
        assert!(failed.is_empty(), "failed calls: {failed:?}");
        ok += n;
    }
    assert!(ok > 0, "calls went through");
    assert!(
        !echo.logged("the client's certificate expired"),
        "the server cut a connection the client still used: {:?}",
        echo.log.lock().unwrap()
    );
}
