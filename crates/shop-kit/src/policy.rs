//! The shop's authorization policy, in one place: which workload calls which
//! methods of which service. `shopctl up` and the tests write it, and the
//! Kubernetes manifests are checked against it.
//!
//! Least privilege: each caller holds exactly the methods it calls, so a
//! compromised orders process cannot open accounts or deposit money, and the
//! gateway reaches payments' user-facing `WalletService` only. The operator
//! (a person with a short-lived certificate, never a workload in the
//! cluster) may call everything.

/// Who calls what: `(caller, callee, methods)`. The gateway's entries are
/// its public routes (checked against its route table in its tests) plus
/// the token keys it verifies with.
pub const CALLS: &[(&str, &str, &[&str])] = &[
    (
        "orders",
        "auth",
        &["mesh.auth.v1.AuthService/GetPublicKeys"],
    ),
    (
        "orders",
        "inventory",
        &[
            "mesh.inventory.v1.InventoryService/GetProduct",
            "mesh.inventory.v1.InventoryService/ReserveStock",
            "mesh.inventory.v1.InventoryService/CommitReservation",
            "mesh.inventory.v1.InventoryService/ReleaseReservation",
        ],
    ),
    (
        "orders",
        "payments",
        &[
            "mesh.payments.v1.PaymentsService/GetAccount",
            "mesh.payments.v1.PaymentsService/CreateCharge",
            "mesh.payments.v1.PaymentsService/RefundCharge",
            "mesh.payments.v1.PaymentsService/GetCharge",
        ],
    ),
    (
        "orders",
        "recommendations",
        &["mesh.recommendations.v1.RecommendationsService/RecordOrder"],
    ),
    (
        "payments",
        "auth",
        &["mesh.auth.v1.AuthService/GetPublicKeys"],
    ),
    (
        "gateway",
        "auth",
        &[
            "mesh.auth.v1.AuthService/Register",
            "mesh.auth.v1.AuthService/Login",
            "mesh.auth.v1.AuthService/GetPublicKeys",
        ],
    ),
    (
        "gateway",
        "inventory",
        &[
            "mesh.inventory.v1.InventoryService/GetProduct",
            "mesh.inventory.v1.InventoryService/ListProducts",
        ],
    ),
    ("gateway", "orders", &["mesh.orders.v1.OrdersService/*"]),
    ("gateway", "payments", &["mesh.payments.v1.WalletService/*"]),
    (
        "gateway",
        "recommendations",
        &["mesh.recommendations.v1.RecommendationsService/Recommend"],
    ),
];

/// The workload identity that administers the shop from outside it.
pub const OPERATOR: &str = "operator";

/// The SPIFFE ID of `workload` in the shop's namespace of `trust_domain`.
pub fn identity(trust_domain: &str, workload: &str) -> String {
    format!("spiffe://{trust_domain}/ns/shop/sa/{workload}")
}

/// The `authorization` section of `service`'s mesh config: its callers'
/// rules from [`CALLS`] and the operator's, enforced. `None` for a service
/// no workload calls (the gateway, whose port is public).
pub fn authorization(service: &str, trust_domain: &str) -> Option<serde_json::Value> {
    let mut rules: Vec<serde_json::Value> = CALLS
        .iter()
        .filter(|(_, callee, _)| *callee == service)
        .map(|(caller, _, methods)| {
            serde_json::json!({
                "callers": [identity(trust_domain, caller)],
                "methods": methods,
            })
        })
        .collect();
    if rules.is_empty() {
        return None;
    }
    rules.push(serde_json::json!({
        "callers": [identity(trust_domain, OPERATOR)],
        "methods": ["*"],
    }));
    Some(serde_json::json!({ "mode": "enforce", "rules": rules }))
}

/// `service`'s mesh config holding only its authorization policy (an empty
/// config for the gateway).
pub fn mesh_config(service: &str, trust_domain: &str) -> serde_json::Value {
    match authorization(service, trust_domain) {
        Some(authorization) => serde_json::json!({ "authorization": authorization }),
        None => serde_json::json!({}),
    }
}

/// The methods `caller` may call on `callee` (empty when none).
pub fn methods(caller: &str, callee: &str) -> &'static [&'static str] {
    CALLS
        .iter()
        .find(|(from, to, _)| *from == caller && *to == callee)
        .map(|(_, _, methods)| *methods)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_named_exists_in_the_contracts() {
        let mut known = mesh_client::MethodTable::default();
        known.add_encoded(shop_api::FILE_DESCRIPTOR_SET).unwrap();
        for (caller, callee, methods) in CALLS {
            for method in *methods {
                let ok = match method.strip_suffix("/*") {
                    Some(service) => known
                        .paths()
                        .any(|m| m.starts_with(&format!("/{service}/"))),
                    None => known.get(&format!("/{method}")).is_some(),
                };
                assert!(ok, "{caller} → {callee}: {method} is not in the contracts");
            }
        }
    }

    #[test]
    fn orders_cannot_mint_money_or_stock() {
        let orders_payments = methods("orders", "payments");
        for forbidden in ["Deposit", "OpenAccount"] {
            assert!(
                !orders_payments
                    .iter()
                    .any(|m| m.ends_with(forbidden) || m.ends_with("*")),
                "orders must not hold {forbidden}"
            );
        }
        let orders_inventory = methods("orders", "inventory");
        for forbidden in ["CreateProduct", "AdjustStock"] {
            assert!(
                !orders_inventory
                    .iter()
                    .any(|m| m.ends_with(forbidden) || m.ends_with("*")),
                "orders must not hold {forbidden}"
            );
        }
        assert!(authorization("gateway", "shop.local").is_none());
        let payments = authorization("payments", "shop.local").unwrap();
        assert_eq!(payments["rules"].as_array().unwrap().len(), 3);
    }
}
