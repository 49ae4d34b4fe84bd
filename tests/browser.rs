//! The storefront and the mesh dashboard in a real browser: Debian's
//! Chromium, headless, driven by Node scripts through `playwright-core`
//! (`web/e2e/*.mjs`), against `shopctl up` itself (real processes, mTLS,
//! SQLite). Each test saves a screenshot of its page under the target
//! directory (`tmp/browser/`); with `MESH_UPDATE_SCREENSHOTS=1` it also
//! writes the README's pictures in `docs/`.
//!
//! Skipped with `SKIPPED:` when Node, Chromium or the built web apps
//! (`npm ci && npm run build` in web/) are missing, failing under
//! `MESH_TEST_REQUIRE_ALL=1`.

mod common;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{authed, bin};
use serde_json::Value;
use shop_api::{
    common::v1::Money,
    inventory::v1::{
        CreateProductRequest, ListProductsRequest, inventory_service_client::InventoryServiceClient,
    },
    orders::v1::orders_service_client::OrdersServiceClient,
    payments::v1::{
        DepositRequest, GetAccountRequest, OpenWalletAccountRequest,
        wallet_service_client::WalletServiceClient,
    },
};

/// Every edge of the shop: who calls whom over the mesh.
const SHOP_EDGES: &str = "gateway>auth,gateway>inventory,gateway>orders,gateway>payments,\
                          orders>auth,orders>inventory,orders>payments,payments>auth";

/// The longest a browser script may run (it stops itself at 280 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// What a browser test needs: Node, Chromium, playwright-core and the
/// built apps; `None` (after `SKIPPED:`) when one is missing.
struct Browser {
    node: PathBuf,
    chromium: PathBuf,
    web: PathBuf,
}

fn browser() -> Option<Browser> {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let Some(node) = common::which("node") else {
        match common::skip_or_fail("node is not installed (apt-get install nodejs npm)")? {}
    };
    let chromium = std::env::var_os("MESH_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        common::skip_or_fail(&format!(
            "{} is missing (apt-get install chromium)",
            chromium.display()
        ))?;
    }
    if !web.join("node_modules/playwright-core").is_dir() {
        common::skip_or_fail("web/node_modules has no playwright-core (run `npm ci` in web/)")?;
    }
    for app in ["shop", "dashboard"] {
        if !web.join("dist").join(app).join("index.html").is_file() {
            common::skip_or_fail(&format!(
                "web/dist/{app} is not built (run `npm ci && npm run build` in web/)"
            ))?;
        }
    }
    Some(Browser {
        node,
        chromium,
        web,
    })
}

impl Browser {
    /// Runs `web/e2e/<script>` with `env`, bounded; panics with its output
    /// unless it printed `PASS`. Returns what it printed.
    async fn run(&self, script: &str, env: &[(&str, String)]) -> String {
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(&self.node)
            .arg(self.web.join("e2e").join(script))
            .current_dir(&self.web)
            .env("CHROMIUM", &self.chromium)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.reopen().unwrap())
            .stderr(out.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting node {script}: {e}"));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > SCRIPT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let printed = std::fs::read_to_string(out.path()).unwrap_or_default();
        match status {
            Some(s) if s.success() && printed.contains("PASS") => printed,
            Some(s) => panic!("{script} failed ({s}):\n{printed}"),
            None => panic!("{script} ran longer than {SCRIPT_TIMEOUT:?}:\n{printed}"),
        }
    }
}

/// Where a test's screenshot goes; with `MESH_UPDATE_SCREENSHOTS=1` it is
/// then copied to `docs/<name>` for the README.
fn screenshot(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn publish(shot: &Path) {
    assert!(shot.is_file(), "no screenshot at {}", shot.display());
    if std::env::var("MESH_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::copy(shot, docs.join(shot.file_name().unwrap())).unwrap();
    }
    eprintln!("screenshot: {}", shot.display());
}

const REPLICAS: u16 = 2;
/// Ports each of `shopctl up`'s gRPC and admin blocks needs: 6 services ×
/// replicas, then the identity service.
const BLOCK: u16 = 6 * REPLICAS + 1;
/// Ports a `shopctl up` run needs: both blocks, then the storefront and
/// the dashboard.
const SPAN: u16 = 2 * BLOCK + 2;

/// A base port with `SPAN` free ports from it, in 8100..12000: below the
/// range of `tests/shopctl_up.rs` and `common::free_addr`'s, so no other
/// test's process is handed one of them.
fn free_block() -> u16 {
    common::up::free_port_block(8_100, 12_000, SPAN)
}

/// `shopctl up` with both web apps, SIGKILLed with its services if the
/// test fails.
struct Up {
    shop: common::up::Up,
    state: PathBuf,
    storefront: String,
    dashboard: String,
    endpoints: Value,
    /// A port held for the test's whole run.
    _taken: Option<TcpListener>,
}

impl Up {
    /// Starts `shopctl up` (`REPLICAS` per service) in `dir` and waits
    /// until it has written endpoints.json; with `dashboard_taken`, another
    /// process holds the dashboard's port meanwhile.
    async fn start(dir: &Path, web: &Path, dashboard_taken: bool) -> Up {
        let base = free_block();
        let n = BLOCK;
        let (storefront, dashboard) = (base + 2 * n, base + 2 * n + 1);
        let taken = dashboard_taken
            .then(|| TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], dashboard))).unwrap());
        let args = [
            "--replicas".to_string(),
            REPLICAS.to_string(),
            "--base-port".into(),
            base.to_string(),
            "--admin-base-port".into(),
            (base + n).to_string(),
            "--storefront-port".into(),
            storefront.to_string(),
            "--dashboard-port".into(),
            dashboard.to_string(),
            "--web-dir".into(),
            web.join("dist").display().to_string(),
        ];
        let shop = common::up::Up::start(dir, &args).await;
        Up {
            state: shop.state.clone(),
            endpoints: shop.endpoints(),
            shop,
            storefront: format!("http://127.0.0.1:{storefront}/"),
            dashboard: format!("http://127.0.0.1:{dashboard}/"),
            _taken: taken,
        }
    }

    fn log_text(&self) -> String {
        self.shop.log()
    }

    fn gateway(&self) -> SocketAddr {
        self.endpoints["services"]["gateway"]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The operator stocks a product (inside the mesh, with the
    /// certificate shopctl issued); returns its id.
    async fn stock(&self, sku: &str, price_minor: i64, stock: i64) -> String {
        let tls = &self.endpoints["tls"];
        let inventory = &self.endpoints["services"]["inventory"];
        let operator = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
            .unwrap()
            .with_tls(
                mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(
                    Path::new(tls["cert"].as_str().unwrap()).parent().unwrap(),
                ))
                .unwrap(),
            );
        let channel = operator
            .channel_with_identity(
                inventory["target"].as_str().unwrap(),
                inventory["identity"].as_str().unwrap(),
            )
            .unwrap();
        InventoryServiceClient::new(channel)
            .create_product(CreateProductRequest {
                sku: sku.into(),
                name: "Mug".into(),
                price: Some(usd(price_minor)),
                initial_stock: stock,
            })
            .await
            .expect("CreateProduct as the operator")
            .into_inner()
            .product_id
    }

    /// SIGTERM: everything drains, exit 0.
    async fn stop(self) {
        self.shop.stop().await
    }
}

fn usd(amount_minor: i64) -> Money {
    Money {
        currency_code: "USD".into(),
        amount_minor,
    }
}

/// A unique user name per run (the shop's state is the test's own, but a
/// rerun must not depend on that).
fn username(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storefront_orders_live_shows_server_errors_and_refuses_the_signed_out() {
    let Some(browser) = browser() else { return };
    tokio::time::timeout(Duration::from_secs(600), async {
        let dir = tempfile::tempdir().unwrap();
        // The dashboard's port is taken: the shop and its storefront start
        // anyway, and say what is left out.
        let up = Up::start(dir.path(), &browser.web, true).await;
        let log = up.log_text();
        assert!(
            log.contains("dashboard not served: cannot bind"),
            "no note of the taken port:\n{log}"
        );
        up.stock("MUG-1", 1250, 100).await;
        let shot = screenshot("storefront.png");
        let printed = browser
            .run(
                "storefront.mjs",
                &[
                    ("STOREFRONT_URL", up.storefront.clone()),
                    ("SHOP_USER", username("ann")),
                    ("SHOP_SKU", "MUG-1".into()),
                    ("SCREENSHOT", shot.display().to_string()),
                ],
            )
            .await;
        eprintln!("{printed}");
        publish(&shot);
        up.stop().await;
    })
    .await
    .expect("the test took more than 600 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_draws_every_edge_with_moving_rates_and_shows_a_killed_replica() {
    let Some(browser) = browser() else { return };
    tokio::time::timeout(Duration::from_secs(600), async {
        let dir = tempfile::tempdir().unwrap();
        let up = Up::start(dir.path(), &browser.web, false).await;
        let product = up.stock("TEA-1", 100, 1_000_000).await;
        let load = load(up.gateway(), product).await;
        let shot = screenshot("dashboard.png");
        let printed = browser
            .run(
                "dashboard.mjs",
                &[
                    ("DASHBOARD_URL", up.dashboard.clone()),
                    ("EXPECTED_EDGES", SHOP_EDGES.into()),
                    (
                        "STATUS_JSON",
                        up.state.join("status.json").display().to_string(),
                    ),
                    ("KILL", "inventory:1".into()),
                    ("SCREENSHOT", shot.display().to_string()),
                ],
            )
            .await;
        eprintln!("{printed}");
        standalone_dashboard(&up, &browser.web).await;
        load.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = load.task.await.unwrap();
        eprintln!("load: {ok} rounds, {failed} failed calls");
        assert!(ok > 0, "the load never got a round through");
        publish(&shot);
        up.stop().await;
    })
    .await
    .expect("the test took more than 600 s");
}

struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u32, u32)>,
}

/// A user buying through the gateway, about four rounds a second (under
/// the gateway's 20 calls/s per address): list products, place an order,
/// read the wallet; a login every tenth round. Bounded: 2 400 rounds (10
/// minutes) at most, or until told to stop. Returns (rounds, failed calls).
async fn load(gateway: SocketAddr, product: String) -> Load {
    let channel = common::channel(gateway).await;
    let (_, token) = common::gateway_login(&channel, &username("bob")).await;
    let mut wallet = WalletServiceClient::new(channel.clone());
    let account = wallet
        .open_account(authed(
            &token,
            OpenWalletAccountRequest {
                currency_code: "USD".into(),
            },
        ))
        .await
        .expect("open a wallet account through the gateway")
        .into_inner()
        .account_id;
    wallet
        .deposit(authed(
            &token,
            DepositRequest {
                account_id: account.clone(),
                amount: Some(usd(900_000_000)),
                idempotency_key: "load-1".into(),
            },
        ))
        .await
        .expect("deposit through the gateway");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut inventory = InventoryServiceClient::new(channel.clone());
            let mut orders = OrdersServiceClient::new(channel.clone());
            let mut auth =
                shop_api::auth::v1::auth_service_client::AuthServiceClient::new(channel.clone());
            let (mut rounds, mut failed) = (0u32, 0u32);
            for round in 0..2_400u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let mut results = vec![
                    inventory
                        .list_products(ListProductsRequest::default())
                        .await
                        .map(drop),
                    orders
                        .place_order(common::place_request(
                            &token,
                            &product,
                            &account,
                            format!("load-{round}"),
                        ))
                        .await
                        .map(drop),
                    wallet
                        .get_account(authed(
                            &token,
                            GetAccountRequest {
                                account_id: account.clone(),
                            },
                        ))
                        .await
                        .map(drop),
                ];
                if round % 10 == 0 {
                    results.push(
                        auth.login(shop_api::auth::v1::LoginRequest {
                            username: username("bob"),
                            password: "correct-horse-battery".into(),
                        })
                        .await
                        .map(drop),
                    );
                }
                rounds += 1;
                failed += results.iter().filter(|r| r.is_err()).count() as u32;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (rounds, failed)
        })
    };
    Load { stop, task }
}

/// One raw HTTP/1.1 request (`Connection: close`) to `addr`; the whole
/// answer as text, head and body.
async fn raw_http(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// No browser needed: the gateway's second port serves the built app (and
/// only it), with a strict CSP naming the gateway, and CORS on the gRPC
/// port admits the app's own origin and the configured one, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_the_web_app_on_its_own_port_and_cors_admits_only_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<p>storefront</p>").unwrap();
    std::fs::create_dir(dir.path().join("assets")).unwrap();
    std::fs::write(dir.path().join("assets/app-1.js"), "console.log(1)").unwrap();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "not for the web").unwrap();
    let (addr, web) = (common::free_addr(), common::free_addr());
    let args = |static_dir: &Path| {
        vec![
            "--static-dir".to_string(),
            static_dir.display().to_string(),
            "--static-listen".into(),
            web.to_string(),
            "--cors-allowed-origin".into(),
            common::ORIGIN.into(),
            "--admin-addr".into(),
            common::free_addr().to_string(),
        ]
    };
    // A directory that is not there is refused at start, with the fix.
    let missing = dir.path().join("missing");
    let refused = Command::new(bin("gateway"))
        .args(["--listen", &addr.to_string()])
        .args(args(&missing))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--static-dir") && stderr.contains("npm"),
        "{stderr}"
    );

    let _gateway = common::Proc::spawn("gateway", addr, &args(dir.path()));
    common::wait_serving(addr).await;
    let get = |path: &str, host: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let host = web.to_string();

    let index = raw_http(web, &get("/", &host)).await;
    assert!(index.starts_with("HTTP/1.1 200"), "{index}");
    assert!(index.contains("<p>storefront</p>"));
    let lower = index.to_ascii_lowercase();
    assert!(
        lower.contains(&format!(
            "content-security-policy: default-src 'self'; connect-src 'self' http://{addr};"
        )),
        "{index}"
    );
    assert!(lower.contains("x-content-type-options: nosniff"));
    let asset = raw_http(web, &get("/assets/app-1.js", &host)).await;
    assert!(
        asset.contains("text/javascript") && asset.contains("immutable"),
        "{asset}"
    );
    let config = raw_http(web, &get("/config.json", &host)).await;
    assert!(
        config.contains(&format!("{{\"gatewayUrl\":\"http://{addr}\"}}")),
        "{config}"
    );
    // Nothing outside the directory, whatever the path says.
    let name = secret.path().file_name().unwrap().to_string_lossy();
    for path in [
        format!("/../{name}"),
        format!("/%2e%2e/{name}"),
        secret.path().display().to_string(),
    ] {
        let answer = raw_http(web, &get(&path, &host)).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
    }
    let post = raw_http(
        web,
        &format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    // DNS rebinding: a loopback server answers only to loopback names.
    let rebound = raw_http(web, &get("/", "evil.example")).await;
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    let localhost = raw_http(web, &get("/", &format!("localhost:{}", web.port()))).await;
    assert!(localhost.starts_with("HTTP/1.1 200"), "{localhost}");

    // CORS on the gRPC port: the app's origins and the configured one.
    let preflight = |origin: String| {
        format!(
            "OPTIONS /mesh.inventory.v1.InventoryService/ListProducts HTTP/1.1\r\nHost: {addr}\r\n\
             Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: content-type,x-grpc-web\r\nConnection: close\r\n\r\n"
        )
    };
    let other = common::free_addr();
    for (origin, allowed) in [
        (format!("http://{web}"), true),
        (format!("http://localhost:{}", web.port()), true),
        (common::ORIGIN.to_string(), true),
        (format!("http://{other}"), false),
        (format!("https://{web}"), false),
        ("null".to_string(), false),
    ] {
        let answer = raw_http(addr, &preflight(origin.clone()))
            .await
            .to_ascii_lowercase();
        let granted = answer.contains(&format!(
            "access-control-allow-origin: {}",
            origin.to_ascii_lowercase()
        ));
        assert_eq!(granted, allowed, "{origin}: {answer}");
        assert!(
            !answer.contains("access-control-allow-origin: *"),
            "{answer}"
        );
    }
}

/// `shopctl dashboard` on its own, reading the endpoints file of `up`:
/// its `/api/view` names every edge of the shop; without a built page it
/// refuses to start and says how to build one.
async fn standalone_dashboard(up: &Up, web: &Path) {
    let endpoints = up.state.join("endpoints.json");
    let missing = Command::new(bin("shopctl"))
        .arg("dashboard")
        .arg("--endpoints")
        .arg(&endpoints)
        .args(["--listen", &common::free_addr().to_string()])
        .args(["--web-dir", "/nonexistent"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("npm ci && npm run build"),
        "{stderr}"
    );
    let at = common::free_addr();
    let mut dashboard = Command::new(bin("shopctl"))
        .arg("dashboard")
        .arg("--endpoints")
        .arg(&endpoints)
        .args(["--listen", &at.to_string(), "--interval", "0.5"])
        .arg("--web-dir")
        .arg(web.join("dist/dashboard"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let view = loop {
        let view = match tokio::net::TcpStream::connect(at).await {
            Ok(_) => {
                let (status, body) = common::http_get(at, "/api/view").await;
                assert_eq!(status, 200, "{body}");
                serde_json::from_str::<Value>(&body).unwrap()
            }
            Err(_) => Value::Null,
        };
        if view["seq"].as_u64().unwrap_or(0) >= 1 {
            break view;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "shopctl dashboard gave no view in 60 s: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = dashboard.kill();
    let _ = dashboard.wait();
    let known: Vec<String> = view["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}>{}",
                t["from"].as_str().unwrap(),
                t["to"].as_str().unwrap()
            )
        })
        .collect();
    for edge in SHOP_EDGES.split(',') {
        assert!(known.iter().any(|k| k == edge), "{edge} not in {known:?}");
    }
}
