//! `meshsim client`: one client process of the subsetting test
//! (tests/subsetting.rs). It calls a `static:///` target of echo servers
//! through a mesh with a subset, counts the answers per server, prints
//! them as one JSON line and then holds its connections until killed, so
//! the test can count them from outside.

use std::{collections::BTreeMap, time::Duration};

use mesh_client::{Mesh, MeshConfig};
use shop_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};

/// Runs the client; returns an error text for the exit status.
pub async fn run(target: &str, config_json: &str, calls: usize) -> Result<(), String> {
    let config = MeshConfig::from_json(config_json).map_err(|e| e.to_string())?;
    let mesh = Mesh::new(config);
    let channel = mesh.channel(target).map_err(|e| e.to_string())?;
    // Wait (bounded) until every member's health watch saw it SERVING.
    let mut members = Vec::new();
    for _ in 0..600 {
        members = channel.endpoint_states();
        if !members.is_empty() && members.iter().all(|m| m.serving == Some(true)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = EchoServiceClient::new(channel.clone());
    let mut per_server: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed = 0u64;
    for _ in 0..calls {
        match client.echo(EchoRequest::default()).await {
            Ok(reply) => *per_server.entry(reply.into_inner().server_id).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    let line = serde_json::json!({
        "pid": std::process::id(),
        "members": channel.endpoint_states().iter().map(|m| m.addr.to_string()).collect::<Vec<_>>(),
        "serving": members.iter().filter(|m| m.serving == Some(true)).count(),
        "resolved": channel.endpoints().len(),
        "subsetSize": channel.subset_size(),
        "perServer": per_server,
        "failed": failed,
    });
    println!("{line}");
    // Hold the connections until the test has counted them and kills us.
    tokio::time::sleep(Duration::from_secs(600)).await;
    Ok(())
}
