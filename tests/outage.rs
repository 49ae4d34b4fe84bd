//! A database outage: the service answers UNAVAILABLE fast, reports
//! NOT_SERVING, writes nothing partial, and recovers by itself. And the
//! same charge sent concurrently charges once.

mod common;

use std::time::Duration;

use common::{Db, Proc, Shop, free_addr, wait_serving};
use shop_api::{
    common::v1::Money,
    payments::v1::{
        CreateChargeRequest, DepositRequest, GetAccountRequest, OpenAccountRequest,
        payments_service_client::PaymentsServiceClient,
    },
};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn usd(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".into(),
        amount_minor,
    })
}

fn pg(action: &str, dir: &std::path::Path, port: Option<u16>) -> String {
    let mut cmd = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/test-postgres.sh"
    ));
    if !action.is_empty() {
        cmd.arg(action);
    }
    cmd.env("MESH_PG_DIR", dir);
    if let Some(port) = port {
        cmd.env("MESH_PG_PORT", port.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "postgres {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn health(addr: std::net::SocketAddr) -> Option<ServingStatus> {
    let mut client = HealthClient::new(common::channel(addr).await);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(1));
    client
        .check(request)
        .await
        .ok()
        .map(|r| r.get_ref().status())
}

async fn wait_health(addr: std::net::SocketAddr, want: ServingStatus, within: Duration) {
    let start = Instant::now();
    while start.elapsed() < within {
        if health(addr).await == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr} did not report {want:?} within {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_not_ready_and_heals_itself() {
    let Some(Db::Postgres(_)) = Db::postgres() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("mesh-outage-{}", std::process::id()));
    let admin = pg("", &dir, Some(27000 + (std::process::id() % 1000) as u16));
    let url = Db::Postgres(admin).create(&dir, "payments").await;
    let addr = free_addr();
    let _payments = Proc::spawn("payments", addr, &["--database-url".into(), url]);
    wait_serving(addr).await;
    let mut client = PaymentsServiceClient::new(common::channel(addr).await);
    let account = client
        .open_account(OpenAccountRequest {
            owner_id: "outage".into(),
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account_id;

    pg("pause", &dir, None);
    let started = Instant::now();
    let err = client
        .deposit(DepositRequest {
            account_id: account.clone(),
            amount: usd(500),
            idempotency_key: "during-outage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
    wait_health(addr, ServingStatus::NotServing, Duration::from_secs(5)).await;

    pg("resume", &dir, None);
    wait_health(addr, ServingStatus::Serving, Duration::from_secs(10)).await;
    let balance = client
        .get_account(GetAccountRequest {
            account_id: account.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap()
        .amount_minor;
    assert_eq!(balance, 0, "the failed deposit wrote nothing");
    // The same deposit, retried after the outage, lands once.
    for _ in 0..2 {
        client
            .deposit(DepositRequest {
                account_id: account.clone(),
                amount: usd(500),
                idempotency_key: "during-outage".into(),
            })
            .await
            .unwrap();
    }
    let balance = client
        .get_account(GetAccountRequest {
            account_id: account,
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap();
    assert_eq!(balance.amount_minor, 500);
    pg("stop", &dir, None);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn concurrent_same_key_charges(db: Db) {
    let shop = Shop::start(&db).await;
    let mut payments = shop.payments().await;
    let account = payments
        .open_account(OpenAccountRequest {
            owner_id: "race".into(),
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account_id;
    payments
        .deposit(DepositRequest {
            account_id: account.clone(),
            amount: usd(10_000),
            idempotency_key: "race-dep".into(),
        })
        .await
        .unwrap();
    let charges: Vec<_> = (0..20)
        .map(|_| {
            let mut client = payments.clone();
            let account = account.clone();
            tokio::spawn(async move {
                client
                    .create_charge(CreateChargeRequest {
                        account_id: account,
                        amount: usd(700),
                        idempotency_key: "race-charge".into(),
                        reference: "race".into(),
                        expected_owner_id: "race".into(),
                    })
                    .await
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for charge in charges {
        match charge.await.unwrap() {
            Ok(c) => {
                ids.insert(c.into_inner().charge_id);
            }
            // A loser may be told to retry while the winner commits.
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "every answer is the one charge: {ids:?}");
    let balance = payments
        .get_account(GetAccountRequest {
            account_id: account,
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap();
    assert_eq!(balance.amount_minor, 10_000 - 700, "charged exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_charge_sent_concurrently_charges_once_sqlite() {
    concurrent_same_key_charges(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_charge_sent_concurrently_charges_once_postgres() {
    let Some(db) = Db::postgres() else { return };
    concurrent_same_key_charges(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_reservation_expires_and_releases_its_stock() {
    use shop_api::inventory::v1::{
        CommitReservationRequest, CreateProductRequest, GetProductRequest, LineItem,
        ReserveStockRequest, inventory_service_client::InventoryServiceClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("sqlite://{}", dir.path().join("inventory.db").display());
    let _inventory = Proc::spawn(
        "inventory",
        addr,
        &[
            "--database-url".into(),
            url,
            "--reservation-ttl-secs".into(),
            "1".into(),
        ],
    );
    wait_serving(addr).await;
    let mut client = InventoryServiceClient::new(common::channel(addr).await);
    let product = client
        .create_product(CreateProductRequest {
            sku: "TTL".into(),
            name: "ttl".into(),
            price: usd(10),
            initial_stock: 5,
        })
        .await
        .unwrap()
        .into_inner()
        .product_id;
    let reservation_id = uuid::Uuid::new_v4().to_string();
    client
        .reserve_stock(ReserveStockRequest {
            reservation_id: reservation_id.clone(),
            items: vec![LineItem {
                product_id: product.clone(),
                quantity: 4,
            }],
        })
        .await
        .unwrap();
    let stock = |p: shop_api::inventory::v1::Product| (p.available, p.reserved);
    let now = client
        .get_product(GetProductRequest {
            product_id: product.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stock(now), (1, 4));
    let start = Instant::now();
    loop {
        let p = client
            .get_product(GetProductRequest {
                product_id: product.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if stock(p.clone()) == (5, 0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the saga never came back, but the stock is still held: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A saga that comes back too late cannot commit the released stock.
    let err = client
        .commit_reservation(CommitReservationRequest { reservation_id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}
