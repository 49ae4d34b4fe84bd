//! No order lost, no charge doubled: hundreds of orders placed concurrently
//! (some doomed by stock or funds) while a seeded chaos driver SIGKILLs and
//! restarts orders, payments and inventory (and, on PostgreSQL, stops and
//! restarts the database once). After recovery settles the invariants are
//! checked against the services' own databases and printed.
//!
//! Once per run, payments refuses orders' RefundCharge for a few seconds
//! (its mesh policy, `PERMISSION_DENIED`) while charged orders must be
//! refunded: inventory refuses CommitReservation meanwhile, so charged
//! orders wait at step commit, and their reservations are released (as
//! the expiry sweep would). Those orders must wait at step refund until
//! payments takes refunds again, never end CANCELLED with the money taken
//! (#23.4); a probe order of its own makes sure at least one is there.
//!
//! Replay a seed or run bigger: `CHAOS_SEED=42 CHAOS_ORDERS=2000 cargo test
//! --workspace --test chaos -- --nocapture`.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Db, Shop, ShopOptions, authed, http_get, shop_policy_refusing_orders};
use rand::{Rng, SeedableRng, rngs::StdRng};
use shop_api::{
    common::v1::Money,
    inventory::v1::{CreateProductRequest, ReleaseReservationRequest},
    orders::v1::{PlaceOrderItem, PlaceOrderRequest},
    payments::v1::{DepositRequest, OpenAccountRequest},
};
use sqlx::{AnyPool, Row};
use tokio::time::Instant;
use tonic::Code;

const PRODUCTS: usize = 5;
const STOCK: i64 = 30;
const USERS: usize = 12;

struct World {
    products: Vec<String>,
    users: Vec<(String, String)>, // (token, account)
    deposits: i64,
    /// The refund refusal's probe: a rich user of its own and a product
    /// with stock to spare, so its order surely gets charged.
    probe: (String, String),
    probe_product: String,
}

const PROBE_STOCK: i64 = 1_000;

async fn setup(shop: &Shop, rng: &mut StdRng) -> World {
    let mut products = Vec::new();
    for i in 0..PRODUCTS {
        let p = shop
            .inventory()
            .await
            .create_product(CreateProductRequest {
                sku: format!("CHAOS-{i}"),
                name: format!("chaos product {i}"),
                price: Some(Money {
                    currency_code: "USD".into(),
                    amount_minor: 100 * (i as i64 + 1),
                }),
                initial_stock: STOCK,
            })
            .await
            .unwrap()
            .into_inner();
        products.push(p.product_id);
    }
    let mut users = Vec::new();
    let mut deposits = 0;
    for i in 0..USERS {
        let (user_id, token) = shop.user(&format!("chaos{i}")).await;
        let account = shop
            .payments()
            .await
            .open_account(OpenAccountRequest {
                owner_id: user_id,
                currency_code: "USD".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .account_id;
        // Some users are poor: their orders are doomed by funds.
        let amount = if i % 3 == 0 {
            150
        } else {
            rng.random_range(2_000..20_000)
        };
        shop.payments()
            .await
            .deposit(DepositRequest {
                account_id: account.clone(),
                amount: Some(Money {
                    currency_code: "USD".into(),
                    amount_minor: amount,
                }),
                idempotency_key: format!("chaos-dep-{i}"),
            })
            .await
            .unwrap();
        deposits += amount;
        users.push((token, account));
    }
    let probe_product = shop
        .inventory()
        .await
        .create_product(CreateProductRequest {
            sku: "CHAOS-PROBE".into(),
            name: "refund refusal probe".into(),
            price: Some(Money {
                currency_code: "USD".into(),
                amount_minor: 100,
            }),
            initial_stock: PROBE_STOCK,
        })
        .await
        .unwrap()
        .into_inner()
        .product_id;
    let (user_id, token) = shop.user("chaos-probe").await;
    let account = shop
        .payments()
        .await
        .open_account(OpenAccountRequest {
            owner_id: user_id,
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account_id;
    shop.payments()
        .await
        .deposit(DepositRequest {
            account_id: account.clone(),
            amount: Some(Money {
                currency_code: "USD".into(),
                amount_minor: 100_000,
            }),
            idempotency_key: "chaos-dep-probe".into(),
        })
        .await
        .unwrap();
    deposits += 100_000;
    World {
        products,
        users,
        deposits,
        probe: (token, account),
        probe_product,
    }
}

/// Places one order, retrying with the same key through outages and
/// while the user has too many orders in progress. The shop is locked for
/// reading per attempt only, so the chaos driver can restart services
/// between attempts.
async fn place(
    shop: &tokio::sync::RwLock<Shop>,
    request: PlaceOrderRequest,
    token: &str,
) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut call = authed(token, request.clone());
        call.set_timeout(Duration::from_secs(5));
        let answer = {
            let guard = shop.read().await;
            let mut orders = guard.orders().await;
            orders.place_order(call).await
        };
        match answer {
            Ok(order) => return Some(order.into_inner().order_id),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::Aborted
                        | Code::Internal
                        | Code::Unknown
                        | Code::Cancelled
                        | Code::ResourceExhausted
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("order refused: {s:?}"),
        }
    }
    None
}

async fn pool(url: &str) -> AnyPool {
    common::check_pool(url).await
}

async fn chaos(db: Db, pg_control: Option<PgControl>) {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let n_orders: usize = std::env::var("CHAOS_ORDERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    eprintln!("chaos: seed {seed} ({n_orders} orders; replay with CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    // mTLS: the refund refusal is a mesh authorization policy.
    let shop = Shop::start_opts(
        &db,
        ShopOptions {
            tls: true,
            ..Default::default()
        },
    )
    .await;
    let world = setup(&shop, &mut rng).await;

    // The orders to place, drawn from the seed.
    let plans: Vec<(usize, Vec<(usize, i64)>)> = (0..n_orders)
        .map(|_| {
            let user = rng.random_range(0..USERS);
            let first = rng.random_range(0..PRODUCTS);
            let mut items = vec![(first, rng.random_range(1..=3))];
            if rng.random_bool(0.4) {
                items.push(((first + 1) % PRODUCTS, rng.random_range(1..=2)));
            }
            (user, items)
        })
        .collect();
    let shop = Arc::new(tokio::sync::RwLock::new(shop));
    let world = Arc::new(world);
    let queue = Arc::new(Mutex::new(
        plans.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let placing = Instant::now();
    let workers: Vec<_> = (0..12)
        .map(|_| {
            let (shop, world, queue, accepted) =
                (shop.clone(), world.clone(), queue.clone(), accepted.clone());
            tokio::spawn(async move {
                loop {
                    let Some((n, (user, items))) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let (token, account) = &world.users[user];
                    let request = PlaceOrderRequest {
                        items: items
                            .iter()
                            .map(|(p, q)| PlaceOrderItem {
                                product_id: world.products[*p].clone(),
                                quantity: *q,
                            })
                            .collect(),
                        payment_account_id: account.clone(),
                        idempotency_key: format!("chaos-order-{n}"),
                    };
                    if let Some(id) = place(&shop, request, token).await {
                        accepted.lock().unwrap().push(id);
                    }
                }
            })
        })
        .collect();

    // The chaos driver: kill and restart services while orders flow.
    let mut events = Vec::new();
    let mut pg_cycled = pg_control.is_none();
    let refuse_at = rng.random_range(1..=3);
    let mut probe = None;
    while !workers.iter().all(|w| w.is_finished()) && placing.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
        if probe.is_none() && events.len() >= refuse_at {
            let (id, event) = refuse_refunds(&shop, &world, seed).await;
            probe = Some(id);
            events.push(event);
            continue;
        }
        if !pg_cycled && rng.random_bool(0.3) {
            let pg = pg_control.as_ref().unwrap();
            pg.stop();
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
            pg.start();
            events.push("postgres stop/start".to_string());
            pg_cycled = true;
            continue;
        }
        let victim = ["orders", "payments", "inventory"][rng.random_range(0..3)];
        let pause = Duration::from_millis(rng.random_range(50..500));
        let mut guard = shop.write().await;
        guard.proc_mut(victim).kill();
        tokio::time::sleep(pause).await;
        guard.restart(victim).await;
        events.push(format!("SIGKILL {victim}, back after {pause:?}"));
    }
    if !pg_cycled {
        let pg = pg_control.as_ref().unwrap();
        pg.stop();
        tokio::time::sleep(Duration::from_millis(800)).await;
        pg.start();
        events.push("postgres stop/start".to_string());
    }
    if probe.is_none() {
        let (id, event) = refuse_refunds(&shop, &world, seed).await;
        probe = Some(id);
        events.push(event);
    }
    for w in workers {
        w.await.unwrap();
    }
    let mut accepted = accepted.lock().unwrap().clone();
    accepted.extend(probe);
    eprintln!("chaos: {} events: {events:?}", events.len());
    eprintln!(
        "chaos: {} of {n_orders} orders accepted in {:?}",
        accepted.len(),
        placing.elapsed()
    );

    // Settle: every order must end CONFIRMED or CANCELLED.
    let shop = shop.read().await;
    let orders_db = pool(&shop.urls["orders"]).await;
    let settle = Instant::now();
    loop {
        let pending: i64 = sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE status = 'PENDING'")
            .fetch_one(&orders_db)
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        if pending == 0 {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(120),
            "seed {seed}: {pending} orders still PENDING after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    check_invariants(&shop, &world, &accepted, seed).await;
}

/// The series counting orders' refused refund attempts.
const REFUSED_REFUNDS: &str = "mesh_orders_refund_failures_total{grpc_code=\"PERMISSION_DENIED\"}";

/// `(status, saga_step)` of an order, from the orders database.
async fn order_state(orders_db: &AnyPool, order_id: &str) -> (String, String) {
    let row = sqlx::query("SELECT status, saga_step FROM orders WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(orders_db)
        .await
        .unwrap();
    (
        row.try_get("status").unwrap(),
        row.try_get("saga_step").unwrap(),
    )
}

/// Waits (bounded) until the order is at `step`; panics if it ends first.
async fn wait_step(orders_db: &AnyPool, order_id: &str, step: &str, seed: u64) {
    let start = Instant::now();
    loop {
        let (status, at) = order_state(orders_db, order_id).await;
        if at == step {
            return;
        }
        assert_eq!(
            status, "PENDING",
            "seed {seed}: order {order_id} ended {status} before reaching step {step} while refunds were refused"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "seed {seed}: order {order_id} stuck at step {at}, waiting for {step}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The orders process's count of refused refund attempts.
async fn refused_refunds(shop: &Shop) -> f64 {
    let (_, body) = http_get(shop.admin["orders"], "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(REFUSED_REFUNDS)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Payments refuses orders' refunds for a while, with charged orders
/// needing one (see the module docs); returns the probe order's id and
/// what happened.
async fn refuse_refunds(
    shop: &tokio::sync::RwLock<Shop>,
    world: &World,
    seed: u64,
) -> (String, String) {
    let started = Instant::now();
    {
        let mut guard = shop.write().await;
        guard
            .restart_with_policy(
                "payments",
                &shop_policy_refusing_orders("payments", &["PaymentsService/RefundCharge"]),
            )
            .await;
        guard
            .restart_with_policy(
                "inventory",
                &shop_policy_refusing_orders("inventory", &["InventoryService/CommitReservation"]),
            )
            .await;
    }
    let (token, account) = &world.probe;
    let request = PlaceOrderRequest {
        items: vec![PlaceOrderItem {
            product_id: world.probe_product.clone(),
            quantity: 1,
        }],
        payment_account_id: account.clone(),
        idempotency_key: "chaos-probe".into(),
    };
    let probe = place(shop, request, token)
        .await
        .unwrap_or_else(|| panic!("seed {seed}: the probe order was not accepted"));
    let orders_db = pool(&shop.read().await.urls["orders"]).await;
    wait_step(&orders_db, &probe, "commit", seed).await;
    // Every order waiting at commit is charged: release its reservation,
    // as the expiry sweep would, so its commit fails and it must refund.
    let waiting: Vec<String> =
        sqlx::query("SELECT order_id FROM orders WHERE saga_step = 'commit'")
            .fetch_all(&orders_db)
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get("order_id").unwrap())
            .collect();
    {
        let guard = shop.read().await;
        let mut inventory = guard.inventory().await;
        for id in &waiting {
            // Committed just before the refusal began: nothing to release.
            let _ = inventory
                .release_reservation(ReleaseReservationRequest {
                    reservation_id: id.clone(),
                })
                .await;
        }
    }
    shop.write().await.restore("inventory").await;
    wait_step(&orders_db, &probe, "refund", seed).await;
    let start = Instant::now();
    while refused_refunds(&*shop.read().await).await < 3.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "seed {seed}: orders did not count its refused refunds"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, step) = order_state(&orders_db, &probe).await;
    assert_eq!(
        (status.as_str(), step.as_str()),
        ("PENDING", "refund"),
        "seed {seed}: a charged order whose refund is refused waits at step refund"
    );
    shop.write().await.restore("payments").await;
    let event = format!(
        "refunds refused for {:?}, {} charged orders had their reservation released",
        started.elapsed(),
        waiting.len()
    );
    (probe, event)
}

async fn check_invariants(shop: &Shop, world: &World, accepted: &[String], seed: u64) {
    let products: Vec<(String, i64)> = world
        .products
        .iter()
        .map(|p| (p.clone(), STOCK))
        .chain(std::iter::once((world.probe_product.clone(), PROBE_STOCK)))
        .collect();
    let tally = common::check_saga_invariants(
        &shop.urls,
        &products,
        world.deposits,
        accepted,
        &format!("seed {seed}"),
    )
    .await;
    eprintln!(
        "chaos invariants hold (seed {seed}): {} orders, {} confirmed (charged and committed once), {} cancelled (nothing held or charged), stock and ledger balance",
        tally.orders, tally.confirmed, tally.cancelled
    );
}

/// Stops and starts the test's own PostgreSQL server.
struct PgControl {
    dir: std::path::PathBuf,
}

impl PgControl {
    fn ctl(&self, action: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres.sh");
        let status = std::process::Command::new(script)
            .arg(action)
            .env("MESH_PG_DIR", &self.dir)
            .status()
            .unwrap();
        assert!(status.success(), "postgres {action}");
    }
    fn stop(&self) {
        self.ctl("pause");
    }
    fn start(&self) {
        self.ctl("resume");
    }
}

impl Drop for PgControl {
    fn drop(&mut self) {
        self.ctl("stop");
        let _ = std::fs::remove_dir_all(self.dir.parent().unwrap_or(&self.dir));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sqlite() {
    chaos(Db::Sqlite, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres() {
    // Its own server, since the database is stopped mid-run.
    if Db::postgres().is_none() {
        return;
    }
    // Directly under the temp dir: the postgres user must be able to reach it.
    let dir = std::env::temp_dir().join(format!("mesh-chaos-{}", std::process::id()));
    let port = 26000 + (std::process::id() % 1000) as u16;
    let out = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/test-postgres.sh"
    ))
    .env("MESH_PG_DIR", dir.join("pg"))
    .env("MESH_PG_PORT", port.to_string())
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let control = PgControl {
        dir: dir.join("pg"),
    };
    chaos(Db::Postgres(url), Some(control)).await;
}
