//! Test identities: one test CA from the dev-CA generator and workload
//! certificates issued into directories as a Kubernetes Secret presents
//! them. Shared with the shop's cross-service tests (`tests/common`).

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
