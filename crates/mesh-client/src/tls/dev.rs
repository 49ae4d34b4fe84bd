//! A development mesh CA: creates a trust bundle and signing key and issues
//! short-lived SPIFFE workload certificates (ECDSA P-256), for running the
//! mesh locally and for tests. In production the certificates come from
//! your CA (cert-manager, SPIRE, ...) through the same files.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::{SpiffeId, TlsError};

fn err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid(e.to_string())
}

fn at(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&rand::random::<u64>().to_be_bytes());
    }
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A CA that signs workload certificates.
pub struct DevCa {
    /// The CA certificate, PEM (the trust bundle entry).
    pub cert_pem: String,
    /// The CA's private key, PEM.
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

/// What a workload certificate says.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// The workload identity (the URI SAN).
    pub identity: SpiffeId,
    /// DNS names the workload is reached by (so grpcurl can verify it).
    pub dns_names: Vec<String>,
    /// IP addresses the workload is reached by.
    pub ips: Vec<IpAddr>,
    /// Valid from this time...
    pub not_before: SystemTime,
    /// ...for this long.
    pub valid_for: Duration,
}

impl LeafSpec {
    /// A 24-hour certificate for `identity`, valid for localhost and 127.0.0.1.
    pub fn local(identity: SpiffeId) -> Self {
        Self {
            identity,
            dns_names: vec!["localhost".into()],
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            not_before: SystemTime::now() - Duration::from_secs(60),
            valid_for: Duration::from_secs(24 * 3600),
        }
    }
}

/// An issued certificate and its key.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl DevCa {
    /// A new self-signed CA for `trust_domain`, valid for `valid_for`.
    pub fn generate(trust_domain: &str, valid_for: Duration) -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            format!("mesh dev CA for {trust_domain}"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = at(SystemTime::now() - Duration::from_secs(60));
        params.not_after = at(SystemTime::now() + valid_for);
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().map_err(err)?,
        )];
        let cert = params.self_signed(&key).map_err(err)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// A CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(err)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// Issues a workload certificate (client and server use).
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            spec.identity.service_account().unwrap_or("workload"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = at(spec.not_before);
        params.not_after = at(spec.not_before + spec.valid_for);
        params.serial_number = Some(random_serial());
        let mut sans = vec![SanType::URI(
            spec.identity.as_str().try_into().map_err(err)?,
        )];
        for dns in &spec.dns_names {
            sans.push(SanType::DnsName(dns.as_str().try_into().map_err(err)?));
        }
        sans.extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to `path` atomically (temp file + rename), with mode
/// 0600 when `private` (0644 otherwise), set explicitly whatever the umask.
///
/// Neither the temp file nor `path` is followed if it is a symlink: the temp
/// file is created new (`O_EXCL`, `O_NOFOLLOW`), so a file or link planted
/// at its name is never written through (a leftover is unlinked, not
/// followed, and creation retried once), and `rename` replaces a link at
/// `path` instead of writing to what it points at.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let io = |e: std::io::Error| TlsError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mode = if private { 0o600 } else { 0o644 };
    let open = || {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode).custom_flags(libc::O_NOFOLLOW);
        }
        options.open(&tmp)
    };
    let mut file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A leftover of a crashed write, or something planted: remove
            // the name itself (never what a link points at) and start anew.
            fs::remove_file(&tmp).map_err(io)?;
            open().map_err(io)?
        }
        other => other.map_err(io)?,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io)?;
    }
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Writes a workload's `tls.crt`, `tls.key` (0600) and `ca.crt` into `dir`.
pub fn write_workload(dir: &Path, issued: &Issued, bundle_pem: &str) -> Result<(), TlsError> {
    write_file(&dir.join("tls.crt"), &issued.cert_pem, false)?;
    write_file(&dir.join("tls.key"), &issued.key_pem, true)?;
    write_file(&dir.join("ca.crt"), bundle_pem, false)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn write_file_follows_no_symlink_at_the_temp_name_or_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "untouched").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();

        // A link planted where the temp file goes.
        let key = dir.path().join("tls.key");
        symlink(&victim, dir.path().join(".tls.key.tmp")).unwrap();
        write_file(&key, "SECRET", true).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(mode(&victim), 0o644);
        assert_eq!(fs::read_to_string(&key).unwrap(), "SECRET");
        assert!(fs::symlink_metadata(&key).unwrap().file_type().is_file());
        assert_eq!(mode(&key), 0o600);
        assert!(!dir.path().join(".tls.key.tmp").exists());

        // A link planted at the target itself is replaced, not written through.
        let cert = dir.path().join("tls.crt");
        symlink(&victim, &cert).unwrap();
        write_file(&cert, "PUBLIC", false).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(fs::symlink_metadata(&cert).unwrap().file_type().is_file());
        assert_eq!(mode(&cert), 0o644);

        // A stale temp file (a crashed write) does not block the next write,
        // and rewriting a public file as private narrows its mode.
        fs::write(dir.path().join(".tls.crt.tmp"), "stale").unwrap();
        write_file(&cert, "NOW PRIVATE", true).unwrap();
        assert_eq!(fs::read_to_string(&cert).unwrap(), "NOW PRIVATE");
        assert_eq!(mode(&cert), 0o600);
    }
}
