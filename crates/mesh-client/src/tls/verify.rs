//! Secure naming: a mesh client verifies the server's certificate chain
//! against the trust bundle and then its SPIFFE ID, not its DNS name.
//!
//! Hand-written because rustls' `WebPkiServerVerifier` always checks the
//! server name against DNS/IP SANs; workload identity lives in the URI SAN.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::{SpiffeId, identity::leaf_info};

/// Verifies a server's chain and, if set, that it presents `expected`.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) expected: Option<SpiffeId>,
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| TlsError::General(format!("bad server certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| TlsError::General(format!("server certificate not trusted: {e}")))?;
        let Some(expected) = &self.expected else {
            return Ok(ServerCertVerified::assertion());
        };
        let info = leaf_info(end_entity).map_err(TlsError::General)?;
        match info.identity {
            Some(id) if &id == expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(TlsError::General(format!(
                "secure naming: expected server {expected}, it presented {id}"
            ))),
            None => Err(TlsError::General(format!(
                "secure naming: expected server {expected}, its certificate has no SPIFFE ID"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
