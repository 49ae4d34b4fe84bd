//! `identity agent`: the workload certificate as files, for workloads that
//! are not Rust (the Python recommendations service) and read
//! `--tls-dir`, the way SPIRE's spiffe-helper or cert-manager's
//! csi-driver-spiffe do it.
//!
//! The agent gets the certificate from the identity service exactly as a
//! Rust workload does (`mesh_client::tls::certify`: a key made in memory,
//! a CSR, the projected ServiceAccount token, renewal at ~70 % of the
//! lifetime, riding out outages) and writes what it holds to `--out` in
//! the layout of a Kubernetes TLS Secret, which every `--tls-dir` reader
//! expects: `tls.crt` (chain, leaf first), `tls.key` (PKCS#8) and `ca.crt`
//! (the trust bundle). Each file is written to a temporary file in the
//! same directory and renamed over the old one, so a reader never sees
//! half a file; the order is `ca.crt`, `tls.key`, `tls.crt`, and readers
//! refuse a key that does not match the certificate and look again a
//! second later. `tls.key` is 0600, the directory 0700 (share it with the
//! workload by running both as the same user); no path is followed
//! through a symlink (the directory must not be one, temporary files are
//! created exclusively and a rename replaces a link rather than writing
//! through it).
//!
//! `/ready` on `--admin-addr` answers 200 once the files hold a valid
//! certificate (the startup probe of a native sidecar, so the workload
//! starts after it). If no first certificate arrives within
//! `--first-certificate-timeout-secs` the agent exits 1 saying why. Every
//! renewal is logged with identity, serial and expiry; the key never is.

use std::{
    ffi::OsString,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use clap::Parser;
use mesh_client::tls::certify::{
    CertificateSource as _, CertifyOptions, IssuedPem, certify_with_pem,
};
use shop_kit::certify::CertifyArgs;

/// Flags of `identity agent`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "identity agent",
    about = "Keeps a workload certificate from the identity service in a directory of files (tls.crt, tls.key, ca.crt)"
)]
pub struct AgentConfig {
    /// Directory the files are written to: created (mode 0700) if missing,
    /// its parent must exist; it must not be a symlink. An `emptyDir` with
    /// `medium: Memory` in Kubernetes, so the key never reaches a disk.
    #[arg(long, env = "AGENT_OUT_DIR")]
    pub out: PathBuf,
    /// The identity service, the token and the trust bundle.
    #[command(flatten)]
    pub certify: CertifyArgs,
    /// SPIFFE trust domain (for the identity service's default ID).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "shop.local")]
    pub trust_domain: String,
    /// Namespace of the identity service (for its default ID).
    #[arg(long, env = "MESH_NAMESPACE", default_value = "shop")]
    pub namespace: String,
    /// Admin HTTP port (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Give up (exit 1) if no first certificate arrives in this many
    /// seconds (1 to 3600).
    #[arg(long, env = "FIRST_CERTIFICATE_TIMEOUT_SECS", default_value_t = 120)]
    pub first_certificate_timeout_secs: u64,
}

impl AgentConfig {
    /// Everything wrong with the flags.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.certify.enabled() {
            problems.push("--identity-addr: required".into());
        }
        problems.extend(
            self.certify
                .problems(false, &self.trust_domain, &self.namespace),
        );
        if !(1..=3600).contains(&self.first_certificate_timeout_secs) {
            problems.push("--first-certificate-timeout-secs: must be 1 to 3600".into());
        }
        match self.out.parent() {
            Some(parent) if parent.as_os_str().is_empty() || parent.is_dir() => {}
            _ => problems.push(format!(
                "--out: the parent of {} must be an existing directory",
                self.out.display()
            )),
        }
        if std::fs::symlink_metadata(&self.out).is_ok_and(|m| m.file_type().is_symlink()) {
            problems.push(format!(
                "--out: {} is a symlink; give the directory itself",
                self.out.display()
            ));
        }
        problems
    }
}

/// The files in `--out`, in the order they are replaced.
const FILES: [(&str, u32); 3] = [("ca.crt", 0o644), ("tls.key", 0o600), ("tls.crt", 0o644)];

/// Makes `dir` a directory only its owner can enter, refusing a symlink.
fn prepare_dir(dir: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(format!(
                "--out: {} is a symlink; refusing to follow it",
                dir.display()
            ));
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(format!("--out: {} is not a directory", dir.display()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("--out: cannot create {}: {e}", dir.display()))?,
        Err(e) => return Err(format!("--out: {}: {e}", dir.display())),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("--out: cannot make {} mode 0700: {e}", dir.display()))
}

/// Replaces `dir/name` with `contents` atomically: an exclusively created
/// temporary file in `dir` (never a followed symlink), synced, renamed.
fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A leftover of a crash: removing a symlink removes the link only.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // Exactly `mode`, whatever the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the files of `pem` that differ from `written` (what is on disk).
fn write_files(dir: &Path, pem: &IssuedPem, written: &mut [Vec<u8>; 3]) -> Result<(), String> {
    for (i, (name, mode)) in FILES.iter().enumerate() {
        let contents = match *name {
            "ca.crt" => &pem.bundle_pem,
            "tls.key" => &pem.key_pem,
            _ => &pem.chain_pem,
        };
        if written[i] == *contents {
            continue;
        }
        write_atomic(dir, name, contents, *mode)
            .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))?;
        written[i] = contents.clone();
    }
    Ok(())
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How often a failed write is tried again.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    prepare_dir(&config.out)?;
    let (client, bundle) = config
        .certify
        .client(&config.trust_domain, &config.namespace)?;
    let source = client.describe();
    // What the files on disk hold: readiness checks its expiry.
    let on_disk: Arc<Mutex<Option<SystemTime>>> = Arc::new(Mutex::new(None));
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    if let Some(addr) = config.admin_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--admin-addr: cannot listen on {addr}: {e}"))?;
        let on_disk = on_disk.clone();
        tokio::spawn(mesh_client::telemetry::admin::serve(
            listener,
            mesh_client::telemetry::metrics().clone(),
            Arc::new(move || {
                let valid = on_disk
                    .lock()
                    .expect("lock")
                    .is_some_and(|not_after| SystemTime::now() < not_after);
                Box::pin(async move { valid })
            }),
            None,
            stop.clone(),
        ));
    }
    let limit = Duration::from_secs(config.first_certificate_timeout_secs);
    tracing::info!(identity_service = %source, out = %config.out.display(), "getting the workload certificate; not ready until it is written");
    tokio::pin!(shutdown);
    let (tls, mut pem) = tokio::select! {
        got = tokio::time::timeout(limit, certify_with_pem(CertifyOptions::new(bundle), Arc::new(client))) => match got {
            Ok(got) => got.map_err(|e| format!("TLS: {e}"))?,
            Err(_) => return Err(format!(
                "no certificate from {source} within {} s (--first-certificate-timeout-secs); the warnings above say why",
                limit.as_secs()
            )),
        },
        () = &mut shutdown => return Err("stopped before the identity service issued a certificate".into()),
    };
    // The same expiry gauge as every workload's, for the same alerts.
    tls.report_expiry_to(mesh_client::telemetry::metrics());
    let mut written: [Vec<u8>; 3] = Default::default();
    let mut last_serial = String::new();
    let mut pending = Some(pem.borrow_and_update().clone());
    loop {
        if let Some(current) = pending.take() {
            match write_files(&config.out, &current, &mut written) {
                Ok(()) => {
                    *on_disk.lock().expect("lock") = Some(current.not_after);
                    let expires = unix_seconds(current.not_after);
                    if last_serial.is_empty() {
                        tracing::info!(identity = %current.identity, serial = %current.serial, expires_unix = expires, out = %config.out.display(), "certificate files written");
                    } else if last_serial != current.serial {
                        tracing::info!(identity = %current.identity, serial = %current.serial, previous = %last_serial, expires_unix = expires, "certificate files renewed");
                    } else {
                        tracing::info!(identity = %current.identity, serial = %current.serial, "trust bundle file updated");
                    }
                    last_serial = current.serial.clone();
                }
                Err(e) => {
                    tracing::error!(identity = %current.identity, serial = %current.serial, retry_in = ?WRITE_RETRY, "{e}");
                    pending = Some(current);
                }
            }
        }
        tokio::select! {
            changed = pem.changed() => {
                changed.map_err(|_| "the certificate renewal stopped".to_string())?;
                pending = Some(pem.borrow_and_update().clone());
            }
            () = tokio::time::sleep(WRITE_RETRY), if pending.is_some() => {}
            () = &mut shutdown => break,
        }
    }
    drop(tls);
    tracing::info!("identity agent stopped");
    Ok(())
}

/// `identity agent ARGS`: `args` starts with the program name.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let config = match AgentConfig::try_parse_from(args) {
        Ok(config) => config,
        Err(err) => {
            let code = if err.use_stderr() {
                shop_kit::EXIT_BAD_CONFIG
            } else {
                0
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let problems = config.problems();
    if !problems.is_empty() {
        eprintln!("identity agent: invalid configuration:");
        for problem in &problems {
            eprintln!("  - {problem}");
        }
        return ExitCode::from(shop_kit::EXIT_BAD_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("identity agent: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = mesh_client::telemetry::init("identity-agent");
        let code = match run(config, shop_kit::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("identity agent failed: {e}");
                eprintln!("identity agent: {e}");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown().await;
        code
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn files_replace_atomically_with_their_modes_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        prepare_dir(&out).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o700);
        // A planted link where the key goes: replaced, its target untouched.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, out.join("tls.key")).unwrap();
        write_atomic(&out, "tls.key", b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let meta = std::fs::symlink_metadata(out.join("tls.key")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, 0o600);
        write_atomic(&out, "ca.crt", b"bundle", 0o644).unwrap();
        assert_eq!(
            std::fs::metadata(out.join("ca.crt")).unwrap().mode() & 0o777,
            0o644
        );
        // No temporary file stays behind.
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // An output directory that is a symlink is refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        assert!(prepare_dir(&link).unwrap_err().contains("symlink"));
    }
}
