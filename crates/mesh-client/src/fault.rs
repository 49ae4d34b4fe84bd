//! Fault injection (gRFC A33, Istio's `fault`): a share of calls delayed
//! and/or aborted with a chosen status, to prove that callers ride out a
//! slow or failing dependency before it happens for real.
//!
//! This module holds the policy data, shared by the client routes and by
//! the server's `serverFaults`; the layers that apply it live below.
//!
//! ```json
//! { "delay": { "percentage": 10, "fixedDelay": "200ms" },
//!   "abort": { "percentage": 20, "grpcStatus": "UNAVAILABLE" } }
//! ```
//!
//! Percentages are of calls (0 to 100, fractions allowed), decided per call
//! and independently for delay and abort: with both at 50 %, a quarter of
//! the calls are delayed and then aborted. A delay counts against the
//! call's deadline; an abort is marked so that no balancer or outlier
//! detector counts it against an endpoint.

pub mod layer;
pub(crate) mod server;

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tonic::Code;

use crate::{
    authz::{
        CALLER_PATTERN, METHOD_PATTERN, caller_pattern_ok, method_pattern_ok, pattern_matches,
    },
    config::text::duration_str,
    error::MeshError,
};

/// Response header on an answer the mesh made up (value `abort`), so a
/// layer or a peer can tell an injected failure from a real one: a client
/// balancer that gets it from a server (server-side injection) does not
/// count the answer against the endpoint.
pub const FAULT_HEADER: &str = "mesh-fault-injected";

/// The longest injected delay (5 min): longer than any deadline the mesh
/// gives (`maxTimeout` is at most 24 h but 30 s by default), short enough
/// that a typo such as `"200m"` for `"200ms"` is caught only when it exceeds
/// it; the deadline ends a delayed call first in practice.
pub const MAX_FIXED_DELAY: Duration = Duration::from_secs(300);

/// What to inject into a share of calls.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultPolicy {
    /// Delay a share of calls before they are sent (client) or handled
    /// (server).
    #[serde(default)]
    pub delay: Option<DelayFault>,
    /// Answer a share of calls with a status instead of sending (client) or
    /// handling (server) them.
    #[serde(default)]
    pub abort: Option<AbortFault>,
}

/// A fixed delay for `percentage` % of calls.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelayFault {
    /// Share of calls delayed, 0 to 100.
    pub percentage: f64,
    /// How long, 1 ms to [`MAX_FIXED_DELAY`], written like every duration
    /// of the config (`"200ms"`, `"1.5s"`).
    #[serde(deserialize_with = "duration_str::deserialize")]
    pub fixed_delay: Duration,
}

/// An immediate status for `percentage` % of calls.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortFault {
    /// Share of calls aborted, 0 to 100.
    pub percentage: f64,
    /// The status they end with, by its gRPC name (`"UNAVAILABLE"`); not
    /// `OK`.
    #[serde(deserialize_with = "status_name")]
    pub grpc_status: Code,
}

fn status_name<'de, D: Deserializer<'de>>(d: D) -> Result<Code, D::Error> {
    let name = String::deserialize(d)?;
    crate::config::text::codes::parse(&name).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "`grpcStatus` {name:?} is not a gRPC status code name such as \"UNAVAILABLE\""
        ))
    })
}

/// Checks a percentage of `field`.
pub(crate) fn check_percentage(field: &str, value: f64) -> Result<(), MeshError> {
    if !(0.0..=100.0).contains(&value) {
        return Err(MeshError::InvalidConfig {
            field: field.into(),
            reason: format!("must be between 0 and 100 (percent of calls), got {value}"),
        });
    }
    Ok(())
}

impl FaultPolicy {
    /// Checks every value; errors name the field below `field_path` (for
    /// example `targets["inv"].routes[0].fault`).
    pub fn validate(&self, field_path: &str) -> Result<(), MeshError> {
        if self.delay.is_none() && self.abort.is_none() {
            return Err(MeshError::InvalidConfig {
                field: field_path.into(),
                reason: "a fault needs a delay, an abort or both".into(),
            });
        }
        if let Some(delay) = &self.delay {
            check_percentage(&format!("{field_path}.delay.percentage"), delay.percentage)?;
            if delay.fixed_delay < Duration::from_millis(1) || delay.fixed_delay > MAX_FIXED_DELAY {
                return Err(MeshError::InvalidConfig {
                    field: format!("{field_path}.delay.fixedDelay"),
                    reason: format!(
                        "must be between 1ms and {MAX_FIXED_DELAY:?}, got {:?}",
                        delay.fixed_delay
                    ),
                });
            }
        }
        if let Some(abort) = &self.abort {
            check_percentage(&format!("{field_path}.abort.percentage"), abort.percentage)?;
            if abort.grpc_status == Code::Ok {
                return Err(MeshError::InvalidConfig {
                    field: format!("{field_path}.abort.grpcStatus"),
                    reason: "OK is not an abort; use a failing status such as \"UNAVAILABLE\""
                        .into(),
                });
            }
        }
        Ok(())
    }
}

/// One rule of the server's `serverFaults`: a fault for calls of some
/// methods from some callers, matched on the caller's verified SPIFFE ID
/// (the mTLS peer, as authorization sees it) and the method.
///
/// ```json
/// { "name": "orders-sees-flaky-reads",
///   "callers": ["spiffe://shop.local/ns/shop/sa/orders"],
///   "methods": ["mesh.inventory.v1.InventoryService/*"],
///   "abort": { "percentage": 20, "grpcStatus": "UNAVAILABLE" } }
/// ```
///
/// Rules are tried in order and the first that matches the call decides
/// (its delay and abort rolled as in [`FaultPolicy`]). Health checks and
/// reflection are never faulted, so probes and balancers keep seeing the
/// truth.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerFaultRule {
    /// Names the rule in logs and in `mesh_server_faults_injected_total`;
    /// 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`, unique.
    pub name: String,
    /// Caller patterns: an exact SPIFFE ID, a `spiffe://` prefix of whole
    /// path segments ending in `/*`, or `*` for any authenticated caller. Omitted or empty: every
    /// caller, unauthenticated ones (plaintext) included.
    #[serde(default)]
    pub callers: Vec<String>,
    /// Method patterns: `package.Service/Method`, `package.Service/*` or
    /// `*`. Omitted or empty: every method (but health and reflection).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Delay a share of the matching calls before they are handled.
    #[serde(default)]
    pub delay: Option<DelayFault>,
    /// Answer a share of the matching calls with a status, unhandled.
    #[serde(default)]
    pub abort: Option<AbortFault>,
}

/// The longest rule name (a metric label value).
const MAX_RULE_NAME: usize = 64;

impl ServerFaultRule {
    /// The rule's fault, as the client routes write it.
    pub fn policy(&self) -> FaultPolicy {
        FaultPolicy {
            delay: self.delay.clone(),
            abort: self.abort.clone(),
        }
    }

    /// Whether a call of `method` (`package.Service/Method`) from `caller`
    /// (its verified SPIFFE ID, `None` without one) falls under this rule.
    pub fn matches(&self, caller: Option<&str>, method: &str) -> bool {
        if method.starts_with("grpc.health.v1.Health/") || method.starts_with("grpc.reflection.") {
            return false;
        }
        let caller_ok = self.callers.is_empty()
            || caller.is_some_and(|c| self.callers.iter().any(|p| pattern_matches(p, c)));
        caller_ok
            && (self.methods.is_empty() || self.methods.iter().any(|p| pattern_matches(p, method)))
    }
}

/// Checks every rule of `serverFaults`; names the first bad field.
pub(crate) fn check_server_faults(rules: &[ServerFaultRule]) -> Result<(), MeshError> {
    let bad = |field: String, reason: String| MeshError::InvalidConfig { field, reason };
    let mut names = std::collections::HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("serverFaults[{i}]");
        let name_ok = (1..=MAX_RULE_NAME).contains(&rule.name.len())
            && rule
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !name_ok {
            return Err(bad(
                format!("{at}.name"),
                format!(
                    "{:?} must be 1 to {MAX_RULE_NAME} of a-z, 0-9, '-', '_', '.'",
                    rule.name
                ),
            ));
        }
        if !names.insert(rule.name.as_str()) {
            return Err(bad(
                format!("{at}.name"),
                format!(
                    "{:?} names an earlier rule too; names must be unique",
                    rule.name
                ),
            ));
        }
        for (j, caller) in rule.callers.iter().enumerate() {
            if !caller_pattern_ok(caller) {
                return Err(bad(
                    format!("{at}.callers[{j}]"),
                    format!("{caller:?} {CALLER_PATTERN}"),
                ));
            }
        }
        for (j, method) in rule.methods.iter().enumerate() {
            if !method_pattern_ok(method) {
                return Err(bad(
                    format!("{at}.methods[{j}]"),
                    format!("{method:?} {METHOD_PATTERN}"),
                ));
            }
        }
        rule.policy().validate(&at)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<FaultPolicy, String> {
        let p: FaultPolicy = serde_json::from_str(json).map_err(|e| e.to_string())?;
        p.validate("fault").map_err(|e| e.to_string())?;
        Ok(p)
    }

    #[test]
    fn parses_the_documented_json() {
        let p = parse(
            r#"{ "delay": { "percentage": 10, "fixedDelay": "200ms" },
                 "abort": { "percentage": 20, "grpcStatus": "UNAVAILABLE" } }"#,
        )
        .unwrap();
        let delay = p.delay.unwrap();
        assert_eq!(delay.percentage, 10.0);
        assert_eq!(delay.fixed_delay, Duration::from_millis(200));
        let abort = p.abort.unwrap();
        assert_eq!(abort.percentage, 20.0);
        assert_eq!(abort.grpc_status, Code::Unavailable);
        let p = parse(r#"{"abort":{"percentage":0.5,"grpcStatus":"RESOURCE_EXHAUSTED"}}"#).unwrap();
        assert!(p.delay.is_none());
    }

    fn rules(json: &str) -> Result<Vec<ServerFaultRule>, String> {
        let r: Vec<ServerFaultRule> = serde_json::from_str(json).map_err(|e| e.to_string())?;
        check_server_faults(&r).map_err(|e| e.to_string())?;
        Ok(r)
    }

    #[test]
    fn server_rules_match_callers_and_methods_never_health() {
        let r = rules(
            r#"[{"name":"orders-reads","callers":["spiffe://shop.local/ns/shop/sa/orders"],
                 "methods":["mesh.inventory.v1.InventoryService/*"],
                 "abort":{"percentage":20,"grpcStatus":"UNAVAILABLE"}},
                {"name":"everyone","delay":{"percentage":1,"fixedDelay":"5ms"}}]"#,
        )
        .unwrap();
        let orders = Some("spiffe://shop.local/ns/shop/sa/orders");
        let gateway = Some("spiffe://shop.local/ns/shop/sa/gateway");
        let get = "mesh.inventory.v1.InventoryService/GetProduct";
        assert!(r[0].matches(orders, get));
        assert!(!r[0].matches(gateway, get));
        assert!(!r[0].matches(None, get));
        assert!(!r[0].matches(orders, "mesh.payments.v1.PaymentsService/GetAccount"));
        assert!(r[1].matches(None, get), "no callers: every caller");
        assert!(!r[1].matches(orders, "grpc.health.v1.Health/Check"));
        assert!(!r[1].matches(
            orders,
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert_eq!(r[0].policy().abort.unwrap().grpc_status, Code::Unavailable);
    }

    #[test]
    fn server_rules_name_the_bad_field() {
        for (json, expected) in [
            (
                r#"[{"name":"","abort":{"percentage":1,"grpcStatus":"INTERNAL"}}]"#,
                "serverFaults[0].name",
            ),
            (
                r#"[{"name":"Big Name","abort":{"percentage":1,"grpcStatus":"INTERNAL"}}]"#,
                "serverFaults[0].name",
            ),
            (
                r#"[{"name":"a","abort":{"percentage":1,"grpcStatus":"INTERNAL"}},
                    {"name":"a","abort":{"percentage":1,"grpcStatus":"INTERNAL"}}]"#,
                "serverFaults[1].name",
            ),
            (
                r#"[{"name":"a","callers":["orders"],"abort":{"percentage":1,"grpcStatus":"INTERNAL"}}]"#,
                "serverFaults[0].callers[0]",
            ),
            (
                r#"[{"name":"a","methods":["/p.S/M"],"abort":{"percentage":1,"grpcStatus":"INTERNAL"}}]"#,
                "serverFaults[0].methods[0]",
            ),
            (
                r#"[{"name":"a","abort":{"percentage":120,"grpcStatus":"INTERNAL"}}]"#,
                "serverFaults[0].abort.percentage",
            ),
            (r#"[{"name":"a"}]"#, "serverFaults[0]: a fault needs"),
            (r#"[{"name":"a","caller":["*"]}]"#, "caller"),
        ] {
            let err = rules(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn names_the_bad_field() {
        for (json, expected) in [
            (
                r#"{"delay":{"percentage":101,"fixedDelay":"1s"}}"#,
                "fault.delay.percentage",
            ),
            (
                r#"{"delay":{"percentage":-1,"fixedDelay":"1s"}}"#,
                "fault.delay.percentage",
            ),
            (
                r#"{"abort":{"percentage":100.5,"grpcStatus":"INTERNAL"}}"#,
                "fault.abort.percentage",
            ),
            (
                r#"{"abort":{"percentage":5,"grpcStatus":"OK"}}"#,
                "fault.abort.grpcStatus",
            ),
            (
                r#"{"abort":{"percentage":5,"grpcStatus":"UNAVAILBLE"}}"#,
                "UNAVAILBLE",
            ),
            (
                r#"{"delay":{"percentage":5,"fixedDelay":"0ms"}}"#,
                "fault.delay.fixedDelay",
            ),
            (
                r#"{"delay":{"percentage":5,"fixedDelay":"10m"}}"#,
                "fault.delay.fixedDelay",
            ),
            (r#"{"delay":{"percentage":5,"fixedDelay":"10"}}"#, "no unit"),
            (r#"{"delay":{"percentage":5}}"#, "fixedDelay"),
            (r#"{"dealy":{"percentage":5}}"#, "dealy"),
            (
                r#"{"abort":{"percentage":5,"grpcStatus":"INTERNAL","httpStatus":503}}"#,
                "httpStatus",
            ),
            (r#"{}"#, "fault: a fault needs"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
