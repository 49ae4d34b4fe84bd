use std::{collections::HashMap, time::Duration};

use serde::Deserialize;

use crate::MeshError;

/// Process-wide mesh policy: defaults plus per-target overrides.
///
/// Deserializes from JSON with camelCase keys (the gRPC service-config
/// spelling), for example:
///
/// ```json
/// { "defaultTimeout": "5s",
///   "targets": { "static:///127.0.0.1:50052": { "timeout": "2s" } } }
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Deadline given to a call that has neither an explicit nor an
    /// inherited one. Default 10 s.
    #[serde(with = "duration_str")]
    pub default_timeout: Duration,
    /// Connection settings for every endpoint.
    pub endpoint: EndpointConfig,
    /// Per-target overrides, keyed by the target string given to
    /// [`crate::Mesh::channel`].
    pub targets: HashMap<String, TargetConfig>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(10),
            endpoint: EndpointConfig::default(),
            targets: HashMap::new(),
        }
    }
}

impl MeshConfig {
    /// Parses and validates a JSON config, naming the bad field on error.
    pub fn from_json(text: &str) -> Result<Self, MeshError> {
        let config: Self = serde_json::from_str(text).map_err(|e| MeshError::InvalidConfig {
            field: "(document)".into(),
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value is in range; reports the first bad field.
    pub fn validate(&self) -> Result<(), MeshError> {
        check_timeout("defaultTimeout", self.default_timeout)?;
        check_timeout("endpoint.connectTimeout", self.endpoint.connect_timeout)?;
        for (name, target) in &self.targets {
            if let Some(timeout) = target.timeout {
                check_timeout(&format!("targets[{name:?}].timeout"), timeout)?;
            }
        }
        Ok(())
    }

    /// The default deadline for calls to `target`.
    pub fn timeout_for(&self, target: &str) -> Duration {
        self.targets
            .get(target)
            .and_then(|t| t.timeout)
            .unwrap_or(self.default_timeout)
    }
}

fn check_timeout(field: &str, value: Duration) -> Result<(), MeshError> {
    // grpc-timeout carries at most 8 digits; hours cover anything sane.
    if value.is_zero() || value > Duration::from_secs(24 * 3600) {
        return Err(MeshError::InvalidConfig {
            field: field.into(),
            reason: format!("must be between 1ms and 24h, got {value:?}"),
        });
    }
    Ok(())
}

/// Policy for one target.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TargetConfig {
    /// Default deadline for calls to this target; overrides
    /// [`MeshConfig::default_timeout`].
    #[serde(with = "duration_str::option")]
    pub timeout: Option<Duration>,
}

/// How each endpoint's connection is made and kept.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EndpointConfig {
    /// Give up connecting after this long. Default 1 s: an endpoint on a
    /// cluster network that has not answered by then is not going to.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval while the connection is idle. Default 30 s.
    #[serde(with = "duration_str")]
    pub keepalive_interval: Duration,
    /// Close the connection if a PING is not answered in this long. Default 10 s.
    #[serde(with = "duration_str")]
    pub keepalive_timeout: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Durations written as gRPC service config does: `"1.5s"`, `"250ms"`.
pub(crate) mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(crate) fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let (number, unit) = if let Some(n) = text.strip_suffix("ms") {
            (n, 1e-3)
        } else if let Some(n) = text.strip_suffix('s') {
            (n, 1.0)
        } else if let Some(n) = text.strip_suffix('m') {
            (n, 60.0)
        } else {
            return Err(format!(
                "{text:?} has no unit; write e.g. \"1.5s\" or \"250ms\""
            ));
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a number followed by ms, s or m"))?;
        if !value.is_finite() || value < 0.0 {
            return Err(format!("{text:?} must be a non-negative duration"));
        }
        Ok(Duration::from_secs_f64(value * unit))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| parse(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_overrides() {
        let config = MeshConfig::from_json(
            r#"{"defaultTimeout":"1.5s","targets":{"inv":{"timeout":"250ms"}}}"#,
        )
        .unwrap();
        assert_eq!(config.default_timeout, Duration::from_millis(1500));
        assert_eq!(config.timeout_for("inv"), Duration::from_millis(250));
        assert_eq!(config.timeout_for("other"), Duration::from_millis(1500));
    }

    #[test]
    fn names_the_bad_field() {
        let err = MeshConfig::from_json(r#"{"targets":{"inv":{"timeout":"0s"}}}"#).unwrap_err();
        assert!(
            err.to_string().contains("targets[\"inv\"].timeout"),
            "{err}"
        );
        let err = MeshConfig::from_json(r#"{"defaultTimout":"1s"}"#).unwrap_err();
        assert!(err.to_string().contains("defaultTimout"), "{err}");
        let err = MeshConfig::from_json(r#"{"defaultTimeout":"10"}"#).unwrap_err();
        assert!(err.to_string().contains("no unit"), "{err}");
    }
}
