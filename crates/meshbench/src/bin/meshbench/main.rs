//! `meshbench`: the mesh against raw tonic and against a two-HAProxy
//! sidecar path, side by side in one run.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/meshbench suite --quick          # about two minutes
//! target/release/meshbench suite --out bench-results --postgres-url postgres://...
//! ```
//!
//! Prints a table per scenario with its goals, and writes `results.json`,
//! `summary.md` and one SVG per scenario into the results folder. Method and
//! numbers: `docs/benchmarks.md`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

mod h2direct;
mod load;
mod pki;
mod procs;
mod report;
mod scenarios;

use load::Plan;
use scenarios::Ctx;

#[derive(Parser)]
#[command(
    name = "meshbench",
    about = "Benchmarks of the mesh against raw tonic and a sidecar path"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the scenarios (all by default), print tables, write results.
    Suite(SuiteArgs),
    /// One client process for the memory scenario (run by `suite`).
    #[command(hide = true)]
    MemoryClient {
        #[arg(long)]
        mode: String,
        /// Comma-separated endpoints of one target; repeat per target.
        #[arg(long = "target")]
        targets: Vec<String>,
    },
}

#[derive(clap::Args)]
struct SuiteArgs {
    /// Short rounds (about two minutes for everything).
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (repeatable): overhead, sidecar, streaming,
    /// slow-replica, failover, memory, shop.
    #[arg(long = "scenario", value_parser = clap::builder::PossibleValuesParser::new(scenarios::ALL))]
    scenarios: Vec<String>,
    /// Results folder (created; files in it are replaced).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Calls in flight at once in closed-loop scenarios.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Echo payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Measured time per round per contender (default 5s, --quick 1.5s).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Unmeasured warm-up per contender (default 2s, --quick 0.5s).
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Rounds; each runs every contender once, in turn (default 3, --quick 2).
    #[arg(long)]
    rounds: Option<usize>,
    /// Open-loop rate, calls per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Admin URL of a PostgreSQL server for the shop scenario (it creates
    /// fresh databases there); without it only SQLite is measured.
    #[arg(long, env = "MESH_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// An earlier run's results.json to print this run beside (now / then
    /// ratios); skipped when the file does not exist.
    #[arg(long, default_value = "docs/bench/results.json")]
    previous: PathBuf,
    /// Run only this contender (repeatable; its name as in the tables,
    /// e.g. `--only mesh`), to profile one path: the others measure
    /// nothing, so the run's ratios mean nothing.
    #[arg(long)]
    only: Vec<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| c.is_alphabetic()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 5s or 300ms"))?;
    let d = match unit {
        "s" => Duration::from_secs_f64(n),
        "ms" => Duration::from_secs_f64(n / 1000.0),
        _ => return Err(format!("{text:?}: use s or ms")),
    };
    if d > Duration::from_secs(300) {
        return Err("at most 300s per round".into());
    }
    Ok(d)
}

impl SuiteArgs {
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(1..=4000).contains(&self.concurrency) {
            problems.push("--concurrency: must be 1 to 4000".into());
        }
        if self.payload > 1024 * 1024 {
            problems.push("--payload: at most 1 MiB".into());
        }
        if !(1.0..=50_000.0).contains(&self.rate) {
            problems.push("--rate: must be 1 to 50000 calls/s".into());
        }
        if self.rounds == Some(0) || self.rounds > Some(20) {
            problems.push("--rounds: must be 1 to 20".into());
        }
        problems
    }

    fn ctx(&self, dir: PathBuf) -> Ctx {
        let (warmup, duration, rounds) = if self.quick {
            (0.5, 1.5, 2)
        } else {
            (2.0, 5.0, 3)
        };
        let plan = Plan {
            warmup: self.warmup.unwrap_or(Duration::from_secs_f64(warmup)),
            duration: self.duration.unwrap_or(Duration::from_secs_f64(duration)),
            rounds: self.rounds.unwrap_or(rounds),
        };
        // The open loop needs more calls per round for a stable p99.
        let open_plan = Plan {
            duration: plan.duration.mul_f64(if self.quick { 1.4 } else { 2.0 }),
            ..plan
        };
        Ctx {
            dir,
            plan,
            concurrency: self.concurrency,
            payload: self.payload,
            open_rate: self.rate,
            open_plan,
            failover_duration: plan.duration * 2,
            shop_concurrency: 8,
            postgres_url: self.postgres_url.clone().filter(|u| !u.is_empty()),
        }
    }
}

async fn suite(args: SuiteArgs) -> Result<bool, String> {
    load::run_only(args.only.clone());
    let chosen: Vec<&str> = scenarios::ALL
        .iter()
        .copied()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.iter().any(|c| c == s))
        .collect();
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("creating {}: {e}", args.out.display()))?;
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ctx = args.ctx(scratch.path().to_path_buf());
    let previous = report::Previous::load(&args.previous)?;
    if previous.is_none() {
        eprintln!(
            "meshbench: no earlier results at {}: nothing to compare with",
            args.previous.display()
        );
    }
    let started = Instant::now();
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for id in chosen {
        eprintln!("-- {id}");
        // Every scenario is bounded by its rounds; this is a backstop.
        let outcome = tokio::time::timeout(Duration::from_secs(900), run_one(&ctx, id)).await;
        match outcome {
            Ok(Ok(done)) => {
                for s in done {
                    report::print(&s, previous.as_ref());
                    report::plot(&s, &args.out)?;
                    results.push(s);
                }
            }
            Ok(Err(e)) => failures.push(format!("{id}: {e}")),
            Err(_) => failures.push(format!("{id}: did not finish in 900 s")),
        }
    }
    for f in &failures {
        eprintln!("meshbench: scenario failed: {f}");
    }
    let doc = serde_json::json!({
        "machine": machine(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "quick": args.quick,
        "seconds": started.elapsed().as_secs_f64(),
        "scenarios": results,
        "failed": failures,
        "previous": previous.as_ref().map(|p| serde_json::json!({"path": p.path, "command": p.command})),
    });
    write(
        &args.out.join("results.json"),
        &serde_json::to_string_pretty(&doc).expect("serializable"),
    )?;
    write(
        &args.out.join("summary.md"),
        &summary(&results, previous.as_ref()),
    )?;
    eprintln!(
        "\nmeshbench: {} scenarios in {:.0} s; results in {}",
        results.len(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(failures.is_empty())
}

async fn run_one(ctx: &Ctx, id: &str) -> Result<Vec<report::Scenario>, String> {
    Ok(match id {
        "overhead" => vec![scenarios::overhead::run(ctx).await?],
        "sidecar" => scenarios::sidecar::run(ctx).await?,
        "streaming" => vec![scenarios::streaming::run(ctx).await?],
        "slow-replica" => vec![scenarios::balance::run(ctx).await?],
        "failover" => vec![scenarios::failover::run(ctx).await?],
        "memory" => vec![scenarios::memory::run(ctx).await?],
        "shop" => vec![scenarios::shop::run(ctx).await?],
        other => return Err(format!("unknown scenario {other}")),
    })
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// What the numbers were measured on.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_owned();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let haproxy = procs::which("haproxy")
        .and_then(|h| std::process::Command::new(h).arg("-v").output().ok())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|| "not installed".into());
    serde_json::json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
        "memory": memory,
        "haproxy": haproxy,
        "envoy": procs::envoy_version().unwrap_or_else(|| "not installed".into()),
        "profile": if cfg!(debug_assertions) { "debug (numbers not meaningful)" } else { "release" },
    })
}

/// The tables as Markdown, for docs/benchmarks.md.
fn summary(results: &[report::Scenario], previous: Option<&report::Previous>) -> String {
    let mut md = String::new();
    for s in results {
        md += &format!("### {}\n\n{}\n\n", s.title, s.setup);
        let memory = s.rows.iter().all(|r| r.mode == "memory");
        if memory {
            md += "| contender | resident memory MiB |\n|---|---:|\n";
            for r in &s.rows {
                md += &format!(
                    "| {} | {:.1} |\n",
                    r.contender,
                    r.extra.get("rss_mib").copied().unwrap_or(0.0)
                );
            }
        } else {
            md += "| contender | mode | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | CPU µs/req |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
            for r in &s.rows {
                md += &format!("| {} | {} |\n", r.contender, r.cells().join(" | "));
            }
        }
        md += "\n";
        for g in &s.goals {
            let verdict = match g.met {
                Some(true) => " — **met**",
                Some(false) => " — **missed**",
                None => "",
            };
            let goal = if g.goal.is_empty() {
                String::new()
            } else {
                format!(" (goal {} {})", g.goal, g.unit)
            };
            let value = if g.value.is_nan() {
                "not measured".to_owned()
            } else {
                format!("{:.3}", g.value)
            };
            md += &format!(
                "- {}: **{value} {}**{goal}{verdict}{}\n",
                g.what,
                g.unit,
                report::previous_goal_text(s, g, previous)
            );
        }
        for n in &s.notes {
            md += &format!("- note: {n}\n");
        }
        if let Some(cpu) = report::cpu_table_md(s) {
            md += &format!("\n{cpu}\n![{} CPU by process]({}-cpu.svg)\n", s.title, s.id);
        }
        if let Some(p) = previous {
            md += &format!("\n{}", report::comparison_md(s, p));
        }
        md += &format!("\n![{}]({}.svg)\n\n", s.title, s.id);
        if s.timeline.is_some() {
            md += &format!("![{} over time]({}-timeline.svg)\n\n", s.title, s.id);
        }
    }
    md
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Suite(args) = &cli.command {
        let problems = args.problems();
        if !problems.is_empty() {
            for p in problems {
                eprintln!("meshbench: {p}");
            }
            return ExitCode::from(64);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Suite(args) => suite(args).await,
            Cmd::MemoryClient { mode, targets } => scenarios::memory::client(&mode, &targets)
                .await
                .map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meshbench: {e}");
            ExitCode::FAILURE
        }
    }
}
