//! `meshsim`: the fleet simulator and the scaling benchmarks
//! (`docs/scaling.md`; the model is described in `meshbench::sim`).
//!
//! - `meshsim fleet`: clients × servers under the paused clock, comparing
//!   round robin, P2C over every server and P2C over subsets, steady and
//!   with 5 % of the servers slow or dying.
//! - `meshsim bench`: pick cost against the endpoint count, memory per
//!   idle endpoint, the subset choice's evenness and churn, a 1,000-address
//!   update beside live calls.
//! - `meshsim client`: one client process of tests/subsetting.rs.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use mesh_client::{LbPolicy, SubsetMode};
use meshbench::{
    plot::{self, LineChart},
    sim::{self, Event, Fleet, Strategy, bench},
};

#[derive(Parser)]
#[command(
    name = "meshsim",
    about = "Fleet simulator and scaling benchmarks of the mesh client"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulates a fleet and compares balancing strategies.
    Fleet {
        /// Client processes.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Server replicas.
        #[arg(long, default_value_t = 1000)]
        servers: usize,
        /// Subset size of the subsetting strategies.
        #[arg(long, default_value_t = 16)]
        subset: usize,
        /// Simulated seconds per run (statistics from half of it).
        #[arg(long, default_value_t = 4)]
        seconds: u64,
        /// Calls each server serves at once.
        #[arg(long, default_value_t = 4)]
        capacity: usize,
        /// Which runs: any of steady, slow, dying.
        #[arg(long, value_delimiter = ',', default_value = "steady,slow,dying")]
        events: Vec<String>,
        /// Where results.json and the SVG plot go.
        #[arg(long, default_value = "docs/scaling")]
        out: PathBuf,
    },
    /// Measures pick cost, memory, subset churn and a large update.
    Bench {
        /// Measure only the memory per idle endpoint (in a fresh process:
        /// memory freed by the other measurements would hide the growth).
        #[arg(long)]
        memory_only: bool,
        /// A short run (a couple of minutes in a release build): pick cost
        /// at 10, 1,000 and 10,000 endpoints only, fewer calls, updates
        /// and subset trials. The ratio line is the same measurement.
        #[arg(long)]
        quick: bool,
        /// Measure only the pick cost (seconds), print it and write nothing.
        #[arg(long)]
        pick_only: bool,
        /// Measure only the client stack's cost per call without a network
        /// (the mesh's layers against tonic's bare client), print it and
        /// write nothing.
        #[arg(long)]
        stack_only: bool,
        /// Where bench.json and the SVG plot go.
        #[arg(long, default_value = "docs/scaling")]
        out: PathBuf,
    },
    /// One client of the real-process subsetting test.
    Client {
        /// The target (`static:///a,b,...`).
        #[arg(long)]
        target: String,
        /// The mesh config, JSON.
        #[arg(long)]
        config: String,
        /// Calls to make before reporting.
        #[arg(long, default_value_t = 800)]
        calls: usize,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Fleet {
            clients,
            servers,
            subset,
            seconds,
            capacity,
            events,
            out,
        } => fleet(clients, servers, subset, seconds, capacity, &events, &out),
        Command::Bench {
            out,
            memory_only,
            quick,
            pick_only,
            stack_only,
        } => {
            if stack_only {
                run_stack_bench(quick)
            } else {
                run_bench(&out, memory_only, quick, pick_only)
            }
        }
        Command::Client {
            target,
            config,
            calls,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(sim::client::run(&target, &config, calls))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshsim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fleet(
    clients: usize,
    servers: usize,
    subset: usize,
    seconds: u64,
    capacity: usize,
    which: &[String],
    out: &std::path::Path,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let strategies = [
        Strategy::RoundRobin,
        Strategy::P2c,
        Strategy::P2cSubset {
            size: subset,
            mode: SubsetMode::Rendezvous,
        },
        Strategy::P2cSubset {
            size: subset,
            mode: SubsetMode::Deterministic,
        },
    ];
    let at = Duration::from_secs(seconds) / 4;
    let events = [
        ("steady", Event::None),
        (
            "5% 10x slow",
            Event::Slow {
                share: 0.05,
                factor: 10.0,
                at,
            },
        ),
        ("5% dying", Event::Dying { share: 0.05, at }),
    ];
    let mut results = Vec::new();
    let mut load_series = Vec::new();
    println!(
        "{:<34} {:<12} {:>9} {:>8} {:>8} {:>9} {:>8} {:>9} {:>13} {:>13} {:>8} {:>9} {:>6}",
        "strategy",
        "event",
        "calls",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max/mean",
        "(poisson)",
        "conns/client",
        "conns/server",
        "hit %",
        "failed %",
        "wall s"
    );
    for (label, event) in events {
        let key = label.split(' ').next_back().unwrap_or(label);
        if !which
            .iter()
            .any(|w| w == key || (w == "steady" && label == "steady"))
        {
            continue;
        }
        for strategy in &strategies {
            let mut f = Fleet::new(clients, servers, strategy.clone());
            f.capacity = capacity;
            f.duration = Duration::from_secs(seconds);
            f.measure_from = match event {
                Event::None => Duration::from_secs(seconds) / 2,
                // Measure from a second after the event (reaction time is
                // reported apart).
                _ => at + Duration::from_secs(1),
            };
            f.event = event;
            let r = sim::run(&f);
            println!(
                "{:<34} {:<12} {:>9} {:>8.1} {:>8.1} {:>9.1} {:>8.3} {:>9.3} {:>6.1} ({:>4}) {:>6.1} ({:>4}) {:>8.2} {:>9.3} {:>6.1}",
                r.strategy,
                label,
                r.calls,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.load_max_mean,
                r.poisson_floor,
                r.conns_per_client.0,
                r.conns_per_client.1,
                r.conns_per_server.0,
                r.conns_per_server.1,
                r.hit_share * 100.0,
                r.measured_failed as f64 * 100.0 / r.measured_calls.max(1) as f64,
                r.wall_s,
            );
            if let Some(ms) = r.reaction_ms {
                println!(
                    "{:<34} {:<12} failures under 0.1 % per 100 ms from {ms} ms after the event",
                    "", ""
                );
            } else if matches!(event, Event::Dying { .. }) {
                println!(
                    "{:<34} {:<12} failures never settled under 0.1 % per 100 ms",
                    "", ""
                );
            }
            if matches!(event, Event::None) {
                let n = r.load_sorted.len().max(1) as f64;
                load_series.push(plot::Series {
                    name: r.strategy.clone(),
                    points: r
                        .load_sorted
                        .iter()
                        .enumerate()
                        .map(|(i, l)| (i as f64 * 100.0 / n, *l))
                        .collect(),
                });
            }
            let mut json = serde_json::to_value(&r).map_err(|e| e.to_string())?;
            json["event"] = label.into();
            json.as_object_mut().map(|o| o.remove("load_sorted"));
            results.push(json);
        }
    }
    let name = format!("fleet-{clients}x{servers}");
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let title =
        format!("Calls served per server ({clients} clients x {servers} servers, steady), sorted");
    plot::lines(
        &out.join(format!("{name}-load.svg")),
        &LineChart::new(
            &title,
            "servers, percent (least loaded first)",
            "load / mean",
        ),
        &load_series,
    )
}

/// Pick costs measured and summed up (see `bench::pick_summary`).
struct Picks {
    counts: Vec<usize>,
    rounds: usize,
    p2c: Vec<Vec<f64>>,
    p2c_marked: Vec<Vec<f64>>,
    rr: Vec<Vec<f64>>,
}

impl Picks {
    async fn measure(counts: &[usize], rounds: usize) -> Self {
        use bench::PickWork::{Pick, PickAndMark};
        Self {
            counts: counts.to_vec(),
            rounds,
            p2c: bench::pick_cost(counts, LbPolicy::P2c, Pick, 100_000, rounds).await,
            p2c_marked: bench::pick_cost(counts, LbPolicy::P2c, PickAndMark, 100_000, rounds).await,
            rr: bench::pick_cost(counts, LbPolicy::RoundRobin, Pick, 100_000, rounds).await,
        }
    }

    /// (count, median ns) pairs, for the plot and bench.json.
    fn medians(&self, samples: &[Vec<f64>]) -> Vec<(usize, f64)> {
        self.counts
            .iter()
            .copied()
            .zip(bench::pick_summary(samples, 0).into_iter().map(|s| s.0))
            .collect()
    }

    fn print(&self) {
        println!(
            "pick cost (ns per pick: median and best of {} rounds x 100,000, the counts taken in turn; ratio: median of each round's ratio to 10 endpoints; {} build):",
            self.rounds,
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
        println!(
            "{:>10} {:>22} {:>22} {:>22}",
            "endpoints", "p2c med/best/ratio", "p2c+mark med/ratio", "round robin med/ratio"
        );
        let (p, m, r) = (
            bench::pick_summary(&self.p2c, 0),
            bench::pick_summary(&self.p2c_marked, 0),
            bench::pick_summary(&self.rr, 0),
        );
        for (i, n) in self.counts.iter().enumerate() {
            println!(
                "{n:>10} {:>8.1} {:>6.1} {:>5.2}x {:>14.1} {:>5.2}x {:>14.1} {:>5.2}x",
                p[i].0, p[i].1, p[i].2, m[i].0, m[i].2, r[i].0, r[i].2
            );
        }
        let Some(at) = self.counts.iter().position(|n| *n == 10_000) else {
            return;
        };
        let rounds: Vec<String> = self
            .p2c
            .iter()
            .map(|row| format!("{:.2}", row[at] / row[0]))
            .collect();
        println!("p2c at 10,000 / at 10, each round: {}", rounds.join(" "));
        println!(
            "p2c pick at 10,000 / at 10: {:.2}x   (pick and mark {:.2}x, round robin {:.2}x)   goal <= 1.2x: {}",
            p[at].2,
            m[at].2,
            r[at].2,
            if p[at].2 <= 1.2 { "met" } else { "NOT met" }
        );
    }
}

/// `meshsim bench --stack-only`: the client stack's cost per call.
fn run_stack_bench(quick: bool) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (calls, rounds) = if quick { (20_000, 5) } else { (100_000, 9) };
    let cost = rt.block_on(bench::stack_cost(calls, rounds));
    let (mesh, bare) = (bench::median(&cost.mesh), bench::median(&cost.bare));
    println!(
        "client stack, unary Echo answered at once (ns per call: median of {rounds} rounds x {calls}, the clients in turn; {} build):",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  mesh channel {mesh:.0} (best {:.0}), tonic's bare client {bare:.0} (best {:.0}): the mesh's layers {:.0} ns a call, {:.2}x",
        cost.mesh.iter().copied().fold(f64::MAX, f64::min),
        cost.bare.iter().copied().fold(f64::MAX, f64::min),
        mesh - bare,
        mesh / bare
    );
    Ok(())
}

fn run_bench(
    out: &std::path::Path,
    memory_only: bool,
    quick: bool,
    pick_only: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    if memory_only {
        let (full, subset) = rt.block_on(bench::bytes_per_idle_endpoint(10_000));
        println!(
            "resident bytes per idle endpoint (10,000, health checks off): full set {full:.0}, subset 16 (per resolved address) {subset:.0}"
        );
        return Ok(());
    }
    let counts: &[usize] = if quick {
        &[10, 1_000, 10_000]
    } else {
        &[10, 100, 1_000, 10_000, 100_000]
    };
    let (rounds, calls_n, batches) = if quick {
        (7, 5_000, 5)
    } else {
        (9, 20_000, 20)
    };
    if pick_only {
        rt.block_on(Picks::measure(counts, rounds)).print();
        return Ok(());
    }
    let (picks, calls, memory, update) = rt.block_on(async {
        let picks = Picks::measure(counts, rounds).await;
        let calls = bench::call_cost(&[10, 10_000], calls_n, 3).await;
        let memory = bench::bytes_per_idle_endpoint(10_000).await;
        let update = bench::update_beside_calls(batches).await;
        (picks, calls, memory, update)
    });
    picks.print();
    let (p2c, rr) = (picks.medians(&picks.p2c), picks.medians(&picks.rr));
    println!(
        "whole call through the stack (ns): 10 endpoints {:.0}, 10,000 endpoints {:.0} ({:.2}x)",
        calls[0].1,
        calls[1].1,
        calls[1].1 / calls[0].1
    );
    println!(
        "resident bytes per idle endpoint (10,000, health checks off): full set {:.0}, subset 16 (per resolved address) {:.0}",
        memory.0, memory.1
    );
    println!(
        "1,000 addresses swapped per update (2,000 changes) beside calls: apply p50 {:.1} ms, max {:.1} ms; call latency quiet p50/p99/max {:?} us, during updates {:?} us ({} calls)",
        update.apply_ms_p50,
        update.apply_ms_max,
        update.quiet_us,
        update.busy_us,
        update.calls_during_updates
    );
    let removals = if quick { 10 } else { 100 };
    let choice = bench::subset_choice(1000, 1000, 16, if quick { 2 } else { 10 }, removals);
    for c in &choice {
        println!(
            "subset {:<13} 1,000 x 1,000, size 16: clients per server max/mean {:.3}, min {}; moved on one removal {:.3} % (worst {:.3} %), on one addition {:.3} % (worst {:.3} %), mean over {removals} removals {:.3} %",
            c.mode,
            c.conns_max_mean,
            c.conns_min,
            c.moved_on_remove.0 * 100.0,
            c.moved_on_remove.1 * 100.0,
            c.moved_on_add.0 * 100.0,
            c.moved_on_add.1 * 100.0,
            c.moved_over_100_removals * 100.0,
        );
    }
    let json = serde_json::json!({
        "pick_ns_p2c": p2c, "pick_ns_round_robin": rr, "call_ns": calls,
        "bytes_per_idle_endpoint": {"full": memory.0, "subset16": memory.1},
        "update": update, "subset_choice": choice,
    });
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let series = |name: &str, v: &[(usize, f64)]| plot::Series {
        name: name.into(),
        points: v.iter().map(|(n, ns)| (*n as f64, *ns)).collect(),
    };
    plot::lines(
        &out.join("pick-cost.svg"),
        &LineChart {
            log_x: true,
            ..LineChart::new(
                "Balancer pick cost against endpoint count",
                "endpoints (log)",
                "ns per pick",
            )
        },
        &[series("P2C", &p2c), series("round robin", &rr)],
    )
}
