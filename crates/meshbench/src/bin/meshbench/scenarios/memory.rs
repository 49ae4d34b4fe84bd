//! Scenario 5: resident memory of a client process with 4 targets × 3
//! endpoints, mesh vs raw tonic, each in its own fresh process.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::Ctx;
use crate::load::{Caller, closed_loop};
use crate::procs::{self, status_kib};
use crate::report::{Goal, Row, Scenario};

pub const TARGETS: usize = 4;
pub const ENDPOINTS: usize = 3;
/// Calls per target before measuring, so every endpoint has a connection
/// and every lazily built structure exists.
const CALLS_PER_TARGET: usize = 600;

/// Runs the scenario: mesh and raw client processes in turn, RSS of each.
pub async fn run(ctx: &Ctx) -> Result<Scenario, String> {
    let mut servers = Vec::new();
    for i in 0..TARGETS * ENDPOINTS {
        servers.push(procs::echo(&ctx.dir, &format!("memory-{i}"), &[]).await?);
    }
    let targets: Vec<String> = servers.chunks(ENDPOINTS).map(super::addr_list).collect();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut results: Vec<(&str, Vec<(u64, u64)>)> = vec![("mesh", vec![]), ("raw", vec![])];
    // An odd count, so the median is a sample.
    let rounds = ctx.plan.rounds.max(3) | 1;
    for _ in 0..rounds {
        for (mode, samples) in results.iter_mut() {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["memory-client", "--mode", mode])
                .kill_on_drop(true);
            for t in &targets {
                cmd.args(["--target", t]);
            }
            let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
                .await
                .map_err(|_| format!("memory-client --mode {mode} did not finish in 120 s"))?
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            let parsed: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
                format!(
                    "memory-client --mode {mode} printed {text:?}: {e}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
            let kib = |k: &str| parsed[k].as_u64().unwrap_or(0);
            samples.push((kib("rss_kib"), kib("baseline_kib")));
        }
    }
    let median = |v: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| {
        let mut x: Vec<u64> = v.iter().map(f).collect();
        x.sort_unstable();
        x[x.len() / 2] as f64 / 1024.0
    };
    let rows: Vec<Row> = results
        .iter()
        .map(|(mode, samples)| {
            let name = if *mode == "mesh" {
                "mesh (P2C, health checks, retries, metrics)"
            } else {
                "raw tonic (balance_list)"
            };
            let mut row = crate::load::Acc::default().row(name, "memory");
            row.extra.insert("rss_mib".into(), median(samples, |s| s.0));
            row.extra.insert(
                "rss before any channel, MiB".into(),
                median(samples, |s| s.1),
            );
            row
        })
        .collect();
    let delta = rows[0].extra["rss_mib"] - rows[1].extra["rss_mib"];
    Ok(Scenario {
        id: "memory".into(),
        timeline: None,
        title: format!("Memory: client with {TARGETS} targets × {ENDPOINTS} endpoints"),
        setup: format!(
            "a fresh client process per sample (same binary, a runtime thread per core): {CALLS_PER_TARGET} Echo calls per target, 4 at a time, then VmRSS; median of {rounds} samples each, interleaved"
        ),
        rows,
        goals: vec![Goal::at_most(
            "mesh − raw tonic resident memory",
            delta,
            "MiB",
            5.0,
        )],
        notes: vec![
            "for scale: Linkerd's proxy uses about 26 MB per pod, Envoy about 60 MB".into(),
        ],
    })
}

/// The child process: build the channels, use them, report VmRSS as JSON.
pub async fn client(mode: &str, targets: &[String]) -> Result<(), String> {
    let baseline = status_kib("VmRSS");
    let mut callers = Vec::new();
    // Only the mesh client holds a mesh (and the contracts' descriptors).
    let mesh = match mode {
        "mesh" => Some(crate::scenarios::descriptor_mesh(
            mesh_client::MeshConfig::default(),
        )?),
        _ => None,
    };
    for target in targets {
        callers.push(match (mode, &mesh) {
            ("mesh", Some(mesh)) => Caller::mesh_echo(
                mesh.channel(&format!("static:///{target}"))
                    .map_err(|e| e.to_string())?,
                64,
            ),
            ("raw", _) => {
                let endpoints = target.split(',').map(|a| {
                    Endpoint::from_shared(format!("http://{a}"))
                        .expect("valid URI")
                        .tcp_nodelay(true)
                });
                Caller::raw_echo(Channel::balance_list(endpoints), 64)
            }
            (other, _) => return Err(format!("--mode {other}: use mesh or raw")),
        });
    }
    for caller in &callers {
        let mut made = 0;
        while made < CALLS_PER_TARGET {
            let sample = closed_loop(caller, 4, Duration::from_millis(50), false).await;
            made += (sample.calls + sample.errors) as usize;
            if sample.errors > 0 {
                return Err(format!("calls failed: {:?}", sample.error_examples));
            }
        }
    }
    // Let background tasks (health watches, DNS, reconnects) settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "baseline_kib": baseline,
            "rss_kib": status_kib("VmRSS"),
        })
    );
    drop(callers);
    Ok(())
}
