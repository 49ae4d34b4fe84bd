//! Results: the table on stdout, `results.json`, and one SVG per scenario.

use std::{collections::BTreeMap, path::Path};

use plotters::prelude::*;
use serde::Serialize;

/// One contender's measurements in one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Who was measured.
    pub contender: String,
    /// `closed` (fixed concurrency), `open` (fixed rate) or `memory`.
    pub mode: String,
    /// Successful calls per second.
    pub rps: f64,
    /// Successful calls.
    pub calls: u64,
    /// Failed calls.
    pub errors: u64,
    /// Latency percentiles and maximum of successful calls, µs.
    pub p50_us: u64,
    /// p90, µs.
    pub p90_us: u64,
    /// p99, µs.
    pub p99_us: u64,
    /// p99.9, µs.
    pub p999_us: u64,
    /// Slowest successful call, µs.
    pub max_us: u64,
    /// CPU seconds per process that did this contender's work.
    pub cpu_s: BTreeMap<String, f64>,
    /// All those CPU seconds over the successful calls, in µs.
    pub cpu_us_per_call: f64,
    /// The first few distinct errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_examples: Vec<String>,
    /// Scenario-specific numbers (RSS, recovery time, share of calls ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

impl Row {
    /// The latency table's columns after the contender's name, as text:
    /// mode, req/s, p50, p90, p99, p99.9, errors, CPU µs/req.
    pub fn cells(&self) -> [String; 8] {
        [
            self.mode.clone(),
            format!("{:.0}", self.rps),
            self.p50_us.to_string(),
            self.p90_us.to_string(),
            self.p99_us.to_string(),
            self.p999_us.to_string(),
            self.errors.to_string(),
            self.cpu_text(),
        ]
    }

    /// CPU µs per call, or `-` where no process's CPU was tracked.
    pub fn cpu_text(&self) -> String {
        if self.cpu_s.is_empty() {
            "-".into()
        } else {
            format!("{:.1}", self.cpu_us_per_call)
        }
    }
}

/// A measured ratio or difference and the goal it is held to.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// What is compared.
    pub what: String,
    /// The measured value.
    pub value: f64,
    /// `×` for ratios, `µs`, `MiB`, `calls`, `ms`.
    pub unit: String,
    /// The goal in words (`≥ 0.97`), empty when only reported.
    pub goal: String,
    /// Whether the goal holds; `None` when only reported.
    pub met: Option<bool>,
}

impl Goal {
    /// A goal met when `value` ≥ `goal`.
    pub fn at_least(what: &str, value: f64, unit: &str, goal: f64) -> Goal {
        Goal {
            what: what.into(),
            value,
            unit: unit.into(),
            goal: format!("≥ {goal}"),
            met: (!value.is_nan()).then_some(value >= goal),
        }
    }

    /// A goal met when `value` ≤ `goal`.
    pub fn at_most(what: &str, value: f64, unit: &str, goal: f64) -> Goal {
        Goal {
            what: what.into(),
            value,
            unit: unit.into(),
            goal: format!("≤ {goal}"),
            met: (!value.is_nan()).then_some(value <= goal),
        }
    }

    /// A number reported without a goal.
    pub fn report(what: &str, value: f64, unit: &str) -> Goal {
        Goal {
            what: what.into(),
            value,
            unit: unit.into(),
            goal: String::new(),
            met: None,
        }
    }
}

/// One scenario's results.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    /// Short name, also the SVG's file name.
    pub id: String,
    /// Heading of its table and plot.
    pub title: String,
    /// Load, payload, processes: what a reader needs to reproduce it.
    pub setup: String,
    /// One row per contender.
    pub rows: Vec<Row>,
    /// Ratios and the goals they are held to.
    pub goals: Vec<Goal>,
    /// What a reader should know about the numbers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// A measurement over time, plotted as lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Timeline>,
}

/// Lines over time: one per contender.
#[derive(Clone, Debug, Serialize)]
pub struct Timeline {
    /// Heading of the plot.
    pub title: String,
    /// X axis label.
    pub x: String,
    /// Y axis label.
    pub y: String,
    /// One line per contender.
    pub series: Vec<Series>,
}

/// One contender's line (the chart module's, shared with `meshsim`).
pub use meshbench::plot::Series;
use meshbench::plot::{LineChart, PALETTE, SeriesLabelPosition};

/// `a / b` for ratios of measurements; NaN ("not measured") when `b`
/// measured nothing (its contender did not run, as under `--only`).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// The numbers of an earlier run (its `results.json`), printed beside this
/// run's so a change shows as a ratio.
pub struct Previous {
    /// Where they came from.
    pub path: String,
    /// The command of that run.
    pub command: String,
    /// (scenario, contender, mode) → (req/s, p99 µs, CPU µs per call).
    rows: BTreeMap<(String, String, String), (f64, f64, f64)>,
    /// (scenario, goal) → value.
    goals: BTreeMap<(String, String), f64>,
}

impl Previous {
    /// Reads `path`; `Ok(None)` when there is no such file.
    pub fn load(path: &Path) -> Result<Option<Previous>, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a results.json: {e}", path.display()))?;
        let mut previous = Previous {
            path: path.display().to_string(),
            command: doc["command"].as_str().unwrap_or("").to_owned(),
            rows: BTreeMap::new(),
            goals: BTreeMap::new(),
        };
        let text_of = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
        let number = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        for s in doc["scenarios"].as_array().into_iter().flatten() {
            let id = text_of(&s["id"]);
            for r in s["rows"].as_array().into_iter().flatten() {
                previous.rows.insert(
                    (id.clone(), text_of(&r["contender"]), text_of(&r["mode"])),
                    (
                        number(&r["rps"]),
                        number(&r["p99_us"]),
                        number(&r["cpu_us_per_call"]),
                    ),
                );
            }
            for g in s["goals"].as_array().into_iter().flatten() {
                previous
                    .goals
                    .insert((id.clone(), text_of(&g["what"])), number(&g["value"]));
            }
        }
        Ok(Some(previous))
    }

    fn row(&self, scenario: &str, r: &Row) -> Option<(f64, f64, f64)> {
        self.rows
            .get(&(scenario.into(), r.contender.clone(), r.mode.clone()))
            .copied()
    }

    /// A goal's earlier value; goals about "HAProxy sidecars" were named
    /// "sidecars" before the Envoy pair joined.
    fn goal(&self, scenario: &str, what: &str) -> Option<f64> {
        let key = |w: &str| (scenario.to_owned(), w.to_owned());
        self.goals
            .get(&key(what))
            .or_else(|| {
                self.goals
                    .get(&key(&what.replace("HAProxy sidecars", "sidecars")))
            })
            .copied()
    }
}

/// `now / before` as text, `-` without a usable earlier number.
fn change(now: f64, before: Option<f64>) -> String {
    match before {
        Some(b) if b.abs() > 1e-9 => format!("{:.2}×", now / b),
        _ => "-".into(),
    }
}

/// CPU µs per call of each process on a row's path.
fn cpu_per_process(r: &Row) -> Vec<(String, f64)> {
    r.cpu_s
        .iter()
        .map(|(label, s)| (label.clone(), s * 1e6 / r.calls.max(1) as f64))
        .collect()
}

/// The process columns of a CPU table: every label of any row, the client
/// and server first, `None` when no row has more than those two (a CPU
/// table would repeat the main table).
fn cpu_columns(s: &Scenario) -> Option<Vec<String>> {
    let mut labels: Vec<String> = Vec::new();
    for r in &s.rows {
        for label in r.cpu_s.keys() {
            if !labels.contains(label) {
                labels.push(label.clone());
            }
        }
    }
    if labels.len() <= 2 {
        return None;
    }
    let rank = |l: &String| match l.as_str() {
        "client" => 0,
        "server" => 1,
        _ => 2,
    };
    labels.sort_by_key(rank);
    Some(labels)
}

/// The CPU per request of every process on each contender's path, as a
/// Markdown table (for scenarios with proxies on the path).
pub fn cpu_table_md(s: &Scenario) -> Option<String> {
    let columns = cpu_columns(s)?;
    let mut md = format!(
        "CPU µs per request by process:\n\n| path | {} | total |\n|---|{}---:|\n",
        columns.join(" | "),
        "---:|".repeat(columns.len())
    );
    for r in &s.rows {
        let per: BTreeMap<_, _> = cpu_per_process(r).into_iter().collect();
        let cells: Vec<String> = columns
            .iter()
            .map(|c| per.get(c).map_or("–".into(), |v| format!("{v:.1}")))
            .collect();
        md += &format!(
            "| {} | {} | **{:.1}** |\n",
            r.contender,
            cells.join(" | "),
            r.cpu_us_per_call
        );
    }
    Some(md)
}

/// This run beside an earlier one, as Markdown lines under a scenario.
pub fn comparison_md(s: &Scenario, previous: &Previous) -> String {
    let mut md = format!(
        "Against the previous run (`{}`), now / then:\n\n| contender | mode | req/s | p99 | CPU/req |\n|---|---|---:|---:|---:|\n",
        previous.path
    );
    for r in &s.rows {
        let before = previous.row(&s.id, r);
        md += &format!(
            "| {} | {} | {} | {} | {} |\n",
            r.contender,
            r.mode,
            change(r.rps, before.map(|b| b.0)),
            change(r.p99_us as f64, before.map(|b| b.1)),
            change(r.cpu_us_per_call, before.map(|b| b.2)),
        );
    }
    md
}

/// A goal's earlier value as text for a goal line, empty without one.
pub fn previous_goal_text(s: &Scenario, g: &Goal, previous: Option<&Previous>) -> String {
    previous
        .and_then(|p| p.goal(&s.id, &g.what))
        .map(|v| format!("; previous run {} {}", trim(v), g.unit))
        .unwrap_or_default()
}

/// Prints a scenario as a table with its goals, and beside the numbers of
/// `previous` where given.
pub fn print(s: &Scenario, previous: Option<&Previous>) {
    println!("\n== {} ({})\n   {}", s.title, s.id, s.setup);
    let latency = s.rows.iter().any(|r| r.mode != "memory");
    if latency {
        println!(
            "   {:<34} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6} {:>10}",
            "contender",
            "mode",
            "req/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "errors",
            "CPU µs/req"
        );
    }
    for r in &s.rows {
        if r.mode != "memory" {
            let [mode, rps, p50, p90, p99, p999, errors, cpu] = r.cells();
            println!(
                "   {:<34} {mode:>5} {rps:>9} {p50:>8} {p90:>8} {p99:>8} {p999:>8} {errors:>6} {cpu:>10}",
                r.contender
            );
        }
        let extra: Vec<String> = r
            .extra
            .iter()
            .map(|(k, v)| format!("{k} = {}", trim(*v)))
            .collect();
        if !extra.is_empty() {
            println!("   {:<34} {}", r.contender, extra.join(", "));
        }
        for e in &r.error_examples {
            println!("   {:<34} error: {e}", "");
        }
    }
    for g in &s.goals {
        let verdict = match g.met {
            Some(true) => "  met",
            Some(false) => "  MISSED",
            None => "",
        };
        let goal = if g.goal.is_empty() {
            String::new()
        } else {
            format!(" (goal {})", g.goal)
        };
        println!(
            "   -> {}: {} {}{goal}{verdict}{}",
            g.what,
            trim(g.value),
            g.unit,
            previous_goal_text(s, g, previous)
        );
    }
    for n in &s.notes {
        println!("   note: {n}");
    }
    if let Some(columns) = cpu_columns(s) {
        println!("   CPU µs/req by process: {}", columns.join(", "));
        for r in &s.rows {
            let per: BTreeMap<_, _> = cpu_per_process(r).into_iter().collect();
            let cells: Vec<String> = columns
                .iter()
                .map(|c| per.get(c).map_or("-".into(), |v| format!("{v:.1}")))
                .collect();
            println!("   {:<34} {}", r.contender, cells.join("  "));
        }
    }
    if let Some(p) = previous {
        println!("   vs {} (now / then): req/s, p99, CPU/req", p.path);
        for r in &s.rows {
            let before = p.row(&s.id, r);
            println!(
                "   {:<34} {:>5} {:>8} {:>8} {:>8}",
                r.contender,
                r.mode,
                change(r.rps, before.map(|b| b.0)),
                change(r.p99_us as f64, before.map(|b| b.1)),
                change(r.cpu_us_per_call, before.map(|b| b.2)),
            );
        }
    }
}

fn trim(v: f64) -> String {
    if v.is_nan() {
        "not measured".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Writes `<dir>/<id>.svg`: throughput (or memory) bars beside latency
/// percentiles on a log scale.
pub fn plot(s: &Scenario, dir: &Path) -> Result<(), String> {
    let path = dir.join(format!("{}.svg", s.id));
    let names: Vec<String> = s.rows.iter().map(|r| short(&r.contender)).collect();
    let memory = s.rows.iter().all(|r| r.mode == "memory");
    let width = if memory { 480 } else { 1100 };
    let root = SVGBackend::new(&path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(&s.title, ("sans-serif", 18))
        .map_err(|e| e.to_string())?;
    if memory {
        let rss: Vec<f64> = s
            .rows
            .iter()
            .map(|r| r.extra.get("rss_mib").copied().unwrap_or(0.0))
            .collect();
        bar_chart(&root, "resident memory, MiB", &names, &rss)?;
    } else {
        let (left, right) = root.split_horizontally(400);
        let rps: Vec<f64> = s.rows.iter().map(|r| r.rps).collect();
        // The streaming scenario counts messages, not calls.
        let label = if s.id == "streaming" {
            "messages per second"
        } else {
            "requests per second"
        };
        bar_chart(&left, label, &names, &rps)?;
        percentile_chart(&right, &names, &s.rows)?;
    }
    root.present().map_err(|e| e.to_string())?;
    if let Some(columns) = cpu_columns(s) {
        plot_cpu(s, &columns, &dir.join(format!("{}-cpu.svg", s.id)))?;
    }
    if let Some(timeline) = &s.timeline {
        plot_timeline(timeline, &dir.join(format!("{}-timeline.svg", s.id)))?;
    }
    Ok(())
}

fn plot_timeline(t: &Timeline, path: &Path) -> Result<(), String> {
    let chart = LineChart {
        size: (1100, 380),
        legend: SeriesLabelPosition::UpperRight,
        ..LineChart::new(&t.title, &t.x, &t.y)
    };
    meshbench::plot::lines(path, &chart, &t.series)
}

/// Stacked bars: each contender's CPU µs per request, one band per process.
fn plot_cpu(s: &Scenario, columns: &[String], path: &Path) -> Result<(), String> {
    let names: Vec<String> = s.rows.iter().map(|r| short(&r.contender)).collect();
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let top = s.rows.iter().map(|r| r.cpu_us_per_call).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: CPU per request by process", s.title),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..names.len() as f64, 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len() * 2 + 1)
        .x_label_formatter(&|x| label_at(&names, *x))
        .y_desc("CPU µs per request (all processes on the path)")
        .draw()
        .map_err(|e| e.to_string())?;
    let per: Vec<BTreeMap<String, f64>> = s
        .rows
        .iter()
        .map(|r| cpu_per_process(r).into_iter().collect())
        .collect();
    for (c, column) in columns.iter().enumerate() {
        let color = PALETTE[c % 6];
        let bars = per.iter().enumerate().filter_map(|(i, p)| {
            let below: f64 = columns[..c].iter().filter_map(|l| p.get(l)).sum();
            let v = *p.get(column)?;
            let x = i as f64;
            Some(Rectangle::new(
                [(x + 0.2, below), (x + 0.8, below + v)],
                color.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(|e| e.to_string())?
            .label(column.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .draw_series(s.rows.iter().enumerate().map(|(i, r)| {
            Text::new(
                format!("{:.1}", r.cpu_us_per_call),
                (i as f64 + 0.35, r.cpu_us_per_call + top * 0.02),
                ("sans-serif", 13),
            )
        }))
        .map_err(|e| e.to_string())?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Keeps axis labels short: the part before any parenthesis.
fn short(name: &str) -> String {
    name.split(" (").next().unwrap_or(name).to_owned()
}

fn bar_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    label: &str,
    names: &[String],
    values: &[f64],
) -> Result<(), String> {
    let top = values.iter().cloned().fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..names.len() as f64, 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len() * 2 + 1)
        .x_label_formatter(&|x| label_at(names, *x))
        .y_desc(label)
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            let x = i as f64;
            Rectangle::new([(x + 0.15, 0.0), (x + 0.85, *v)], PALETTE[i % 6].filled())
        }))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            Text::new(
                trim(*v),
                (i as f64 + 0.3, *v + top * 0.02),
                ("sans-serif", 13),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The name of the bar centred at `x`, blank between bars.
fn label_at(names: &[String], x: f64) -> String {
    let i = x.floor() as usize;
    if (x - x.floor() - 0.5).abs() < 0.01 {
        names.get(i).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

fn percentile_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    names: &[String],
    rows: &[super::report::Row],
) -> Result<(), String> {
    const QUANTILES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];
    let values: Vec<[f64; 4]> = rows
        .iter()
        .map(|r| {
            [r.p50_us, r.p90_us, r.p99_us, r.p999_us].map(|v| (v.max(1) as f64) / 1000.0) // ms
        })
        .collect();
    let top = values.iter().flatten().cloned().fold(0.01, f64::max) * 2.0;
    let bottom = values.iter().flatten().cloned().fold(f64::MAX, f64::min) / 2.0;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..4.0, (bottom..top).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(9)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                QUANTILES.get(i).map(|q| q.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("latency, ms (log scale)")
        .draw()
        .map_err(|e| e.to_string())?;
    let width = 0.8 / names.len().max(1) as f64;
    for (c, (name, v)) in names.iter().zip(&values).enumerate() {
        let color = PALETTE[c % 6];
        chart
            .draw_series((0..4).map(|q| {
                let x0 = q as f64 + 0.1 + c as f64 * width;
                Rectangle::new([(x0, bottom), (x0 + width * 0.9, v[q])], color.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_over_a_contender_that_did_not_run_is_not_measured_and_neither_met_nor_missed() {
        assert_eq!(ratio(3.0, 2.0), 1.5);
        let missing = ratio(20_733.0, 0.0);
        assert!(missing.is_nan());
        assert_eq!(Goal::at_least("x", missing, "×", 0.97).met, None);
        assert_eq!(Goal::at_most("x", missing, "×", 1.05).met, None);
        assert_eq!(Goal::at_least("x", 0.5, "×", 0.97).met, Some(false));
        assert_eq!(trim(missing), "not measured");
    }
}
