//! Mirroring (Istio's `mirror`, Envoy's `request_mirror_policies`): a share
//! of calls copied to a shadow target, fire-and-forget, to try a new
//! version on real traffic without its answers reaching anyone.
//!
//! This module holds the policy data; the layer that applies it lives
//! below.
//!
//! ```json
//! { "target": "dns:///inventory-shadow.shop.svc.cluster.local:50052",
//!   "percentage": 5, "maxInFlight": 16, "allowSideEffects": false,
//!   "stripHeaders": ["x-api-key"], "keepHeaders": [] }
//! ```
//!
//! The primary call never waits for, nor fails because of, its copy: a copy
//! is made only of a request body that fits the replay buffer
//! (`maxReplayBytes`), only while fewer than `maxInFlight` copies are
//! running (others are dropped, never queued), and only of methods whose
//! proto declares `idempotency_level = NO_SIDE_EFFECTS` unless
//! `allowSideEffects` says the shadow may see writes.
//!
//! A shadow is often less trusted than the primary (a new build, another
//! team's test deployment), so a copy does not carry the caller's
//! credentials: [`DEFAULT_STRIPPED_HEADERS`] (`authorization`, `cookie`,
//! `proxy-authorization`) and every header named in `stripHeaders` are
//! removed from it. A default-stripped header is kept only when
//! `keepHeaders` names it, an explicit opt-in for a shadow that must
//! authenticate the end user as the primary does.

pub mod layer;

use serde::Deserialize;

use crate::{error::MeshError, fault::check_percentage};

/// The most copies a mirror may have in flight (`maxInFlight`), 1 to this.
pub const MAX_MIRROR_IN_FLIGHT: u32 = 1024;

/// Request headers removed from every copy unless `keepHeaders` names them:
/// the caller's credentials, which a shadow could replay elsewhere.
pub const DEFAULT_STRIPPED_HEADERS: &[&str] = &["authorization", "cookie", "proxy-authorization"];

/// Request header on every copy (value `true`), so the shadow can tell
/// mirrored traffic from its own (and keep it out of business counts).
pub const MIRROR_HEADER: &str = "mesh-mirrored";

/// Headers a copy needs to be a gRPC call the shadow can tell from real
/// traffic; `stripHeaders` may not name them.
const REQUIRED_HEADERS: &[&str] = &["content-type", "te", MIRROR_HEADER];

/// The most names `stripHeaders` or `keepHeaders` may list.
pub const MAX_MIRROR_HEADER_NAMES: usize = 64;

/// Copy a share of calls to a shadow target.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorPolicy {
    /// The shadow: a target string as given to `Mesh::channel`
    /// (`dns:///host:port`, `static:///a:1,b:2`, `file:///path`), with its
    /// own resolver, balancer and connections; its `targets` entry, if any,
    /// gives its identity.
    pub target: String,
    /// Share of calls copied, 0 to 100. Default 100.
    #[serde(default = "all")]
    pub percentage: f64,
    /// Copies running at once, 1 to [`MAX_MIRROR_IN_FLIGHT`]; a call that
    /// finds them all busy is not copied (counted as dropped). Default 16.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u32,
    /// Copy methods that may have side effects too (default false: only
    /// methods declared `NO_SIDE_EFFECTS` are copied, so a shadow sharing
    /// a database with the primary cannot charge a customer twice).
    #[serde(default)]
    pub allow_side_effects: bool,
    /// More request headers removed from every copy, on top of
    /// [`DEFAULT_STRIPPED_HEADERS`] (header names, any case; at most
    /// [`MAX_MIRROR_HEADER_NAMES`]; never `content-type`, `te` or
    /// `mesh-mirrored`). Default none.
    #[serde(default)]
    pub strip_headers: Vec<String>,
    /// Default-stripped headers the copy keeps after all (opt-in: only
    /// names in [`DEFAULT_STRIPPED_HEADERS`], none also in `stripHeaders`),
    /// for a shadow trusted with the caller's credentials. Default none.
    #[serde(default)]
    pub keep_headers: Vec<String>,
}

fn all() -> f64 {
    100.0
}

fn default_in_flight() -> u32 {
    16
}

impl MirrorPolicy {
    /// Checks every value; errors name the field below `field_path` (for
    /// example `targets["inv"].routes[0].mirror`).
    pub fn validate(&self, field_path: &str) -> Result<(), MeshError> {
        let target = self.target.trim();
        if target.is_empty() || !target.contains("://") {
            return Err(MeshError::InvalidConfig {
                field: format!("{field_path}.target"),
                reason: format!(
                    "{:?} is not a target; write e.g. \"dns:///inventory-shadow:50052\"",
                    self.target
                ),
            });
        }
        check_percentage(&format!("{field_path}.percentage"), self.percentage)?;
        if !(1..=MAX_MIRROR_IN_FLIGHT).contains(&self.max_in_flight) {
            return Err(MeshError::InvalidConfig {
                field: format!("{field_path}.maxInFlight"),
                reason: format!(
                    "must be 1 to {MAX_MIRROR_IN_FLIGHT}, got {}",
                    self.max_in_flight
                ),
            });
        }
        let strip = header_names(&format!("{field_path}.stripHeaders"), &self.strip_headers)?;
        let keep = header_names(&format!("{field_path}.keepHeaders"), &self.keep_headers)?;
        for (i, name) in strip.iter().enumerate() {
            if REQUIRED_HEADERS.contains(&name.as_str()) {
                return Err(MeshError::InvalidConfig {
                    field: format!("{field_path}.stripHeaders[{i}]"),
                    reason: format!("{name:?} is needed by every copy and cannot be stripped"),
                });
            }
        }
        for (i, name) in keep.iter().enumerate() {
            let field = format!("{field_path}.keepHeaders[{i}]");
            if !DEFAULT_STRIPPED_HEADERS.contains(&name.as_str()) {
                return Err(MeshError::InvalidConfig {
                    field,
                    reason: format!(
                        "{name:?} is not stripped by default; keepHeaders may name only {}",
                        DEFAULT_STRIPPED_HEADERS.join(", ")
                    ),
                });
            }
            if strip.contains(name) {
                return Err(MeshError::InvalidConfig {
                    field,
                    reason: format!("{name:?} is also in stripHeaders; name it in one list"),
                });
            }
        }
        Ok(())
    }

    /// The request headers removed from a copy: the defaults not kept,
    /// plus `stripHeaders` (names of a validated policy).
    pub fn stripped_headers(&self) -> Vec<http::HeaderName> {
        let keep: Vec<http::HeaderName> = self
            .keep_headers
            .iter()
            .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        let mut names: Vec<http::HeaderName> = DEFAULT_STRIPPED_HEADERS
            .iter()
            .map(|n| http::HeaderName::from_static(n))
            .filter(|n| !keep.contains(n))
            .collect();
        for name in &self.strip_headers {
            if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes())
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
        names
    }
}

/// Parses a list of header names (any case; `HeaderName` lowercases them).
fn header_names(field: &str, names: &[String]) -> Result<Vec<http::HeaderName>, MeshError> {
    if names.len() > MAX_MIRROR_HEADER_NAMES {
        return Err(MeshError::InvalidConfig {
            field: field.to_owned(),
            reason: format!(
                "at most {MAX_MIRROR_HEADER_NAMES} names, got {}",
                names.len()
            ),
        });
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| MeshError::InvalidConfig {
                field: format!("{field}[{i}]"),
                reason: format!("{name:?} is not a header name; write e.g. \"x-api-key\""),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<MirrorPolicy, String> {
        let p: MirrorPolicy = serde_json::from_str(json).map_err(|e| e.to_string())?;
        p.validate("mirror").map_err(|e| e.to_string())?;
        Ok(p)
    }

    #[test]
    fn parses_the_documented_json_and_defaults() {
        let p = parse(
            r#"{ "target": "dns:///inventory-shadow.shop.svc.cluster.local:50052",
                 "percentage": 5, "maxInFlight": 16, "allowSideEffects": false }"#,
        )
        .unwrap();
        assert_eq!(
            p.target,
            "dns:///inventory-shadow.shop.svc.cluster.local:50052"
        );
        assert_eq!(p.percentage, 5.0);
        assert_eq!(p.max_in_flight, 16);
        assert!(!p.allow_side_effects);
        let p = parse(r#"{"target":"static:///127.0.0.1:1"}"#).unwrap();
        assert_eq!((p.percentage, p.max_in_flight), (100.0, 16));
        assert_eq!(
            p.stripped_headers(),
            ["authorization", "cookie", "proxy-authorization"],
            "credentials are stripped by default"
        );
    }

    #[test]
    fn keep_headers_opts_in_and_strip_headers_adds() {
        let p = parse(
            r#"{"target":"dns:///a:1","keepHeaders":["Authorization"],
                "stripHeaders":["X-Api-Key","cookie"]}"#,
        )
        .unwrap();
        assert_eq!(
            p.stripped_headers(),
            ["cookie", "proxy-authorization", "x-api-key"]
        );
    }

    #[test]
    fn names_the_bad_field() {
        for (json, expected) in [
            (r#"{"target":"","percentage":5}"#, "mirror.target"),
            (r#"{"target":"inventory:50052"}"#, "mirror.target"),
            (
                r#"{"target":"dns:///a:1","percentage":150}"#,
                "mirror.percentage",
            ),
            (
                r#"{"target":"dns:///a:1","percentage":-0.1}"#,
                "mirror.percentage",
            ),
            (
                r#"{"target":"dns:///a:1","maxInFlight":0}"#,
                "mirror.maxInFlight",
            ),
            (
                r#"{"target":"dns:///a:1","maxInFlight":5000}"#,
                "mirror.maxInFlight",
            ),
            (r#"{"target":"dns:///a:1","maxInflight":3}"#, "maxInflight"),
            (r#"{"percentage":5}"#, "target"),
            (
                r#"{"target":"dns:///a:1","stripHeaders":["x ok"]}"#,
                "mirror.stripHeaders[0]",
            ),
            (
                r#"{"target":"dns:///a:1","stripHeaders":["x-a","content-type"]}"#,
                "mirror.stripHeaders[1]",
            ),
            (
                r#"{"target":"dns:///a:1","keepHeaders":["x-api-key"]}"#,
                "mirror.keepHeaders[0]",
            ),
            (
                r#"{"target":"dns:///a:1","keepHeaders":["cookie"],"stripHeaders":["cookie"]}"#,
                "mirror.keepHeaders[0]",
            ),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
