//! The mesh identity service with real processes and real TLS: workloads
//! with no certificate on disk get short-lived certificates from it, renew
//! them under load, ride out its outages, fail closed when their
//! certificate runs out and recover without a restart; tokens prove only
//! their own ServiceAccount, and bad tokens and CSRs get the right code.

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Proc, TRUST_DOMAIN, free_addr, identity, place_request, shop_policy};
use mesh_client::tls::{
    SpiffeId,
    certify::{CertifyRequest, IdentityClient},
    dev::DevCa,
};
use shop_api::orders::v1::{GetOrderRequest, OrderStatus};
use shop_kit::sa_token::{DevTokenIssuer, ServiceAccountClaims};
use tonic::Code;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "mesh-identity";
const SERVICES: [&str; 4] = ["auth", "inventory", "payments", "orders"];

/// The CA, the dev token issuer and the identity service.
struct Identity {
    dir: PathBuf,
    ca: DevCa,
    tokens: DevTokenIssuer,
    addr: SocketAddr,
    admin: SocketAddr,
    ttl_secs: u64,
    extra: Vec<String>,
    /// How the service finds the issuer's keys (default: `--jwks-file`).
    key_flags: Option<Vec<String>>,
    proc: Option<Proc>,
}

impl Identity {
    fn new(dir: &Path, ttl_secs: u64, extra: &[&str]) -> Identity {
        let dir = dir.join("identity");
        std::fs::create_dir_all(dir.join("jwks")).unwrap();
        let ca = DevCa::generate(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
        std::fs::create_dir_all(dir.join("ca")).unwrap();
        std::fs::write(dir.join("ca/tls.crt"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("ca/tls.key"), &ca.key_pem).unwrap();
        std::fs::write(dir.join("bundle.crt"), &ca.cert_pem).unwrap();
        let tokens = DevTokenIssuer::generate(ISSUER).unwrap();
        std::fs::write(dir.join("jwks/cluster.json"), tokens.jwks_json()).unwrap();
        Identity {
            dir,
            ca,
            tokens,
            addr: free_addr(),
            admin: free_addr(),
            ttl_secs,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            key_flags: None,
            proc: None,
        }
    }

    /// The trust bundle every workload and the service itself read.
    fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.crt")
    }

    /// Writes the trust bundle (an atomic replace, as a ConfigMap update is).
    fn write_bundle(&self, pem: &str) {
        mesh_client::tls::dev::write_file(&self.bundle(), pem, false).unwrap();
    }

    /// Makes `ca` the issuing CA (the next start uses it).
    fn replace_ca(&mut self, ca: DevCa) {
        std::fs::write(self.dir.join("ca/tls.crt"), &ca.cert_pem).unwrap();
        std::fs::write(self.dir.join("ca/tls.key"), &ca.key_pem).unwrap();
        self.ca = ca;
    }

    async fn start(&mut self) {
        let mut args: Vec<String> = [
            "--admin-addr",
            &self.admin.to_string(),
            "--ca-cert",
            &self.dir.join("ca/tls.crt").display().to_string(),
            "--ca-key",
            &self.dir.join("ca/tls.key").display().to_string(),
            "--trust-bundle",
            &self.bundle().display().to_string(),
            "--trust-domain",
            TRUST_DOMAIN,
            "--token-issuer",
            ISSUER,
            "--token-audience",
            AUDIENCE,
            "--cert-ttl-secs",
            &self.ttl_secs.to_string(),
            "--backdate-secs",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        args.extend(self.key_flags.clone().unwrap_or_else(|| {
            vec![
                "--jwks-file".into(),
                self.dir.join("jwks").display().to_string(),
            ]
        }));
        let child = Command::new(common::bin("identity"))
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log_path()).unwrap())
            .spawn()
            .unwrap();
        self.proc = Some(Proc::adopt("identity", self.addr, child));
        wait_ready(self.admin, Duration::from_secs(60)).await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("identity.log")
    }

    /// What the service logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// A token file for `sa`, valid for an hour.
    fn token_file(&self, sa: &str) -> PathBuf {
        let path = self.dir.join(format!("{sa}.token"));
        let token = self
            .tokens
            .mint("shop", sa, AUDIENCE, Duration::from_secs(3600))
            .unwrap();
        std::fs::write(&path, token).unwrap();
        path
    }

    fn client(&self, server_id: &str) -> IdentityClient {
        IdentityClient {
            addrs: vec![self.addr.to_string()],
            server_id: server_id.parse().unwrap(),
            token_file: self.dir.join("unused.token"),
            bundle: self.bundle(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// `GET http://addr{path}`'s status, or why there was none (a process
/// starting, or its not-ready admin port handing over to the server's).
async fn try_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .map_err(|_| "no answer in 5 s".to_string())?
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// Polls `/ready` on an admin port until it answers 200.
async fn wait_ready(admin: SocketAddr, limit: Duration) {
    let start = Instant::now();
    let mut last = Err(String::from("not asked yet"));
    while start.elapsed() < limit {
        last = try_status(admin, "/ready").await;
        if last == Ok(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{admin} not ready after {limit:?}: {last:?}");
}

/// A workload process whose log goes to a file the test reads.
struct Workload {
    proc: Proc,
    admin: SocketAddr,
    log: PathBuf,
}

impl Workload {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The four services, each getting its identity from the identity service.
struct Shop {
    dir: tempfile::TempDir,
    identity: Identity,
    workloads: HashMap<&'static str, Workload>,
    mesh: mesh_client::Mesh,
}

impl Shop {
    async fn start(ttl_secs: u64) -> Shop {
        let dir = tempfile::tempdir().unwrap();
        let mut id = Identity::new(dir.path(), ttl_secs, &[]);
        id.start().await;
        let identity_service = id;
        let addrs: HashMap<&str, SocketAddr> = SERVICES.iter().map(|s| (*s, free_addr())).collect();
        let mut workloads = HashMap::new();
        for name in SERVICES {
            let policy = dir.path().join(format!("{name}.policy.json"));
            std::fs::write(&policy, shop_policy(name)).unwrap();
            let admin = free_addr();
            let mut args: Vec<String> = vec![
                "--listen".into(),
                addrs[name].to_string(),
                "--database-url".into(),
                format!(
                    "sqlite://{}",
                    dir.path().join(format!("{name}.db")).display()
                ),
                "--admin-addr".into(),
                admin.to_string(),
                "--mesh-config".into(),
                policy.display().to_string(),
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
                "--identity-addr".into(),
                identity_service.addr.to_string(),
                "--trust-bundle".into(),
                identity_service.bundle().display().to_string(),
                "--identity-token-file".into(),
                identity_service.token_file(name).display().to_string(),
            ];
            let target = |s: &str| format!("static:///{}", addrs[s]);
            match name {
                "payments" => args.extend(["--auth-target".into(), target("auth")]),
                "orders" => args.extend([
                    "--auth-target".into(),
                    target("auth"),
                    "--inventory-target".into(),
                    target("inventory"),
                    "--payments-target".into(),
                    target("payments"),
                ]),
                _ => {}
            }
            let log = dir.path().join(format!("{name}.log"));
            let child = Command::new(common::bin(name))
                .args(&args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            workloads.insert(
                name,
                Workload {
                    proc: Proc::adopt(name, addrs[name], child),
                    admin,
                    log,
                },
            );
        }
        // The operator keeps file mode: a certificate from the same CA on disk.
        let operator = dir.path().join("operator");
        let issued = identity_service
            .ca
            .issue(&mesh_client::tls::dev::LeafSpec::local(
                identity("operator").parse().unwrap(),
            ))
            .unwrap();
        mesh_client::tls::dev::write_workload(&operator, &issued, &identity_service.ca.cert_pem)
            .unwrap();
        let mesh = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
            .unwrap()
            .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
            .unwrap()
            .with_tls(
                mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(&operator))
                    .unwrap(),
            );
        let shop = Shop {
            dir,
            identity: identity_service,
            workloads,
            mesh,
        };
        for name in SERVICES {
            wait_ready(shop.workloads[name].admin, Duration::from_secs(60)).await;
        }
        shop
    }

    fn channel(&self, name: &str) -> mesh_client::MeshChannel {
        self.mesh
            .channel_with_identity(
                &format!("static:///{}", self.workloads[name].proc.addr),
                &identity(name),
            )
            .unwrap()
    }

    async fn customer(&self, name: &str) -> (String, String, String) {
        use shop_api::{
            auth::v1::auth_service_client::AuthServiceClient,
            inventory::v1::inventory_service_client::InventoryServiceClient,
            payments::v1::payments_service_client::PaymentsServiceClient,
        };
        common::customer(
            AuthServiceClient::new(self.channel("auth")),
            InventoryServiceClient::new(self.channel("inventory")),
            PaymentsServiceClient::new(self.channel("payments")),
            name,
        )
        .await
    }

    /// Serial and SPIFFE ID a fresh handshake with `name` shows, or why
    /// the handshake failed.
    async fn served_certificate(&self, name: &str) -> Result<(String, String), String> {
        self.served_leaf(name)
            .await
            .map(|der| leaf_serial_and_id(&der))
    }

    /// The leaf certificate (DER) a fresh handshake with `name` shows.
    async fn served_leaf(&self, name: &str) -> Result<Vec<u8>, String> {
        peer_certificate(
            self.workloads[name].proc.addr,
            &self.dir.path().join("operator"),
        )
        .await
    }
}

/// A TLS handshake with `addr` as the operator (its certificate from
/// `operator`), checking the server's chain against the bundle there;
/// returns the server leaf's serial and SPIFFE ID.
async fn peer_certificate(addr: SocketAddr, operator: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(operator.join("tls.crt"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(operator.join("tls.key")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(operator.join("ca.crt")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    #[derive(Debug)]
    struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);
    impl rustls::client::danger::ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _name: &rustls::pki_types::ServerName<'_>,
            ocsp: &[u8],
            now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            // Workload certificates name a SPIFFE ID, not a DNS name: check
            // the chain and validity only (the name is read afterwards).
            match self.0.verify_server_cert(
                end_entity,
                intermediates,
                &rustls::pki_types::ServerName::try_from("unused.invalid").unwrap(),
                ocsp,
                now,
            ) {
                Ok(v) => Ok(v),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                ))
                | Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
                Err(e) => Err(e),
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        ),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok(leaf.to_vec())
}

fn leaf_serial_and_id(der: &[u8]) -> (String, String) {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    let id = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    (cert.raw_serial_as_string(), id)
}

/// When the leaf `der` was issued (its `notBefore` plus the 5 s backdating).
fn issued_at(der: &[u8]) -> std::time::SystemTime {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    std::time::UNIX_EPOCH + Duration::from_secs(cert.validity().not_before.timestamp() as u64 + 5)
}

/// Continuous PlaceOrder traffic from `callers` tasks until stopped; each
/// call's start, latency and outcome recorded.
struct Traffic {
    /// The customer's token (orders are theirs to read).
    token: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
    orders: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    async fn start(shop: &Shop, callers: usize) -> Traffic {
        let (token, product, account) = shop.customer("renewer").await;
        let traffic = Traffic {
            token: token.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicU64::new(0)),
            failures: Arc::default(),
            samples: Arc::default(),
            orders: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for caller in 0..callers {
            let mut client = shop_api::orders::v1::orders_service_client::OrdersServiceClient::new(
                shop.channel("orders"),
            );
            let (token, product, account) = (token.clone(), product.clone(), account.clone());
            let (stop, ok, failures, samples, orders) = (
                traffic.stop.clone(),
                traffic.ok.clone(),
                traffic.failures.clone(),
                traffic.samples.clone(),
                traffic.orders.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let started = Instant::now();
                    let request = place_request(
                        &token,
                        &product,
                        &account,
                        format!("renew-{caller}-{n}-{}", uuid::Uuid::new_v4()),
                    );
                    match client.place_order(request).await {
                        Ok(response) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            samples.lock().unwrap().push((started, started.elapsed()));
                            if n.is_multiple_of(20) {
                                orders.lock().unwrap().push(response.into_inner().order_id);
                            }
                        }
                        Err(e) => failures.lock().unwrap().push(format!("PlaceOrder: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        Traffic { tasks, ..traffic }
    }

    async fn stop(self) -> (u64, Vec<String>, Vec<(Instant, Duration)>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
            self.samples.lock().unwrap().clone(),
            self.orders.lock().unwrap().clone(),
        )
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Waits until every order in `ids` is CONFIRMED (their sagas called
/// inventory and payments over the renewing mesh).
async fn all_confirmed(shop: &Shop, token: &str, ids: &[String]) {
    let mut client = shop_api::orders::v1::orders_service_client::OrdersServiceClient::new(
        shop.channel("orders"),
    );
    for id in ids {
        let start = Instant::now();
        loop {
            let status = client
                .get_order(common::authed(
                    token,
                    GetOrderRequest {
                        order_id: id.clone(),
                    },
                ))
                .await
                .map(|r| r.into_inner().status());
            match status {
                Ok(OrderStatus::Confirmed) => break,
                Ok(OrderStatus::Cancelled) => panic!("order {id} was cancelled"),
                _ if start.elapsed() > Duration::from_secs(60) => {
                    panic!("order {id} not confirmed after 60 s: {status:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_second_certificates_renew_under_load_with_no_failed_call() {
    let shop = Shop::start(30).await;
    let traffic = Traffic::start(&shop, 2).await;
    let token = traffic.token.clone();
    let mut serials: HashMap<&str, Vec<(Instant, String)>> = HashMap::new();
    let start = Instant::now();
    // Three and a half lifetimes: every workload renews at least four times.
    while start.elapsed() < Duration::from_secs(105) {
        for name in SERVICES {
            let (serial, id) = shop
                .served_certificate(name)
                .await
                .unwrap_or_else(|e| panic!("handshake with {name}: {e}"));
            assert_eq!(
                id,
                identity(name),
                "{name} presents the identity its token proves"
            );
            let seen = serials.entry(name).or_default();
            if seen.last().is_none_or(|(_, s)| *s != serial) {
                seen.push((Instant::now(), serial));
            }
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let (ok, failures, samples, orders) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed calls: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "only {ok} calls");
    for name in SERVICES {
        let distinct: HashSet<&String> = serials[name].iter().map(|(_, s)| s).collect();
        assert!(
            distinct.len() >= 4,
            "{name} showed {} certificates over 105 s of 30-s certificates: {:?}",
            distinct.len(),
            serials[name]
        );
        assert!(
            shop.workloads[name]
                .log()
                .contains("TLS certificate renewed")
        );
    }
    all_confirmed(&shop, &token, &orders).await;

    // The cost of a renewal to the busy workloads: latency of calls that
    // started within 2 s after a new serial was first seen vs the rest.
    let changes: Vec<Instant> = serials
        .values()
        .flat_map(|v| v.iter().skip(1).map(|(t, _)| *t))
        .collect();
    let (mut near, mut far): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for (at, latency) in samples {
        if changes
            .iter()
            .any(|c| at + Duration::from_secs(1) >= *c && at <= *c + Duration::from_secs(2))
        {
            near.push(latency);
        } else {
            far.push(latency);
        }
    }
    near.sort();
    far.sort();
    eprintln!(
        "renewal under load: {ok} PlaceOrder calls, 0 failed; p50/p99 near a renewal {:?}/{:?} ({} calls), elsewhere {:?}/{:?} ({} calls)",
        percentile(&near, 0.5),
        percentile(&near, 0.99),
        near.len(),
        percentile(&far, 0.5),
        percentile(&far, 0.99),
        far.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_outages_half_a_lifetime_is_ridden_out_a_whole_one_fails_closed_and_recovers() {
    const TTL: u64 = 60;
    let mut shop = Shop::start(TTL).await;
    let mut first: HashMap<&str, String> = HashMap::new();
    let mut issued = Vec::new();
    for name in SERVICES {
        let leaf = shop.served_leaf(name).await.unwrap();
        first.insert(name, leaf_serial_and_id(&leaf).0);
        issued.push(issued_at(&leaf));
    }
    let (earliest, latest) = (*issued.iter().min().unwrap(), *issued.iter().max().unwrap());

    // More than half a lifetime, and past every renewal time (at most 75 %
    // of the lifetime) yet before the earliest certificate runs out:
    // everyone keeps serving on the certificate they hold.
    let traffic = Traffic::start(&shop, 2).await;
    shop.identity.kill();
    let killed = std::time::SystemTime::now();
    let back = (latest + Duration::from_secs(TTL * 80 / 100))
        .min(earliest + Duration::from_secs(TTL * 90 / 100));
    let outage = back.duration_since(killed).unwrap_or_default();
    assert!(
        outage > Duration::from_secs(TTL / 2),
        "the shop took too long to start ({:?} between issuance and the kill) for an outage of half a lifetime",
        killed.duration_since(earliest)
    );
    tokio::time::sleep(outage).await;
    let (ok, failures, _, _) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed calls during the outage: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 20, "only {ok} calls");
    for name in SERVICES {
        assert_eq!(shop.served_certificate(name).await.unwrap().0, first[name]);
    }
    shop.identity.start().await;
    // Renewals recover (they were due during the outage).
    for name in SERVICES {
        let start = Instant::now();
        loop {
            let serial = shop.served_certificate(name).await.unwrap().0;
            if serial != first[name] {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} did not renew after the identity service came back"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            shop.workloads[name]
                .log()
                .contains("TLS certificate renewal failed; keeping the current certificate"),
            "{name} warned"
        );
    }

    // Longer than a whole lifetime: every certificate runs out.
    shop.identity.kill();
    for name in SERVICES {
        // Peers refuse it: its certificate has expired (a minute at most,
        // with margin for this machine).
        let start = Instant::now();
        loop {
            match shop.served_certificate(name).await {
                Err(refused) if refused.to_lowercase().contains("expired") => break,
                other => assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "{name} still accepted with the identity service down: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Not ready, and it says why; still alive (liveness is not readiness).
        let start = Instant::now();
        loop {
            let log = shop.workloads[name].log();
            let ready = try_status(shop.workloads[name].admin, "/ready").await;
            if ready == Ok(503) && log.contains("TLS certificate EXPIRED and not renewed") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}: ready {ready:?}; says why?\n{}",
                &log[log.len().saturating_sub(2000)..]
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            try_status(shop.workloads[name].admin, "/live").await,
            Ok(200)
        );
    }
    let pids: HashMap<&str, i32> = SERVICES
        .iter()
        .map(|n| (*n, shop.workloads[n].proc.pid().as_raw()))
        .collect();
    shop.identity.start().await;
    for name in SERVICES {
        wait_ready(shop.workloads[name].admin, Duration::from_secs(60)).await;
        shop.served_certificate(name).await.unwrap();
        assert_eq!(
            shop.workloads[name].proc.pid().as_raw(),
            pids[name],
            "{name} was not restarted"
        );
    }
    // And the shop works again, over fresh connections.
    let (token, product, account) = shop.customer("after-outage").await;
    let mut orders = shop_api::orders::v1::orders_service_client::OrdersServiceClient::new(
        shop.channel("orders"),
    );
    let id = orders
        .place_order(place_request(
            &token,
            &product,
            &account,
            "after-outage-1".into(),
        ))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    all_confirmed(&shop, &token, &[id]).await;
}

/// A workload with no certificate serves nothing but its admin port, which
/// says not ready (and alive) until the identity service issues one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_is_not_ready_until_it_holds_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::new(dir.path(), 3600, &[]);
    let (addr, admin) = (free_addr(), free_addr());
    let args: Vec<String> = vec![
        "--database-url".into(),
        format!("sqlite://{}", dir.path().join("inventory.db").display()),
        "--admin-addr".into(),
        admin.to_string(),
        "--trust-domain".into(),
        TRUST_DOMAIN.into(),
        "--identity-addr".into(),
        id.addr.to_string(),
        "--trust-bundle".into(),
        id.bundle().display().to_string(),
        "--identity-token-file".into(),
        id.token_file("inventory").display().to_string(),
    ];
    let _inventory = Proc::spawn("inventory", addr, &args);
    let start = Instant::now();
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(60), "no admin port");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few seconds of asking an identity service that is not there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(common::http_get(admin, "/ready").await.0, 503);
    assert_eq!(common::http_get(admin, "/live").await.0, 200);
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(common::channel(admin).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    // The gRPC port is bound (the kernel queues connections) but nothing
    // answers on it: no handshake without a certificate.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "the gRPC port answered without a certificate: {read:?}"
        );
    }
    id.start().await;
    wait_ready(admin, Duration::from_secs(60)).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(common::channel(admin).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

/// The token file is read anew for every renewal (the kubelet rotates it):
/// an expired token there makes renewals fail, loudly, with the identity
/// service's reason; a fresh one makes them succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_read_again_for_every_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::new(dir.path(), 12, &[]);
    id.start().await;
    let (addr, admin) = (free_addr(), free_addr());
    let token = id.token_file("inventory");
    let log = dir.path().join("inventory.log");
    let child = Command::new(common::bin("inventory"))
        .args([
            "--listen".to_string(),
            addr.to_string(),
            "--database-url".into(),
            format!("sqlite://{}", dir.path().join("inventory.db").display()),
            "--admin-addr".into(),
            admin.to_string(),
            "--trust-domain".into(),
            TRUST_DOMAIN.into(),
            "--identity-addr".into(),
            id.addr.to_string(),
            "--trust-bundle".into(),
            id.bundle().display().to_string(),
            "--identity-token-file".into(),
            token.display().to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _inventory = Proc::adopt("inventory", addr, child);
    wait_ready(admin, Duration::from_secs(60)).await;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut expired = ServiceAccountClaims::new(
        ISSUER,
        "shop",
        "inventory",
        AUDIENCE,
        Duration::from_secs(600),
    );
    expired.iat -= 7200;
    expired.nbf = Some(expired.iat);
    expired.exp = expired.iat + 600;
    std::fs::write(&token, id.tokens.mint_claims(&expired).unwrap()).unwrap();
    let start = Instant::now();
    while !read().contains("the token has expired") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no failed renewal logged:\n{}",
            read()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(read().contains("TLS certificate renewal failed; keeping the current certificate"));
    let renewed = read().matches("TLS certificate renewed").count();
    id.token_file("inventory");
    let start = Instant::now();
    while read().matches("TLS certificate renewed").count() <= renewed {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no renewal with the fresh token:\n{}",
            read()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_ready(admin, Duration::from_secs(30)).await;
}

/// In a cluster the keys come from the issuer's OIDC discovery document:
/// served here by a real HTTP server (Python's), and followed when the
/// issuer adds a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_come_from_oidc_discovery_and_follow_a_new_key() {
    if common::which("python3").is_none() {
        common::skip_or_fail("python3 is missing (it serves the discovery document)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::new(dir.path(), 3600, &[]);
    let http = free_addr();
    let www = dir.path().join("www");
    std::fs::create_dir_all(www.join(".well-known")).unwrap();
    std::fs::create_dir_all(www.join("openid/v1")).unwrap();
    std::fs::write(
        www.join(".well-known/openid-configuration"),
        serde_json::json!({
            "issuer": ISSUER,
            "jwks_uri": format!("http://{http}/openid/v1/jwks"),
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(www.join("openid/v1/jwks"), id.tokens.jwks_json()).unwrap();
    let server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &http.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&www)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Proc::adopt("python3", http, server);
    let start = Instant::now();
    while tokio::net::TcpStream::connect(http).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the HTTP server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    id.key_flags = Some(vec![
        "--oidc-discovery-url".into(),
        format!("http://{http}/.well-known/openid-configuration"),
        "--jwks-refresh-secs".into(),
        "10".into(),
    ]);
    id.start().await;
    let client = id.client(&identity("identity"));
    let certify = |token: String| {
        let client = client.clone();
        async move {
            client
                .call(CertifyRequest {
                    csr: csr(None),
                    token,
                })
                .await
        }
    };
    let token = id
        .tokens
        .mint("shop", "orders", AUDIENCE, Duration::from_secs(600))
        .unwrap();
    assert_eq!(certify(token).await.unwrap().spiffe_id, identity("orders"));

    // The issuer adds a key: tokens signed with it verify once it is published.
    let next = DevTokenIssuer::generate(ISSUER).unwrap();
    let token = next
        .mint("shop", "payments", AUDIENCE, Duration::from_secs(600))
        .unwrap();
    let status = certify(token.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut keys: serde_json::Value = serde_json::from_str(&id.tokens.jwks_json()).unwrap();
    let added: serde_json::Value = serde_json::from_str(&next.jwks_json()).unwrap();
    keys["keys"]
        .as_array_mut()
        .unwrap()
        .push(added["keys"][0].clone());
    std::fs::write(www.join("openid/v1/jwks"), keys.to_string()).unwrap();
    let start = Instant::now();
    loop {
        match certify(token.clone()).await {
            Ok(response) => {
                assert_eq!(response.spiffe_id, identity("payments"));
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "the new key was never fetched: {status:?}"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn csr(asking_for: Option<&str>) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    if let Some(uri) = asking_for {
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_proves_only_its_own_service_account_and_bad_requests_get_the_right_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::new(dir.path(), 3600, &[]);
    id.start().await;
    let client = id.client(&identity("identity"));
    let mint = |claims: &ServiceAccountClaims| id.tokens.mint_claims(claims).unwrap();
    let claims = |sa: &str, aud: &str| {
        ServiceAccountClaims::new(ISSUER, "shop", sa, aud, Duration::from_secs(600))
    };

    // orders asks for payments' identity: it gets its own.
    let response = client
        .call(CertifyRequest {
            csr: csr(Some(&identity("payments"))),
            token: mint(&claims("orders", AUDIENCE)),
        })
        .await
        .unwrap();
    assert_eq!(response.spiffe_id, identity("orders"));
    let (serial, san) = leaf_serial_and_id(&response.certificate_chain[0]);
    assert_eq!(san, identity("orders"));
    assert_eq!(serial, response.serial);

    let refused = |code: Code, fragment: &'static str| {
        move |r: Result<_, tonic::Status>| {
            let status = r.expect_err("refused");
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(fragment),
                "{status:?} should say {fragment:?}"
            );
        }
    };
    let mut expired = claims("orders", AUDIENCE);
    expired.iat -= 7200;
    expired.nbf = Some(expired.iat);
    expired.exp = expired.iat + 600;
    refused(Code::Unauthenticated, "expired")(
        client
            .call(CertifyRequest {
                csr: csr(None),
                token: mint(&expired),
            })
            .await,
    );
    refused(Code::Unauthenticated, "audience")(
        client
            .call(CertifyRequest {
                csr: csr(None),
                token: mint(&claims("orders", "some-other-api")),
            })
            .await,
    );
    let foreign = DevTokenIssuer::generate("https://other-cluster.example").unwrap();
    refused(Code::Unauthenticated, "other-cluster.example")(
        client
            .call(CertifyRequest {
                csr: csr(None),
                token: foreign
                    .mint("shop", "payments", AUDIENCE, Duration::from_secs(600))
                    .unwrap(),
            })
            .await,
    );
    // Same issuer name, a key the cluster does not publish.
    let impostor = DevTokenIssuer::generate(ISSUER).unwrap();
    refused(Code::Unauthenticated, "does not publish")(
        client
            .call(CertifyRequest {
                csr: csr(None),
                token: impostor
                    .mint("shop", "payments", AUDIENCE, Duration::from_secs(600))
                    .unwrap(),
            })
            .await,
    );
    refused(Code::InvalidArgument, "PKCS#10")(
        client
            .call(CertifyRequest {
                csr: b"-----BEGIN CERTIFICATE REQUEST-----".to_vec(),
                token: mint(&claims("orders", AUDIENCE)),
            })
            .await,
    );
    let mut forged = csr(None);
    let at = forged.len() - 4;
    forged[at] ^= 0x40;
    refused(Code::InvalidArgument, "signature")(
        client
            .call(CertifyRequest {
                csr: forged,
                token: mint(&claims("orders", AUDIENCE)),
            })
            .await,
    );

    // The caller checks who it talks to: a server that is not the identity
    // service's SPIFFE ID is refused before any token is sent.
    let wrong = id.client(&identity("payments"));
    let status = wrong
        .call(CertifyRequest {
            csr: csr(None),
            token: mint(&claims("orders", AUDIENCE)),
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("secure naming"), "{status:?}");

    // Per-identity limit: a burst beyond it is RESOURCE_EXHAUSTED.
    let token = mint(&claims("inventory", AUDIENCE));
    let mut exhausted = None;
    for _ in 0..40 {
        if let Err(status) = client
            .call(CertifyRequest {
                csr: csr(None),
                token: token.clone(),
            })
            .await
        {
            exhausted = Some(status);
            break;
        }
    }
    let status = exhausted.expect("the per-identity burst (20) ends within 40 calls");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.metadata().get("retry-after").is_some());

    // Refusals are in the audit log with the caller's address and why.
    let log = id.log();
    assert!(
        log.lines().any(|l| l.contains("refused a Certify call")
            && l.contains("127.0.0.1")
            && l.contains("Unauthenticated")),
        "no refusal logged:\n{log}"
    );

    // Issuance is counted per identity.
    let (_, metrics) = common::http_get(id.admin, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "mesh_identity_certificates_issued_total{{spiffe_id=\"{}\"}}",
            identity("orders")
        )),
        "{metrics}"
    );
    let _: SpiffeId = response.spiffe_id.parse().unwrap();
}

/// A second CA for the trust domain, told apart by its name.
fn rotated_ca() -> DevCa {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rotated mesh CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    DevCa::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
}

fn issuer_of(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    cert.issuer().to_string()
}

/// The runbook of docs/identity.md, under PlaceOrder traffic: both roots
/// in every bundle, the identity service moved to the new CA, every
/// workload renewed onto it, the old root retired; no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_issuing_ca_rotates_under_load_with_no_failed_call() {
    let mut shop = Shop::start(30).await;
    let traffic = Traffic::start(&shop, 2).await;
    let operator = shop.dir.path().join("operator");
    let old = shop.identity.ca.cert_pem.clone();
    let new = rotated_ca();
    let new_pem = new.cert_pem.clone();
    let both = format!("{old}{new_pem}");

    // 1. Trust both roots everywhere (the ConfigMap, and the operator's files).
    shop.identity.write_bundle(&both);
    mesh_client::tls::dev::write_file(&operator.join("ca.crt"), &both, false).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 2. Issue from the new CA (a rollout of the identity Deployment).
    shop.identity.kill();
    shop.identity.replace_ca(new);
    shop.identity.start().await;
    for name in SERVICES {
        let start = Instant::now();
        loop {
            let leaf = shop.served_leaf(name).await.unwrap();
            if issuer_of(&leaf).contains("rotated mesh CA") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} still presents a certificate of the old CA"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let issued = shop
        .identity
        .ca
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity("operator").parse().unwrap(),
        ))
        .unwrap();
    mesh_client::tls::dev::write_workload(&operator, &issued, &both).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 3. Retire the old root.
    shop.identity.write_bundle(&new_pem);
    mesh_client::tls::dev::write_file(&operator.join("ca.crt"), &new_pem, false).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for name in SERVICES {
        // Checked against the new root alone (the operator's bundle now).
        let leaf = shop.served_leaf(name).await.unwrap();
        assert!(issuer_of(&leaf).contains("rotated mesh CA"), "{name}");
        assert!(
            shop.workloads[name].log().contains("trust bundle changed"),
            "{name} followed the bundle"
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ok, failures, _, orders) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed calls during the CA rotation: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 50, "only {ok} calls");
    // Fresh connections all the way through the saga, on the new CA alone.
    let (token, product, account) = shop.customer("after-rotation").await;
    let mut client = shop_api::orders::v1::orders_service_client::OrdersServiceClient::new(
        shop.channel("orders"),
    );
    let id = client
        .place_order(place_request(
            &token,
            &product,
            &account,
            "after-rotation-1".into(),
        ))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    all_confirmed(&shop, &token, &[id]).await;
    let _ = orders;
}

/// Issuance latency at a realistic rate (a fleet renewing: 20 Certify
/// calls a second, each on a new connection as workloads make them).
/// Prints numbers; asserts only that every call succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_latency_at_twenty_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::new(
        dir.path(),
        3600,
        &["--rate-per-address", "1000", "--burst-per-address", "1000"],
    );
    id.start().await;
    let client = id.client(&identity("identity"));
    let mut latencies = Vec::new();
    let calls = 200;
    for i in 0..calls {
        // 50 ServiceAccounts, so no identity's own limit is reached.
        let token = id
            .tokens
            .mint(
                "shop",
                &format!("sa-{}", i % 50),
                AUDIENCE,
                Duration::from_secs(600),
            )
            .unwrap();
        let request = CertifyRequest {
            csr: csr(None),
            token,
        };
        let started = Instant::now();
        client.call(request).await.unwrap();
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50).saturating_sub(started.elapsed())).await;
    }
    latencies.sort();
    eprintln!(
        "Certify latency over {calls} calls at ~20/s (new TLS connection each): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    let (_, metrics) = common::http_get(id.admin, "/metrics").await;
    let server_side: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_identity_certify_duration_seconds"))
        .collect();
    eprintln!(
        "server side (token check + signing):\n{}",
        server_side.join("\n")
    );
}

/// `identity agent` for the Python recommendations service: the agent
/// gets 30-second certificates from the identity service and writes them
/// as `--tls-dir` files; Python serves with them and reloads each renewal;
/// a Rust mesh client calls it, on one long-lived channel and on a fresh
/// connection every second, across at least two renewals with no failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_identity_agent_keeps_a_python_workload_certified_across_renewals() {
    use shop_api::recommendations::v1::{
        RecommendRequest, RecordOrderRequest,
        recommendations_service_client::RecommendationsServiceClient,
    };
    use std::os::unix::fs::MetadataExt as _;
    let python_ok = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_health.v1, grpc_reflection.v1alpha, cryptography, prometheus_client, opentelemetry.sdk",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !python_ok {
        common::skip_or_fail(
            "python3 lacks the recommendations service's packages (pip install -r services/recommendations/requirements.txt)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::new(dir.path(), 30, &[]);
    id.start().await;

    // The agent, as the recommendations pod's sidecar runs it.
    let out = dir.path().join("mesh/tls");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let agent_admin = free_addr();
    let agent_log = dir.path().join("agent.log");
    let agent = Command::new(common::bin("identity"))
        .arg("agent")
        .arg("--out")
        .arg(&out)
        .args(["--identity-addr", &id.addr.to_string()])
        .arg("--identity-token-file")
        .arg(id.token_file("recommendations"))
        .arg("--trust-bundle")
        .arg(id.bundle())
        .args(["--trust-domain", TRUST_DOMAIN])
        .args(["--admin-addr", &agent_admin.to_string()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let _agent = Proc::adopt("identity-agent", agent_admin, agent);
    wait_ready(agent_admin, Duration::from_secs(60)).await;
    assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o700);
    let (status, metrics) = common::http_get(agent_admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_certificate_expiry_timestamp")
                && l.contains(&identity("recommendations"))),
        "{metrics}"
    );
    assert_eq!(
        std::fs::metadata(out.join("tls.key")).unwrap().mode() & 0o777,
        0o600
    );

    // Python, reading the agent's directory.
    let addr = free_addr();
    let recs_admin = free_addr();
    let policy = dir.path().join("recommendations.policy.json");
    std::fs::write(&policy, shop_policy("recommendations")).unwrap();
    let python = Command::new("python3")
        .args(["-m", "recommendations"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("services/recommendations"))
        .args(["--listen", &addr.to_string()])
        .args(["--admin-addr", &recs_admin.to_string()])
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.path().join("recs.db").display()))
        .arg("--tls-dir")
        .arg(&out)
        .arg("--mesh-config")
        .arg(&policy)
        .args(["--trust-domain", TRUST_DOMAIN])
        .env("LOG_LEVEL", "WARNING")
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 -m recommendations");
    let _python = Proc::adopt("recommendations", addr, python);

    // The operator in file mode, from the same CA.
    let operator = dir.path().join("operator");
    let issued = id
        .ca
        .issue(&mesh_client::tls::dev::LeafSpec::local(
            identity("operator").parse().unwrap(),
        ))
        .unwrap();
    mesh_client::tls::dev::write_workload(&operator, &issued, &id.ca.cert_pem).unwrap();
    let mesh = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
        .unwrap()
        .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
        .unwrap()
        .with_tls(
            mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(&operator)).unwrap(),
        );
    let target = format!("static:///{addr}");
    let channel = || {
        RecommendationsServiceClient::new(
            mesh.channel_with_identity(&target, &identity("recommendations"))
                .unwrap(),
        )
    };
    common::wait_serving_on(
        mesh.channel_with_identity(&target, &identity("recommendations"))
            .unwrap(),
    )
    .await;
    let mut recs = channel();
    for (order, products) in [("o1", ["a", "b"]), ("o2", ["a", "c"])] {
        recs.record_order(RecordOrderRequest {
            order_id: order.into(),
            product_ids: products.iter().map(|p| p.to_string()).collect(),
        })
        .await
        .expect("RecordOrder");
    }
    let request = || {
        let mut request = tonic::Request::new(RecommendRequest {
            user_id: "u1".into(),
            product_ids: vec!["a".into()],
            max_results: 0,
        });
        request.set_timeout(Duration::from_secs(10));
        request
    };

    // Calls on one long-lived channel, all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let steady = {
        let (stop, calls, failures, mut recs) =
            (stop.clone(), calls.clone(), failures.clone(), recs.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match recs.recommend(request()).await {
                    Ok(_) => {
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("steady: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Every second a new connection (a handshake with the files in use)
    // and the serial Python presents.
    let mut serials: Vec<String> = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(80) {
        match channel().recommend(request()).await {
            Ok(answer) => {
                assert_eq!(answer.into_inner().product_ids, ["b", "c"]);
                calls.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => failures.lock().unwrap().push(format!("fresh: {e}")),
        }
        match peer_certificate(addr, &operator).await {
            Ok(der) => {
                let (serial, spiffe_id) = leaf_serial_and_id(&der);
                assert_eq!(spiffe_id, identity("recommendations"));
                if serials.last() != Some(&serial) {
                    serials.push(serial);
                }
            }
            Err(e) => failures.lock().unwrap().push(format!("handshake: {e}")),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    steady.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    let calls = calls.load(Ordering::Relaxed);
    let log = std::fs::read_to_string(&agent_log).unwrap();
    eprintln!(
        "identity agent: {calls} calls, {} failed, {} certificates seen over 80 s: {serials:?}",
        failures.len(),
        serials.len()
    );
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    assert!(calls > 100, "only {calls} calls");
    assert!(
        serials.len() >= 3,
        "Python served {} certificates over 80 s of 30-s certificates (two renewals expected): {serials:?}\n{log}",
        serials.len()
    );
    assert!(
        log.matches("certificate files renewed").count() >= 2,
        "{log}"
    );
    for serial in &serials {
        assert!(log.contains(serial.as_str()), "serial {serial} not logged");
    }
    assert!(!log.contains("PRIVATE KEY"), "the agent logged a key");
}

/// With no identity service to answer, the agent says why and exits 1
/// once `--first-certificate-timeout-secs` has passed, never ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_agent_exits_non_zero_without_a_first_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::new(dir.path(), 30, &[]);
    let output = tokio::task::spawn_blocking({
        let args: Vec<String> = vec![
            "agent".into(),
            "--out".into(),
            dir.path().join("tls").display().to_string(),
            "--identity-addr".into(),
            // Nothing listens there.
            id.addr.to_string(),
            "--identity-token-file".into(),
            id.token_file("recommendations").display().to_string(),
            "--trust-bundle".into(),
            id.bundle().display().to_string(),
            "--first-certificate-timeout-secs".into(),
            "3".into(),
        ];
        move || {
            Command::new(common::bin("identity"))
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    });
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the agent gave up in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no certificate from identity service")
            && stderr.contains("--first-certificate-timeout-secs"),
        "{stderr}"
    );
    assert!(!dir.path().join("tls/tls.key").exists());
}

/// The agent replaces its files one at a time, so a reader can read a new
/// certificate with the old key: the Python loader refuses the pair
/// (gRPC would fail handshakes with it) and keeps the last good one.
#[test]
fn the_python_loader_refuses_a_key_that_does_not_match_the_certificate() {
    let python_ok = Command::new("python3")
        .args(["-c", "import grpc, cryptography"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !python_ok {
        common::skip_or_fail("python3 lacks grpcio and cryptography");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let spec = mesh_client::tls::dev::LeafSpec::local(identity("recommendations").parse().unwrap());
    let (old, new) = (ca.issue(&spec).unwrap(), ca.issue(&spec).unwrap());
    let load = |cert: &str, key: &str| {
        mesh_client::tls::dev::write_workload(
            dir.path(),
            &mesh_client::tls::dev::Issued {
                cert_pem: cert.to_owned(),
                key_pem: key.to_owned(),
            },
            &ca.cert_pem,
        )
        .unwrap();
        Command::new("python3")
            .args([
                "-c",
                "import sys\nfrom recommendations.identity import load\nload(sys.argv[1])",
            ])
            .arg(dir.path())
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("services/recommendations"))
            .output()
            .unwrap()
    };
    let good = load(&new.cert_pem, &new.key_pem);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let torn = load(&new.cert_pem, &old.key_pem);
    let stderr = String::from_utf8_lossy(&torn.stderr);
    assert!(!torn.status.success());
    assert!(
        stderr.contains("tls.key does not match tls.crt"),
        "{stderr}"
    );
}
