//! The scenarios of the suite, and what they share.

use std::{path::PathBuf, time::Duration};

use mesh_client::{Mesh, MeshChannel, MeshConfig};

use crate::load::Plan;

pub mod balance;
pub mod failover;
pub mod memory;
pub mod overhead;
pub mod shop;
pub mod sidecar;
pub mod streaming;

/// Every scenario's id, in the order the suite runs them.
pub const ALL: [&str; 7] = [
    "overhead",
    "sidecar",
    "streaming",
    "slow-replica",
    "failover",
    "memory",
    "shop",
];

/// Settings every scenario reads.
pub struct Ctx {
    /// Scratch directory: certificates, configs, logs, databases.
    pub dir: PathBuf,
    /// Closed-loop warm-up, round length and rounds.
    pub plan: Plan,
    /// Calls in flight in closed-loop scenarios.
    pub concurrency: usize,
    /// Echo payload bytes.
    pub payload: usize,
    /// Open loop: calls per second, and its own plan.
    pub open_rate: f64,
    pub open_plan: Plan,
    /// Length of each failover round.
    pub failover_duration: Duration,
    /// Orders in flight in the shop scenario.
    pub shop_concurrency: usize,
    /// Admin URL of a PostgreSQL server for the shop scenario.
    pub postgres_url: Option<String>,
}

impl Ctx {
    /// A mesh with default policy and the contracts (so it knows which
    /// methods are idempotent), as a service using it would have.
    pub fn mesh(&self) -> Result<Mesh, String> {
        descriptor_mesh(MeshConfig::default())
    }

    /// The closed-loop plan in words, for a scenario's setup line.
    pub fn plan_text(&self) -> String {
        plan_text(self.plan)
    }

    /// The open-loop plan in words.
    pub fn open_plan_text(&self) -> String {
        plan_text(self.open_plan)
    }
}

fn plan_text(plan: Plan) -> String {
    format!(
        "{} rounds × {:.1} s per contender after {:.1} s warm-up, contenders interleaved",
        plan.rounds,
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64()
    )
}

/// A mesh with `config` and the shop's contracts.
pub fn descriptor_mesh(config: MeshConfig) -> Result<Mesh, String> {
    Mesh::from_config(config)
        .and_then(|m| m.with_descriptor_set(shop_api::FILE_DESCRIPTOR_SET))
        .map_err(|e| e.to_string())
}

/// The addresses of `procs`, comma-separated, as a static target lists them.
pub fn addr_list(procs: &[crate::procs::Proc]) -> String {
    procs
        .iter()
        .map(|p| p.addr.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A mesh target naming every one of `procs`.
pub fn static_target(procs: &[crate::procs::Proc]) -> String {
    format!("static:///{}", addr_list(procs))
}

/// Waits until the server behind `channel` reports SERVING.
pub async fn wait_serving(channel: MeshChannel) -> Result<(), String> {
    shop_kit::mesh::wait_serving(channel, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())
}
