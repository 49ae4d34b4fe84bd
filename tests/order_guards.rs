//! The orders service's guards, against real processes (issue #23):
//! a refused refund is retried until it succeeds and the order waits at
//! its compensation step meanwhile (#23.4); pending orders and WatchOrder
//! streams are capped per user, and a watched order has one feed however
//! many watch it (#23.6); cancel reasons are the service's own words,
//! never a callee's message (#23.11).
//!
//! Callees refuse calls through the mesh's authorization policy (the shop
//! runs mTLS): a service restarted with a policy that leaves orders out of
//! one method answers it `PERMISSION_DENIED`.

mod common;

use std::time::Duration;

use common::{
    Db, Shop, assert_status, authed, http_get, place_request, shop_policy_refusing_orders,
};
use shop_api::{
    common::v1::Money,
    inventory::v1::{CreateProductRequest, GetProductRequest, ReleaseReservationRequest},
    orders::v1::{GetOrderRequest, Order, OrderStatus, WatchOrderRequest},
    payments::v1::{
        ChargeState, DepositRequest, GetAccountRequest, GetChargeRequest, OpenAccountRequest,
    },
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Code, Streaming};

const LONG: Duration = Duration::from_secs(60);
/// `orders::MAX_PENDING_ORDERS_PER_USER` and `orders::MAX_WATCHES_PER_USER`.
const MAX_PENDING: usize = 10;
const MAX_WATCHES: usize = 8;

fn usd(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".into(),
        amount_minor,
    })
}

async fn get_order(shop: &Shop, token: &str, order_id: &str) -> Order {
    shop.orders()
        .await
        .get_order(authed(
            token,
            GetOrderRequest {
                order_id: order_id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Polls the order until `done` holds (bounded); panics if it ends first.
async fn wait_step(shop: &Shop, token: &str, order_id: &str, step: &str) -> Order {
    let start = Instant::now();
    loop {
        let order = get_order(shop, token, order_id).await;
        if order.saga_step == step {
            return order;
        }
        assert_eq!(
            order.status(),
            OrderStatus::Pending,
            "order ended ({:?}, reason {:?}) before reaching step {step}",
            order.status(),
            order.cancel_reason
        );
        assert!(
            start.elapsed() < LONG,
            "order still at step {} after {LONG:?}, waiting for {step}",
            order.saga_step
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_final(shop: &Shop, token: &str, order_id: &str) -> Order {
    let start = Instant::now();
    loop {
        let order = get_order(shop, token, order_id).await;
        if order.status() != OrderStatus::Pending {
            return order;
        }
        assert!(
            start.elapsed() < LONG,
            "order still PENDING at step {} after {LONG:?}",
            order.saga_step
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn charge_state(shop: &Shop, order_id: &str) -> ChargeState {
    shop.payments()
        .await
        .get_charge(GetChargeRequest {
            charge_idempotency_key: format!("order-{order_id}-charge"),
        })
        .await
        .unwrap()
        .into_inner()
        .state()
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

/// The value of the orders process's metric series `series` (name and
/// labels exactly as exposed), 0 when absent.
async fn metric(shop: &Shop, series: &str) -> f64 {
    let (status, body) = http_get(shop.admin["orders"], "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

async fn wait_metric(shop: &Shop, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let value = metric(shop, series).await;
        if ok(value) {
            return value;
        }
        assert!(start.elapsed() < LONG, "{series} stayed at {value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watch(
    shop: &Shop,
    token: &str,
    order_id: &str,
) -> Result<Streaming<Order>, tonic::Status> {
    shop.orders()
        .await
        .watch_order(authed(
            token,
            WatchOrderRequest {
                order_id: order_id.into(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The next update of a watch (bounded).
async fn next(stream: &mut Streaming<Order>) -> Option<Order> {
    tokio::time::timeout(LONG, stream.next())
        .await
        .expect("a watch update in time")
        .map(|u| u.expect("watch update"))
}

/// Reads a watch to its end; its last update.
async fn last(mut stream: Streaming<Order>) -> Order {
    let mut last = None;
    while let Some(update) = next(&mut stream).await {
        last = Some(update);
    }
    last.expect("at least one update")
}

const REFUSED_REFUND: &str = "mesh_orders_refund_failures_total{grpc_code=\"PERMISSION_DENIED\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refund_is_retried_until_it_succeeds_and_the_order_never_cancels_while_charged() {
    let mut shop = Shop::start_mtls().await;
    let (token, product, account) = shop.customer("ann").await;
    let before = balance(&shop, &account).await;
    // Commits are refused so the order waits, charged, at step commit.
    shop.restart_with_policy(
        "inventory",
        &shop_policy_refusing_orders("inventory", &["InventoryService/CommitReservation"]),
    )
    .await;
    shop.restart_with_policy(
        "payments",
        &shop_policy_refusing_orders("payments", &["PaymentsService/RefundCharge"]),
    )
    .await;
    let order = shop
        .orders()
        .await
        .place_order(place_request(&token, &product, &account, "refund-1".into()))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    wait_step(&shop, &token, &order, "commit").await;
    assert_eq!(charge_state(&shop, &order).await, ChargeState::Captured);

    // The reservation expires (released as the sweeper would): the commit
    // is refused for good, so the saga must refund, which payments refuses.
    shop.inventory()
        .await
        .release_reservation(ReleaseReservationRequest {
            reservation_id: order.clone(),
        })
        .await
        .unwrap();
    shop.restore("inventory").await;
    wait_step(&shop, &token, &order, "refund").await;
    wait_metric(&shop, REFUSED_REFUND, |n| n >= 3.0).await;
    let waiting = get_order(&shop, &token, &order).await;
    assert_eq!(
        (waiting.status(), waiting.saga_step.as_str()),
        (OrderStatus::Pending, "refund"),
        "an order whose refund is refused waits at its compensation step"
    );
    assert_eq!(charge_state(&shop, &order).await, ChargeState::Captured);

    shop.restore("payments").await;
    let done = wait_final(&shop, &token, &order).await;
    assert_eq!(done.status(), OrderStatus::Cancelled);
    assert_eq!(
        done.cancel_reason,
        "the stock reservation expired before the order could be completed"
    );
    assert_eq!(charge_state(&shop, &order).await, ChargeState::Refunded);
    assert_eq!(balance(&shop, &account).await, before, "the money is back");
    let p = shop
        .inventory()
        .await
        .get_product(GetProductRequest {
            product_id: product,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.available, p.reserved, p.committed), (1_000_000, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_orders_and_watch_streams_are_capped_per_user() {
    let mut shop = Shop::start_mtls().await;
    let (ann, ann_product, ann_account) = shop.customer("ann").await;
    let (bob, bob_product, bob_account) = shop.customer("bob").await;
    // Charges and refunds refused: every order waits at step refund.
    shop.restart_with_policy(
        "payments",
        &shop_policy_refusing_orders(
            "payments",
            &[
                "PaymentsService/CreateCharge",
                "PaymentsService/RefundCharge",
            ],
        ),
    )
    .await;
    let mut orders = shop.orders().await;
    let mut placed = Vec::new();
    for n in 0..MAX_PENDING {
        let order = orders
            .place_order(place_request(
                &ann,
                &ann_product,
                &ann_account,
                format!("ann-{n}"),
            ))
            .await
            .unwrap()
            .into_inner();
        placed.push(order.order_id);
    }
    assert_status(
        orders
            .place_order(place_request(
                &ann,
                &ann_product,
                &ann_account,
                "ann-over".into(),
            ))
            .await,
        Code::ResourceExhausted,
        &format!("you have {MAX_PENDING} orders in progress"),
    );
    // A repeat is still answered with its order.
    let repeat = orders
        .place_order(place_request(
            &ann,
            &ann_product,
            &ann_account,
            "ann-0".into(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeat.order_id, placed[0]);
    let bobs = orders
        .place_order(place_request(
            &bob,
            &bob_product,
            &bob_account,
            "bob-0".into(),
        ))
        .await
        .expect("another user's order is not capped by ann's")
        .into_inner()
        .order_id;
    wait_step(&shop, &ann, &placed[0], "refund").await;

    // Watches: eight of ann's on one order, the ninth refused.
    let mut streams = Vec::new();
    for _ in 0..MAX_WATCHES {
        let mut stream = watch(&shop, &ann, &placed[0]).await.unwrap();
        assert_eq!(
            next(&mut stream).await.unwrap().status(),
            OrderStatus::Pending
        );
        streams.push(stream);
    }
    assert_status(
        watch(&shop, &ann, &placed[0]).await,
        Code::ResourceExhausted,
        "you already have 8 WatchOrder streams open",
    );
    assert_status(
        watch(&shop, &ann, &placed[1]).await,
        Code::ResourceExhausted,
        "8 WatchOrder streams",
    );
    let mut bob_stream = watch(&shop, &bob, &bobs)
        .await
        .expect("another user's watch is not capped by ann's");
    assert_eq!(next(&mut bob_stream).await.unwrap().order_id, bobs);
    assert_eq!(metric(&shop, "mesh_orders_watches").await, 9.0);
    assert_eq!(
        metric(&shop, "mesh_orders_watched_orders").await,
        2.0,
        "nine watches of two orders share two feeds"
    );

    // A closed stream frees its slot (the server notices asynchronously).
    drop(streams.pop());
    let start = Instant::now();
    let again = loop {
        match watch(&shop, &ann, &placed[0]).await {
            Ok(stream) => break stream,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
        assert!(start.elapsed() < LONG, "a closed watch kept its slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    streams.push(again);

    // Payments back: every order ends, every watcher sees it.
    shop.restore("payments").await;
    // The mesh refusing orders (the policy) is retried like an outage,
    // never taken for payments' answer: an order whose retries outlast the
    // refusal is charged and confirmed, one whose retries ran out is
    // cancelled with its charge key voided.
    for stream in streams {
        let end = last(stream).await;
        match end.status() {
            OrderStatus::Confirmed => {}
            OrderStatus::Cancelled => assert_eq!(
                end.cancel_reason,
                "payments did not answer; any charge is refunded"
            ),
            other => panic!("watch ended at {other:?}"),
        }
    }
    for order in &placed {
        let done = wait_final(&shop, &ann, order).await;
        let charge = charge_state(&shop, order).await;
        match done.status() {
            OrderStatus::Cancelled => assert_eq!(charge, ChargeState::Voided),
            OrderStatus::Confirmed => assert_eq!(charge, ChargeState::Captured),
            other => panic!("{order} ended {other:?}"),
        }
    }
    assert!(matches!(
        last(bob_stream).await.status(),
        OrderStatus::Cancelled | OrderStatus::Confirmed
    ));
    orders
        .place_order(place_request(
            &ann,
            &ann_product,
            &ann_account,
            "ann-after".into(),
        ))
        .await
        .expect("ann may order again once hers are final");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_of_one_order_share_one_feed_and_all_see_it_confirmed() {
    let mut shop = Shop::start_mtls().await;
    let (token, product, account) = shop.customer("ann").await;
    shop.restart_with_policy(
        "inventory",
        &shop_policy_refusing_orders("inventory", &["InventoryService/CommitReservation"]),
    )
    .await;
    let order = shop
        .orders()
        .await
        .place_order(place_request(&token, &product, &account, "watched".into()))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    wait_step(&shop, &token, &order, "commit").await;
    let mut streams = Vec::new();
    for _ in 0..MAX_WATCHES {
        let mut stream = watch(&shop, &token, &order).await.unwrap();
        let first = next(&mut stream).await.unwrap();
        assert_eq!(
            (first.status(), first.saga_step.as_str()),
            (OrderStatus::Pending, "commit")
        );
        streams.push(stream);
    }
    assert_eq!(metric(&shop, "mesh_orders_watches").await, 8.0);
    assert_eq!(
        metric(&shop, "mesh_orders_watched_orders").await,
        1.0,
        "eight watchers of one order share one feed (one database poll)"
    );

    shop.restore("inventory").await;
    for stream in streams {
        assert_eq!(last(stream).await.status(), OrderStatus::Confirmed);
    }
    // The last watcher gone, the feed and its poll end.
    wait_metric(&shop, "mesh_orders_watches", |n| n == 0.0).await;
    wait_metric(&shop, "mesh_orders_watched_orders", |n| n == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reasons_are_our_own_words_not_a_callees_message() {
    let shop = Shop::start(&Db::Sqlite).await;
    let (user_id, token) = shop.user("poor").await;
    let mut inventory = shop.inventory().await;
    let mut payments = shop.payments().await;
    let product = |sku: &str, stock| CreateProductRequest {
        sku: sku.into(),
        name: sku.into(),
        price: usd(1000),
        initial_stock: stock,
    };
    let pricey = inventory
        .create_product(product("PRICEY", 5))
        .await
        .unwrap()
        .into_inner()
        .product_id;
    let scarce = inventory
        .create_product(product("SCARCE", 0))
        .await
        .unwrap()
        .into_inner()
        .product_id;
    let account = payments
        .open_account(OpenAccountRequest {
            owner_id: user_id,
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account_id;
    payments
        .deposit(DepositRequest {
            account_id: account.clone(),
            amount: usd(157),
            idempotency_key: "poor-dep".into(),
        })
        .await
        .unwrap();
    let mut orders = shop.orders().await;

    let broke = orders
        .place_order(place_request(&token, &pricey, &account, "broke".into()))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let broke = wait_final(&shop, &token, &broke).await;
    assert_eq!(broke.status(), OrderStatus::Cancelled);
    assert_eq!(broke.cancel_reason, "insufficient funds");
    assert!(!broke.cancel_reason.contains("157") && !broke.cancel_reason.contains("balance"));

    let none = orders
        .place_order(place_request(&token, &scarce, &account, "none".into()))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let none = wait_final(&shop, &token, &none).await;
    assert_eq!(none.status(), OrderStatus::Cancelled);
    assert_eq!(
        none.cancel_reason,
        format!("insufficient stock for product {scarce}")
    );
}
