//! SPIFFE identities and what the mesh reads from a certificate.

use std::{fmt, str::FromStr, time::SystemTime};

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`, for a workload
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// The workload identity of a service account in a namespace.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, String> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
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

impl FromStr for SpiffeId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{text:?} is not a SPIFFE ID (spiffe://trust-domain/path)"))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{text:?} has no path after the trust domain"))?;
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !domain_ok {
            return Err(format!(
                "{text:?}: the trust domain must be lower-case letters, digits, '-', '.', '_'"
            ));
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
            return Err(format!(
                "{text:?}: the path must be non-empty segments of letters, digits, '-', '.', '_'"
            ));
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
