//! The saga's invariants, checked against the services' own databases
//! once every order has settled (`tests/chaos.rs`, `tests/netfaults_shop.rs`):
//! every order final; each confirmed order charged once for its total and
//! its stock committed; cancelled orders hold and owe nothing; each
//! product's stock adds up and its committed stock is exactly what
//! confirmed orders bought; every ledger balances; no money made or lost.

use std::{collections::HashMap, time::Duration};

use sqlx::{AnyPool, Row};

/// A small pool on a service's database, for checks.
pub async fn check_pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Orders still PENDING in the orders database at `url`.
pub async fn pending_orders(orders_db: &AnyPool) -> i64 {
    sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE status = 'PENDING'")
        .fetch_one(orders_db)
        .await
        .unwrap()
        .try_get("n")
        .unwrap()
}

/// Waits (at most `limit`, polling) until no order is PENDING; panics
/// naming `label` otherwise. Returns how long it took.
pub async fn wait_settled(orders_url: &str, limit: Duration, label: &str) -> Duration {
    let orders_db = check_pool(orders_url).await;
    let start = std::time::Instant::now();
    loop {
        let pending = pending_orders(&orders_db).await;
        if pending == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{label}: {pending} orders still PENDING after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the invariants found, for the test's log.
#[derive(Clone, Debug, Default)]
pub struct SagaTally {
    /// Orders in the orders database.
    pub orders: usize,
    /// Of them, CONFIRMED.
    pub confirmed: usize,
    /// Of them, CANCELLED.
    pub cancelled: usize,
}

/// Checks the saga's invariants (module docs) on the databases in `urls`
/// (`orders`, `payments`, `inventory`): `products` are every product with
/// its initial stock (none restocked), `deposits` the money every
/// customer account received, `accepted` the orders callers were told
/// about (none may be missing). Panics naming `label` on a violation.
pub async fn check_saga_invariants(
    urls: &HashMap<&'static str, String>,
    products: &[(String, i64)],
    deposits: i64,
    accepted: &[String],
    label: &str,
) -> SagaTally {
    let orders_db = check_pool(&urls["orders"]).await;
    let payments_db = check_pool(&urls["payments"]).await;
    let inventory_db = check_pool(&urls["inventory"]).await;

    let rows = sqlx::query("SELECT order_id, status, total_minor FROM orders")
        .fetch_all(&orders_db)
        .await
        .unwrap();
    let mut status: HashMap<String, (String, i64)> = HashMap::new();
    for r in &rows {
        status.insert(
            r.try_get("order_id").unwrap(),
            (
                r.try_get("status").unwrap(),
                r.try_get("total_minor").unwrap(),
            ),
        );
    }
    for id in accepted {
        assert!(
            status.contains_key(id),
            "{label}: accepted order {id} was lost"
        );
    }
    let items = sqlx::query("SELECT order_id, product_id, quantity FROM order_items")
        .fetch_all(&orders_db)
        .await
        .unwrap();
    let mut committed_expected: HashMap<String, i64> = HashMap::new();
    for r in &items {
        let order: String = r.try_get("order_id").unwrap();
        if status[&order].0 == "CONFIRMED" {
            *committed_expected
                .entry(r.try_get("product_id").unwrap())
                .or_default() += r.try_get::<i64, _>("quantity").unwrap();
        }
    }

    let charges: HashMap<String, (String, i64)> =
        sqlx::query("SELECT idempotency_key, state, amount_minor FROM charges")
            .fetch_all(&payments_db)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.try_get("idempotency_key").unwrap(),
                    (
                        r.try_get("state").unwrap(),
                        r.try_get("amount_minor").unwrap(),
                    ),
                )
            })
            .collect();
    let reservations: HashMap<String, String> =
        sqlx::query("SELECT reservation_id, state FROM reservations")
            .fetch_all(&inventory_db)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.try_get("reservation_id").unwrap(),
                    r.try_get("state").unwrap(),
                )
            })
            .collect();

    let (mut confirmed, mut cancelled, mut captured_total) = (0, 0, 0i64);
    for (id, (state, total)) in &status {
        let charge = charges.get(&format!("order-{id}-charge"));
        let reservation = reservations.get(id).map(String::as_str);
        match state.as_str() {
            "CONFIRMED" => {
                confirmed += 1;
                assert_eq!(
                    charge.map(|c| (c.0.as_str(), c.1)),
                    Some(("CAPTURED", *total)),
                    "{label}: confirmed order {id} charged wrongly"
                );
                assert_eq!(
                    reservation,
                    Some("COMMITTED"),
                    "{label}: confirmed order {id} stock not committed"
                );
            }
            "CANCELLED" => {
                cancelled += 1;
                if let Some((charge_state, _)) = charge {
                    assert!(
                        matches!(charge_state.as_str(), "REFUNDED" | "VOIDED" | "DECLINED"),
                        "{label}: cancelled order {id} has a {charge_state} charge"
                    );
                }
                assert!(
                    matches!(reservation, None | Some("RELEASED")),
                    "{label}: cancelled order {id} holds stock ({reservation:?})"
                );
            }
            other => panic!("{label}: order {id} is {other}"),
        }
    }
    for (state, amount) in charges.values() {
        if state == "CAPTURED" {
            captured_total += amount;
        }
    }
    let captured = charges.values().filter(|c| c.0 == "CAPTURED").count();
    assert_eq!(
        captured, confirmed,
        "{label}: every capture belongs to exactly one confirmed order"
    );

    for (product, stock) in products {
        let r = sqlx::query(
            "SELECT available, reserved, committed, received FROM products WHERE product_id = $1",
        )
        .bind(product)
        .fetch_one(&inventory_db)
        .await
        .unwrap();
        let (available, reserved, committed, received): (i64, i64, i64, i64) = (
            r.try_get("available").unwrap(),
            r.try_get("reserved").unwrap(),
            r.try_get("committed").unwrap(),
            r.try_get("received").unwrap(),
        );
        assert_eq!(received, *stock, "{label}: product {product} received");
        assert_eq!(
            available + reserved + committed,
            *stock,
            "{label}: product {product} stock does not add up"
        );
        assert_eq!(
            reserved, 0,
            "{label}: product {product} still has reserved stock"
        );
        assert_eq!(
            committed,
            *committed_expected.get(product).unwrap_or(&0),
            "{label}: product {product} committed != confirmed orders"
        );
    }

    let check = payments::check_ledger(&payments_db).await.unwrap();
    assert!(
        check.mismatched.is_empty() && check.unbalanced_txns.is_empty(),
        "{label}: ledger {check:?}"
    );
    let balances: i64 = sqlx::query("SELECT CAST(COALESCE(SUM(balance_minor), 0) AS BIGINT) AS s FROM accounts WHERE kind = 'CUSTOMER'")
        .fetch_one(&payments_db)
        .await
        .unwrap()
        .try_get("s")
        .unwrap();
    assert_eq!(
        balances + captured_total,
        deposits,
        "{label}: money was created or destroyed"
    );
    SagaTally {
        orders: status.len(),
        confirmed,
        cancelled,
    }
}
