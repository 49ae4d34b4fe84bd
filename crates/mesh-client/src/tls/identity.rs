//! SPIFFE identities and what the mesh reads from a certificate.

use std::{fmt, str::FromStr, time::SystemTime};

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`, for a workload
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// The workload identity of a service account in a namespace. Each
    /// must be one path segment: a namespace `a/sa/b` would otherwise name
    /// another workload's identity.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let text = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        if namespace.contains('/') || service_account.contains('/') {
            return Err(SpiffeIdError::Path(text));
        }
        text.parse()
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        self.0["spiffe://".len()..]
            .split('/')
            .next()
            .unwrap_or_default()
    }

    /// The service account of a workload ID (`.../sa/<name>`), if it is one.
    pub fn service_account(&self) -> Option<&str> {
        self.0
            .rsplit_once("/sa/")
            .map(|(_, sa)| sa)
            .filter(|sa| !sa.contains('/'))
    }
}

/// Why a string is not a SPIFFE ID; each names the string and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// It does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID (spiffe://trust-domain/path)")]
    NotSpiffe(String),
    /// Nothing follows the trust domain.
    #[error("{0:?} has no path after the trust domain")]
    NoPath(String),
    /// The trust domain has characters SPIFFE does not allow.
    #[error("{0:?}: the trust domain must be lower-case letters, digits, '-', '.', '_'")]
    TrustDomain(String),
    /// The path is empty, has empty, `.` or `..` segments, bad characters,
    /// or the ID is longer than 2048 bytes.
    #[error("{0:?}: the path must be non-empty segments of letters, digits, '-', '.', '_'")]
    Path(String),
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::NotSpiffe(text.to_owned()))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::NoPath(text.to_owned()))?;
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !domain_ok {
            return Err(SpiffeIdError::TrustDomain(text.to_owned()));
        }
        let path_ok = path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
        if !path_ok || text.len() > 2048 {
            return Err(SpiffeIdError::Path(text.to_owned()));
        }
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the mesh needs from a leaf certificate.
#[derive(Clone, Debug)]
pub(crate) struct LeafInfo {
    pub(crate) identity: Option<SpiffeId>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    pub(crate) serial: String,
}

fn unix(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// Reads identity, validity and serial from a DER certificate. A
/// certificate with more than one SPIFFE URI SAN has no identity (SPIFFE
/// requires exactly one).
pub(crate) fn leaf_info(cert: &CertificateDer<'_>) -> Result<LeafInfo, String> {
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let uris: Vec<&str> = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let identity = match uris.as_slice() {
        [one] => one.parse().ok(),
        _ => None,
    };
    let validity = parsed.validity();
    Ok(LeafInfo {
        identity,
        not_before: unix(validity.not_before.timestamp()),
        not_after: unix(validity.not_after.timestamp()),
        serial: parsed.raw_serial_as_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_ids() {
        let id = SpiffeId::workload("shop.local", "shop", "orders").unwrap();
        assert_eq!(id.as_str(), "spiffe://shop.local/ns/shop/sa/orders");
        assert_eq!(id.trust_domain(), "shop.local");
        assert_eq!(id.service_account(), Some("orders"));
        assert!(SpiffeId::workload("shop.local", "evil/sa/orders", "x").is_err());
        assert!(SpiffeId::workload("shop.local", "shop", "orders/x").is_err());
        for bad in [
            "http://x/y",
            "spiffe://",
            "spiffe://Shop/x",
            "spiffe://d/",
            "spiffe://d/a//b",
            "spiffe://d/../x",
            "spiffe://d/a b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
