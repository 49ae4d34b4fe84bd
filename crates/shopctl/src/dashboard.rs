//! `shopctl dashboard`: the mesh's live view in a browser, like Linkerd's
//! viz dashboard or Kiali, from the same admin endpoints `shopctl top`
//! scrapes.
//!
//! One background task scrapes every process's `/metrics` each
//! `--interval` and keeps the latest view; browsers read it from
//! `/api/view` (JSON), however many there are, so the shop is scraped at
//! one rate. The view is `shopctl top --json`'s (services and edges with
//! request rate, success rate and latency percentiles over the window,
//! the processes of `shopctl up`) plus, per caller and callee, the
//! endpoints by state (ready, ejected, reconnecting, unhealthy), the
//! ejections and retries counted so far and in the window. The page itself
//! (`web/dashboard`, built to `web/dist/dashboard`) draws the service
//! graph and keeps the history for its charts.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use shop_kit::site::{Asset, Site};

use crate::top::{self, Sample, Scrape};

/// Flags of `shopctl dashboard`.
#[derive(clap::Args)]
pub struct DashboardArgs {
    /// The `endpoints.json` written by `shopctl up`; every admin address in
    /// it is scraped.
    #[arg(long, default_value = ".shop/endpoints.json")]
    endpoints: PathBuf,
    /// Admin addresses (host:port) to scrape instead of the endpoints file;
    /// repeat for each process.
    #[arg(long = "admin", value_name = "ADDR")]
    admin: Vec<SocketAddr>,
    /// Where the dashboard is served (plain HTTP; a loopback address
    /// answers only to loopback host names).
    #[arg(long, default_value = "127.0.0.1:8056")]
    listen: SocketAddr,
    /// The built dashboard (`npm ci && npm run build` in web/).
    #[arg(long, default_value = "web/dist/dashboard")]
    web_dir: PathBuf,
    /// Seconds between scrapes, 0.2 to 60; rates are over this window.
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    interval: f64,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("not a number: {s}"))?;
    if (0.2..=60.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be 0.2 to 60 seconds".into())
    }
}

/// `shopctl dashboard`: serves until Ctrl-C or SIGTERM.
pub fn run(args: DashboardArgs) -> anyhow::Result<()> {
    let targets = if args.admin.is_empty() {
        top::from_endpoints(&args.endpoints)?
    } else {
        args.admin.clone()
    };
    let status = args
        .admin
        .is_empty()
        .then(|| args.endpoints.with_file_name("status.json"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        let site = site(&args.web_dir, Scraper::new(targets, status, args.interval))?;
        println!("Mesh dashboard: http://{}/", listener.local_addr()?);
        site.serve(listener, crate::shutdown_signal()).await;
        Ok(())
    })
}

/// Serves the dashboard on `listener` in the current runtime, scraping
/// `targets` (and `status`, the supervisor's file) every `interval`
/// seconds, until `stop` completes; for `shopctl up`.
pub(crate) fn spawn(
    web_dir: &Path,
    listener: tokio::net::TcpListener,
    targets: Vec<SocketAddr>,
    status: PathBuf,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let site = site(web_dir, Scraper::new(targets, Some(status), 1.0))?;
    tokio::spawn(site.serve(listener, stop));
    Ok(())
}

/// The site: the built page and `/api/view`, the latest view. The scraper
/// task ends when the site (and so its handler) is dropped.
fn site(web_dir: &Path, scraper: Scraper) -> anyhow::Result<Site> {
    let latest = scraper.latest.clone();
    let site = Site::load(web_dir, &[]).map_err(anyhow::Error::msg)?;
    let task = tokio::spawn(scraper.run());
    let guard = Arc::new(AbortOnDrop(task));
    Ok(site.with_dynamic(Arc::new(move |path| {
        let _keep_scraping = guard.clone();
        let view = (path == "/api/view").then(|| latest.read().expect("view lock").clone());
        Box::pin(async move {
            view.map(|body| Asset {
                content_type: "application/json",
                body,
            })
        })
    })))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Scraper {
    targets: Vec<SocketAddr>,
    status: Option<PathBuf>,
    interval: Duration,
    latest: Arc<RwLock<Bytes>>,
}

impl Scraper {
    fn new(targets: Vec<SocketAddr>, status: Option<PathBuf>, interval: f64) -> Scraper {
        Scraper {
            targets,
            status,
            interval: Duration::from_secs_f64(interval),
            latest: Arc::new(RwLock::new(Bytes::from_static(b"{\"seq\":0}"))),
        }
    }

    async fn run(self) {
        let mut previous = top::scrape_all(&self.targets).await;
        let mut taken = Instant::now();
        let mut seq = 0u64;
        loop {
            tokio::time::sleep(self.interval).await;
            let current = top::scrape_all(&self.targets).await;
            let now = Instant::now();
            let window = (now - taken).as_secs_f64();
            let mut view = top::View::between(&previous, &current, window);
            view.processes = self
                .status
                .as_deref()
                .map(top::read_status)
                .unwrap_or_default();
            seq += 1;
            let dashboard = DashboardView {
                seq,
                unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default(),
                targets: targets(&previous, &current, window),
                view,
            };
            match serde_json::to_vec(&dashboard) {
                Ok(json) => *self.latest.write().expect("view lock") = json.into(),
                Err(e) => eprintln!("shopctl: dashboard view not encoded: {e}"),
            }
            previous = current;
            taken = now;
        }
    }
}

/// What `/api/view` answers.
#[derive(Serialize)]
struct DashboardView {
    /// Counts up with every scrape, so the page sees a new one.
    seq: u64,
    /// When the scrape was taken.
    unix_ms: u64,
    #[serde(flatten)]
    view: top::View,
    /// Per caller and callee: the caller's endpoints of the callee's
    /// target, ejections and retries.
    targets: Vec<TargetRow>,
}

/// One caller's view of one callee.
#[derive(Serialize, Default, Debug, PartialEq)]
struct TargetRow {
    from: String,
    to: String,
    /// Endpoints by state, summed over the caller's replicas.
    endpoints: BTreeMap<String, f64>,
    /// Ejections counted since the callers started.
    ejections_total: f64,
    /// Ejections in the window.
    ejections: f64,
    /// Retries sent since the callers started.
    retries_total: f64,
    /// Retries per second over the window.
    retries_per_second: f64,
}

/// The service a scrape is of (`mesh_process_info`).
fn service_of(samples: &[Sample]) -> String {
    samples
        .iter()
        .find(|s| s.name == "mesh_process_info")
        .map(|s| s.label("service").to_owned())
        .unwrap_or_else(|| "?".into())
}

/// Per (caller, callee): endpoint gauges and the two counters, of one scrape.
fn target_totals(samples: &[Sample]) -> BTreeMap<(String, String), TargetRow> {
    let me = service_of(samples);
    let mut out: BTreeMap<(String, String), TargetRow> = BTreeMap::new();
    for s in samples {
        let counted = matches!(
            s.name.as_str(),
            "mesh_endpoints" | "mesh_endpoint_ejections_total"
        ) || (s.name == "mesh_retries_total" && s.label("direction") != "inbound");
        if !counted {
            continue;
        }
        let (from, to) = (me.clone(), s.label("peer").to_owned());
        let row = out
            .entry((from.clone(), to.clone()))
            .or_insert_with(|| TargetRow {
                from,
                to,
                ..TargetRow::default()
            });
        match s.name.as_str() {
            "mesh_endpoints" => {
                *row.endpoints
                    .entry(s.label("state").to_owned())
                    .or_default() += s.value;
            }
            "mesh_endpoint_ejections_total" => row.ejections_total += s.value,
            _ => row.retries_total += s.value,
        }
    }
    out
}

/// The rows of every reachable process in `after`, summed per caller and
/// callee, with the window's increases against `before`.
fn targets(before: &[Scrape], after: &[Scrape], window: f64) -> Vec<TargetRow> {
    let mut sums: BTreeMap<(String, String), TargetRow> = BTreeMap::new();
    for (addr, samples) in after {
        let Some(samples) = samples else { continue };
        // Without a reading at the window's start, the window's increase
        // is unknown (counted as none); with one, a row missing then
        // counted from zero.
        let then = before
            .iter()
            .find(|(a, _)| a == addr)
            .and_then(|(_, s)| s.as_ref())
            .map(|s| target_totals(s));
        for (key, now) in target_totals(samples) {
            let sum = sums.entry(key).or_insert_with(|| TargetRow {
                from: now.from.clone(),
                to: now.to.clone(),
                ..TargetRow::default()
            });
            for (state, n) in &now.endpoints {
                *sum.endpoints.entry(state.clone()).or_default() += n;
            }
            let earlier = then
                .as_ref()
                .map(|t| t.get(&(now.from.clone(), now.to.clone())));
            // A smaller reading means the process restarted: all it counted is new.
            let increase = |before: Option<f64>, after: f64| match (earlier, before) {
                (None, _) => 0.0,
                (Some(_), Some(b)) if after >= b => after - b,
                (Some(_), _) => after,
            };
            sum.ejections += increase(
                earlier.flatten().map(|e| e.ejections_total),
                now.ejections_total,
            );
            sum.retries_per_second += increase(
                earlier.flatten().map(|e| e.retries_total),
                now.retries_total,
            ) / window;
            sum.ejections_total += now.ejections_total;
            sum.retries_total += now.retries_total;
        }
    }
    sums.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(port: u16, text: &str) -> Scrape {
        (
            SocketAddr::from(([127, 0, 0, 1], port)),
            Some(top::parse(text)),
        )
    }

    #[test]
    fn endpoints_ejections_and_retries_per_caller_and_callee() {
        let before = [scrape(
            1,
            concat!(
                "mesh_process_info{service=\"orders\",identity=\"\"} 1\n",
                "mesh_endpoint_ejections_total{peer=\"inventory\"} 1\n",
                "mesh_retries_total{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"m\"} 4\n",
            ),
        )];
        let after = [
            scrape(
                1,
                concat!(
                    "mesh_process_info{service=\"orders\",identity=\"\"} 1\n",
                    "mesh_endpoints{peer=\"inventory\",state=\"ready\"} 1\n",
                    "mesh_endpoints{peer=\"inventory\",state=\"ejected\"} 1\n",
                    "mesh_endpoint_ejections_total{peer=\"inventory\"} 3\n",
                    "mesh_retries_total{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"m\"} 10\n",
                    "mesh_retries_total{direction=\"outbound\",peer=\"inventory\",rpc_service=\"s\",rpc_method=\"n\"} 2\n",
                ),
            ),
            // A replica without an earlier reading: its totals count, its
            // window does not.
            scrape(
                2,
                concat!(
                    "mesh_process_info{service=\"orders\",identity=\"\"} 1\n",
                    "mesh_endpoints{peer=\"inventory\",state=\"ready\"} 2\n",
                    "mesh_endpoint_ejections_total{peer=\"inventory\"} 5\n",
                ),
            ),
        ];
        let rows = targets(&before, &after, 2.0);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.from.as_str(), r.to.as_str()), ("orders", "inventory"));
        assert_eq!(r.endpoints["ready"], 3.0);
        assert_eq!(r.endpoints["ejected"], 1.0);
        assert_eq!(r.ejections_total, 8.0);
        assert_eq!(r.ejections, 2.0);
        assert_eq!(r.retries_total, 12.0);
        assert_eq!(r.retries_per_second, 4.0);
    }
}
