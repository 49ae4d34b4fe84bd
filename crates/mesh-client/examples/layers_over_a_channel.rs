//! The mesh's deadline and retry layers over a plain tonic `Channel`, with
//! no `Mesh`: for a client that keeps its own connection (or its own
//! balancer) but wants deadlines that inherit and cap, and retries within
//! a budget.
//!
//! ```sh
//! cargo run -p mesh-client --example layers_over_a_channel -- http://127.0.0.1:50052
//! ```
//!
//! It calls `grpc.health.v1.Health/Check` on the address given and prints
//! the answer (or why there was none).

use std::{sync::Arc, time::Duration};

use mesh_client::{
    ConfigHandle, MeshConfig, MethodInfo, MethodTable, deadline::DeadlineLayer, retry::RetryLayer,
};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50052".to_owned());
    // Any tonic channel: this one connects on first use.
    let channel = Channel::from_shared(address.clone())?.connect_lazy();

    // The retry policy, read at every call from a live config (reload it
    // with `config.reload(..)`); the key is the name the layer is given.
    let config = ConfigHandle::new(MeshConfig::from_json(
        r#"{ "retryPolicy": { "maxAttempts": 3, "initialBackoff": "50ms",
                              "retryableStatusCodes": ["UNAVAILABLE"] },
             "retryBudget": { "retryRatio": 0.2 } }"#,
    )?)?;
    // Which methods are safe to retry: normally from the contracts'
    // descriptors (`MethodTable::add_encoded`, `idempotency_level`); the
    // health proto declares none, so say it here.
    let mut methods = MethodTable::default();
    methods.insert(
        "/grpc.health.v1.Health/Check",
        MethodInfo {
            idempotent: true,
            client_streaming: false,
        },
    );

    let stack = ServiceBuilder::new()
        // Every call gets a deadline (2 s unless the request or the inbound
        // call being handled has a shorter one), sent as `grpc-timeout`.
        .layer(DeadlineLayer::new(Duration::from_secs(2)))
        // Idempotent calls failing with UNAVAILABLE are retried, at most 3
        // attempts, within a budget of 20 % of calls.
        .layer(RetryLayer::new("health", config, Arc::new(methods)))
        .service(channel);

    let mut client = HealthClient::new(stack);
    match client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(answer) => println!("{address}: {:?}", answer.into_inner().status()),
        Err(status) => println!("{address}: no answer: {status}"),
    }
    Ok(())
}
