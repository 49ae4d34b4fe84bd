//! Scenario 4: three replicas, one SIGKILLed a third of the way into each
//! round; failed calls and the time until p99 is back to normal.

use std::time::Duration;

use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use super::Ctx;
use crate::load::{Acc, Caller, Event, closed_loop, histogram};
use crate::procs;
use crate::report::{Goal, Scenario, Series, Timeline};

/// Width of the windows plotted.
const PLOT_WINDOW_US: u64 = 100_000;
/// Width of the windows judged "normal" or not: long enough (thousands of
/// calls) that one scheduling hiccup on two shared cores is not a verdict.
const JUDGE_WINDOW_US: u64 = 500_000;
/// A window is normal when its p99 is at most this times the p99 before the kill.
const NORMAL_P99: f64 = 1.5;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Mesh,
    Raw,
}

/// Runs the scenario: each contender on fresh replicas, one killed per round.
pub async fn run(ctx: &Ctx) -> Result<Scenario, String> {
    let kinds = [
        (Kind::Mesh, "mesh P2C (retries, ejection)"),
        (Kind::Raw, "raw tonic balance_list"),
    ];
    let mut accs: Vec<(Acc, Vec<f64>)> = kinds.iter().map(|_| Default::default()).collect();
    let duration = ctx.failover_duration;
    let mut series = Vec::new();
    for r in 0..ctx.plan.rounds {
        for (i, (kind, name)) in kinds.iter().enumerate() {
            let (sample, recovery_ms, p99s) = one_round(ctx, *kind, duration).await?;
            if r == 0 {
                series.push(Series {
                    name: name.to_string(),
                    points: p99s,
                });
            }
            eprintln!(
                "  round {}/{}: {name}: {} ok, {} failed, p99 normal again after {recovery_ms:.0} ms",
                r + 1,
                ctx.plan.rounds,
                sample.calls,
                sample.errors
            );
            accs[i].0.add(&sample);
            accs[i].1.push(recovery_ms);
        }
    }
    let rows: Vec<_> = kinds
        .iter()
        .zip(&accs)
        .map(|((_, name), (acc, recoveries))| {
            let mut row = acc.row(name, "closed");
            let mut sorted = recoveries.clone();
            sorted.sort_by(f64::total_cmp);
            let (median, worst) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
            row.extra
                .insert("median time to normal p99, ms".into(), median);
            row.extra
                .insert("worst time to normal p99, ms".into(), worst);
            row.extra.insert("failed calls".into(), acc.errors as f64);
            row
        })
        .collect();
    let goals = vec![
        Goal::at_most(
            "mesh failed idempotent calls",
            rows[0].errors as f64,
            "calls",
            0.0,
        ),
        Goal::report(
            "mesh median time until p99 is normal",
            rows[0].extra["median time to normal p99, ms"],
            "ms",
        ),
        Goal::report(
            "mesh worst time until p99 is normal",
            rows[0].extra["worst time to normal p99, ms"],
            "ms",
        ),
        Goal::report(
            "raw tonic failed calls (for contrast)",
            rows[1].errors as f64,
            "calls",
        ),
    ];
    Ok(Scenario {
        id: "failover".into(),
        title: "Failover: one of 3 replicas SIGKILLed mid-run".into(),
        setup: format!(
            "unary Echo (idempotent: NO_SIDE_EFFECTS), {} in flight (closed loop), fresh replicas per round, SIGKILL at {:.1} s of {:.1} s; \"normal\" = no failed call and p99 ≤ {}× the p99 before the kill in every later {} ms window; {} rounds, contenders interleaved",
            ctx.concurrency,
            duration.as_secs_f64() / 3.0,
            duration.as_secs_f64(),
            NORMAL_P99,
            JUDGE_WINDOW_US / 1000,
            ctx.plan.rounds
        ),
        rows,
        goals,
        notes: vec![],
        timeline: Some(Timeline {
            title: format!(
                "p99 per {} ms window, first round (SIGKILL at {:.1} s)",
                PLOT_WINDOW_US / 1000,
                duration.as_secs_f64() / 3.0
            ),
            x: "seconds into the round".into(),
            y: "p99 of calls started in the window, ms".into(),
            series,
        }),
    })
}

async fn one_round(
    ctx: &Ctx,
    kind: Kind,
    duration: Duration,
) -> Result<(crate::load::Sample, f64, Vec<(f64, f64)>), String> {
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(procs::echo(&ctx.dir, &format!("failover-{i}"), &[]).await?);
    }
    let caller = match kind {
        Kind::Mesh => {
            let channel = ctx
                .mesh()?
                .channel(&super::static_target(&replicas))
                .map_err(|e| e.to_string())?;
            Caller::mesh_echo(channel, ctx.payload)
        }
        Kind::Raw => {
            let endpoints = replicas.iter().map(|r| {
                Endpoint::from_shared(format!("http://{}", r.addr))
                    .expect("valid URI")
                    .tcp_nodelay(true)
            });
            Caller::raw_echo(Channel::balance_list(endpoints), ctx.payload)
        }
    };
    // Warm up so every replica has a connection before the kill.
    let _ = closed_loop(&caller, ctx.concurrency, ctx.plan.warmup, false).await;
    let victim = replicas.remove(0);
    let kill_at = duration / 3;
    let killer = tokio::spawn(async move {
        let mut victim = victim;
        tokio::time::sleep(kill_at).await;
        victim.kill();
    });
    let sample = closed_loop(&caller, ctx.concurrency, duration, true).await;
    killer.await.map_err(|e| e.to_string())?;
    let kill_us = kill_at.as_micros() as u64;
    let recovery = recovery_ms(&sample.timeline, kill_us);
    let series = windows(&sample.timeline, PLOT_WINDOW_US)
        .iter()
        .filter_map(|(start, p99, _, _)| Some((*start as f64 / 1e6, (*p99)? as f64 / 1000.0)))
        .collect();
    Ok((sample, recovery, series))
}

/// Start, p99, whether any call failed, and the number of calls of each
/// `width` window of calls (placed by `start_us`).
fn windows(events: &[Event], width: u64) -> Vec<(u64, Option<u64>, bool, u64)> {
    let last = events.iter().map(|e| e.start_us).max().unwrap_or(0);
    let count = (last / width + 1) as usize;
    let mut hists: Vec<(Histogram<u64>, bool)> = (0..count).map(|_| (histogram(), false)).collect();
    for e in events {
        let w = &mut hists[(e.start_us / width) as usize];
        w.1 |= !e.ok;
        let _ = w.0.record(e.latency_us);
    }
    hists
        .iter()
        .enumerate()
        .map(|(i, (h, failed))| {
            let p99 = (!h.is_empty()).then(|| h.value_at_quantile(0.99));
            (i as u64 * width, p99, *failed, h.len())
        })
        .collect()
}

/// How long after `kill_us` the last abnormal judging window ended (0 when
/// none was): one with a failed call, or with a p99 above [`NORMAL_P99`]×
/// the p99 of the calls answered before the kill. Calls are placed by when
/// they ended, so the calls the kill cut off count after it; windows with
/// too few calls for a p99 (the last, partial one) are not judged.
fn recovery_ms(events: &[Event], kill_us: u64) -> f64 {
    const MIN_CALLS: u64 = 200;
    let end = |e: &Event| e.start_us + e.latency_us;
    let mut before = histogram();
    for e in events.iter().filter(|e| e.ok && end(e) < kill_us) {
        let _ = before.record(e.latency_us);
    }
    let normal = before.value_at_quantile(0.99) as f64 * NORMAL_P99;
    let after: Vec<Event> = events
        .iter()
        .filter(|e| end(e) >= kill_us)
        .map(|e| Event {
            start_us: end(e) - kill_us,
            ..*e
        })
        .collect();
    windows(&after, JUDGE_WINDOW_US)
        .iter()
        .filter(|(_, p99, failed, calls)| {
            *failed || (*calls >= MIN_CALLS && p99.is_some_and(|p| p as f64 > normal))
        })
        .map(|(start, _, _, _)| start + JUDGE_WINDOW_US)
        .max()
        .map_or(0.0, |us| us as f64 / 1000.0)
}
