//! Mirroring (Istio's `mirror`, Envoy's `request_mirror_policies`): a share
//! of calls copied to a shadow target, fire-and-forget, to try a new
//! version on real traffic without its answers reaching anyone.
//!
//! This module holds the policy data; the layer that applies it lives
//! below.
//!
//! ```json
//! { "target": "dns:///inventory-shadow.shop.svc.cluster.local:50052",
//!   "percentage": 5, "maxInFlight": 16, "allowSideEffects": false }
//! ```
//!
//! The primary call never waits for, nor fails because of, its copy: a copy
//! is made only of a request body that fits the replay buffer
//! (`maxReplayBytes`), only while fewer than `maxInFlight` copies are
//! running (others are dropped, never queued), and only of methods whose
//! proto declares `idempotency_level = NO_SIDE_EFFECTS` unless
//! `allowSideEffects` says the shadow may see writes.

pub mod layer;

use serde::Deserialize;

use crate::{error::MeshError, fault::check_percentage};

/// The most copies a mirror may have in flight (`maxInFlight`), 1 to this.
pub const MAX_MIRROR_IN_FLIGHT: u32 = 1024;

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
        Ok(())
    }
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
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
