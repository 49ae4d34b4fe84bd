//! Scenario 3: three replicas, one 20 ms slower; the mesh's P2C over
//! latency-weighted load vs round robin (same mesh, only the policy differs).

use std::collections::HashMap;

use mesh_client::MeshConfig;
use shop_api::echo::v1::{GetStatsRequest, echo_service_client::EchoServiceClient};

use super::Ctx;
use crate::load::{Caller, Contender, Load, round, this_process};
use crate::procs;
use crate::report::{Goal, Scenario, ratio};

const SLOW_MS: i64 = 20;

/// Runs the scenario: P2C and round robin over the same three replicas.
pub async fn run(ctx: &Ctx) -> Result<Scenario, String> {
    let mut replicas = Vec::new();
    for i in 0..3 {
        let delay = if i == 0 { SLOW_MS } else { 0 };
        let extra = vec!["--delay-ms".to_string(), delay.to_string()];
        replicas.push(procs::echo(&ctx.dir, &format!("replica-{i}"), &extra).await?);
    }
    let target = super::static_target(&replicas);
    let policy = |lb: &str| -> Result<MeshConfig, String> {
        MeshConfig::from_json(&format!(r#"{{"loadBalancingPolicy": "{lb}"}}"#))
            .map_err(|e| e.to_string())
    };
    let channel = |lb: &str| -> Result<Caller, String> {
        let mesh = super::descriptor_mesh(policy(lb)?)?;
        let channel = mesh.channel(&target).map_err(|e| e.to_string())?;
        Ok(Caller::mesh_echo(channel, ctx.payload))
    };
    let mut procs_of: Vec<(String, u32)> = vec![this_process()];
    procs_of.extend(replicas.iter().map(|r| (r.label.clone(), r.pid())));
    let mut contenders = [
        Contender::new("mesh P2C", channel("p2c")?, procs_of.clone()),
        Contender::new("mesh round robin", channel("round_robin")?, procs_of),
    ];
    let slow = replicas[0].addr;
    let stats = || async move {
        let mut client = EchoServiceClient::new(
            crate::scenarios::overhead::raw_channel(slow)
                .await
                .map_err(|e| e.to_string())?,
        );
        client
            .get_stats(GetStatsRequest {})
            .await
            .map(|r| r.into_inner().calls)
            .map_err(|e| format!("GetStats of the slow replica: {e}"))
    };
    let load = Load::Closed {
        concurrency: ctx.concurrency,
    };
    let mut slow_calls: HashMap<String, i64> = HashMap::new();
    for c in contenders.iter_mut() {
        round(c, load, ctx.plan.warmup, false).await;
    }
    for r in 0..ctx.plan.rounds {
        for c in contenders.iter_mut() {
            let before = stats().await?;
            round(c, load, ctx.plan.duration, true).await;
            *slow_calls.entry(c.name.clone()).or_default() += stats().await? - before;
            eprintln!("  round {}/{}: {}", r + 1, ctx.plan.rounds, c.name);
        }
    }
    let rows: Vec<_> = contenders
        .iter()
        .map(|c| {
            let mut row = c.acc.row(&c.name, "closed");
            let share = slow_calls[&c.name] as f64 / (c.acc.calls + c.acc.errors).max(1) as f64;
            row.extra
                .insert("slow replica's share of calls".into(), share);
            row
        })
        .collect();
    let goals = vec![Goal::at_most(
        "P2C p99 / round robin p99",
        ratio(rows[0].p99_us as f64, rows[1].p99_us as f64),
        "×",
        0.2,
    )];
    Ok(Scenario {
        id: "slow-replica".into(),
        timeline: None,
        title: format!("Slow replica: P2C vs round robin (one of 3 replicas +{SLOW_MS} ms)"),
        setup: format!(
            "unary Echo, {} in flight (closed loop), 3 mesh-echo replicas, one with --delay-ms {SLOW_MS}; {}",
            ctx.concurrency,
            ctx.plan_text()
        ),
        rows,
        goals,
        notes: vec![],
    })
}
