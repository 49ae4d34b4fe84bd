//! Turning a target string into the addresses to call.

use std::{fmt, net::SocketAddr, str::FromStr};

use crate::MeshError;

/// A parsed call target.
///
/// Accepted forms:
/// - `static:///10.0.0.1:50052,10.0.0.2:50052`: a fixed list of endpoints;
/// - `http://127.0.0.1:50052` or `127.0.0.1:50052`: one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A fixed set of socket addresses.
    Static(Vec<SocketAddr>),
}

impl Target {
    /// The endpoints this target resolves to now.
    pub fn addresses(&self) -> &[SocketAddr] {
        match self {
            Target::Static(addrs) => addrs,
        }
    }
}

impl FromStr for Target {
    type Err = MeshError;

    fn from_str(target: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| MeshError::InvalidTarget {
            target: target.to_owned(),
            reason,
        };
        let list = if let Some(rest) = target.strip_prefix("static:///") {
            rest
        } else if let Some(rest) = target.strip_prefix("http://") {
            rest.trim_end_matches('/')
        } else if target.contains("://") {
            return Err(invalid(
                "unsupported scheme; use static:///host:port[,host:port...] or http://host:port"
                    .into(),
            ));
        } else {
            target
        };
        let addrs = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<SocketAddr>()
                    .map_err(|_| invalid(format!("{s:?} is not an IP:port socket address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err(invalid("names no endpoint".into()));
        }
        Ok(Target::Static(addrs))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Static(addrs) => {
                f.write_str("static:///")?;
                for (i, addr) in addrs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{addr}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_form() {
        let t: Target = "static:///127.0.0.1:1,[::1]:2".parse().unwrap();
        assert_eq!(t.addresses().len(), 2);
        let t: Target = "http://127.0.0.1:5/".parse().unwrap();
        assert_eq!(t.to_string(), "static:///127.0.0.1:5");
        let t: Target = "127.0.0.2:7".parse().unwrap();
        assert_eq!(t.addresses()[0].port(), 7);
    }

    #[test]
    fn rejects_bad_targets_with_reason() {
        let err = "dns:///x".parse::<Target>().unwrap_err().to_string();
        assert!(err.contains("unsupported scheme"), "{err}");
        let err = "static:///localhost:1"
            .parse::<Target>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"localhost:1\" is not an IP:port"), "{err}");
        let err = "static:///".parse::<Target>().unwrap_err().to_string();
        assert!(err.contains("names no endpoint"), "{err}");
    }
}
