//! Every validation rule of every method answers with the right code and a
//! message that names the field, against real processes on SQLite and
//! PostgreSQL; a failed multi-item write leaves nothing half-written.

mod common;

use common::{Db, Shop, assert_status, authed};
use shop_api::{
    auth::v1::{LoginRequest, RegisterRequest, VerifyTokenRequest},
    common::v1::Money,
    inventory::v1::*,
    orders::v1::*,
    payments::v1::*,
};
use tonic::Code::*;

fn money(currency: &str, amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: currency.into(),
        amount_minor,
    })
}

const MISSING: &str = "00000000-0000-4000-8000-000000000000";

macro_rules! check {
    ($call:expr, $code:expr, $needle:expr) => {
        assert_status($call.await.map(drop), $code, $needle)
    };
}

async fn validation(db: Db) {
    let shop = Shop::start(&db).await;
    let (user_id, token) = shop.user("val").await;
    let mut auth = shop.auth().await;
    let mut inv = shop.inventory().await;
    let mut pay = shop.payments().await;
    let mut ord = shop.orders().await;

    // auth
    let reg = |u: &str, p: &str| RegisterRequest {
        username: u.into(),
        password: p.into(),
    };
    check!(
        auth.register(reg("", "password1")),
        InvalidArgument,
        "username: is required"
    );
    check!(
        auth.register(reg("A!", "password1")),
        InvalidArgument,
        "username: must be 3 to 64"
    );
    check!(
        auth.register(reg("zed", "short")),
        InvalidArgument,
        "password: must be 8 to 128 bytes, got 5"
    );
    check!(
        auth.register(reg("zed", &"x".repeat(129))),
        InvalidArgument,
        "password: must be 8 to 128"
    );
    check!(
        auth.register(reg("zed", "")),
        InvalidArgument,
        "password: is required"
    );
    let login = |u: &str, p: &str| LoginRequest {
        username: u.into(),
        password: p.into(),
    };
    check!(
        auth.login(login("", "x")),
        InvalidArgument,
        "username: is required"
    );
    check!(
        auth.login(login("val", "")),
        InvalidArgument,
        "password: is required"
    );
    check!(
        auth.verify_token(VerifyTokenRequest { token: "".into() }),
        InvalidArgument,
        "token: is required"
    );
    check!(
        auth.verify_token(VerifyTokenRequest {
            token: "garbage".into()
        }),
        Unauthenticated,
        "malformed"
    );

    // inventory
    let create = |sku: &str, name: &str, price: Option<Money>, stock: i64| CreateProductRequest {
        sku: sku.into(),
        name: name.into(),
        price,
        initial_stock: stock,
    };
    check!(
        inv.create_product(create("", "n", money("USD", 1), 1)),
        InvalidArgument,
        "sku: is required"
    );
    check!(
        inv.create_product(create("bad sku!", "n", money("USD", 1), 1)),
        InvalidArgument,
        "sku: must be 1 to 64"
    );
    check!(
        inv.create_product(create("S1", "", money("USD", 1), 1)),
        InvalidArgument,
        "name: is required"
    );
    check!(
        inv.create_product(create("S1", &"n".repeat(201), money("USD", 1), 1)),
        InvalidArgument,
        "name: must be 1 to 200 characters, got 201"
    );
    check!(
        inv.create_product(create("S1", "tab\there", money("USD", 1), 1)),
        InvalidArgument,
        "name: must not contain control characters"
    );
    check!(
        inv.create_product(create("S1", "n", None, 1)),
        InvalidArgument,
        "price: is required"
    );
    check!(
        inv.create_product(create("S1", "n", money("XYZ", 1), 1)),
        InvalidArgument,
        "price.currency_code: \"XYZ\" is not a supported"
    );
    check!(
        inv.create_product(create("S1", "n", money("USD", -1), 1)),
        InvalidArgument,
        "price.amount_minor: must be positive, got -1"
    );
    check!(
        inv.create_product(create("S1", "n", money("USD", i64::MAX), 1)),
        InvalidArgument,
        "price.amount_minor: must be at most"
    );
    check!(
        inv.create_product(create("S1", "n", money("USD", 1), -1)),
        InvalidArgument,
        "initial_stock: must be 0 to"
    );
    let a = inv
        .create_product(create("A", "A", money("USD", 100), 10))
        .await
        .unwrap()
        .into_inner();
    let b = inv
        .create_product(create("B", "B", money("USD", 100), 1))
        .await
        .unwrap()
        .into_inner();
    let eur = inv
        .create_product(create("E", "E", money("EUR", 100), 1))
        .await
        .unwrap()
        .into_inner();
    check!(
        inv.create_product(create("A", "again", money("USD", 1), 1)),
        AlreadyExists,
        "sku \"A\" already exists"
    );
    check!(
        inv.get_product(GetProductRequest {
            product_id: "nope".into()
        }),
        InvalidArgument,
        "product_id: \"nope\" is not a UUID"
    );
    check!(
        inv.get_product(GetProductRequest {
            product_id: MISSING.into()
        }),
        NotFound,
        "does not exist"
    );
    check!(
        inv.list_products(ListProductsRequest {
            page_size: 101,
            page_token: "".into()
        }),
        InvalidArgument,
        "page_size: must be 0 to 100"
    );
    check!(
        inv.list_products(ListProductsRequest {
            page_size: 1,
            page_token: "!!".into()
        }),
        InvalidArgument,
        "page_token"
    );
    check!(
        inv.adjust_stock(AdjustStockRequest {
            product_id: a.product_id.clone(),
            delta: 0
        }),
        InvalidArgument,
        "delta: must be non-zero"
    );
    check!(
        inv.adjust_stock(AdjustStockRequest {
            product_id: MISSING.into(),
            delta: 1
        }),
        NotFound,
        "does not exist"
    );
    check!(
        inv.adjust_stock(AdjustStockRequest {
            product_id: a.product_id.clone(),
            delta: -11
        }),
        FailedPrecondition,
        "only 10 available"
    );
    let reserve = |id: &str, items: Vec<(&str, i64)>| ReserveStockRequest {
        reservation_id: id.into(),
        items: items
            .into_iter()
            .map(|(p, q)| LineItem {
                product_id: p.into(),
                quantity: q,
            })
            .collect(),
    };
    let rid = uuid::Uuid::new_v4().to_string();
    check!(
        inv.reserve_stock(reserve("", vec![(&a.product_id, 1)])),
        InvalidArgument,
        "reservation_id: is required"
    );
    check!(
        inv.reserve_stock(reserve(&rid, vec![])),
        InvalidArgument,
        "items: must hold at least one item"
    );
    check!(
        inv.reserve_stock(reserve(&rid, vec![(&a.product_id, 0)])),
        InvalidArgument,
        "items[0].quantity: must be 1 to 10000, got 0"
    );
    check!(
        inv.reserve_stock(reserve(&rid, vec![(&a.product_id, 1), (&a.product_id, 1)])),
        InvalidArgument,
        "items[1].product_id: product"
    );
    check!(
        inv.reserve_stock(reserve(&rid, vec![(MISSING, 1)])),
        NotFound,
        "does not exist"
    );
    // The second item is short: the first item's stock must be untouched.
    check!(
        inv.reserve_stock(reserve(&rid, vec![(&a.product_id, 5), (&b.product_id, 2)])),
        FailedPrecondition,
        "insufficient stock"
    );
    let after = inv
        .get_product(GetProductRequest {
            product_id: a.product_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.available, after.reserved),
        (10, 0),
        "nothing half-written"
    );
    check!(
        inv.get_reservation(GetReservationRequest {
            reservation_id: rid.clone()
        }),
        NotFound,
        "does not exist"
    );
    check!(
        inv.commit_reservation(CommitReservationRequest {
            reservation_id: rid.clone()
        }),
        NotFound,
        "does not exist"
    );
    check!(
        inv.commit_reservation(CommitReservationRequest {
            reservation_id: "x".into()
        }),
        InvalidArgument,
        "reservation_id: \"x\" is not a UUID"
    );
    check!(
        inv.release_reservation(ReleaseReservationRequest {
            reservation_id: "x".into()
        }),
        InvalidArgument,
        "reservation_id"
    );

    // payments
    check!(
        pay.open_account(OpenAccountRequest {
            owner_id: "".into(),
            currency_code: "USD".into()
        }),
        InvalidArgument,
        "owner_id: is required"
    );
    check!(
        pay.open_account(OpenAccountRequest {
            owner_id: "o".into(),
            currency_code: "usd".into()
        }),
        InvalidArgument,
        "currency_code: \"usd\" is not a supported ISO 4217"
    );
    check!(
        pay.get_account(GetAccountRequest {
            account_id: "x".into()
        }),
        InvalidArgument,
        "account_id: \"x\" is not a UUID"
    );
    check!(
        pay.get_account(GetAccountRequest {
            account_id: MISSING.into()
        }),
        NotFound,
        "does not exist"
    );
    let account = pay
        .open_account(OpenAccountRequest {
            owner_id: user_id.clone(),
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account_id;
    let deposit = |amount: Option<Money>, key: &str| DepositRequest {
        account_id: account.clone(),
        amount,
        idempotency_key: key.into(),
    };
    check!(
        pay.deposit(deposit(None, "k")),
        InvalidArgument,
        "amount: is required"
    );
    check!(
        pay.deposit(deposit(money("USD", 0), "k")),
        InvalidArgument,
        "amount.amount_minor: must be positive, got 0"
    );
    check!(
        pay.deposit(deposit(money("USD", 1), "")),
        InvalidArgument,
        "idempotency_key: is required"
    );
    check!(
        pay.deposit(deposit(money("USD", 1), "has space")),
        InvalidArgument,
        "idempotency_key: must be printable ASCII"
    );
    check!(
        pay.deposit(deposit(money("USD", 1), &"k".repeat(129))),
        InvalidArgument,
        "idempotency_key: must be at most 128"
    );
    check!(
        pay.deposit(deposit(money("EUR", 1), "k")),
        FailedPrecondition,
        "holds USD, not EUR"
    );
    let charge = |account: &str, reference: &str| CreateChargeRequest {
        account_id: account.into(),
        amount: money("USD", 1),
        idempotency_key: "c".into(),
        reference: reference.into(),
        expected_owner_id: user_id.clone(),
    };
    check!(
        pay.create_charge(charge(&account, &"r".repeat(201))),
        InvalidArgument,
        "reference: must be 0 to 200 characters"
    );
    check!(
        pay.create_charge(CreateChargeRequest {
            expected_owner_id: String::new(),
            ..charge(&account, "r")
        }),
        InvalidArgument,
        "expected_owner_id"
    );
    check!(
        pay.create_charge(charge(MISSING, "r")),
        PermissionDenied,
        "expected_owner_id has no account with this id"
    );
    check!(
        pay.refund_charge(RefundChargeRequest {
            charge_idempotency_key: "".into()
        }),
        InvalidArgument,
        "charge_idempotency_key: is required"
    );
    check!(
        pay.get_charge(GetChargeRequest {
            charge_idempotency_key: "nothing".into()
        }),
        NotFound,
        "no charge with idempotency key"
    );

    // orders
    let order = |items: Vec<(&str, i64)>, account: &str, key: &str| PlaceOrderRequest {
        items: items
            .into_iter()
            .map(|(p, q)| PlaceOrderItem {
                product_id: p.into(),
                quantity: q,
            })
            .collect(),
        payment_account_id: account.into(),
        idempotency_key: key.into(),
    };
    let good = || order(vec![(&a.product_id, 1)], &account, "o1");
    check!(
        ord.place_order(good()),
        Unauthenticated,
        "missing authorization metadata"
    );
    let mut basic = tonic::Request::new(good());
    basic
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    check!(
        ord.place_order(basic),
        Unauthenticated,
        "must be `Bearer <token>`"
    );
    check!(
        ord.place_order(authed("not.a.jwt", good())),
        Unauthenticated,
        "token"
    );
    check!(
        ord.place_order(authed(&token, order(vec![], &account, "o1"))),
        InvalidArgument,
        "items: must hold at least one item"
    );
    check!(
        ord.place_order(authed(&token, order(vec![("x", 1)], &account, "o1"))),
        InvalidArgument,
        "items[0].product_id: \"x\" is not a UUID"
    );
    check!(
        ord.place_order(authed(
            &token,
            order(vec![(&a.product_id, 0)], &account, "o1")
        )),
        InvalidArgument,
        "items[0].quantity"
    );
    check!(
        ord.place_order(authed(&token, order(vec![(&a.product_id, 1)], "x", "o1"))),
        InvalidArgument,
        "payment_account_id"
    );
    check!(
        ord.place_order(authed(
            &token,
            order(vec![(&a.product_id, 1)], &account, "")
        )),
        InvalidArgument,
        "idempotency_key: is required"
    );
    check!(
        ord.place_order(authed(&token, order(vec![(MISSING, 1)], &account, "o1"))),
        NotFound,
        "items[0].product_id: product"
    );
    check!(
        ord.place_order(authed(
            &token,
            order(vec![(&a.product_id, 1)], MISSING, "o1")
        )),
        PermissionDenied,
        "payment_account_id: you have no payment account with this id"
    );
    check!(
        ord.place_order(authed(
            &token,
            order(
                vec![(&a.product_id, 1), (&eur.product_id, 1)],
                &account,
                "o1"
            )
        )),
        InvalidArgument,
        "one order takes one currency"
    );
    check!(
        ord.get_order(authed(
            &token,
            GetOrderRequest {
                order_id: "x".into()
            }
        )),
        InvalidArgument,
        "order_id: \"x\" is not a UUID"
    );
    check!(
        ord.get_order(authed(
            &token,
            GetOrderRequest {
                order_id: MISSING.into()
            }
        )),
        NotFound,
        "does not exist"
    );
    check!(
        ord.list_orders(authed(
            &token,
            ListOrdersRequest {
                page_size: -1,
                page_token: "".into()
            }
        )),
        InvalidArgument,
        "page_size"
    );
    check!(
        ord.list_orders(authed(
            &token,
            ListOrdersRequest {
                page_size: 1,
                page_token: "zzz".into()
            }
        )),
        InvalidArgument,
        "page_token"
    );
    check!(
        ord.watch_order(authed(
            &token,
            WatchOrderRequest {
                order_id: MISSING.into()
            }
        )),
        NotFound,
        "does not exist"
    );
    let listed = ord
        .list_orders(authed(
            &token,
            ListOrdersRequest {
                page_size: 0,
                page_token: "".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.orders.is_empty(),
        "refused orders must not be stored: {listed:?}"
    );
}

#[tokio::test]
async fn validation_sqlite() {
    validation(Db::Sqlite).await;
}

#[tokio::test]
async fn validation_postgres() {
    let Some(db) = Db::postgres() else { return };
    validation(db).await;
}
