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
        // rcgen names the key's algorithm after the CSR's signature, so a
        // P-256 key signed with ECDSA-SHA384 reads as P-384: the key's own
        // type and curve must be the ones that algorithm names, or the
        // certificate would label the key wrongly.
        if !key_is(csr, alg) {
            return Err(CsrError(
                "the CSR's key does not match its signature algorithm; sign a P-256 key with ECDSA-SHA256, a P-384 key with ECDSA-SHA384, or use Ed25519".into(),
            ));
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

/// Whether the public key of `csr` (DER PKCS#10, already parsed once by
/// rcgen) is of the type and curve `alg` signs with.
fn key_is(csr: &[u8], alg: &rcgen::SignatureAlgorithm) -> bool {
    let Ok((_, request)) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr)
    else {
        return false;
    };
    let key = &request.certification_request_info.subject_pki.algorithm;
    let curve = key
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| oid.to_id_string());
    match (key.algorithm.to_id_string().as_str(), curve.as_deref()) {
        // id-ecPublicKey on prime256v1, on secp384r1; Ed25519.
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => *alg == rcgen::PKCS_ECDSA_P256_SHA256,
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => *alg == rcgen::PKCS_ECDSA_P384_SHA384,
        ("1.3.101.112", _) => *alg == rcgen::PKCS_ED25519,
        _ => false,
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

    /// A P-256 key in a CSR signed with ECDSA-SHA384 (made with `openssl
    /// req -sha384`; its private key was thrown away).
    const P256_KEY_SIGNED_WITH_SHA384: &[u8] = &[
        0x30, 0x81, 0xc4, 0x30, 0x6e, 0x02, 0x01, 0x00, 0x30, 0x0c, 0x31, 0x0a, 0x30, 0x08, 0x06,
        0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, 0x78, 0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        0x03, 0x42, 0x00, 0x04, 0x8e, 0x00, 0x83, 0x96, 0x82, 0x6c, 0xde, 0x51, 0x46, 0xb9, 0xe5,
        0x6b, 0x89, 0x27, 0xd7, 0xe7, 0x70, 0x7e, 0x56, 0x9d, 0xe4, 0xf4, 0xaa, 0x4f, 0x49, 0x3a,
        0x2e, 0x86, 0xba, 0x65, 0x9e, 0x89, 0x2d, 0xac, 0x12, 0x76, 0x6d, 0x5b, 0x15, 0xe3, 0x19,
        0xe5, 0xcb, 0xa5, 0x11, 0x31, 0x58, 0x74, 0x1f, 0x72, 0x5e, 0x2e, 0x37, 0x96, 0x1e, 0xac,
        0x7f, 0x58, 0xd9, 0x9b, 0x46, 0x52, 0x9c, 0xd1, 0xa0, 0x00, 0x30, 0x0a, 0x06, 0x08, 0x2a,
        0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03, 0x03, 0x46, 0x00, 0x30, 0x43, 0x02, 0x1f, 0x1f,
        0x07, 0xe0, 0x5a, 0xa7, 0x9f, 0xe7, 0x17, 0x58, 0x37, 0x39, 0x7c, 0x91, 0xf0, 0x8e, 0x13,
        0x88, 0xec, 0x73, 0xfe, 0xb9, 0x8f, 0xf7, 0x13, 0xd5, 0x58, 0x40, 0x66, 0x59, 0x1a, 0xbf,
        0x02, 0x20, 0x7c, 0xff, 0xf5, 0xf4, 0xc9, 0x42, 0xdb, 0x3e, 0xdb, 0xb1, 0x56, 0x1c, 0x33,
        0x2b, 0x5e, 0x66, 0x1f, 0x0b, 0xb6, 0xb4, 0xb3, 0x4c, 0x9e, 0xe7, 0x27, 0x6b, 0x5c, 0xd5,
        0xe5, 0x9f, 0x8f, 0x6e,
    ];

    #[test]
    fn a_csr_whose_key_is_not_of_its_signature_algorithm_is_refused() {
        let ca = ca();
        let orders: SpiffeId = "spiffe://shop.local/ns/shop/sa/orders".parse().unwrap();
        let Err(err) = ca.sign(
            P256_KEY_SIGNED_WITH_SHA384,
            &orders,
            Duration::from_secs(30),
            Duration::from_secs(5),
        ) else {
            panic!("a mislabelled key is refused");
        };
        assert!(
            err.0.contains("does not match its signature algorithm"),
            "{}",
            err.0
        );
        // Each key type signed as it should be is accepted.
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap();
            ca.sign(
                csr.der(),
                &orders,
                Duration::from_secs(30),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("{alg:?}: {}", e.0));
        }
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
