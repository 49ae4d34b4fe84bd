//! The issuing CA: signs workload certificates for an identity the caller
//! proved, taking nothing from the CSR but its public key.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_client::tls::{
    SpiffeId,
    certify::{CertificateSource, CertifyFuture},
};
use rcgen::{
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use x509_parser::prelude::FromDer;

/// Why a CSR was refused (the caller's mistake: `INVALID_ARGUMENT`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CsrError(pub String);

/// A signed certificate.
#[derive(Clone, Debug)]
pub struct Signed {
    /// DER chain, leaf first, without the trust anchor.
    pub chain: Vec<Vec<u8>>,
    /// Serial number, hex.
    pub serial: String,
    /// Expiry.
    pub not_after: SystemTime,
}

/// The CA key and certificate. The key is never logged or printed
/// (`Debug` shows only the subject).
pub struct IssuingCa {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf (the CA itself when it is an
    /// intermediate, and its parents up to, not including, the root).
    intermediates: Vec<Vec<u8>>,
    subject: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

fn unix(seconds: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64)
}

fn at(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl IssuingCa {
    /// Reads the CA from PEM files: `cert` holds the CA certificate first
    /// (then, for an intermediate, its parents), `key` its private key.
    /// Errors name the file, never its contents.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let cert_pem = std::fs::read_to_string(cert)
            .map_err(|e| format!("--ca-cert {}: {e}", cert.display()))?;
        let key_pem =
            std::fs::read_to_string(key).map_err(|e| format!("--ca-key {}: {e}", key.display()))?;
        Self::from_pem(&cert_pem, &key_pem)
            .map_err(|e| format!("CA {} with key {}: {e}", cert.display(), key.display()))
    }

    /// The CA from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        let first = certs.first().ok_or("holds no certificate")?;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(first)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        if !parsed.is_ca() {
            return Err("the certificate is not a CA (basicConstraints cA is false)".into());
        }
        let key = KeyPair::from_pem(key_pem).map_err(|_| "the key is not a PEM private key")?;
        if rcgen::PublicKeyData::der_bytes(&key)
            != parsed.public_key().subject_public_key.data.as_ref()
        {
            return Err("the key does not belong to the certificate".into());
        }
        let now = SystemTime::now();
        let not_after = unix(parsed.validity().not_after.timestamp());
        if now >= not_after {
            return Err("the CA certificate has expired".into());
        }
        let subject = parsed.subject().to_string();
        let intermediates = certs
            .iter()
            .filter(|c| {
                x509_parser::certificate::X509Certificate::from_der(c)
                    .map(|(_, p)| p.subject() != p.issuer())
                    .unwrap_or(false)
            })
            .map(|c| c.to_vec())
            .collect();
        let issuer = Issuer::from_ca_cert_der(first, key)
            .map_err(|e| format!("cannot use the CA certificate: {e}"))?;
        Ok(Self {
            issuer,
            intermediates,
            subject,
            not_after,
        })
    }

    /// When the CA itself expires (no leaf outlives it).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA's subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Signs a certificate for `identity` with the public key of `csr`
    /// (DER PKCS#10, its signature checked), valid from `backdate` ago for
    /// `ttl` (cut at the CA's own expiry).
    pub fn sign(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        ttl: Duration,
        backdate: Duration,
    ) -> Result<Signed, CsrError> {
        let mut request = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr),
        )
        .map_err(|e| {
            CsrError(match e {
                rcgen::Error::InvalidCertificationRequestSignature => "the CSR's signature does not verify with the key it carries; sign the CSR with its own private key".into(),
                rcgen::Error::UnsupportedExtension => "the CSR requests an extension this service does not read; send a CSR without extensions (the identity comes from the token, not the CSR)".into(),
                rcgen::Error::UnsupportedSignatureAlgorithm => "the CSR's key or signature algorithm is not accepted; use ECDSA P-256 or P-384, or Ed25519".into(),
                rcgen::Error::CouldNotParseCertificationRequest => "the CSR is not a DER-encoded PKCS#10 certification request".into(),
                other => format!("the CSR cannot be used: {other}"),
            })
        })?;
        let alg = request.public_key.algorithm();
        let accepted = [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ];
        if !accepted.contains(&alg) {
            return Err(CsrError(format!(
                "the CSR's key type ({alg:?}) is not accepted; use ECDSA P-256 or P-384, or Ed25519"
            )));
        }
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.not_after);
        let params = &mut request.params;
        *params = rcgen::CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            identity.service_account().unwrap_or("workload"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = at(now - backdate);
        params.not_after = at(not_after);
        let mut serial = [0u8; 16];
        for chunk in serial.chunks_mut(8) {
            chunk.copy_from_slice(&rand::random::<u64>().to_be_bytes());
        }
        // Positive, and a non-zero first byte keeps the DER integer minimal.
        serial[0] = (serial[0] & 0x7f) | 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.subject_alt_names =
            vec![SanType::URI(identity.as_str().try_into().map_err(|e| {
                CsrError(format!("identity {identity} is not a valid URI: {e}"))
            })?)];
        params.use_authority_key_identifier_extension = true;
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|e| CsrError(format!("cannot sign: {e}")))?;
        let serial_hex = serial
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let mut chain = vec![cert.der().to_vec()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Signed {
            chain,
            serial: serial_hex,
            not_after: unix(
                not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
            ),
        })
    }
}

/// The identity service's own certificate, from its own CA (it cannot
/// ask itself over the network before it serves).
pub struct SelfIssuer {
    /// The CA.
    pub ca: Arc<IssuingCa>,
    /// The service's own SPIFFE ID.
    pub identity: SpiffeId,
    /// Lifetime of its certificates.
    pub ttl: Duration,
    /// Backdating.
    pub backdate: Duration,
}

impl CertificateSource for SelfIssuer {
    fn certify<'a>(&'a self, csr: &'a [u8]) -> CertifyFuture<'a> {
        Box::pin(async move {
            let signed = self
                .ca
                .sign(csr, &self.identity, self.ttl, self.backdate)
                .map_err(|e| e.to_string())?;
            tracing::info!(identity = %self.identity, serial = %signed.serial, "issued the identity service's own certificate");
            Ok(signed.chain.into_iter().map(CertificateDer::from).collect())
        })
    }

    fn describe(&self) -> String {
        format!("own CA ({})", self.ca.subject())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> IssuingCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        IssuingCa::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
    }

    fn csr_asking_for(uri: &str) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_certificate_names_the_proven_identity_not_the_requested_one() {
        let ca = ca();
        let orders: SpiffeId = "spiffe://shop.local/ns/shop/sa/orders".parse().unwrap();
        let csr = csr_asking_for("spiffe://shop.local/ns/shop/sa/payments");
        let signed = ca
            .sign(
                &csr,
                &orders,
                Duration::from_secs(30),
                Duration::from_secs(5),
            )
            .unwrap();
        let (_, leaf) =
            x509_parser::certificate::X509Certificate::from_der(&signed.chain[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec!["URI(spiffe://shop.local/ns/shop/sa/orders)"]);
        let v = leaf.validity();
        let lifetime = v.not_after.timestamp() - v.not_before.timestamp();
        assert!((34..=36).contains(&lifetime), "{lifetime}");
        assert!(!leaf.is_ca());
    }

    #[test]
    fn malformed_and_forged_csrs_are_refused_saying_why() {
        let ca = ca();
        let id: SpiffeId = "spiffe://shop.local/ns/shop/sa/orders".parse().unwrap();
        let ttl = Duration::from_secs(30);
        let e = ca.sign(b"garbage", &id, ttl, Duration::ZERO).unwrap_err();
        assert!(e.0.contains("PKCS#10"), "{e}");
        let mut csr = csr_asking_for("spiffe://x/y");
        // Flip a bit in the signature (the last bytes).
        let last = csr.len() - 3;
        csr[last] ^= 0x01;
        let e = ca.sign(&csr, &id, ttl, Duration::ZERO).unwrap_err();
        assert!(e.0.contains("signature"), "{e}");
    }
}
