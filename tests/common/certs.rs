//! Test identities and the shop's authorization policy: one test CA from
//! the dev-CA generator, workload certificates, policy files.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub const TRUST_DOMAIN: &str = "shop.test";

pub fn identity(workload: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{workload}")
}

/// A test CA and workload certificates, from the one dev-CA generator.
pub struct TestPki {
    pub ca: mesh_client::tls::dev::DevCa,
    pub root: std::path::PathBuf,
}

impl TestPki {
    pub fn new(root: &Path) -> TestPki {
        let ca = mesh_client::tls::dev::DevCa::generate(TRUST_DOMAIN, Duration::from_secs(3600))
            .unwrap();
        TestPki {
            ca,
            root: root.to_path_buf(),
        }
    }

    /// Issues `workload`'s certificate into `<root>/<workload>` and returns the directory.
    pub fn issue(&self, workload: &str) -> PathBuf {
        self.issue_with(workload, |_| {})
    }

    pub fn issue_with(
        &self,
        workload: &str,
        tweak: impl FnOnce(&mut mesh_client::tls::dev::LeafSpec),
    ) -> PathBuf {
        let mut spec = mesh_client::tls::dev::LeafSpec::local(identity(workload).parse().unwrap());
        tweak(&mut spec);
        let issued = self.ca.issue(&spec).unwrap();
        let dir = self.root.join(workload);
        mesh_client::tls::dev::write_workload(&dir, &issued, &self.ca.cert_pem).unwrap();
        dir
    }

    pub fn load(&self, workload: &str) -> std::sync::Arc<mesh_client::tls::MeshTls> {
        mesh_client::tls::MeshTls::load(mesh_client::tls::TlsFiles::in_dir(
            self.root.join(workload),
        ))
        .unwrap()
    }
}

/// The shop's authorization policy for `service`, as the local run writes it.
pub fn shop_policy(service: &str) -> String {
    shop_kit::policy::mesh_config(service, TRUST_DOMAIN).to_string()
}

/// [`shop_policy`] for `service`, except that the orders service may not
/// call the methods named in `refused` (`Service/Method`, e.g.
/// `PaymentsService/RefundCharge`): orders' wildcard becomes the list of
/// the service's other methods, read from the contracts.
pub fn shop_policy_refusing_orders(service: &str, refused: &[&str]) -> String {
    use prost::Message;
    let fds = prost_types::FileDescriptorSet::decode(shop_api::FILE_DESCRIPTOR_SET).unwrap();
    let mut policy: serde_json::Value = serde_json::from_str(&shop_policy(service)).unwrap();
    let rules = policy["authorization"]["rules"].as_array_mut().unwrap();
    let orders = rules
        .iter_mut()
        .find(|r| r["callers"][0] == identity("orders"))
        .expect("the shop's policy lets orders call this service");
    let mut allowed = Vec::new();
    for pattern in orders["methods"].as_array().unwrap() {
        let pattern = pattern.as_str().unwrap();
        let Some(full) = pattern.strip_suffix("/*") else {
            let short = pattern.rsplit_once('.').map_or(pattern, |(_, m)| m);
            if !refused.contains(&short) {
                allowed.push(pattern.to_owned());
            }
            continue;
        };
        let (package, name) = full.rsplit_once('.').unwrap();
        let svc = fds
            .file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| &f.service)
            .find(|s| s.name() == name)
            .expect("service in the contracts");
        for m in &svc.method {
            if !refused.contains(&format!("{name}/{}", m.name()).as_str()) {
                allowed.push(format!("{full}/{}", m.name()));
            }
        }
    }
    orders["methods"] = serde_json::json!(allowed);
    policy.to_string()
}
