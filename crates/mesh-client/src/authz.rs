//! Per-method authorization of callers by their verified SPIFFE ID.
//!
//! Deny by default once a policy exists: a call is allowed only if some
//! rule lists both its caller and its method. `grpc.health.v1.Health` is
//! always allowed, so probes work. Audit mode logs what would be denied and
//! lets it through, to roll a policy out safely.
//!
//! A server built with [`crate::server::MeshServer::authorization_from`]
//! follows the policy in its [`crate::Mesh`]'s config, so a policy file
//! read with [`crate::Mesh::from_file`] is enforced as it changes: a
//! revocation takes effect within the file check interval (2 s), without a
//! restart. A changed file that does not validate is refused loudly and the
//! last good policy stays in force; so is a change that would drop the
//! policy altogether (turning deny-by-default into allow-all takes a
//! restart, not a file edit).

pub(crate) mod layer;

use serde::Deserialize;

use crate::{error::MeshError, tls::identity::SpiffeId};

/// Request headers that claim an identity. They are never trusted and are
/// removed before the service sees the request.
pub const IDENTITY_HEADERS: &[&str] = &[
    "x-spiffe-id",
    "x-forwarded-client-cert",
    "x-mesh-caller",
    "x-caller-identity",
];

/// Response header on a denial made by this layer (value
/// `authorization`), so a proxy can tell the mesh refusing *it* from the
/// service's own answer: the denial names the proxy's identity, which an
/// outside caller should not learn.
pub const REFUSED_BY_HEADER: &str = "mesh-refused-by";

/// Enforce the rules, or only log what they would deny.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthzMode {
    /// Deny what no rule allows with `PERMISSION_DENIED`.
    #[default]
    Enforce,
    /// Allow everything; log what would be denied.
    Audit,
}

/// Which callers may call which methods.
///
/// ```json
/// { "mode": "enforce",
///   "rules": [
///     { "callers": ["spiffe://shop.local/ns/shop/sa/orders"],
///       "methods": ["mesh.payments.v1.PaymentsService/CreateCharge"] },
///     { "callers": ["spiffe://shop.local/ns/shop/sa/*"],
///       "methods": ["mesh.payments.v1.PaymentsService/GetAccount"] } ] }
/// ```
///
/// Callers: an exact SPIFFE ID, a prefix of whole path segments ending in
/// `/*` (`spiffe://shop.local/ns/shop/*`), or `*` for any authenticated
/// caller. Methods: `package.Service/Method`, `package.Service/Prefix*`,
/// `package.Service/*`, or `*` (a `*` only at the very end).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Enforce (default) or audit.
    #[serde(default)]
    pub mode: AuthzMode,
    /// Allow rules.
    pub rules: Vec<AuthzRule>,
}

/// One allow rule.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRule {
    /// Caller patterns.
    pub callers: Vec<String>,
    /// Method patterns.
    pub methods: Vec<String>,
}

/// Whether `value` falls under `pattern`: equal to it, or starting with
/// the part before a trailing `*`.
pub(crate) fn pattern_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// What a caller pattern must be, for error messages.
pub(crate) const CALLER_PATTERN: &str =
    "must be a SPIFFE ID, a spiffe:// prefix ending in /* (whole path segments), or *";

/// Whether `pattern` is `*`, an exact SPIFFE ID, or a `spiffe://` prefix
/// that ends at a path segment (`spiffe://shop.local/ns/shop/*`). A prefix
/// cut inside a segment says less than it matches: `spiffe://shop.local*`
/// also matches the trust domain `shop.local.evil`, and `.../sa/orders*`
/// the account `orders-admin`.
pub(crate) fn caller_pattern_ok(pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix("/*") {
        // Valid exactly when some workload's ID could sit under it.
        return format!("{prefix}/x").parse::<SpiffeId>().is_ok();
    }
    pattern.parse::<SpiffeId>().is_ok()
}

/// What a method pattern must be, for error messages.
pub(crate) const METHOD_PATTERN: &str = "must be package.Service/Method, package.Service/MethodPrefix*, package.Service/* or * (a * only at the end)";

/// Whether `pattern` is `*` or `package.Service/Method` (the method part
/// may end in `*`). A `*` anywhere else would be taken literally and never
/// match, so a rule that looks like it allows (or faults) a family of
/// services would silently do nothing: refused instead.
pub(crate) fn method_pattern_ok(pattern: &str) -> bool {
    pattern == "*"
        || pattern.split_once('/').is_some_and(|(service, m)| {
            let m_head = m.strip_suffix('*').unwrap_or(m);
            !service.is_empty()
                && !m.is_empty()
                && !m.contains('/')
                && !service.contains('*')
                && !m_head.contains('*')
        })
}

impl AuthorizationPolicy {
    /// Checks every pattern; names the first bad one.
    pub fn validate(&self) -> Result<(), MeshError> {
        let bad = |field: String, reason: &str| MeshError::InvalidConfig {
            field,
            reason: reason.into(),
        };
        if self.rules.is_empty() {
            return Err(bad(
                "authorization.rules".into(),
                "a policy needs at least one rule",
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.callers.is_empty() || rule.methods.is_empty() {
                return Err(bad(
                    format!("authorization.rules[{i}]"),
                    "needs callers and methods",
                ));
            }
            for (j, caller) in rule.callers.iter().enumerate() {
                if !caller_pattern_ok(caller) {
                    return Err(bad(
                        format!("authorization.rules[{i}].callers[{j}]"),
                        CALLER_PATTERN,
                    ));
                }
            }
            for (j, method) in rule.methods.iter().enumerate() {
                if !method_pattern_ok(method) {
                    return Err(bad(
                        format!("authorization.rules[{i}].methods[{j}]"),
                        METHOD_PATTERN,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `caller` may call `method` (`package.Service/Method`).
    pub fn allows(&self, caller: Option<&str>, method: &str) -> bool {
        if method.starts_with("grpc.health.v1.Health/") {
            return true;
        }
        let Some(caller) = caller else { return false };
        self.rules.iter().any(|rule| {
            rule.callers.iter().any(|p| pattern_matches(p, caller))
                && rule.methods.iter().any(|p| pattern_matches(p, method))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> AuthorizationPolicy {
        let p: AuthorizationPolicy = serde_json::from_str(json).unwrap();
        p.validate().unwrap();
        p
    }

    #[test]
    fn matches_exact_prefix_and_wildcards() {
        let p = policy(
            r#"{"rules":[
              {"callers":["spiffe://shop.local/ns/shop/sa/orders"],"methods":["mesh.payments.v1.PaymentsService/CreateCharge"]},
              {"callers":["spiffe://shop.local/ns/shop/sa/*"],"methods":["mesh.payments.v1.PaymentsService/Get*"]},
              {"callers":["spiffe://shop.local/ns/ops/sa/operator"],"methods":["*"]}]}"#,
        );
        let orders = Some("spiffe://shop.local/ns/shop/sa/orders");
        let gateway = Some("spiffe://shop.local/ns/shop/sa/gateway");
        assert!(p.allows(orders, "mesh.payments.v1.PaymentsService/CreateCharge"));
        assert!(!p.allows(gateway, "mesh.payments.v1.PaymentsService/CreateCharge"));
        assert!(p.allows(gateway, "mesh.payments.v1.PaymentsService/GetAccount"));
        assert!(p.allows(Some("spiffe://shop.local/ns/ops/sa/operator"), "x.Y/Z"));
        assert!(!p.allows(None, "mesh.payments.v1.PaymentsService/GetAccount"));
        assert!(p.allows(None, "grpc.health.v1.Health/Check"));
    }

    #[test]
    fn a_caller_prefix_must_end_at_a_path_segment() {
        for bad in [
            "spiffe://shop.local*",
            "spiffe://shop.local/ns/shop/sa/orders*",
            "spiffe://*",
            "spiffe:///*",
            "spiffe://shop.local/*/sa/*",
            "spiffe://shop.local//*",
        ] {
            let json = format!(r#"{{"rules":[{{"callers":["{bad}"],"methods":["*"]}}]}}"#);
            let p: AuthorizationPolicy = serde_json::from_str(&json).unwrap();
            let err = p.validate().unwrap_err().to_string();
            assert!(
                err.contains("rules[0].callers[0]") && err.contains("/*"),
                "{bad}: {err}"
            );
        }
        let p =
            policy(r#"{"rules":[{"callers":["spiffe://shop.local/ns/shop/*"],"methods":["*"]}]}"#);
        assert!(p.allows(Some("spiffe://shop.local/ns/shop/sa/orders"), "p.S/M"));
        assert!(!p.allows(Some("spiffe://shop.local/ns/shop-evil/sa/x"), "p.S/M"));
        assert!(!p.allows(Some("spiffe://shop.local.evil/ns/shop/sa/x"), "p.S/M"));
    }

    #[test]
    fn a_star_is_refused_anywhere_but_the_end_of_the_method() {
        for bad in [
            "shop.*/Get",
            "*/Get",
            "shop.Orders/G*t",
            "shop.Orders/**",
            "/x",
        ] {
            let json = format!(r#"{{"rules":[{{"callers":["*"],"methods":["{bad}"]}}]}}"#);
            let p: AuthorizationPolicy = serde_json::from_str(&json).unwrap();
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains("rules[0].methods[0]"), "{bad}: {err}");
        }
        let p = policy(r#"{"rules":[{"callers":["*"],"methods":["p.S/Get*"]}]}"#);
        assert!(p.allows(Some("spiffe://shop.local/ns/shop/sa/x"), "p.S/GetOrder"));
        assert!(!p.allows(Some("spiffe://shop.local/ns/shop/sa/x"), "p.S/PutOrder"));
    }

    #[test]
    fn names_bad_patterns() {
        let p: AuthorizationPolicy =
            serde_json::from_str(r#"{"rules":[{"callers":["orders"],"methods":["*"]}]}"#).unwrap();
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("rules[0].callers[0]")
        );
        let p: AuthorizationPolicy =
            serde_json::from_str(r#"{"rules":[{"callers":["*"],"methods":["NoSlash"]}]}"#).unwrap();
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("rules[0].methods[0]")
        );
    }

    proptest::proptest! {
        #[test]
        fn policies_never_panic_and_health_is_always_allowed(
            text in "\\PC{0,300}",
            caller in proptest::option::of("\\PC{0,60}"),
            method in "\\PC{0,60}",
        ) {
            if let Ok(p) = serde_json::from_str::<AuthorizationPolicy>(&text) {
                let _ = p.validate();
                let _ = p.allows(caller.as_deref(), &method);
                proptest::prop_assert!(p.allows(caller.as_deref(), "grpc.health.v1.Health/Check"));
            }
        }

        #[test]
        fn an_exact_rule_allows_only_its_caller(tail in "[a-z]{1,12}", other in "[a-z]{1,12}") {
            let me = format!("spiffe://t.local/ns/a/sa/{tail}");
            let json = format!(r#"{{"rules":[{{"callers":["{me}"],"methods":["p.S/M"]}}]}}"#);
            let p: AuthorizationPolicy = serde_json::from_str(&json).unwrap();
            p.validate().unwrap();
            proptest::prop_assert!(p.allows(Some(&me), "p.S/M"));
            proptest::prop_assert!(!p.allows(Some(&me), "p.S/Other"));
            let them = format!("spiffe://t.local/ns/a/sa/{other}");
            proptest::prop_assert_eq!(p.allows(Some(&them), "p.S/M"), other == tail);
        }
    }
}
