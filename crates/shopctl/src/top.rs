//! `shopctl top`: a live view of the shop's golden metrics, like `linkerd
//! viz stat`, scraped from every process's admin port.
//!
//! Per service (its inbound calls from every caller) and per edge (caller →
//! callee, from the caller's outbound calls): request rate, success rate
//! (gRPC `OK` over all responses) and p50/p95/p99 latency, over the window
//! between two scrapes. Health checks and reflection are left out. With
//! the endpoints file of `shopctl up`, every replica is scraped and the
//! supervisor's `status.json` beside it adds a line per process: its pid,
//! state and how often it was restarted.

use std::{
    collections::{BTreeMap, HashMap},
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct TopArgs {
    /// The `endpoints.json` written by `shopctl up`; every admin address in
    /// it is scraped.
    #[arg(long, default_value = ".shop/endpoints.json")]
    endpoints: PathBuf,
    /// Admin addresses (host:port) to scrape instead of the endpoints file;
    /// repeat for each process.
    #[arg(long = "admin", value_name = "ADDR")]
    admin: Vec<SocketAddr>,
    /// Seconds between scrapes; rates are over this window.
    #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
    interval: f64,
    /// Print one snapshot (two scrapes, one interval apart) and exit.
    #[arg(long)]
    once: bool,
    /// Print snapshots as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("not a number: {s}"))?;
    if (0.2..=300.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be 0.2 to 300 seconds".into())
    }
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let targets = if args.admin.is_empty() {
        from_endpoints(&args.endpoints)?
    } else {
        args.admin.clone()
    };
    // The supervisor's view, when the shop is one `shopctl up` runs.
    let status_path = args
        .admin
        .is_empty()
        .then(|| args.endpoints.with_file_name("status.json"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let interval = Duration::from_secs_f64(args.interval);
        let mut previous = scrape_all(&targets).await;
        let mut taken = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            let current = scrape_all(&targets).await;
            let now = Instant::now();
            let mut view = View::between(&previous, &current, (now - taken).as_secs_f64());
            view.processes = status_path.as_deref().map(read_status).unwrap_or_default();
            let mut out = std::io::stdout().lock();
            if args.json {
                writeln!(out, "{}", serde_json::to_string(&view)?)?;
            } else {
                if !args.once && out.is_terminal() {
                    // Clear the screen and home the cursor, like top(1).
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                view.print_table(&mut out)?;
            }
            out.flush()?;
            if args.once {
                return Ok(());
            }
            previous = current;
            taken = now;
        }
    })
}

#[derive(serde::Deserialize)]
struct EndpointsFile {
    services: BTreeMap<String, EndpointEntry>,
}

#[derive(serde::Deserialize)]
struct EndpointEntry {
    admin: Option<String>,
    /// Every replica (files from before replicas list only `admin`).
    #[serde(default)]
    replicas: Vec<ReplicaEntry>,
}

#[derive(serde::Deserialize)]
struct ReplicaEntry {
    admin: String,
}

pub(crate) fn from_endpoints(path: &PathBuf) -> anyhow::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (start the shop with `shopctl up`, or pass --admin ADDR)",
            path.display()
        )
    })?;
    let file: EndpointsFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut addrs = Vec::new();
    for (name, entry) in file.services {
        let admins: Vec<String> = if entry.replicas.is_empty() {
            entry.admin.into_iter().collect()
        } else {
            entry.replicas.into_iter().map(|r| r.admin).collect()
        };
        for admin in admins {
            addrs.push(
                admin
                    .parse()
                    .with_context(|| format!("{name}'s admin address {admin:?}"))?,
            );
        }
    }
    if addrs.is_empty() {
        bail!("{} lists no admin addresses", path.display());
    }
    Ok(addrs)
}

/// One scrape of one process: `None` if it could not be reached.
pub(crate) type Scrape = (SocketAddr, Option<Vec<Sample>>);

pub(crate) async fn scrape_all(targets: &[SocketAddr]) -> Vec<Scrape> {
    let scrapes = targets.iter().map(|addr| async move {
        let samples = tokio::time::timeout(SCRAPE_TIMEOUT, fetch_metrics(*addr))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|text| parse(&text));
        (*addr, samples)
    });
    futures::future::join_all(scrapes).await
}

async fn fetch_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::get("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        bail!("{addr}/metrics answered {}", response.status());
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// One sample line of the text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub(crate) fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Parses the sample lines of the Prometheus/OpenMetrics text format
/// (comments and malformed lines are skipped). Written here because the
/// view reads only the mesh's own output, whose shape is known; the tests
/// check that output with the reference Python parser.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let space = line.find(' ')?;
    let (name, labels, rest) = match line.find('{') {
        Some(brace) if brace < space => {
            let (labels, rest) = parse_labels(&line[brace + 1..])?;
            (&line[..brace], labels, rest)
        }
        _ => (&line[..space], BTreeMap::new(), &line[space..]),
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y"}rest` → the labels and `rest`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    value.push(if escaped == 'n' { '\n' } else { escaped });
                }
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

mod split;

/// What is measured for one service or edge, summed over its series.
#[derive(Clone, Debug, Default)]
struct Totals {
    responses: f64,
    ok: f64,
    /// Cumulative counts by upper bound (`le`), in seconds.
    buckets: BTreeMap<OrderedF64, f64>,
}

/// A bucket bound as a map key (bounds are never NaN).
#[derive(Clone, Copy, Debug, PartialEq)]
struct OrderedF64(f64);

impl Eq for OrderedF64 {}

impl PartialOrd for OrderedF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    Service(String),
    Edge(String, String),
    /// A routed edge's calls to one backend (see [`split`]).
    Split(split::SplitKey),
}

/// The totals of one process's scrape, by service and edge.
fn totals(samples: &[Sample]) -> HashMap<Key, Totals> {
    let me = samples
        .iter()
        .find(|s| s.name == "mesh_process_info")
        .map(|s| s.label("service").to_owned())
        .unwrap_or_else(|| "?".into());
    let mut out: HashMap<Key, Totals> = HashMap::new();
    for s in samples {
        if s.label("rpc_service").starts_with("grpc.") {
            continue;
        }
        let key = match s.label("direction") {
            "inbound" => Key::Service(me.clone()),
            "outbound" => Key::Edge(me.clone(), s.label("peer").to_owned()),
            _ => continue,
        };
        for key in std::iter::once(key).chain(split::key(&me, s)) {
            match s.name.as_str() {
                "mesh_responses_total" => {
                    let t = out.entry(key).or_default();
                    t.responses += s.value;
                    if s.label("grpc_code") == "OK" {
                        t.ok += s.value;
                    }
                }
                "mesh_response_latency_seconds_bucket" => {
                    let le = match s.label("le") {
                        "+Inf" => f64::INFINITY,
                        le => match le.parse() {
                            Ok(le) => le,
                            Err(_) => continue,
                        },
                    };
                    *out.entry(key)
                        .or_default()
                        .buckets
                        .entry(OrderedF64(le))
                        .or_default() += s.value;
                }
                _ => {}
            }
        }
    }
    out
}

/// Counter increase between two readings; a smaller reading means the
/// process restarted, so everything it counted since is new.
fn increase(before: f64, after: f64) -> f64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

impl Totals {
    fn minus(&self, before: Option<&Totals>) -> Totals {
        let Some(before) = before else {
            return self.clone();
        };
        Totals {
            responses: increase(before.responses, self.responses),
            ok: increase(before.ok, self.ok),
            buckets: self
                .buckets
                .iter()
                .map(|(le, v)| {
                    (
                        *le,
                        increase(before.buckets.get(le).copied().unwrap_or(0.0), *v),
                    )
                })
                .collect(),
        }
    }

    fn add(&mut self, other: &Totals) {
        self.responses += other.responses;
        self.ok += other.ok;
        for (le, v) in &other.buckets {
            *self.buckets.entry(*le).or_default() += v;
        }
    }

    /// The `q` quantile in seconds, interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.values().copied().fold(0.0, f64::max);
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = 0.0;
        let mut below = 0.0;
        for (le, count) in &self.buckets {
            if *count >= rank {
                if le.0.is_infinite() {
                    return Some(lower);
                }
                let share = if count - below > 0.0 {
                    (rank - below) / (count - below)
                } else {
                    1.0
                };
                return Some(lower + (le.0 - lower) * share);
            }
            lower = le.0;
            below = *count;
        }
        Some(lower)
    }
}

/// One row of the view.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of responses that were `OK` (0 to 1); null without responses.
    pub success_rate: Option<f64>,
    /// Latency percentiles in milliseconds; null without responses.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Responses counted in the window.
    pub responses: f64,
}

#[derive(Debug, Serialize)]
struct ServiceRow {
    service: String,
    #[serde(flatten)]
    row: Row,
}

#[derive(Debug, Serialize)]
struct EdgeRow {
    from: String,
    to: String,
    #[serde(flatten)]
    row: Row,
}

/// One snapshot: rates over the window between two scrapes.
#[derive(Debug, Serialize)]
pub(crate) struct View {
    window_seconds: f64,
    services: Vec<ServiceRow>,
    edges: Vec<EdgeRow>,
    /// Routed edges: each backend's share of its route's calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    splits: Vec<split::SplitRow>,
    /// Admin addresses that did not answer.
    unreachable: Vec<String>,
    /// Admin addresses that answered now but not at the window's start.
    warming_up: Vec<String>,
    /// Every process `shopctl up` supervises, from its `status.json`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) processes: Vec<crate::ProcessStatus>,
}

/// The processes in `shopctl up`'s status file; none if it is missing or
/// unreadable (the view is still useful without them).
pub(crate) fn read_status(path: &std::path::Path) -> Vec<crate::ProcessStatus> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<crate::Status>(&text).ok())
        .map(|status| status.processes)
        .unwrap_or_default()
}

impl View {
    pub(crate) fn between(before: &[Scrape], after: &[Scrape], window: f64) -> View {
        let mut sums: BTreeMap<Key, Totals> = BTreeMap::new();
        let mut unreachable = Vec::new();
        let mut warming_up = Vec::new();
        for (addr, samples) in after {
            let Some(samples) = samples else {
                unreachable.push(addr.to_string());
                continue;
            };
            let now = totals(samples);
            // Without a reading at the start of the window (the process was
            // unreachable then) its rate over the window is unknown: skip it.
            let Some(then) = before
                .iter()
                .find(|(a, _)| a == addr)
                .and_then(|(_, s)| s.as_ref())
                .map(|s| totals(s))
            else {
                warming_up.push(addr.to_string());
                continue;
            };
            for (key, t) in now {
                sums.entry(key.clone())
                    .or_default()
                    .add(&t.minus(then.get(&key)));
            }
        }
        let row = |t: &Totals| Row {
            rps: t.responses / window,
            success_rate: (t.responses > 0.0).then(|| t.ok / t.responses),
            p50_ms: t.quantile(0.50).map(|s| s * 1e3),
            p95_ms: t.quantile(0.95).map(|s| s * 1e3),
            p99_ms: t.quantile(0.99).map(|s| s * 1e3),
            responses: t.responses,
        };
        let mut services = Vec::new();
        let mut edges = Vec::new();
        let splits = split::rows(&sums, row);
        for (key, t) in &sums {
            match key {
                Key::Service(service) => services.push(ServiceRow {
                    service: service.clone(),
                    row: row(t),
                }),
                Key::Edge(from, to) => edges.push(EdgeRow {
                    from: from.clone(),
                    to: to.clone(),
                    row: row(t),
                }),
                Key::Split(_) => {}
            }
        }
        View {
            window_seconds: window,
            services,
            edges,
            splits,
            unreachable,
            warming_up,
            processes: Vec::new(),
        }
    }

    fn print_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let services = self.services.iter().map(|s| (s.service.clone(), &s.row));
        print_section(out, "SERVICE (inbound)", services)?;
        writeln!(out)?;
        let edges = self
            .edges
            .iter()
            .map(|e| (format!("{} -> {}", e.from, e.to), &e.row));
        print_section(out, "EDGE (caller -> callee)", edges)?;
        split::print(out, &self.splits)?;
        if !self.processes.is_empty() {
            writeln!(out)?;
            writeln!(
                out,
                "{:<24} {:>21} {:>8} {:>11} {:>9}  LAST EXIT",
                "PROCESS", "ADDRESS", "PID", "STATE", "RESTARTS"
            )?;
            for p in &self.processes {
                writeln!(
                    out,
                    "{:<24} {:>21} {:>8} {:>11} {:>9}  {}",
                    format!("{}[{}]", p.service, p.replica),
                    p.address,
                    p.pid.map_or("-".to_string(), |pid| pid.to_string()),
                    p.state,
                    p.restarts,
                    p.last_exit.as_deref().unwrap_or("-")
                )?;
            }
        }
        for addr in &self.unreachable {
            writeln!(out, "unreachable: {addr}")?;
        }
        for addr in &self.warming_up {
            writeln!(out, "warming up (no earlier reading): {addr}")?;
        }
        writeln!(out, "(over the last {:.1}s)", self.window_seconds)
    }
}

fn print_section<'a>(
    out: &mut impl Write,
    title: &str,
    rows: impl Iterator<Item = (String, &'a Row)>,
) -> std::io::Result<()> {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}ms"));
    writeln!(
        out,
        "{title:<24} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "RPS", "SUCCESS", "P50", "P95", "P99"
    )?;
    for (name, r) in rows {
        writeln!(
            out,
            "{name:<24} {:>9.1} {:>9} {:>10} {:>10} {:>10}",
            r.rps,
            pct(r.success_rate),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_labels_and_escapes() {
        let samples = parse(concat!(
            "# TYPE x counter\n",
            "mesh_responses_total{direction=\"inbound\",peer=\"a\\\"b\",grpc_code=\"OK\"} 7\n",
            "mesh_response_latency_seconds_bucket{le=\"+Inf\"} 3\n",
            "plain 1.5\n",
            "broken{le=\"1\" 2\n",
            "# EOF\n",
        ));
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].label("peer"), "a\"b");
        assert_eq!(samples[0].label("grpc_code"), "OK");
        assert_eq!(samples[0].value, 7.0);
        assert_eq!(samples[1].label("le"), "+Inf");
        assert_eq!(samples[2].name, "plain");
    }

    fn histogram(buckets: &[(f64, f64)]) -> Totals {
        Totals {
            buckets: buckets
                .iter()
                .map(|(le, c)| (OrderedF64(*le), *c))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // 100 calls: 50 under 1 ms, 40 more under 2 ms, 10 more under 4 ms.
        let t = histogram(&[
            (0.001, 50.0),
            (0.002, 90.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ]);
        assert!((t.quantile(0.5).unwrap() - 0.001).abs() < 1e-12);
        assert!((t.quantile(0.7).unwrap() - 0.0015).abs() < 1e-12);
        assert!((t.quantile(0.95).unwrap() - 0.003).abs() < 1e-12);
        assert_eq!(histogram(&[(0.001, 0.0)]).quantile(0.5), None);
        // Everything above the last bound: the last finite bound.
        let slow = histogram(&[(0.001, 0.0), (f64::INFINITY, 5.0)]);
        assert_eq!(slow.quantile(0.99), Some(0.001));
    }

    #[test]
    fn a_restarted_process_counts_from_zero() {
        assert_eq!(increase(10.0, 15.0), 5.0);
        assert_eq!(increase(10.0, 3.0), 3.0);
    }

    #[test]
    fn edges_and_services_come_from_direction() {
        let samples = parse(concat!(
            "mesh_process_info{service=\"orders\",identity=\"\"} 1\n",
            "mesh_responses_total{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"m\",grpc_code=\"OK\"} 4\n",
            "mesh_responses_total{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"m\",grpc_code=\"UNAVAILABLE\"} 1\n",
            "mesh_responses_total{direction=\"inbound\",peer=\"x\",rpc_service=\"s\",rpc_method=\"m\",grpc_code=\"OK\"} 2\n",
            "mesh_responses_total{direction=\"inbound\",peer=\"x\",rpc_service=\"grpc.health.v1.Health\",rpc_method=\"Check\",grpc_code=\"OK\"} 9\n",
        ));
        let t = totals(&samples);
        let edge = &t[&Key::Edge("orders".into(), "inventory".into())];
        assert_eq!((edge.responses, edge.ok), (5.0, 4.0));
        let service = &t[&Key::Service("orders".into())];
        assert_eq!(service.responses, 2.0, "health checks are left out");
    }
}
