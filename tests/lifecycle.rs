//! Process lifecycle: SIGTERM drains and exits cleanly (long-lived streams
//! are told to come back), and data and signing keys survive a restart.

mod common;

use std::time::Duration;

use common::{Proc, authed, free_addr, wait_serving};
use shop_api::{
    auth::v1::{
        LoginRequest, RegisterRequest, VerifyTokenRequest, auth_service_client::AuthServiceClient,
    },
    orders::v1::{WatchOrderRequest, orders_service_client::OrdersServiceClient},
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test]
async fn restart_keeps_users_and_tokens_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = vec![
        "--database-url".to_string(),
        format!("sqlite://{}", dir.path().join("state/auth.db").display()),
    ];
    let addr = free_addr();
    let mut auth = Proc::spawn("auth", addr, &db);
    wait_serving(addr).await;
    let mut client = AuthServiceClient::new(common::channel(addr).await);
    client
        .register(RegisterRequest {
            username: "keeper".into(),
            password: "keeper-password".into(),
        })
        .await
        .unwrap();
    let token = client
        .login(LoginRequest {
            username: "keeper".into(),
            password: "keeper-password".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_eq!(auth.terminate(Duration::from_secs(10)).await, Some(0));

    let addr = free_addr();
    let _auth = Proc::spawn("auth", addr, &db);
    wait_serving(addr).await;
    let mut client = AuthServiceClient::new(common::channel(addr).await);
    // The token issued before the restart still verifies: the key was kept.
    let verified = client
        .verify_token(VerifyTokenRequest { token })
        .await
        .unwrap()
        .into_inner();
    assert!(!verified.subject.is_empty());
    client
        .login(LoginRequest {
            username: "keeper".into(),
            password: "keeper-password".into(),
        })
        .await
        .expect("the user survived the restart");
}

#[tokio::test]
async fn sigterm_reports_not_serving_and_ends_streams() {
    let shop = common::Shop::start(&common::Db::Sqlite).await;
    let (user_id, token) = shop.user("drain").await;
    // An order left pending (payments is stopped below) gives a watch
    // stream that would never end by itself.
    let mut inventory = shop.inventory().await;
    let product = inventory
        .create_product(shop_api::inventory::v1::CreateProductRequest {
            sku: "DRAIN".into(),
            name: "Drain".into(),
            price: Some(shop_api::common::v1::Money {
                currency_code: "USD".into(),
                amount_minor: 10,
            }),
            initial_stock: 5,
        })
        .await
        .unwrap()
        .into_inner();
    let account = shop
        .payments()
        .await
        .open_account(shop_api::payments::v1::OpenAccountRequest {
            owner_id: user_id,
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account_id;
    let mut orders = OrdersServiceClient::new(common::channel(shop.orders.addr).await);
    let order = orders
        .place_order(authed(
            &token,
            shop_api::orders::v1::PlaceOrderRequest {
                items: vec![shop_api::orders::v1::PlaceOrderItem {
                    product_id: product.product_id,
                    quantity: 1,
                }],
                payment_account_id: account,
                idempotency_key: "drain-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut shop = shop;
    shop.payments.kill(); // the saga now retries the charge, so the order stays pending
    let mut stream = orders
        .watch_order(authed(
            &token,
            WatchOrderRequest {
                order_id: order.order_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream
        .message()
        .await
        .unwrap()
        .expect("current state first");
    assert_eq!(first.order_id, order.order_id);

    let orders_addr = shop.orders.addr;
    let terminated = tokio::spawn(async move {
        let code = shop.orders.terminate(Duration::from_secs(20)).await;
        (code, shop)
    });
    // The stream is told to come back instead of holding the drain open.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("watch stream ended during drain")
    .expect("the stream ends with a status, not silently");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    let (code, _shop) = terminated.await.unwrap();
    assert_eq!(code, Some(0), "orders exits 0 after draining");
    let mut health = HealthClient::new(common::channel(orders_addr).await);
    assert!(
        health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_err(),
        "the server is gone after draining"
    );
}
