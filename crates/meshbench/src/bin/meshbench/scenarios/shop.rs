//! Scenario 6: the shop end to end. PlaceOrder (orders → auth, inventory,
//! payments: the whole saga, every hop over the mesh with mTLS) on SQLite
//! and on PostgreSQL, interleaved.

use mesh_client::MeshChannel;
use shop_api::{
    auth::v1::{LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient},
    common::v1::Money,
    inventory::v1::{CreateProductRequest, inventory_service_client::InventoryServiceClient},
    orders::v1::orders_service_client::OrdersServiceClient,
    payments::v1::{
        DepositRequest, OpenAccountRequest, payments_service_client::PaymentsServiceClient,
    },
};

use super::Ctx;
use crate::load::{Caller, Contender, Load, Shopper, interleave, this_process};
use crate::pki::{self, Pki};
use crate::procs::{self, Proc};
use crate::report::{Goal, Scenario};

const SERVICES: [&str; 4] = ["auth", "inventory", "payments", "orders"];

/// The four services on one database kind, and the operator's mesh.
struct Shop {
    procs: Vec<Proc>,
    /// PostgreSQL databases made for this shop, dropped after the run.
    databases: Vec<String>,
    mesh: mesh_client::Mesh,
}

impl Shop {
    fn channel(&self, service: &str) -> Result<MeshChannel, String> {
        let i = SERVICES
            .iter()
            .position(|s| *s == service)
            .expect("known service");
        self.mesh
            .channel_with_identity(
                &format!("static:///{}", self.procs[i].addr),
                &pki::identity("shop", service),
            )
            .map_err(|e| e.to_string())
    }
}

/// Runs the scenario: a shop per database kind, PlaceOrder interleaved.
pub async fn run(ctx: &Ctx) -> Result<Scenario, String> {
    let pki = Pki::new(&ctx.dir.join("shop-pki"))?;
    for who in SERVICES.iter().chain(&["operator"]) {
        pki.issue("shop", who)?;
    }
    let mut shops = vec![("SQLite", start(ctx, &pki, None, "sqlite").await?)];
    let mut notes = vec![];
    match &ctx.postgres_url {
        Some(url) => shops.push(("PostgreSQL", start(ctx, &pki, Some(url), "pg").await?)),
        None => notes.push(
            "PostgreSQL not measured: pass --postgres-url (scripts/test-postgres.sh starts one)"
                .to_string(),
        ),
    }
    let mut contenders = Vec::new();
    for (name, shop) in &shops {
        let shopper = customers(shop, &format!("bench{}", std::process::id())).await?;
        let mut procs = vec![this_process()];
        procs.extend(shop.procs.iter().map(|p| (p.label.clone(), p.pid())));
        contenders.push(Contender::new(
            &format!("PlaceOrder on {name}"),
            Caller::PlaceOrder(Box::new(shopper)),
            procs,
        ));
    }
    let concurrency = ctx.shop_concurrency;
    interleave(&mut contenders, Load::Closed { concurrency }, ctx.plan).await;
    let rows: Vec<_> = contenders
        .iter()
        .map(|c| c.acc.row(&c.name, "closed"))
        .collect();
    drop(contenders);
    for (_, shop) in shops {
        let Shop {
            procs, databases, ..
        } = shop;
        drop(procs);
        if let Some(admin) = &ctx.postgres_url {
            for name in databases {
                if let Err(e) = psql(admin, &format!("DROP DATABASE IF EXISTS {name}")).await {
                    notes.push(format!("could not drop {name}: {e}"));
                }
            }
        }
    }
    let goals = rows
        .iter()
        .map(|r| Goal::report(&format!("{} throughput", r.contender), r.rps, "orders/s"))
        .collect();
    notes.push(
        "CPU counts the client and the four services; PostgreSQL's own processes are not counted"
            .into(),
    );
    Ok(Scenario {
        id: "shop".into(),
        timeline: None,
        title: "Shop end to end: PlaceOrder saga".into(),
        setup: format!(
            "PlaceOrder of one unit ({concurrency} in flight, closed loop): orders verifies the token locally with auth's keys, reserves stock, charges, commits, confirms; one DB per service; mTLS with authorization policies on every hop; {}",
            ctx.plan_text()
        ),
        rows,
        goals,
        notes,
    })
}

async fn start(ctx: &Ctx, pki: &Pki, postgres: Option<&String>, tag: &str) -> Result<Shop, String> {
    let dir = ctx.dir.join(format!("shop-{tag}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let addrs = SERVICES
        .iter()
        .map(|_| procs::free_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let mut procs = Vec::new();
    let mut databases = Vec::new();
    for (i, service) in SERVICES.iter().enumerate() {
        let url = match postgres {
            Some(admin) => {
                let (name, url) = create_database(admin, service).await?;
                databases.push(name);
                url
            }
            None => format!("sqlite://{}", dir.join(format!("{service}.db")).display()),
        };
        let policy = dir.join(format!("{service}.policy.json"));
        std::fs::write(&policy, policy_for(service)).map_err(|e| e.to_string())?;
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addrs[i].to_string(),
            "--database-url".into(),
            url,
            "--tls-dir".into(),
            pki.root.join(service).display().to_string(),
            "--mesh-config".into(),
            policy.display().to_string(),
            "--trust-domain".into(),
            pki::TRUST_DOMAIN.into(),
        ];
        if *service == "orders" {
            for (j, callee) in SERVICES[..3].iter().enumerate() {
                args.push(format!("--{callee}-target"));
                args.push(format!("static:///{}", addrs[j]));
            }
        }
        let log = dir.join(format!("{service}.log"));
        let mut proc = procs::spawn(service, &procs::sibling(service)?, &args, addrs[i], &log)?;
        procs::wait_listening(&mut proc, &log).await?;
        procs.push(proc);
    }
    let mesh = ctx.mesh()?.with_tls(pki.load("operator")?);
    let shop = Shop {
        procs,
        mesh,
        databases,
    };
    // Listening is not serving: wait for each one's health to say SERVING.
    for service in SERVICES {
        crate::scenarios::wait_serving(shop.channel(service)?).await?;
    }
    Ok(shop)
}

/// Who may call what: the operator everything, orders its three callees.
fn policy_for(service: &str) -> String {
    let mut rules = vec![serde_json::json!({
        "callers": [pki::identity("shop", "operator")], "methods": ["*"]
    })];
    if service != "orders" {
        let prefix = match service {
            "auth" => "mesh.auth.v1.AuthService/*",
            "inventory" => "mesh.inventory.v1.InventoryService/*",
            _ => "mesh.payments.v1.PaymentsService/*",
        };
        rules.push(serde_json::json!({
            "callers": [pki::identity("shop", "orders")], "methods": [prefix]
        }));
    }
    serde_json::json!({"authorization": {"rules": rules}}).to_string()
}

/// Runs one SQL statement on the PostgreSQL server at `admin` with `psql`
/// (not sqlx: sqlx turns on tracing's `log` feature, which would put a log
/// fallback into every span of the client being measured).
async fn psql(admin: &str, statement: &str) -> Result<(), String> {
    let psql =
        procs::which("psql").ok_or("psql (PostgreSQL's client) is needed with --postgres-url")?;
    let output = tokio::process::Command::new(psql)
        .args([admin, "-v", "ON_ERROR_STOP=1", "-q", "-c", statement])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), output)
        .await
        .map_err(|_| format!("psql did not answer in 30 s: {statement}"))?
        .map_err(|e| format!("running psql: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{statement} on {admin}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `admin` with its database name replaced by `name` (query kept).
fn database_url(admin: &str, name: &str) -> Result<String, String> {
    let (path, query) = match admin.split_once('?') {
        Some((path, query)) => (path, format!("?{query}")),
        None => (admin, String::new()),
    };
    let (base, _) = path
        .rsplit_once('/')
        .filter(|(base, _)| base.contains("//"))
        .ok_or("--postgres-url must look like postgres://user@host:port/database")?;
    Ok(format!("{base}/{name}{query}"))
}

/// A new empty PostgreSQL database for `service`: its name and URL.
async fn create_database(admin: &str, service: &str) -> Result<(String, String), String> {
    let name = format!(
        "bench_{}_{}_{service}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let url = database_url(admin, &name)?;
    psql(admin, &format!("CREATE DATABASE {name}")).await?;
    Ok((name, url))
}

/// How many customers take turns: enough that none reaches orders' cap on
/// orders in progress, few enough for auth's registration limit per caller.
const CUSTOMERS: usize = 16;

/// [`CUSTOMERS`] users with tokens and accounts with plenty of money, and a
/// product with plenty of stock.
async fn customers(shop: &Shop, name: &str) -> Result<Shopper, String> {
    let mut all = Vec::with_capacity(CUSTOMERS);
    for i in 0..CUSTOMERS {
        all.push(customer(shop, &format!("{name}-{i}")).await?);
    }
    let product = InventoryServiceClient::new(shop.channel("inventory")?)
        .create_product(CreateProductRequest {
            sku: format!("SKU-{name}"),
            name: format!("benchmark product of {name}"),
            price: Some(Money {
                currency_code: "USD".into(),
                amount_minor: 100,
            }),
            initial_stock: 100_000_000,
        })
        .await
        .map_err(|s| format!("create product: {s}"))?
        .into_inner()
        .product_id;
    Ok(Shopper {
        orders: OrdersServiceClient::new(shop.channel("orders")?),
        customers: std::sync::Arc::new(all),
        product,
    })
}

/// A user with a token and an account with plenty of money.
async fn customer(shop: &Shop, name: &str) -> Result<(String, String), String> {
    let e = |what: &'static str| move |s: tonic::Status| format!("{what}: {s}");
    let usd = |amount_minor| {
        Some(Money {
            currency_code: "USD".into(),
            amount_minor,
        })
    };
    let mut auth = AuthServiceClient::new(shop.channel("auth")?);
    let password = "correct-horse-battery-staple".to_string();
    let user = auth
        .register(RegisterRequest {
            username: name.into(),
            password: password.clone(),
        })
        .await
        .map_err(e("register"))?
        .into_inner();
    let token = auth
        .login(LoginRequest {
            username: name.into(),
            password,
        })
        .await
        .map_err(e("login"))?
        .into_inner()
        .access_token;
    let mut payments = PaymentsServiceClient::new(shop.channel("payments")?);
    let account = payments
        .open_account(OpenAccountRequest {
            owner_id: user.user_id,
            currency_code: "USD".into(),
        })
        .await
        .map_err(e("open account"))?
        .into_inner()
        .account_id;
    payments
        .deposit(DepositRequest {
            account_id: account.clone(),
            amount: usd(1_000_000_000_000),
            idempotency_key: format!("deposit-{name}"),
        })
        .await
        .map_err(e("deposit"))?;
    Ok((token, account))
}
