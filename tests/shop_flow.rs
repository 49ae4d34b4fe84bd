//! The shop end to end through its public gRPC API, against real service
//! processes, on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::{Db, Shop, assert_status, authed};
use shop_api::{
    auth::v1::{LoginRequest, RegisterRequest},
    common::v1::Money,
    inventory::v1::{
        CreateProductRequest, GetProductRequest, LineItem, ListProductsRequest, Product,
        ReleaseReservationRequest, ReservationState, ReserveStockRequest,
    },
    orders::v1::{
        ListOrdersRequest, Order, OrderStatus, PlaceOrderItem, PlaceOrderRequest, WatchOrderRequest,
    },
    payments::v1::{
        ChargeState, CreateChargeRequest, DepositRequest, GetAccountRequest, OpenAccountRequest,
        RefundChargeRequest,
    },
};
use tokio_stream::StreamExt;
use tonic::Code;

fn usd(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".into(),
        amount_minor,
    })
}

async fn product(shop: &Shop, sku: &str, name: &str, price: i64, stock: i64) -> Product {
    shop.inventory()
        .await
        .create_product(CreateProductRequest {
            sku: sku.into(),
            name: name.into(),
            price: usd(price),
            initial_stock: stock,
        })
        .await
        .expect("create product")
        .into_inner()
}

async fn stock(shop: &Shop, product_id: &str) -> (i64, i64, i64) {
    let p = shop
        .inventory()
        .await
        .get_product(GetProductRequest {
            product_id: product_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (p.available, p.reserved, p.committed)
}

async fn balance(shop: &Shop, account_id: &str) -> i64 {
    shop.payments()
        .await
        .get_account(GetAccountRequest {
            account_id: account_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap()
        .amount_minor
}

/// Places an order and follows WatchOrder until it ends.
async fn place_and_watch(
    shop: &Shop,
    token: &str,
    account: &str,
    items: &[(&str, i64)],
    key: &str,
) -> Order {
    let mut orders = shop.orders().await;
    let placed = orders
        .place_order(authed(
            token,
            PlaceOrderRequest {
                items: items
                    .iter()
                    .map(|(id, q)| PlaceOrderItem {
                        product_id: (*id).into(),
                        quantity: *q,
                    })
                    .collect(),
                payment_account_id: account.into(),
                idempotency_key: key.into(),
            },
        ))
        .await
        .expect("place order")
        .into_inner();
    assert_eq!(placed.status(), OrderStatus::Pending);
    let mut stream = orders
        .watch_order(authed(
            token,
            WatchOrderRequest {
                order_id: placed.order_id.clone(),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(update)) = tokio::time::timeout_at(deadline, stream.next()).await {
        last = Some(update.expect("watch update"));
    }
    let last = last.expect("at least one update");
    assert_ne!(
        last.status(),
        OrderStatus::Pending,
        "watch ended before the order did"
    );
    last
}

async fn shop_flow(db: Db, tls: bool) {
    let shop = Shop::start_with(&db, tls).await;
    let mut auth = shop.auth().await;

    // Auth: register, duplicate, bad password, login.
    let (user_id, token) = shop.user("ann").await;
    assert_status(
        auth.register(RegisterRequest {
            username: "ann".into(),
            password: "another-password".into(),
        })
        .await,
        Code::AlreadyExists,
        "\"ann\" is taken",
    );
    let wrong = auth
        .login(LoginRequest {
            username: "ann".into(),
            password: "wrong-password".into(),
        })
        .await
        .unwrap_err();
    let missing = auth
        .login(LoginRequest {
            username: "nobody".into(),
            password: "wrong-password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(
        (wrong.code(), wrong.message()),
        (missing.code(), missing.message())
    );

    // Inventory: products, including a name that looks like SQL.
    let mug = product(&shop, "MUG-1", "Mug", 1250, 10).await;
    let sneaky = "Robert'); DROP TABLE products;--";
    let lamp = product(&shop, "LAMP-1", sneaky, 5000, 5).await;
    assert_eq!(lamp.name, sneaky);
    let fetched = shop
        .inventory()
        .await
        .get_product(GetProductRequest {
            product_id: lamp.product_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.name, sneaky);
    let page = shop
        .inventory()
        .await
        .list_products(ListProductsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.products.len(), 1);
    assert_eq!(page.products[0].sku, "LAMP-1");
    let page2 = shop
        .inventory()
        .await
        .list_products(ListProductsRequest {
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.products[0].sku, "MUG-1");
    assert!(page2.next_page_token.is_empty());

    // Payments: account, idempotent deposits.
    let mut payments = shop.payments().await;
    let account = payments
        .open_account(OpenAccountRequest {
            owner_id: user_id.clone(),
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account_id;
    for _ in 0..2 {
        payments
            .deposit(DepositRequest {
                account_id: account.clone(),
                amount: usd(5000),
                idempotency_key: "dep-1".into(),
            })
            .await
            .unwrap();
    }
    assert_eq!(
        balance(&shop, &account).await,
        5000,
        "a repeated deposit key pays once"
    );
    assert_status(
        payments
            .deposit(DepositRequest {
                account_id: account.clone(),
                amount: usd(7000),
                idempotency_key: "dep-1".into(),
            })
            .await,
        Code::AlreadyExists,
        "different deposit",
    );

    // A good order is confirmed: stock committed, money taken.
    let confirmed =
        place_and_watch(&shop, &token, &account, &[(&mug.product_id, 2)], "order-1").await;
    assert_eq!(confirmed.status(), OrderStatus::Confirmed, "{confirmed:?}");
    assert_eq!(confirmed.total.as_ref().unwrap().amount_minor, 2500);
    assert_eq!(stock(&shop, &mug.product_id).await, (8, 0, 2));
    assert_eq!(balance(&shop, &account).await, 2500);

    // The same key again is the same order; with other contents it is refused.
    let mut orders = shop.orders().await;
    let again = orders
        .place_order(authed(
            &token,
            PlaceOrderRequest {
                items: vec![PlaceOrderItem {
                    product_id: mug.product_id.clone(),
                    quantity: 2,
                }],
                payment_account_id: account.clone(),
                idempotency_key: "order-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.order_id, confirmed.order_id);
    assert_status(
        orders
            .place_order(authed(
                &token,
                PlaceOrderRequest {
                    items: vec![PlaceOrderItem {
                        product_id: mug.product_id.clone(),
                        quantity: 3,
                    }],
                    payment_account_id: account.clone(),
                    idempotency_key: "order-1".into(),
                },
            ))
            .await,
        Code::AlreadyExists,
        "different order",
    );

    // Cannot be paid: cancelled, stock released, nothing charged.
    let unpaid =
        place_and_watch(&shop, &token, &account, &[(&lamp.product_id, 1)], "order-2").await;
    assert_eq!(unpaid.status(), OrderStatus::Cancelled, "{unpaid:?}");
    assert!(
        unpaid.cancel_reason.contains("insufficient funds"),
        "{}",
        unpaid.cancel_reason
    );
    assert_eq!(stock(&shop, &lamp.product_id).await, (5, 0, 0));
    assert_eq!(balance(&shop, &account).await, 2500);

    // Cannot be filled: cancelled, nothing charged, nothing held.
    let unfilled = place_and_watch(
        &shop,
        &token,
        &account,
        &[(&mug.product_id, 100)],
        "order-3",
    )
    .await;
    assert_eq!(unfilled.status(), OrderStatus::Cancelled, "{unfilled:?}");
    assert!(
        unfilled.cancel_reason.contains("insufficient stock"),
        "{}",
        unfilled.cancel_reason
    );
    assert_eq!(stock(&shop, &mug.product_id).await, (8, 0, 2));
    assert_eq!(balance(&shop, &account).await, 2500);

    // Listing: newest first, paginated.
    let first = orders
        .list_orders(authed(
            &token,
            ListOrdersRequest {
                page_size: 2,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.orders.len(), 2);
    assert_eq!(first.orders[0].order_id, unfilled.order_id);
    let rest = orders
        .list_orders(authed(
            &token,
            ListOrdersRequest {
                page_size: 2,
                page_token: first.next_page_token,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.orders.len(), 1);
    assert_eq!(rest.orders[0].order_id, confirmed.order_id);
    assert!(rest.next_page_token.is_empty());

    // Another user cannot see ann's order.
    let (_, bob) = shop.user("bob").await;
    assert_status(
        orders
            .get_order(authed(
                &bob,
                shop_api::orders::v1::GetOrderRequest {
                    order_id: confirmed.order_id.clone(),
                },
            ))
            .await,
        Code::NotFound,
        "does not exist",
    );

    // Charges: idempotent, conflicting reuse refused, refunds once, voiding.
    let charge = |key: &str, amount: i64| CreateChargeRequest {
        account_id: account.clone(),
        amount: usd(amount),
        idempotency_key: key.into(),
        reference: "test".into(),
        expected_owner_id: user_id.clone(),
    };
    // Payments itself refuses a charge for anyone but the account's owner
    // (whoever asks), and a missing account reads the same.
    for (account_id, owner) in [
        (account.clone(), "bob"),
        (uuid::Uuid::new_v4().to_string(), user_id.as_str()),
    ] {
        assert_status(
            payments
                .create_charge(CreateChargeRequest {
                    account_id,
                    expected_owner_id: owner.into(),
                    ..charge("c-foreign", 1000)
                })
                .await,
            Code::PermissionDenied,
            "expected_owner_id has no account with this id",
        );
    }
    let c1 = payments
        .create_charge(charge("c-1", 1000))
        .await
        .unwrap()
        .into_inner();
    let c1_again = payments
        .create_charge(charge("c-1", 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c1.charge_id, c1_again.charge_id);
    assert_eq!(balance(&shop, &account).await, 1500);
    assert_status(
        payments.create_charge(charge("c-1", 999)).await,
        Code::AlreadyExists,
        "different charge",
    );
    for _ in 0..2 {
        let refunded = payments
            .refund_charge(RefundChargeRequest {
                charge_idempotency_key: "c-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(refunded.state(), ChargeState::Refunded);
    }
    assert_eq!(balance(&shop, &account).await, 2500);
    let voided = payments
        .refund_charge(RefundChargeRequest {
            charge_idempotency_key: "never-charged".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(voided.state(), ChargeState::Voided);
    assert_status(
        payments.create_charge(charge("never-charged", 100)).await,
        Code::FailedPrecondition,
        "voided",
    );
    assert_status(
        payments.create_charge(charge("too-much", 1_000_000)).await,
        Code::FailedPrecondition,
        "insufficient funds",
    );
    assert_status(
        payments.create_charge(charge("too-much", 1_000_000)).await,
        Code::FailedPrecondition,
        "insufficient funds",
    );
    assert_eq!(balance(&shop, &account).await, 2500);

    // Reservations: same id twice is one reservation; a released id stays released.
    let mut inventory = shop.inventory().await;
    let rid = uuid::Uuid::new_v4().to_string();
    let reserve = || ReserveStockRequest {
        reservation_id: rid.clone(),
        items: vec![LineItem {
            product_id: mug.product_id.clone(),
            quantity: 3,
        }],
    };
    inventory.reserve_stock(reserve()).await.unwrap();
    inventory.reserve_stock(reserve()).await.unwrap();
    assert_eq!(stock(&shop, &mug.product_id).await, (5, 3, 2));
    for _ in 0..2 {
        let released = inventory
            .release_reservation(ReleaseReservationRequest {
                reservation_id: rid.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(released.state(), ReservationState::Released);
    }
    let late = inventory
        .reserve_stock(reserve())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.state(), ReservationState::Released);
    assert_eq!(stock(&shop, &mug.product_id).await, (8, 0, 2));

    // The ledger agrees with the balances, and every transaction balances.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&shop.urls["payments"])
        .await
        .unwrap();
    let check = payments::check_ledger(&pool).await.unwrap();
    assert!(check.accounts >= 3, "{check:?}");
    assert!(
        check.mismatched.is_empty() && check.unbalanced_txns.is_empty(),
        "{check:?}"
    );
}

#[tokio::test]
async fn shop_flow_sqlite() {
    shop_flow(Db::Sqlite, false).await;
}

#[tokio::test]
async fn shop_flow_sqlite_with_mtls_and_authorization() {
    shop_flow(Db::Sqlite, true).await;
}

#[tokio::test]
async fn shop_flow_postgres() {
    let Some(db) = Db::postgres() else { return };
    shop_flow(db, false).await;
}
