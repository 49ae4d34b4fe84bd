//! `shopctl certs`: a development mesh CA and SPIFFE workload certificates,
//! as files (for `--tls-dir` outside Kubernetes; in a cluster workloads get
//! theirs from the identity service, and no Secret holds a workload key).
//!
//! The operator's identity (allowed to call everything) is issued on
//! demand with `--operator`, locally, valid for [`OPERATOR_VALID_HOURS`] only.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::STANDARD};
use mesh_client::tls::{
    SpiffeId,
    dev::{DevCa, LeafSpec, write_file, write_workload},
};

/// The shop's workloads.
pub const SERVICES: [&str; 6] = [
    "auth",
    "inventory",
    "payments",
    "orders",
    "gateway",
    "recommendations",
];
/// The identity that may call everything (people with grpcurl).
pub const OPERATOR: &str = "operator";
/// Lifetime of an operator certificate from `shopctl certs --operator`:
/// an all-access credential should not outlive the task it was made for.
pub const OPERATOR_VALID_HOURS: u64 = 1;

/// What to issue.
#[derive(clap::Args, Clone, Debug)]
pub struct CertArgs {
    /// Where the CA and certificates go: `ca/` and one directory per workload.
    #[arg(long, default_value = ".shop/certs")]
    pub out: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "shop.local")]
    pub trust_domain: String,
    /// Namespace in the identities (and of the Secrets).
    #[arg(long, default_value = "shop")]
    pub namespace: String,
    /// Workloads to issue for (the operator is not one: see `--operator`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "auth,inventory,payments,orders,gateway,recommendations"
    )]
    pub workloads: Vec<String>,
    /// Issue only the operator's client certificate (calls everything),
    /// into `<out>/operator`, valid for 1 hour; for grpcurl from this machine.
    #[arg(long, conflicts_with_all = ["workloads", "valid_hours"])]
    pub operator: bool,
    /// Extra DNS names for every server certificate.
    #[arg(long = "dns")]
    pub extra_dns: Vec<String>,
    /// Certificate lifetime in hours.
    #[arg(long, default_value_t = 24)]
    pub valid_hours: u64,
    /// Print, for `kubectl apply -f -`, the mesh identity service's issuing
    /// CA (`<out>/ca`, created on first use) as the `identity-ca` Secret
    /// and its certificate as the `mesh-trust-bundle` ConfigMap (with
    /// the namespace), and issue nothing else: workloads get their
    /// certificates from the identity service.
    #[arg(long, conflicts_with_all = ["operator"])]
    pub k8s_identity_ca: bool,
}

fn ca_paths(out: &Path) -> (PathBuf, PathBuf) {
    (out.join("ca").join("ca.crt"), out.join("ca").join("ca.key"))
}

/// The CA in `out/ca`, created (key 0600) if absent.
pub fn ensure_ca(out: &Path, trust_domain: &str) -> anyhow::Result<DevCa> {
    let (cert, key) = ca_paths(out);
    if cert.exists() && key.exists() {
        let ca = DevCa::from_pem(
            &std::fs::read_to_string(&cert)?,
            &std::fs::read_to_string(&key)?,
        )
        .with_context(|| format!("loading the CA in {}", cert.display()))?;
        return Ok(ca);
    }
    let ca = DevCa::generate(trust_domain, Duration::from_secs(365 * 24 * 3600))?;
    write_file(&cert, &ca.cert_pem, false)?;
    write_file(&key, &ca.key_pem, true)?;
    eprintln!(
        "shopctl: created a dev mesh CA in {}",
        cert.parent().unwrap_or(out).display()
    );
    Ok(ca)
}

/// DNS names a shop workload is reached by, locally and in Kubernetes.
fn dns_names(workload: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if workload != OPERATOR {
        names.extend([
            workload.to_string(),
            format!("{workload}.{namespace}"),
            format!("{workload}.{namespace}.svc"),
            format!("{workload}.{namespace}.svc.cluster.local"),
        ]);
    }
    names.extend(extra.iter().cloned());
    names
}

/// Whether the certificate in `dir` is missing or expires within an hour.
fn needs_issue(dir: &Path) -> bool {
    let Ok(pem) = std::fs::read(dir.join("tls.crt")) else {
        return true;
    };
    match mesh_client::tls::certificate_expiry(&pem) {
        Some(not_after) => not_after < SystemTime::now() + Duration::from_secs(3600),
        None => true,
    }
}

/// Issues (or renews) certificates for `args.workloads`; returns the
/// workload directories.
pub fn issue(args: &CertArgs, force: bool) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let ca = ensure_ca(&args.out, &args.trust_domain)?;
    let mut dirs = Vec::new();
    for workload in &args.workloads {
        let identity = SpiffeId::workload(&args.trust_domain, &args.namespace, workload)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("workload {workload:?}"))?;
        let dir = args.out.join(workload);
        if force || needs_issue(&dir) {
            let spec = LeafSpec {
                dns_names: dns_names(workload, &args.namespace, &args.extra_dns),
                ips: vec![IpAddr::from([127, 0, 0, 1])],
                valid_for: Duration::from_secs(args.valid_hours * 3600),
                ..LeafSpec::local(identity)
            };
            let issued = ca.issue(&spec)?;
            write_workload(&dir, &issued, &ca.cert_pem)?;
        }
        dirs.push((workload.clone(), dir));
    }
    Ok(dirs)
}

/// The identity service's CA as Kubernetes objects (see
/// [`CertArgs::k8s_identity_ca`]).
pub fn identity_ca_yaml(out: &Path, trust_domain: &str, namespace: &str) -> anyhow::Result<String> {
    let ca = ensure_ca(out, trust_domain)?;
    let b64 = |text: &str| STANDARD.encode(text.as_bytes());
    let bundle = ca
        .cert_pem
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n  labels:\n    app.kubernetes.io/part-of: mesh-shop\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: identity-ca\n  namespace: {namespace}\n  labels:\n    app.kubernetes.io/part-of: mesh-shop\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: mesh-trust-bundle\n  namespace: {namespace}\n  labels:\n    app.kubernetes.io/part-of: mesh-shop\ndata:\n  ca.crt: |\n{bundle}\n",
        b64(&ca.cert_pem),
        b64(&ca.key_pem),
    ))
}

/// `shopctl certs`.
pub fn run(mut args: CertArgs) -> anyhow::Result<()> {
    if args.k8s_identity_ca {
        print!(
            "{}",
            identity_ca_yaml(&args.out, &args.trust_domain, &args.namespace)?
        );
        return Ok(());
    }
    if args.valid_hours == 0 || args.valid_hours > 24 * 90 {
        bail!("--valid-hours must be 1 to 2160");
    }
    if args.operator {
        args.workloads = vec![OPERATOR.to_string()];
        args.valid_hours = OPERATOR_VALID_HOURS;
    } else if args.workloads.iter().any(|w| w == OPERATOR) {
        bail!(
            "the operator is not a workload: its certificate calls everything, so it is issued \
             on its own, locally and for {OPERATOR_VALID_HOURS} h, with `shopctl certs --operator`"
        );
    }
    let dirs = issue(&args, true)?;
    for (workload, dir) in dirs {
        println!(
            "{workload:<10} spiffe://{}/ns/{}/sa/{workload}  {}",
            args.trust_domain,
            args.namespace,
            dir.display()
        );
    }
    if args.operator {
        println!(
            "The operator certificate expires in {OPERATOR_VALID_HOURS} h; run this again for a new one."
        );
    }
    Ok(())
}
