//! The shop's authorization policy files. Test identities and workload
//! certificates come from mesh-client's tests (`common/pki.rs`), the one
//! dev-CA generator both test suites use.

pub use super::pki::{TRUST_DOMAIN, TestPki, identity};

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
