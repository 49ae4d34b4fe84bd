//! How the config writes values that are not JSON's own: gRPC status
//! codes and durations, as gRPC's service config writes them. A leaf
//! module (it uses nothing of the crate), so policy types outside
//! `config` (faults, mirrors) can parse them without an import cycle.

/// Status codes written as gRPC service config does: `"UNAVAILABLE"`.
pub(crate) mod codes {
    use serde::{Deserialize, Deserializer};
    use tonic::Code;

    pub(crate) fn parse(name: &str) -> Option<Code> {
        Some(match name {
            "CANCELLED" => Code::Cancelled,
            "UNKNOWN" => Code::Unknown,
            "INVALID_ARGUMENT" => Code::InvalidArgument,
            "DEADLINE_EXCEEDED" => Code::DeadlineExceeded,
            "NOT_FOUND" => Code::NotFound,
            "ALREADY_EXISTS" => Code::AlreadyExists,
            "PERMISSION_DENIED" => Code::PermissionDenied,
            "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
            "FAILED_PRECONDITION" => Code::FailedPrecondition,
            "ABORTED" => Code::Aborted,
            "OUT_OF_RANGE" => Code::OutOfRange,
            "UNIMPLEMENTED" => Code::Unimplemented,
            "INTERNAL" => Code::Internal,
            "UNAVAILABLE" => Code::Unavailable,
            "DATA_LOSS" => Code::DataLoss,
            "UNAUTHENTICATED" => Code::Unauthenticated,
            "OK" => Code::Ok,
            _ => return None,
        })
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Code>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|name| {
                parse(name).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "{name:?} is not a gRPC status code name such as \"UNAVAILABLE\""
                    ))
                })
            })
            .collect()
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
        if !value.is_finite() || !(0.0..=1e9).contains(&value) {
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
