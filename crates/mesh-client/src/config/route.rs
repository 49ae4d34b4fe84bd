//! Routes of a target: ordered, first match wins, with the names and the
//! semantics of Gateway API's `GRPCRoute` (as GAMMA attaches it to a
//! Service): `matches` on the method and on request metadata, weighted
//! `backendRefs`, and per-route `timeout` and `retryPolicy` overrides.
//!
//! ```json
//! "targets": { "dns:///inventory.shop.svc.cluster.local:50052": { "routes": [
//!   { "name": "canary-header",
//!     "matches": [ { "method": { "service": "mesh.inventory.v1.InventoryService", "method": "GetProduct" },
//!                    "headers": [ { "name": "x-canary", "type": "Exact", "value": "true" } ] } ],
//!     "backendRefs": [ { "target": "dns:///inventory-canary.shop.svc.cluster.local:50052", "weight": 100 } ],
//!     "timeout": "2s" },
//!   { "name": "split",
//!     "backendRefs": [ { "target": "dns:///inventory.shop.svc.cluster.local:50052", "weight": 90 },
//!                      { "target": "dns:///inventory-canary.shop.svc.cluster.local:50052", "weight": 10 } ] } ] } }
//! ```
//!
//! A route matches a call when any of its `matches` does (none: every
//! call); a match holds when its method and every one of its headers
//! hold. A call that no route matches goes to the target itself, as GAMMA
//! sends unmatched requests to the Service. Validation (in
//! [`check_routes`]) refuses what would not do what it says: a backend that
//! is not a configured target (its identity lives there), weights summing
//! to zero, a regular expression that does not compile, a match that can
//! never hold, and a route that an earlier one always takes first.

use std::{collections::HashMap, time::Duration};

use serde::Deserialize;

use super::{RetryPolicy, TargetConfig, check_retry, check_timeout, check_within, invalid};
use crate::error::MeshError;

/// Most routes per target.
pub(crate) const MAX_ROUTES: usize = 64;
/// Most `matches` per route.
pub(crate) const MAX_MATCHES: usize = 16;
/// Most `headers` per match.
pub(crate) const MAX_HEADERS: usize = 16;
/// Most `backendRefs` per route.
pub(crate) const MAX_BACKENDS: usize = 16;
/// Largest weight of one backend (Gateway API's bound).
pub(crate) const MAX_WEIGHT: u32 = 1_000_000;
/// Longest route name, which is a metric label value.
pub(crate) const MAX_NAME_LEN: usize = 63;
/// Longest header value or regular expression, in bytes.
pub(crate) const MAX_VALUE_LEN: usize = 1024;
/// Most memory one compiled regular expression may take.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// One route of a target (Gateway API `GRPCRouteRule`, named).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name, unique in its target: letters, digits, `-`, `_`
    /// and `.`, at most 63. Metrics and spans carry it as `route`.
    pub name: String,
    /// The route takes a call when any of these holds; none (or an empty
    /// list) takes every call.
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Where the route's calls go, each call to one backend chosen by
    /// weight. A backend is a target of this config (or the routed target
    /// itself), with its own resolver, balancer, endpoints and identity.
    pub backend_refs: Vec<BackendRef>,
    /// Default deadline of the route's calls, instead of the target's or
    /// method's (the applicable `maxTimeout` still caps it).
    #[serde(default, with = "super::duration_str::option")]
    pub timeout: Option<Duration>,
    /// Retry policy of the route's calls, instead of the target's or
    /// method's.
    #[serde(default)]
    pub retry_policy: Option<RetryPolicy>,
    /// Delays and aborts injected into a share of the route's calls (see
    /// [`crate::fault`]); applied per attempt below the retry layer.
    #[serde(default)]
    pub fault: Option<crate::fault::FaultPolicy>,
    /// A share of the route's calls copied to a shadow target (see
    /// [`crate::mirror`]).
    #[serde(default)]
    pub mirror: Option<crate::mirror::MirrorPolicy>,
}

/// One way a call can match a route (Gateway API `GRPCRouteMatch`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteMatch {
    /// The method; omitted: any method.
    pub method: Option<MethodMatch>,
    /// Request metadata that must all be present with matching values.
    pub headers: Vec<HeaderMatch>,
}

/// A method match (Gateway API `GRPCMethodMatch`): a service and method
/// compared exactly; leaving one out matches any.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MethodMatch {
    /// Only `Exact` (the default).
    #[serde(rename = "type")]
    pub match_type: MethodMatchType,
    /// The fully qualified service, `mesh.inventory.v1.InventoryService`;
    /// omitted: any service.
    pub service: Option<String>,
    /// The method name, `GetProduct`; omitted: any method of the service.
    pub method: Option<String>,
}

/// How a method is compared.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum MethodMatchType {
    /// Equal, case-sensitive.
    #[default]
    Exact,
}

/// A metadata match (Gateway API `GRPCHeaderMatch`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type", default)]
    pub match_type: HeaderMatchType,
    /// The metadata key, compared without regard to case; not a
    /// pseudo-header, not binary (`-bin`).
    pub name: String,
    /// The value to compare with, or the regular expression (Rust `regex`
    /// syntax, RE2-like) that must match the whole value. With several
    /// values for the key, one matching is enough.
    pub value: String,
}

/// How a metadata value is compared.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum HeaderMatchType {
    /// Equal, case-sensitive.
    #[default]
    Exact,
    /// The whole value matches the expression.
    RegularExpression,
}

/// A weighted backend of a route (Gateway API `GRPCBackendRef`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// A target of this config (a key of `targets`), or the routed target
    /// itself.
    pub target: String,
    /// Share of the route's calls relative to the other backends, 0 to
    /// 1 000 000; default 1. Zero drains the backend (no new calls; calls
    /// already on it finish there).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A regular expression that must match a whole header value.
pub(crate) fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.len() > MAX_VALUE_LEN {
        return Err(format!("longer than {MAX_VALUE_LEN} bytes"));
    }
    let build = |p: &str| {
        regex::RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("not a valid regular expression: {e}"))
    };
    // Alone first: `a)|(b` is no expression, though wrapped in the anchors
    // it would parse (and match far more than whole values).
    build(pattern)?;
    build(&format!("^(?:{pattern})$"))
}

/// Whether every call `b` matches, `a` matches too (so a route with `a`
/// placed before one with `b` always takes those calls first). Decided
/// on the written conditions: a condition of `a` that `b` does not have
/// word for word makes it "no", which keeps the check from refusing a
/// route that is reachable.
fn covers(a: &RouteMatch, b: &RouteMatch) -> bool {
    let method = match (&a.method, &b.method) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => {
            a.service
                .as_ref()
                .is_none_or(|s| b.service.as_ref() == Some(s))
                && a.method
                    .as_ref()
                    .is_none_or(|m| b.method.as_ref() == Some(m))
        }
    };
    method
        && a.headers.iter().all(|h| {
            b.headers.iter().any(|g| {
                g.name.eq_ignore_ascii_case(&h.name)
                    && g.match_type == h.match_type
                    && g.value == h.value
            })
        })
}

/// A route's matches, `[{}]` (every call) for none.
pub(crate) fn matches_of(route: &RouteConfig) -> std::borrow::Cow<'_, [RouteMatch]> {
    if route.matches.is_empty() {
        std::borrow::Cow::Owned(vec![RouteMatch::default()])
    } else {
        std::borrow::Cow::Borrowed(&route.matches)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks the routes of target `name`, naming the field of the first
/// problem (`targets["t"].routes[1].backendRefs[0].target`).
pub(super) fn check_routes(
    name: &str,
    target: &TargetConfig,
    targets: &HashMap<String, TargetConfig>,
    target_max: Duration,
) -> Result<(), MeshError> {
    let routes = &target.routes;
    let at = |i: usize, field: &str| format!("targets[{name:?}].routes[{i}]{field}");
    if routes.len() > MAX_ROUTES {
        return Err(invalid(
            &format!("targets[{name:?}].routes"),
            &format!(
                "at most {MAX_ROUTES} routes per target, got {}",
                routes.len()
            ),
        ));
    }
    for (i, route) in routes.iter().enumerate() {
        if !valid_name(&route.name) {
            return Err(invalid(
                &at(i, ".name"),
                &format!(
                    "must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', got {:?}",
                    route.name
                ),
            ));
        }
        if let Some(j) = routes[..i].iter().position(|r| r.name == route.name) {
            return Err(invalid(
                &at(i, ".name"),
                &format!(
                    "{:?} is already the name of routes[{j}]; route names are unique per target",
                    route.name
                ),
            ));
        }
        if route.matches.len() > MAX_MATCHES {
            return Err(invalid(
                &at(i, ".matches"),
                &format!("at most {MAX_MATCHES} matches per route"),
            ));
        }
        for (k, m) in route.matches.iter().enumerate() {
            check_match(&at(i, &format!(".matches[{k}]")), m)?;
        }
        check_backends(&at(i, ".backendRefs"), name, route, targets)?;
        if let Some(t) = route.timeout {
            check_timeout(&at(i, ".timeout"), t)?;
            check_within(&at(i, ".timeout"), t, target_max)?;
        }
        if let Some(r) = &route.retry_policy {
            check_retry(&at(i, ".retryPolicy"), r)?;
        }
        if let Some(fault) = &route.fault {
            fault.validate(&at(i, ".fault"))?;
        }
        if let Some(mirror) = &route.mirror {
            mirror.validate(&at(i, ".mirror"))?;
            // One level deep, like backends: a shadow that is this target,
            // or routes (and so may mirror) itself, would build its own
            // mirror again without end.
            let routed = targets
                .get(&mirror.target)
                .is_some_and(|t| !t.routes.is_empty());
            if mirror.target == name || routed {
                return Err(invalid(
                    &at(i, ".mirror.target"),
                    &format!(
                        "{:?} is this target or has routes of its own; a shadow must be a target without routes",
                        mirror.target
                    ),
                ));
            }
        }
        // First match wins: a route every one of whose matches an earlier
        // route already takes is never reached (a duplicate, or a
        // narrower route behind a broader one).
        let mine = matches_of(route);
        let shadow = mine.iter().enumerate().try_fold(None, |found, (k, m)| {
            routes[..i]
                .iter()
                .enumerate()
                .find(|(_, earlier)| matches_of(earlier).iter().any(|e| covers(e, m)))
                .map(|(j, _)| found.or(Some((j, k))))
                .ok_or(())
        });
        if let Ok(Some((j, _))) = shadow {
            return Err(invalid(
                &at(i, ".matches"),
                &format!(
                    "route {:?} is never reached: every call it matches is taken first by routes[{j}] ({:?}); put the narrower route first or remove it",
                    route.name, routes[j].name
                ),
            ));
        }
    }
    Ok(())
}

fn check_match(at: &str, m: &RouteMatch) -> Result<(), MeshError> {
    if let Some(method) = &m.method {
        if method.service.is_none() && method.method.is_none() {
            return Err(invalid(
                &format!("{at}.method"),
                "name a service, a method or both (omit `method` to match every method)",
            ));
        }
        if let Some(s) = &method.service
            && (s.is_empty() || s.contains('/') || s.len() > MAX_VALUE_LEN)
        {
            return Err(invalid(
                &format!("{at}.method.service"),
                &format!(
                    "must be a fully qualified service such as mesh.inventory.v1.InventoryService, got {s:?}"
                ),
            ));
        }
        if let Some(name) = &method.method
            && (name.is_empty() || name.contains(['/', '.']) || name.len() > MAX_VALUE_LEN)
        {
            return Err(invalid(
                &format!("{at}.method.method"),
                &format!("must be a method name such as GetProduct, got {name:?}"),
            ));
        }
    }
    if m.headers.len() > MAX_HEADERS {
        return Err(invalid(
            &format!("{at}.headers"),
            &format!("at most {MAX_HEADERS} headers per match"),
        ));
    }
    for (h, header) in m.headers.iter().enumerate() {
        let field = format!("{at}.headers[{h}]");
        let lower = header.name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() || lower.is_empty() {
            return Err(invalid(
                &format!("{field}.name"),
                &format!("{:?} is not a metadata key", header.name),
            ));
        }
        if lower.ends_with("-bin") {
            return Err(invalid(
                &format!("{field}.name"),
                "binary metadata (-bin) cannot be matched",
            ));
        }
        if let Some(g) = m.headers[..h]
            .iter()
            .position(|g| g.name.eq_ignore_ascii_case(&header.name))
        {
            return Err(invalid(
                &format!("{field}.name"),
                &format!(
                    "{:?} is already matched by headers[{g}] of this match; one condition per key",
                    header.name
                ),
            ));
        }
        match header.match_type {
            HeaderMatchType::Exact if header.value.len() > MAX_VALUE_LEN => {
                return Err(invalid(
                    &format!("{field}.value"),
                    &format!("longer than {MAX_VALUE_LEN} bytes"),
                ));
            }
            HeaderMatchType::Exact => {}
            HeaderMatchType::RegularExpression => {
                compile_regex(&header.value).map_err(|e| invalid(&format!("{field}.value"), &e))?;
            }
        }
    }
    Ok(())
}

fn check_backends(
    at: &str,
    routed: &str,
    route: &RouteConfig,
    targets: &HashMap<String, TargetConfig>,
) -> Result<(), MeshError> {
    let backends = &route.backend_refs;
    if backends.is_empty() || backends.len() > MAX_BACKENDS {
        return Err(invalid(
            at,
            &format!(
                "a route needs 1 to {MAX_BACKENDS} backends, got {}",
                backends.len()
            ),
        ));
    }
    for (b, backend) in backends.iter().enumerate() {
        let field = format!("{at}[{b}]");
        if backend.target != routed {
            let Some(config) = targets.get(&backend.target) else {
                return Err(invalid(
                    &format!("{field}.target"),
                    &format!(
                        "{:?} is not a target of this config: add it under `targets` (with its `identity` when calls use mTLS) or name {routed:?} itself",
                        backend.target
                    ),
                ));
            };
            if !config.routes.is_empty() {
                return Err(invalid(
                    &format!("{field}.target"),
                    &format!(
                        "{:?} has routes of its own, which a routed call would not follow (routing is one level deep)",
                        backend.target
                    ),
                ));
            }
        }
        if let Some(c) = backends[..b]
            .iter()
            .position(|c| c.target == backend.target)
        {
            return Err(invalid(
                &format!("{field}.target"),
                &format!(
                    "{:?} is already backendRefs[{c}] of this route",
                    backend.target
                ),
            ));
        }
        if backend.weight > MAX_WEIGHT {
            return Err(invalid(
                &format!("{field}.weight"),
                &format!("must be 0 to {MAX_WEIGHT}, got {}", backend.weight),
            ));
        }
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(invalid(
            at,
            "every weight is 0, so the route could send its calls nowhere; give at least one backend a weight above 0 (0 drains one backend of several)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::MeshConfig;

    const INV: &str = "dns:///inventory.shop.svc.cluster.local:50052";
    const CANARY: &str = "dns:///inventory-canary.shop.svc.cluster.local:50052";

    /// A config routing INV by `routes` (JSON), with CANARY as a target.
    fn with_routes(routes: &str) -> Result<MeshConfig, crate::MeshError> {
        MeshConfig::from_json(&format!(
            r#"{{"targets":{{"{INV}":{{"routes":{routes}}},"{CANARY}":{{}}}}}}"#
        ))
    }

    #[test]
    fn the_issue_s_routes_parse() {
        let config = with_routes(&format!(
            r#"[{{"name":"canary-header",
                 "matches":[{{"method":{{"service":"mesh.inventory.v1.InventoryService","method":"GetProduct"}},
                              "headers":[{{"name":"x-canary","type":"Exact","value":"true"}}]}}],
                 "backendRefs":[{{"target":"{CANARY}","weight":100}}],
                 "timeout":"2s","retryPolicy":{{"maxAttempts":2}}}},
                {{"name":"regex","matches":[{{"headers":[{{"name":"X-User","type":"RegularExpression","value":"beta-[0-9]+"}}]}}],
                 "backendRefs":[{{"target":"{CANARY}"}}]}},
                {{"name":"split","backendRefs":[{{"target":"{INV}","weight":90}},{{"target":"{CANARY}","weight":10}}]}}]"#
        ))
        .unwrap();
        let routes = &config.targets[INV].routes;
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[1].backend_refs[0].weight, 1, "weight defaults to 1");
        assert_eq!(routes[0].retry_policy.as_ref().unwrap().max_attempts, 2);
    }

    #[test]
    fn every_bad_route_is_refused_with_its_field_named() {
        let t = format!("targets[{INV:?}]");
        for (routes, field, says) in [
            (
                r#"[{"name":"a","backendRefs":[{"target":"dns:///nowhere.svc:1"}]}]"#.to_owned(),
                format!("{t}.routes[0].backendRefs[0].target"),
                "not a target of this config",
            ),
            (
                format!(
                    r#"[{{"name":"a","backendRefs":[{{"target":"{INV}","weight":0}},{{"target":"{CANARY}","weight":0}}]}}]"#
                ),
                format!("{t}.routes[0].backendRefs"),
                "every weight is 0",
            ),
            (
                format!(
                    r#"[{{"name":"a","backendRefs":[{{"target":"{CANARY}","weight":1000001}}]}}]"#
                ),
                format!("{t}.routes[0].backendRefs[0].weight"),
                "0 to 1000000",
            ),
            (
                r#"[{"name":"a","backendRefs":[]}]"#.to_owned(),
                format!("{t}.routes[0].backendRefs"),
                "1 to 16 backends",
            ),
            (
                format!(
                    r#"[{{"name":"a","backendRefs":[{{"target":"{CANARY}"}},{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].backendRefs[1].target"),
                "already backendRefs[0]",
            ),
            (
                format!(
                    r#"[{{"name":"a","matches":[{{"headers":[{{"name":"x-u","type":"RegularExpression","value":"(unclosed"}}]}}],"backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].matches[0].headers[0].value"),
                "not a valid regular expression",
            ),
            (
                format!(
                    r#"[{{"name":"a","matches":[{{"method":{{}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].matches[0].method"),
                "name a service, a method or both",
            ),
            (
                format!(
                    r#"[{{"name":"a","matches":[{{"method":{{"service":"a.S","method":"x/y"}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].matches[0].method.method"),
                "method name",
            ),
            (
                format!(
                    r#"[{{"name":"a","matches":[{{"headers":[{{"name":"x-a","value":"1"}},{{"name":"X-A","value":"2"}}]}}],"backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].matches[0].headers[1].name"),
                "one condition per key",
            ),
            (
                format!(
                    r#"[{{"name":"a","matches":[{{"headers":[{{"name":"x-a-bin","value":"1"}}]}}],"backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].matches[0].headers[0].name"),
                "binary",
            ),
            (
                format!(r#"[{{"name":"a b","backendRefs":[{{"target":"{CANARY}"}}]}}]"#),
                format!("{t}.routes[0].name"),
                "letters, digits",
            ),
            (
                format!(
                    r#"[{{"name":"a","matches":[{{"method":{{"service":"a.S"}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}},
                           {{"name":"a","backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[1].name"),
                "already the name of routes[0]",
            ),
            // A duplicate: the same match twice.
            (
                format!(
                    r#"[{{"name":"a","matches":[{{"method":{{"service":"a.S"}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}},
                           {{"name":"b","matches":[{{"method":{{"service":"a.S"}}}}],"backendRefs":[{{"target":"{INV}"}}]}}]"#
                ),
                format!("{t}.routes[1].matches"),
                "never reached",
            ),
            // Behind a catch-all.
            (
                format!(
                    r#"[{{"name":"all","backendRefs":[{{"target":"{CANARY}"}}]}},
                           {{"name":"narrow","matches":[{{"headers":[{{"name":"x-canary","value":"true"}}]}}],"backendRefs":[{{"target":"{INV}"}}]}}]"#
                ),
                format!("{t}.routes[1].matches"),
                "taken first by routes[0] (\"all\")",
            ),
            // Behind a broader method match.
            (
                format!(
                    r#"[{{"name":"svc","matches":[{{"method":{{"service":"a.S"}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}},
                           {{"name":"m","matches":[{{"method":{{"service":"a.S","method":"M"}},"headers":[{{"name":"x","value":"1"}}]}}],"backendRefs":[{{"target":"{INV}"}}]}}]"#
                ),
                format!("{t}.routes[1].matches"),
                "never reached",
            ),
            (
                format!(
                    r#"[{{"name":"a","timeout":"31s","backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].timeout"),
                "exceeds the maxTimeout",
            ),
            (
                format!(
                    r#"[{{"name":"a","retryPolicy":{{"maxAttempts":9}},"backendRefs":[{{"target":"{CANARY}"}}]}}]"#
                ),
                format!("{t}.routes[0].retryPolicy.maxAttempts"),
                "1 to 5",
            ),
            (
                format!(r#"[{{"name":"a","backendRefs":[{{"target":"{CANARY}"}}],"weight":3}}]"#),
                "weight".to_owned(),
                "unknown field",
            ),
        ] {
            let err = with_routes(&routes).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{field}: ")) || err.contains(&field),
                "{routes}: {err}"
            );
            assert!(err.contains(says), "{routes}: {err}");
        }
    }

    #[test]
    fn a_backend_with_routes_of_its_own_is_refused() {
        let err = MeshConfig::from_json(&format!(
            r#"{{"targets":{{"{INV}":{{"routes":[{{"name":"a","backendRefs":[{{"target":"{CANARY}"}}]}}]}},
                 "{CANARY}":{{"routes":[{{"name":"b","backendRefs":[{{"target":"{INV}"}}]}}]}}}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("one level deep"), "{err}");
    }

    #[test]
    fn a_mirror_to_its_own_target_or_a_routed_one_is_refused() {
        // Either would build its own mirror again without end.
        for shadow in [INV, CANARY] {
            let err = MeshConfig::from_json(&format!(
                r#"{{"targets":{{"{INV}":{{"routes":[{{"name":"a","backendRefs":[{{"target":"{INV}"}}],
                        "mirror":{{"target":"{shadow}"}}}}]}},
                     "{CANARY}":{{"routes":[{{"name":"b","backendRefs":[{{"target":"static:///127.0.0.1:9"}}]}}]}},
                     "static:///127.0.0.1:9":{{}}}}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(".mirror.target"), "{shadow}: {err}");
        }
    }

    #[test]
    fn routes_that_overlap_only_in_part_are_fine() {
        // First match wins; a broader route after a narrower one is reached.
        with_routes(&format!(
            r#"[{{"name":"canary","matches":[{{"headers":[{{"name":"x-canary","value":"true"}}]}},
                                            {{"method":{{"service":"a.S","method":"M"}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}},
                {{"name":"svc","matches":[{{"method":{{"service":"a.S"}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}},
                {{"name":"rest","backendRefs":[{{"target":"{INV}","weight":0}},{{"target":"{CANARY}"}}]}}]"#
        ))
        .unwrap();
        // One match of a route still reachable is enough.
        with_routes(&format!(
            r#"[{{"name":"svc","matches":[{{"method":{{"service":"a.S"}}}}],"backendRefs":[{{"target":"{CANARY}"}}]}},
                {{"name":"two","matches":[{{"method":{{"service":"a.S","method":"M"}}}},{{"method":{{"service":"b.T"}}}}],"backendRefs":[{{"target":"{INV}"}}]}}]"#
        ))
        .unwrap();
    }

    #[test]
    fn regular_expressions_match_whole_values() {
        let re = super::compile_regex("beta-[0-9]+").unwrap();
        assert!(re.is_match("beta-12"));
        assert!(!re.is_match("xbeta-12"));
        assert!(!re.is_match("beta-12x"));
        assert!(super::compile_regex(&"a".repeat(2000)).is_err());
        // No escaping the anchors with unbalanced groups.
        assert!(super::compile_regex("a)|(b").is_err());
    }

    proptest::proptest! {
        // Any route text: parsed or refused naming a field, never a panic.
        #[test]
        fn the_route_parser_never_panics(name in "\\PC{0,12}", value in "\\PC{0,12}", weight in 0u32..3, kind in 0usize..2) {
            let kind = ["Exact", "RegularExpression"][kind];
            let routes = format!(
                r#"[{{"name":{name:?},"matches":[{{"headers":[{{"name":"x-a","type":"{kind}","value":{value:?}}}]}}],
                     "backendRefs":[{{"target":"{CANARY}","weight":{weight}}}]}}]"#
            );
            if let Err(e) = with_routes(&routes) {
                proptest::prop_assert!(e.to_string().starts_with("invalid mesh config: "), "{}", e);
            }
        }
    }
}
