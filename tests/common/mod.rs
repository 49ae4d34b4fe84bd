//! Shared helpers for the cross-service tests: real service processes on
//! loopback, real databases, and the rule for skipping tests whose tools
//! are missing.
//!
//! A test that needs PostgreSQL, grpcurl or Python skips with a visible
//! message when they are absent, unless `MESH_TEST_REQUIRE_ALL=1` (set by
//! `.ci/run`), which turns every such skip into a failure.

#![allow(dead_code)] // each test binary uses a different part

pub mod dns;
pub mod netbed;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use shop_api::{
    auth::v1::{LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient},
    inventory::v1::inventory_service_client::InventoryServiceClient,
    orders::v1::orders_service_client::OrdersServiceClient,
    payments::v1::payments_service_client::PaymentsServiceClient,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Skips the calling test (returns `None`) with a message, or panics when
/// CI requires every test to run.
pub fn skip_or_fail(what: &str) -> Option<std::convert::Infallible> {
    if std::env::var("MESH_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("MESH_TEST_REQUIRE_ALL=1 but {what}");
    }
    eprintln!("SKIPPED: {what} (set MESH_TEST_REQUIRE_ALL=1 to make this a failure)");
    None
}

/// The directory holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of a workspace binary; `cargo test --workspace` builds them all.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing; run the tests with `cargo test --workspace` so every service binary is built",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 for a process to bind (loopback only).
///
/// Ports come from a counter below Linux's ephemeral range (32768+), so an
/// address handed out here is never handed out again in this test binary,
/// nor picked by the kernel for someone's port 0, before its process binds
/// it; each is checked free when handed out.
pub fn free_addr() -> SocketAddr {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    };
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(LOW + rand::random_range(0..(HIGH - LOW))));
    for _ in 0..(HIGH - LOW) {
        let port = LOW + next.fetch_add(1, Ordering::Relaxed) % (HIGH - LOW);
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in {LOW}..{HIGH}");
}

/// A service process, SIGKILLed when dropped.
pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
}

impl Proc {
    /// Starts `bin` with `args` plus `--listen addr`.
    pub fn spawn(name: &str, addr: SocketAddr, args: &[String]) -> Proc {
        Proc::spawn_env(name, addr, args, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(
        name: &str,
        addr: SocketAddr,
        args: &[String],
        env: &[(String, String)],
    ) -> Proc {
        let child = Command::new(bin(name))
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.into(),
            addr,
            child,
        }
    }

    /// Wraps an already spawned child.
    pub fn adopt(name: &str, addr: SocketAddr, child: Child) -> Proc {
        Proc {
            name: name.into(),
            addr,
            child,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends SIGTERM and waits for the process to exit; returns its code.
    /// Async so this process's client connections keep running: a drain
    /// waits for clients to close their connections.
    pub async fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = nix::sys::signal::kill(self.pid(), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} did not exit within {limit:?} of SIGTERM", self.name);
    }

    /// SIGKILL, no drain.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plaintext channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// Waits until `addr` answers health SERVING (plaintext).
pub async fn wait_serving(addr: SocketAddr) {
    let channel = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
        .unwrap()
        .channel(&format!("static:///{addr}"))
        .unwrap();
    wait_serving_on(channel).await;
}

/// Waits until the server behind `channel` answers health SERVING.
pub async fn wait_serving_on(channel: mesh_client::MeshChannel) {
    let target = channel.target().to_owned();
    let mut health = HealthClient::new(channel);
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(2));
        match health.check(request).await {
            Ok(r) if r.get_ref().status() == ServingStatus::Serving => return,
            Ok(r) => last = format!("{:?}", r.get_ref().status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{target} not serving after 30 s: {last}");
}

/// Which database the services use.
#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite files in the shop's temporary directory.
    Sqlite,
    /// Fresh databases on the PostgreSQL server at this admin URL.
    Postgres(String),
}

impl Db {
    /// PostgreSQL from `MESH_TEST_POSTGRES_URL`, or a skip.
    pub fn postgres() -> Option<Db> {
        match std::env::var("MESH_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(Db::Postgres(url)),
            _ => {
                skip_or_fail("MESH_TEST_POSTGRES_URL is not set, so PostgreSQL tests cannot run")?;
                unreachable!()
            }
        }
    }

    /// A new empty database for `service`, as a URL.
    pub async fn create(&self, dir: &Path, service: &str) -> String {
        match self {
            Db::Sqlite => format!("sqlite://{}", dir.join(format!("{service}.db")).display()),
            Db::Postgres(admin) => {
                use sqlx::Connection;
                sqlx::any::install_default_drivers();
                let name = format!("t_{}_{service}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::AnyConnection::connect(admin)
                    .await
                    .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("CREATE DATABASE");
                let (base, _) = admin.rsplit_once('/').expect("admin URL ends in /<db>");
                format!("{base}/{name}")
            }
        }
    }
}

/// The four services as separate processes on loopback.
pub struct Shop {
    pub dir: tempfile::TempDir,
    pub auth: Proc,
    pub inventory: Proc,
    pub payments: Proc,
    pub orders: Proc,
    pub urls: std::collections::HashMap<&'static str, String>,
    /// The operator's mesh (mTLS when the shop runs it).
    pub mesh: mesh_client::Mesh,
    pub tls: bool,
    /// The flags each process was started with, to restart it.
    pub args: std::collections::HashMap<&'static str, Vec<String>>,
    /// Each process's admin port (metrics, liveness, readiness).
    pub admin: std::collections::HashMap<&'static str, SocketAddr>,
    /// The test CA, when the shop runs mTLS.
    pub pki: Option<TestPki>,
    env: Vec<(String, String)>,
}

/// How to start the shop.
#[derive(Clone, Debug, Default)]
pub struct ShopOptions {
    /// mTLS with the shop's authorization policy.
    pub tls: bool,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
}

pub const TRUST_DOMAIN: &str = "shop.test";

pub fn identity(workload: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{workload}")
}

/// A test CA and workload certificates, from the one dev-CA generator.
pub struct TestPki {
    pub ca: mesh_client::tls::dev::DevCa,
    pub root: std::path::PathBuf,
}

impl TestPki {
    pub fn new(root: &Path) -> TestPki {
        let ca = mesh_client::tls::dev::DevCa::generate(TRUST_DOMAIN, Duration::from_secs(3600))
            .unwrap();
        TestPki {
            ca,
            root: root.to_path_buf(),
        }
    }

    /// Issues `workload`'s certificate into `<root>/<workload>` and returns the directory.
    pub fn issue(&self, workload: &str) -> PathBuf {
        self.issue_with(workload, |_| {})
    }

    pub fn issue_with(
        &self,
        workload: &str,
        tweak: impl FnOnce(&mut mesh_client::tls::dev::LeafSpec),
    ) -> PathBuf {
        let mut spec = mesh_client::tls::dev::LeafSpec::local(identity(workload).parse().unwrap());
        tweak(&mut spec);
        let issued = self.ca.issue(&spec).unwrap();
        let dir = self.root.join(workload);
        mesh_client::tls::dev::write_workload(&dir, &issued, &self.ca.cert_pem).unwrap();
        dir
    }

    pub fn load(&self, workload: &str) -> std::sync::Arc<mesh_client::tls::MeshTls> {
        mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(
            self.root.join(workload),
        ))
        .unwrap()
    }
}

/// The shop's authorization policy for `service`, as the local run writes it.
pub fn shop_policy(service: &str) -> String {
    shop_kit::policy::mesh_config(service, TRUST_DOMAIN).to_string()
}

/// [`shop_policy`] for `service`, except that the orders service may not
/// call the methods named in `refused` (`Service/Method`, e.g.
/// `PaymentsService/RefundCharge`): orders' wildcard becomes the list of
/// the service's other methods, read from the contracts.
pub fn shop_policy_refusing_orders(service: &str, refused: &[&str]) -> String {
    use prost::Message;
    let fds = prost_types::FileDescriptorSet::decode(shop_api::FILE_DESCRIPTOR_SET).unwrap();
    let mut policy: serde_json::Value = serde_json::from_str(&shop_policy(service)).unwrap();
    let rules = policy["authorization"]["rules"].as_array_mut().unwrap();
    let orders = rules
        .iter_mut()
        .find(|r| r["callers"][0] == identity("orders"))
        .expect("the shop's policy lets orders call this service");
    let mut allowed = Vec::new();
    for pattern in orders["methods"].as_array().unwrap() {
        let pattern = pattern.as_str().unwrap();
        let Some(full) = pattern.strip_suffix("/*") else {
            let short = pattern.rsplit_once('.').map_or(pattern, |(_, m)| m);
            if !refused.contains(&short) {
                allowed.push(pattern.to_owned());
            }
            continue;
        };
        let (package, name) = full.rsplit_once('.').unwrap();
        let svc = fds
            .file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| &f.service)
            .find(|s| s.name() == name)
            .expect("service in the contracts");
        for m in &svc.method {
            if !refused.contains(&format!("{name}/{}", m.name()).as_str()) {
                allowed.push(format!("{full}/{}", m.name()));
            }
        }
    }
    orders["methods"] = serde_json::json!(allowed);
    policy.to_string()
}

impl Shop {
    /// Kills `name` and starts it again with `policy` (a mesh policy JSON,
    /// see [`shop_policy_refusing_orders`]) instead of its own; the shop
    /// must run mTLS. [`Shop::restart`] after a kill restores its own.
    pub async fn restart_with_policy(&mut self, name: &'static str, policy: &str) {
        let path = self.dir.path().join(format!("{name}.other.policy.json"));
        std::fs::write(&path, policy).unwrap();
        let mut args = self.args[name].clone();
        let at = args
            .iter()
            .position(|a| a == "--mesh-config")
            .expect("a shop with mTLS runs with a mesh policy");
        args[at + 1] = path.display().to_string();
        self.proc_mut(name).kill();
        let addr = self.proc_mut(name).addr;
        *self.proc_mut(name) = Proc::spawn_env(name, addr, &args, &self.env);
        wait_serving_on(self.channel(addr, name)).await;
    }

    /// Kills `name` and starts it again with its own flags and policy.
    pub async fn restore(&mut self, name: &'static str) {
        self.proc_mut(name).kill();
        self.restart(name).await;
    }

    pub async fn start(db: &Db) -> Shop {
        Shop::start_with(db, false).await
    }

    /// Starts the shop; with `tls`, every process has a certificate from a
    /// test CA and the shop's authorization policy, and the test calls as
    /// the operator.
    pub async fn start_with(db: &Db, tls: bool) -> Shop {
        Shop::start_opts(
            db,
            ShopOptions {
                tls,
                ..Default::default()
            },
        )
        .await
    }

    /// Starts the shop as `options` say.
    pub async fn start_opts(db: &Db, options: ShopOptions) -> Shop {
        let ShopOptions { tls, env } = options;
        let dir = tempfile::tempdir().unwrap();
        let admin: std::collections::HashMap<&'static str, SocketAddr> =
            ["auth", "inventory", "payments", "orders"]
                .into_iter()
                .map(|name| (name, free_addr()))
                .collect();
        let mut urls = std::collections::HashMap::new();
        for name in ["auth", "inventory", "payments", "orders"] {
            urls.insert(name, db.create(dir.path(), name).await);
        }
        let pki = tls.then(|| TestPki::new(&dir.path().join("certs")));
        let db_args = |name: &str| {
            let mut args = vec![
                "--database-url".to_string(),
                urls[name].clone(),
                "--admin-addr".into(),
                admin[name].to_string(),
            ];
            if let Some(pki) = &pki {
                let policy = dir.path().join(format!("{name}.policy.json"));
                std::fs::write(&policy, shop_policy(name)).unwrap();
                args.extend([
                    "--tls-dir".into(),
                    pki.issue(name).display().to_string(),
                    "--mesh-config".into(),
                    policy.display().to_string(),
                    "--trust-domain".into(),
                    TRUST_DOMAIN.into(),
                ]);
            }
            args
        };
        let mut args = std::collections::HashMap::new();
        for name in ["auth", "inventory", "payments"] {
            args.insert(name, db_args(name));
        }
        let auth = Proc::spawn_env("auth", free_addr(), &args["auth"], &env);
        let inventory = Proc::spawn_env("inventory", free_addr(), &args["inventory"], &env);
        // Payments checks wallet users' tokens with auth's keys.
        args.get_mut("payments")
            .unwrap()
            .extend(["--auth-target".into(), format!("static:///{}", auth.addr)]);
        let payments = Proc::spawn_env("payments", free_addr(), &args["payments"], &env);
        let mut orders_args = db_args("orders");
        orders_args.extend([
            "--auth-target".into(),
            format!("static:///{}", auth.addr),
            "--inventory-target".into(),
            format!("static:///{}", inventory.addr),
            "--payments-target".into(),
            format!("static:///{}", payments.addr),
        ]);
        let orders = Proc::spawn_env("orders", free_addr(), &orders_args, &env);
        args.insert("orders", orders_args);
        let mut mesh = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
            .unwrap()
            .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
            .unwrap();
        if let Some(pki) = &pki {
            pki.issue("operator");
            mesh = mesh.with_tls(pki.load("operator"));
        }
        let shop = Shop {
            dir,
            auth,
            inventory,
            payments,
            orders,
            urls,
            mesh,
            tls,
            args,
            admin,
            env,
            pki,
        };
        for (p, name) in [
            (&shop.auth, "auth"),
            (&shop.inventory, "inventory"),
            (&shop.payments, "payments"),
            (&shop.orders, "orders"),
        ] {
            wait_serving_on(shop.channel(p.addr, name)).await;
        }
        shop
    }

    pub fn proc_mut(&mut self, name: &str) -> &mut Proc {
        match name {
            "auth" => &mut self.auth,
            "inventory" => &mut self.inventory,
            "payments" => &mut self.payments,
            "orders" => &mut self.orders,
            other => panic!("no service {other}"),
        }
    }

    /// Starts `name` again on its address with its flags (after a kill).
    pub async fn restart(&mut self, name: &'static str) {
        let addr = self.proc_mut(name).addr;
        let args = self.args[name].clone();
        *self.proc_mut(name) = Proc::spawn_env(name, addr, &args, &self.env);
        wait_serving_on(self.channel(addr, name)).await;
    }

    /// A mesh channel to one of the shop's processes, as the operator.
    pub fn channel(&self, addr: SocketAddr, service: &str) -> mesh_client::MeshChannel {
        let target = format!("static:///{addr}");
        if self.tls {
            self.mesh
                .channel_with_identity(&target, &identity(service))
                .unwrap()
        } else {
            self.mesh.channel(&target).unwrap()
        }
    }

    pub async fn auth(&self) -> AuthServiceClient<mesh_client::MeshChannel> {
        AuthServiceClient::new(self.channel(self.auth.addr, "auth"))
    }
    pub async fn inventory(&self) -> InventoryServiceClient<mesh_client::MeshChannel> {
        InventoryServiceClient::new(self.channel(self.inventory.addr, "inventory"))
    }
    pub async fn payments(&self) -> PaymentsServiceClient<mesh_client::MeshChannel> {
        PaymentsServiceClient::new(self.channel(self.payments.addr, "payments"))
    }
    pub async fn orders(&self) -> OrdersServiceClient<mesh_client::MeshChannel> {
        OrdersServiceClient::new(self.channel(self.orders.addr, "orders"))
    }

    /// Registers a fresh user and returns `(user_id, bearer token)`.
    pub async fn user(&self, name: &str) -> (String, String) {
        user(self.auth().await, name).await
    }

    /// [`customer`] made by the operator: `(token, product_id, account_id)`.
    pub async fn customer(&self, name: &str) -> (String, String, String) {
        customer(
            self.auth().await,
            self.inventory().await,
            self.payments().await,
            name,
        )
        .await
    }

    /// The shop on SQLite with mTLS and its authorization policy.
    pub async fn start_mtls() -> Shop {
        Shop::start_opts(
            &Db::Sqlite,
            ShopOptions {
                tls: true,
                ..Default::default()
            },
        )
        .await
    }
}

/// Registers a fresh user through `auth` and returns `(user_id, bearer token)`.
pub async fn user(
    mut auth: AuthServiceClient<mesh_client::MeshChannel>,
    name: &str,
) -> (String, String) {
    let password = "correct-horse-battery".to_string();
    let user = auth
        .register(RegisterRequest {
            username: name.into(),
            password: password.clone(),
        })
        .await
        .expect("register")
        .into_inner();
    let login = auth
        .login(LoginRequest {
            username: name.into(),
            password,
        })
        .await
        .expect("login")
        .into_inner();
    (user.user_id, login.access_token)
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII token"),
    );
    request
}

/// Asserts a call failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Ok(v) => panic!("expected {code:?} containing {needle:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "wrong code; message: {}",
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "message {:?} does not contain {needle:?}",
                status.message()
            );
        }
    }
}

/// Finds an executable on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}

/// `GET http://addr{path}`: the status and body (plain HTTP/1.1, for admin ports).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("admin response");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The web origin test gateways allow gRPC-Web calls from.
pub const ORIGIN: &str = "https://shop.example";

/// A gateway process in front of `shop`, with its own workload identity
/// (sending inventory calls to `inventory`, if given, instead of the shop's).
pub fn gateway(shop: &Shop, inventory: Option<String>, extra: &[&str]) -> (Proc, SocketAddr) {
    let pki = shop.pki.as_ref().expect("the shop runs mTLS");
    let addr = free_addr();
    let mut args = vec![
        "--tls-dir".to_string(),
        pki.issue("gateway").display().to_string(),
        "--trust-domain".into(),
        TRUST_DOMAIN.into(),
        "--auth-target".into(),
        format!("static:///{}", shop.auth.addr),
        "--inventory-target".into(),
        inventory.unwrap_or_else(|| format!("static:///{}", shop.inventory.addr)),
        "--orders-target".into(),
        format!("static:///{}", shop.orders.addr),
        "--payments-target".into(),
        format!("static:///{}", shop.payments.addr),
        "--cors-allowed-origin".into(),
        ORIGIN.into(),
        "--admin-addr".into(),
        free_addr().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    (Proc::spawn("gateway", addr, &args), addr)
}

/// Registers `name` and logs in through the gateway at `gw`, as an end
/// user would; returns `(user_id, token)`.
pub async fn gateway_login(gw: &tonic::transport::Channel, name: &str) -> (String, String) {
    use shop_api::auth::v1::{LoginRequest, RegisterRequest};
    let mut auth = AuthServiceClient::new(gw.clone());
    auth.register(RegisterRequest {
        username: name.into(),
        password: "correct-horse-battery".into(),
    })
    .await
    .expect("register through the gateway");
    let login = auth
        .login(LoginRequest {
            username: name.into(),
            password: "correct-horse-battery".into(),
        })
        .await
        .expect("login through the gateway")
        .into_inner();
    (login.user_id, login.access_token)
}

/// What an order needs, made through these clients: a user's token, a
/// product with plenty of stock and an account of theirs with plenty of
/// money. Returns `(token, product_id, account_id)`.
pub async fn customer(
    auth: AuthServiceClient<mesh_client::MeshChannel>,
    mut inventory: InventoryServiceClient<mesh_client::MeshChannel>,
    mut payments: PaymentsServiceClient<mesh_client::MeshChannel>,
    name: &str,
) -> (String, String, String) {
    use shop_api::{
        common::v1::Money,
        inventory::v1::CreateProductRequest,
        payments::v1::{DepositRequest, OpenAccountRequest},
    };
    let usd = |amount_minor| {
        Some(Money {
            currency_code: "USD".into(),
            amount_minor,
        })
    };
    let (user_id, token) = user(auth, name).await;
    let product = inventory
        .create_product(CreateProductRequest {
            sku: format!("SKU-{name}"),
            name: format!("product of {name}"),
            price: usd(100),
            initial_stock: 1_000_000,
        })
        .await
        .expect("create product")
        .into_inner()
        .product_id;
    let account = payments
        .open_account(OpenAccountRequest {
            owner_id: user_id,
            currency_code: "USD".into(),
        })
        .await
        .expect("open account")
        .into_inner()
        .account_id;
    payments
        .deposit(DepositRequest {
            account_id: account.clone(),
            amount: usd(1_000_000_000),
            idempotency_key: format!("dep-{name}"),
        })
        .await
        .expect("deposit");
    (token, product, account)
}

/// Runs `cmd` with `input` on its stdin and returns what it printed.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A PlaceOrder for one unit, with a deadline.
pub fn place_request(
    token: &str,
    product: &str,
    account: &str,
    key: String,
) -> tonic::Request<shop_api::orders::v1::PlaceOrderRequest> {
    let mut request = authed(
        token,
        shop_api::orders::v1::PlaceOrderRequest {
            items: vec![shop_api::orders::v1::PlaceOrderItem {
                product_id: product.into(),
                quantity: 1,
            }],
            payment_account_id: account.into(),
            idempotency_key: key,
        },
    );
    request.set_timeout(Duration::from_secs(10));
    request
}
