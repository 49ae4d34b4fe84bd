//! Object-level authorization: may *this* user touch *this* object. Users
//! manage their own accounts through the gateway (the owner comes from the
//! token, never the request); nobody pays with, reads or funds another
//! user's account, whether through the gateway, directly at orders with a
//! forged forwarded subject, or by a charge naming the wrong owner; and
//! tokens are checked in process, so orders and wallets keep serving users
//! while auth is down.

mod common;

use std::time::Duration;

use common::{Shop, assert_status, authed, gateway};
use futures::StreamExt;
use shop_api::{
    common::v1::Money,
    orders::v1::{
        GetOrderRequest, ListOrdersRequest, Order, OrderStatus, PlaceOrderItem, PlaceOrderRequest,
        WatchOrderRequest, orders_service_client::OrdersServiceClient,
    },
    payments::v1::{
        DepositRequest, EntryKind, GetAccountRequest, ListEntriesRequest,
        ListWalletAccountsRequest, OpenAccountRequest, OpenWalletAccountRequest,
        payments_service_client::PaymentsServiceClient, wallet_service_client::WalletServiceClient,
    },
};
use tonic::Code;

fn usd(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".into(),
        amount_minor,
    })
}

fn place(account: &str, product: &str, key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        items: vec![PlaceOrderItem {
            product_id: product.into(),
            quantity: 1,
        }],
        payment_account_id: account.into(),
        idempotency_key: key.into(),
    }
}

/// Watches `order_id` until it is final (30 s at most) and returns it.
async fn final_order<T>(orders: &mut OrdersServiceClient<T>, token: &str, order_id: &str) -> Order
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut stream = orders
        .watch_order(authed(
            token,
            WatchOrderRequest {
                order_id: order_id.into(),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while let Ok(Some(update)) = tokio::time::timeout_at(deadline, stream.next()).await {
        last = Some(update.expect("watch update"));
    }
    let last = last.expect("at least one update");
    assert!(
        matches!(
            last.status(),
            OrderStatus::Confirmed | OrderStatus::Cancelled
        ),
        "not final within 30 s: {last:?}"
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_manage_their_own_accounts_and_nobody_pays_with_anothers() {
    let shop = Shop::start_mtls().await;
    let (_gateway, addr) = gateway(&shop, None, &[]);
    common::wait_serving(addr).await;
    let gw = common::channel(addr).await;
    let (_, product, _) = shop.customer("stocker").await;
    let (ann_id, ann) = common::gateway_login(&gw, "ann").await;
    let (_, bob) = common::gateway_login(&gw, "bob").await;
    let mut wallet = WalletServiceClient::new(gw.clone());

    // Ann opens and funds her own account through the gateway; the owner
    // is her token's subject whatever the request says.
    let ann_account = wallet
        .open_account(authed(
            &ann,
            OpenWalletAccountRequest {
                currency_code: "USD".into(),
            },
        ))
        .await
        .expect("open account through the gateway")
        .into_inner();
    assert_eq!(ann_account.owner_id, ann_id);
    let ann_acct = ann_account.account_id.clone();
    let deposit = |account: &str, amount, key: &str| DepositRequest {
        account_id: account.into(),
        amount: usd(amount),
        idempotency_key: key.into(),
    };
    for _ in 0..2 {
        let after = wallet
            .deposit(authed(&ann, deposit(&ann_acct, 2500, "dep-1")))
            .await
            .expect("deposit")
            .into_inner();
        assert_eq!(after.balance.unwrap().amount_minor, 2500, "a key pays once");
    }
    assert_status(
        wallet
            .deposit(authed(&ann, deposit(&ann_acct, 9999, "dep-1")))
            .await,
        Code::AlreadyExists,
        "different deposit",
    );

    // Bob's keys are his own: the same key is a new deposit into his account.
    let bob_acct = wallet
        .open_account(authed(
            &bob,
            OpenWalletAccountRequest {
                currency_code: "USD".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .account_id;
    let bob_after = wallet
        .deposit(authed(&bob, deposit(&bob_acct, 100, "dep-1")))
        .await
        .expect("bob's own dep-1")
        .into_inner();
    assert_eq!(bob_after.balance.unwrap().amount_minor, 100);

    // Ann's account does not exist for Bob: not readable, not fundable,
    // no history, not in his list.
    assert_status(
        wallet
            .get_account(authed(
                &bob,
                GetAccountRequest {
                    account_id: ann_acct.clone(),
                },
            ))
            .await,
        Code::NotFound,
        "does not exist",
    );
    assert_status(
        wallet
            .deposit(authed(&bob, deposit(&ann_acct, 1, "bob-into-ann")))
            .await,
        Code::NotFound,
        "does not exist",
    );
    assert_status(
        wallet
            .list_entries(authed(
                &bob,
                ListEntriesRequest {
                    account_id: ann_acct.clone(),
                    ..Default::default()
                },
            ))
            .await,
        Code::NotFound,
        "does not exist",
    );
    let bobs = wallet
        .list_accounts(authed(&bob, ListWalletAccountsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .accounts;
    assert_eq!(
        bobs.iter()
            .map(|a| a.account_id.as_str())
            .collect::<Vec<_>>(),
        [bob_acct.as_str()]
    );

    // Bob cannot pay with Ann's account through the gateway: the same
    // answer as for an account that does not exist.
    let mut orders = OrdersServiceClient::new(gw.clone());
    for (account, key) in [
        (ann_acct.clone(), "bob-1"),
        (uuid::Uuid::new_v4().to_string(), "bob-2"),
    ] {
        assert_status(
            orders
                .place_order(authed(&bob, place(&account, &product, key)))
                .await,
            Code::PermissionDenied,
            "you have no payment account with this id",
        );
    }

    // Nor directly at orders inside the mesh, with or without a forwarded
    // subject claiming to be Ann.
    let mut direct = shop.orders().await;
    assert_status(
        direct
            .place_order(authed(&bob, place(&ann_acct, &product, "bob-3")))
            .await,
        Code::PermissionDenied,
        "you have no payment account with this id",
    );
    let mut forged = authed(&bob, place(&ann_acct, &product, "bob-4"));
    forged
        .metadata_mut()
        .insert("x-verified-subject", ann_id.parse().unwrap());
    assert_status(
        direct.place_order(forged).await,
        Code::PermissionDenied,
        "does not match its token",
    );

    // Nor can a charge for Bob take Ann's money at payments itself.
    let mut payments = shop.payments().await;
    assert_status(
        payments
            .create_charge(shop_api::payments::v1::CreateChargeRequest {
                account_id: ann_acct.clone(),
                amount: usd(1),
                idempotency_key: "bob-charge".into(),
                reference: "attack".into(),
                expected_owner_id: "bob".into(),
            })
            .await,
        Code::PermissionDenied,
        "expected_owner_id has no account with this id",
    );

    // Ann pays with her own account; her history shows it, page by page.
    let placed = orders
        .place_order(authed(&ann, place(&ann_acct, &product, "ann-1")))
        .await
        .expect("ann orders with her own account")
        .into_inner();
    let done = final_order(&mut orders, &ann, &placed.order_id).await;
    assert_eq!(done.status(), OrderStatus::Confirmed, "{done:?}");
    let first = wallet
        .list_entries(authed(
            &ann,
            ListEntriesRequest {
                account_id: ann_acct.clone(),
                page_size: 1,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries.len(), 1);
    assert_eq!(first.entries[0].kind(), EntryKind::Charge);
    assert_eq!(first.entries[0].amount.as_ref().unwrap().amount_minor, -100);
    assert!(first.entries[0].reference.contains(&placed.order_id));
    assert!(!first.next_page_token.is_empty());
    let second = wallet
        .list_entries(authed(
            &ann,
            ListEntriesRequest {
                account_id: ann_acct.clone(),
                page_size: 1,
                page_token: first.next_page_token,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.entries.len(), 1);
    assert_eq!(second.entries[0].kind(), EntryKind::Deposit);
    assert_eq!(
        second.entries[0].amount.as_ref().unwrap().amount_minor,
        2500
    );
    assert_eq!(second.entries[0].reference, "dep-1");
    assert!(second.next_page_token.is_empty());
    let balance = wallet
        .get_account(authed(
            &ann,
            GetAccountRequest {
                account_id: ann_acct.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap()
        .amount_minor;
    assert_eq!(balance, 2400, "only Ann's own order took Ann's money");

    // Bob cannot read Ann's order in any way.
    for status in [
        orders
            .get_order(authed(
                &bob,
                GetOrderRequest {
                    order_id: placed.order_id.clone(),
                },
            ))
            .await
            .map(|_| ()),
        orders
            .watch_order(authed(
                &bob,
                WatchOrderRequest {
                    order_id: placed.order_id.clone(),
                },
            ))
            .await
            .map(|_| ()),
    ] {
        assert_eq!(status.unwrap_err().code(), Code::NotFound);
    }
    let bobs_orders = orders
        .list_orders(authed(&bob, ListOrdersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(bobs_orders.orders.is_empty());

    // No token, no wallet; the operator's PaymentsService stays internal.
    assert_status(
        wallet
            .list_accounts(ListWalletAccountsRequest::default())
            .await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_status(
        PaymentsServiceClient::new(gw.clone())
            .open_account(authed(
                &bob,
                OpenAccountRequest {
                    owner_id: ann_id.clone(),
                    currency_code: "USD".into(),
                },
            ))
            .await,
        Code::PermissionDenied,
        "internal",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_and_wallets_serve_users_while_auth_is_down() {
    let mut shop = Shop::start_mtls().await;
    let (token, product, account) = shop.customer("ann").await;
    let mut orders = shop.orders().await;
    let mut wallet = WalletServiceClient::new(shop.channel(shop.payments.addr, "payments"));
    let balance_request = || {
        authed(
            &token,
            GetAccountRequest {
                account_id: account.clone(),
            },
        )
    };
    // Both services learn auth's keys on first use.
    let first = orders
        .place_order(authed(&token, place(&account, &product, "before")))
        .await
        .expect("order before the outage")
        .into_inner();
    assert_eq!(
        final_order(&mut orders, &token, &first.order_id)
            .await
            .status(),
        OrderStatus::Confirmed
    );
    wallet.get_account(balance_request()).await.expect("wallet");

    shop.proc_mut("auth").kill();

    for i in 0..5 {
        let placed = orders
            .place_order(authed(
                &token,
                place(&account, &product, &format!("during-{i}")),
            ))
            .await
            .unwrap_or_else(|e| panic!("order {i} while auth is down: {e:?}"))
            .into_inner();
        let done = final_order(&mut orders, &token, &placed.order_id).await;
        assert_eq!(done.status(), OrderStatus::Confirmed, "{done:?}");
    }
    let listed = orders
        .list_orders(authed(&token, ListOrdersRequest::default()))
        .await
        .expect("reads while auth is down")
        .into_inner();
    assert_eq!(listed.orders.len(), 6);
    wallet
        .get_account(balance_request())
        .await
        .expect("wallet while auth is down");
    // A bad token is still refused without auth.
    assert_status(
        orders
            .list_orders(authed("not-a-token", ListOrdersRequest::default()))
            .await,
        Code::Unauthenticated,
        "token",
    );
}

/// The shop's workloads hold only the methods they call: a compromised
/// orders process cannot mint money or stock, and the gateway's identity
/// reaches payments' wallet but never `PaymentsService` itself, even
/// calling around the gateway's own route table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_hold_only_the_methods_they_call() {
    use shop_api::inventory::v1::{
        AdjustStockRequest, CreateProductRequest, inventory_service_client::InventoryServiceClient,
    };
    let shop = Shop::start_mtls().await;
    let pki = shop.pki.as_ref().unwrap();
    let as_workload = |workload: &str, callee: &str, addr: std::net::SocketAddr| {
        // Reuse a running workload's certificate (re-issuing would rotate it under it).
        if !pki.root.join(workload).exists() {
            pki.issue(workload);
        }
        mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
            .unwrap()
            .with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET)
            .unwrap()
            .with_tls(pki.load(workload))
            .channel_with_identity(&format!("static:///{addr}"), &common::identity(callee))
            .unwrap()
    };
    let denied = |result: Result<(), tonic::Status>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
    };

    let orders_to_payments = as_workload("orders", "payments", shop.payments.addr);
    let mut payments = PaymentsServiceClient::new(orders_to_payments);
    denied(
        payments
            .open_account(OpenAccountRequest {
                owner_id: "orders".into(),
                currency_code: "USD".into(),
            })
            .await
            .map(|_| ()),
        "orders → OpenAccount",
    );
    denied(
        payments
            .deposit(DepositRequest {
                account_id: uuid::Uuid::new_v4().to_string(),
                amount: usd(1),
                idempotency_key: "mint".into(),
            })
            .await
            .map(|_| ()),
        "orders → Deposit",
    );
    // What orders does call still works (the account is missing, not refused).
    let err = payments
        .get_account(GetAccountRequest {
            account_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let mut inventory =
        InventoryServiceClient::new(as_workload("orders", "inventory", shop.inventory.addr));
    denied(
        inventory
            .create_product(CreateProductRequest::default())
            .await
            .map(|_| ()),
        "orders → CreateProduct",
    );
    denied(
        inventory
            .adjust_stock(AdjustStockRequest::default())
            .await
            .map(|_| ()),
        "orders → AdjustStock",
    );

    let gateway_to_payments = as_workload("gateway", "payments", shop.payments.addr);
    denied(
        PaymentsServiceClient::new(gateway_to_payments.clone())
            .get_account(GetAccountRequest {
                account_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .map(|_| ()),
        "gateway → PaymentsService/GetAccount",
    );
    // The wallet answers the gateway's identity (and wants a user token).
    assert_status(
        WalletServiceClient::new(gateway_to_payments)
            .list_accounts(ListWalletAccountsRequest::default())
            .await,
        Code::Unauthenticated,
        "authorization",
    );
}

/// A wallet is a test stand-in for a card payment, with limits: a user's
/// account holds at most `payments::WALLET_MAX_BALANCE_MINOR` after a
/// deposit, and a user opens at most `payments::MAX_ACCOUNTS_PER_USER`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallets_cannot_mint_money_or_accounts_without_end() {
    let shop = Shop::start_mtls().await;
    let (_, token) = shop.user("minter").await;
    let mut wallet = WalletServiceClient::new(shop.channel(shop.payments.addr, "payments"));
    let open = |wallet: &mut WalletServiceClient<mesh_client::MeshChannel>| {
        open_usd_account(wallet.clone(), token.clone())
    };
    let account = open(&mut wallet).await.unwrap().into_inner().account_id;
    let full = payments::WALLET_MAX_BALANCE_MINOR;
    let deposit = |amount, key: &str| {
        authed(
            &token,
            DepositRequest {
                account_id: account.clone(),
                amount: usd(amount),
                idempotency_key: key.into(),
            },
        )
    };
    wallet
        .deposit(deposit(full, "fill"))
        .await
        .expect("up to the limit");
    assert_status(
        wallet.deposit(deposit(1, "one-more")).await,
        Code::FailedPrecondition,
        "over its limit",
    );
    for _ in 1..payments::MAX_ACCOUNTS_PER_USER {
        open(&mut wallet).await.expect("within the account limit");
    }
    assert_status(
        open(&mut wallet).await,
        Code::ResourceExhausted,
        "the most one user may open",
    );
}

/// Opens a USD wallet account as the holder of `token`.
async fn open_usd_account(
    mut wallet: WalletServiceClient<mesh_client::MeshChannel>,
    token: String,
) -> Result<tonic::Response<shop_api::payments::v1::Account>, tonic::Status> {
    wallet
        .open_account(authed(
            &token,
            OpenWalletAccountRequest {
                currency_code: "USD".into(),
            },
        ))
        .await
}

/// The account cap holds when a user opens many accounts at once: 20
/// concurrent opens with 9 accounts held open exactly one (a count then an
/// insert let all of them through).
async fn concurrent_opens_stop_at_the_cap(db: common::Db) {
    let shop = Shop::start_with(&db, true).await;
    let (_, token) = shop.user("racer").await;
    let wallet = WalletServiceClient::new(shop.channel(shop.payments.addr, "payments"));
    let open = || open_usd_account(wallet.clone(), token.clone());
    for _ in 1..payments::MAX_ACCOUNTS_PER_USER {
        open().await.expect("within the account limit");
    }
    let mut opens = tokio::task::JoinSet::new();
    for _ in 0..20 {
        opens.spawn(open());
    }
    let mut opened = 0;
    while let Some(result) = opens.join_next().await {
        match result.expect("the open task") {
            Ok(_) => opened += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("the most one user may open"),
                    "{status:?}"
                );
            }
        }
    }
    assert_eq!(opened, 1, "one open takes the last place");
    let held = wallet
        .clone()
        .list_accounts(authed(
            &token,
            ListWalletAccountsRequest {
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .accounts
        .len();
    assert_eq!(held as i64, payments::MAX_ACCOUNTS_PER_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_stop_at_the_account_cap() {
    concurrent_opens_stop_at_the_cap(common::Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_stop_at_the_account_cap_postgres() {
    let Some(db) = common::Db::postgres() else {
        return;
    };
    concurrent_opens_stop_at_the_cap(db).await;
}
