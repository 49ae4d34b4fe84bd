//! Inventory answers a reservation's real state, also when a commit races
//! the expiry sweeper (issue #23.3): a commit whose guarded update matched
//! no row must not answer COMMITTED, or the orders saga confirms an order
//! whose stock is available again (oversold).
//!
//! The race is made deterministic on PostgreSQL: the test does what the
//! sweeper's transaction does, holds its row lock until inventory's commit
//! waits on it (seen in `pg_stat_activity`), then commits.

mod common;

use std::time::Duration;

use common::{Db, Proc, assert_status, free_addr, wait_serving};
use shop_api::{
    common::v1::Money,
    inventory::v1::{
        CommitReservationRequest, CreateProductRequest, GetProductRequest, GetReservationRequest,
        LineItem, ReleaseReservationRequest, ReservationState, ReserveStockRequest,
        inventory_service_client::InventoryServiceClient,
    },
};
use sqlx::{Connection, Row};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};

struct Inventory {
    _proc: Proc,
    _dir: tempfile::TempDir,
    url: String,
    client: InventoryServiceClient<Channel>,
}

async fn inventory(db: &Db, extra: &[&str]) -> Inventory {
    let dir = tempfile::tempdir().unwrap();
    let url = db.create(dir.path(), "inventory").await;
    let addr = free_addr();
    let mut args = vec!["--database-url".to_string(), url.clone()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let proc = Proc::spawn("inventory", addr, &args);
    wait_serving(addr).await;
    Inventory {
        _proc: proc,
        _dir: dir,
        url,
        client: InventoryServiceClient::new(common::channel(addr).await),
    }
}

/// A product with `stock` units and a reservation of 3 of them.
async fn reserved(inv: &mut Inventory, stock: i64) -> (String, String) {
    let product = inv
        .client
        .create_product(CreateProductRequest {
            sku: "RACE-1".into(),
            name: "raced product".into(),
            price: Some(Money {
                currency_code: "USD".into(),
                amount_minor: 100,
            }),
            initial_stock: stock,
        })
        .await
        .unwrap()
        .into_inner()
        .product_id;
    let reservation = uuid::Uuid::new_v4().to_string();
    inv.client
        .reserve_stock(ReserveStockRequest {
            reservation_id: reservation.clone(),
            items: vec![LineItem {
                product_id: product.clone(),
                quantity: 3,
            }],
        })
        .await
        .unwrap();
    (product, reservation)
}

/// `(available, reserved, committed)`.
async fn stock(inv: &mut Inventory, product: &str) -> (i64, i64, i64) {
    let p = inv
        .client
        .get_product(GetProductRequest {
            product_id: product.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (p.available, p.reserved, p.committed)
}

async fn state(inv: &mut Inventory, reservation: &str) -> ReservationState {
    inv.client
        .get_reservation(GetReservationRequest {
            reservation_id: reservation.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state()
}

/// Waits until a backend of the test database waits for a row lock.
async fn wait_for_lock_waiter(url: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let start = Instant::now();
    loop {
        let waiting: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "inventory's call never waited for the test's row lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `finish` in a transaction of the test's own holding the
/// reservation's row lock, starts `call` against inventory, and commits the
/// transaction once the call waits for the lock; returns the call's answer.
async fn race<T: Send + 'static>(
    inv: &Inventory,
    finish: &[String],
    call: impl std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
) -> Result<T, tonic::Status> {
    let mut conn = sqlx::PgConnection::connect(&inv.url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    for statement in finish {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let call = tokio::spawn(call);
    wait_for_lock_waiter(&inv.url).await;
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the raced call answers once the lock is gone")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_loses_the_race_with_the_expiry_sweep_is_refused_postgres() {
    let Some(db) = Db::postgres() else { return };
    let mut inv = inventory(&db, &[]).await;
    let (product, reservation) = reserved(&mut inv, 10).await;
    // What the sweeper's release does, in one transaction.
    let sweep = [
        format!(
            "UPDATE reservations SET state = 'RELEASED' WHERE reservation_id = '{reservation}' AND state = 'RESERVED'"
        ),
        format!(
            "UPDATE products SET reserved = reserved - 3, available = available + 3 WHERE product_id = '{product}'"
        ),
    ];
    let mut client = inv.client.clone();
    let id = reservation.clone();
    let answer = race(&inv, &sweep, async move {
        client
            .commit_reservation(CommitReservationRequest { reservation_id: id })
            .await
            .map(|r| r.into_inner().state())
    })
    .await;
    assert_status(answer, Code::FailedPrecondition, "is RELEASED");
    assert_eq!(
        state(&mut inv, &reservation).await,
        ReservationState::Released
    );
    assert_eq!(
        stock(&mut inv, &product).await,
        (10, 0, 0),
        "released stock is available, none committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_loses_the_race_with_a_commit_is_refused_postgres() {
    let Some(db) = Db::postgres() else { return };
    let mut inv = inventory(&db, &[]).await;
    let (product, reservation) = reserved(&mut inv, 10).await;
    let commit = [
        format!(
            "UPDATE reservations SET state = 'COMMITTED' WHERE reservation_id = '{reservation}' AND state = 'RESERVED'"
        ),
        format!(
            "UPDATE products SET reserved = reserved - 3, committed = committed + 3 WHERE product_id = '{product}'"
        ),
    ];
    let mut client = inv.client.clone();
    let id = reservation.clone();
    let answer = race(&inv, &commit, async move {
        client
            .release_reservation(ReleaseReservationRequest { reservation_id: id })
            .await
            .map(|r| r.into_inner().state())
    })
    .await;
    assert_status(answer, Code::FailedPrecondition, "was COMMITTED");
    assert_eq!(
        state(&mut inv, &reservation).await,
        ReservationState::Committed
    );
    assert_eq!(stock(&mut inv, &product).await, (7, 0, 3));
}

/// The sweeper releases an expired reservation; a late commit is refused
/// and the stock adds up.
async fn an_expired_reservation_cannot_be_committed(db: Db) {
    let mut inv = inventory(&db, &["--reservation-ttl-secs", "1"]).await;
    let (product, reservation) = reserved(&mut inv, 10).await;
    let start = Instant::now();
    while state(&mut inv, &reservation).await != ReservationState::Released {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the sweeper did not release an expired reservation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_status(
        inv.client
            .commit_reservation(CommitReservationRequest {
                reservation_id: reservation.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "is RELEASED (released or expired)",
    );
    assert_eq!(stock(&mut inv, &product).await, (10, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_reservation_cannot_be_committed_sqlite() {
    an_expired_reservation_cannot_be_committed(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_reservation_cannot_be_committed_postgres() {
    let Some(db) = Db::postgres() else { return };
    an_expired_reservation_cannot_be_committed(db).await;
}
