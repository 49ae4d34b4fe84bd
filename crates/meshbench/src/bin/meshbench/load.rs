//! Load generation: closed loop (fixed concurrency) and open loop (fixed
//! rate, latency measured from each call's intended start so coordinated
//! omission is counted), recorded in HdrHistograms.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use mesh_client::MeshChannel;
use shop_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};
use shop_api::orders::v1::{
    PlaceOrderItem, PlaceOrderRequest, orders_service_client::OrdersServiceClient,
};
use tonic::transport::Channel;

use crate::procs::cpu_seconds;
use crate::report::Row;

/// Latencies up to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// What one call of a contender does.
#[derive(Clone)]
pub enum Caller {
    /// Echo through a raw tonic channel, with this payload.
    RawEcho(EchoServiceClient<Channel>, Vec<u8>),
    /// Echo through tonic's codec over h2 directly, with this payload.
    H2Echo(EchoServiceClient<crate::h2direct::H2Channel>, Vec<u8>),
    /// Echo through a mesh channel, with this payload.
    MeshEcho(EchoServiceClient<MeshChannel>, Vec<u8>),
    /// PlaceOrder of one unit through the shop.
    PlaceOrder(Box<Shopper>),
}

/// Customers placing one-unit orders with fresh idempotency keys, taking
/// turns (orders caps the orders one user may have in progress, so one
/// user cannot stand for a crowd).
#[derive(Clone)]
pub struct Shopper {
    /// Orders, through the mesh.
    pub orders: OrdersServiceClient<MeshChannel>,
    /// Each customer's access token and account with plenty of money.
    pub customers: std::sync::Arc<Vec<(String, String)>>,
    /// A product with plenty of stock.
    pub product: String,
}

impl Caller {
    /// Echo of `payload` bytes over a raw tonic channel.
    pub fn raw_echo(channel: Channel, payload: usize) -> Caller {
        Caller::RawEcho(EchoServiceClient::new(channel), vec![7; payload])
    }

    /// Echo of `payload` bytes over h2 directly (a reference).
    pub fn h2_echo(channel: crate::h2direct::H2Channel, payload: usize) -> Caller {
        Caller::H2Echo(
            EchoServiceClient::with_origin(channel, "http://echo".parse().expect("a uri")),
            vec![7; payload],
        )
    }

    /// Echo of `payload` bytes over a mesh channel.
    pub fn mesh_echo(channel: MeshChannel, payload: usize) -> Caller {
        Caller::MeshEcho(EchoServiceClient::new(channel), vec![7; payload])
    }

    /// Makes one call.
    pub async fn call(&mut self) -> Result<(), tonic::Status> {
        match self {
            Caller::RawEcho(client, payload) => client
                .echo(EchoRequest {
                    payload: payload.clone(),
                })
                .await
                .map(drop),
            Caller::H2Echo(client, payload) => client
                .echo(EchoRequest {
                    payload: payload.clone(),
                })
                .await
                .map(drop),
            Caller::MeshEcho(client, payload) => client
                .echo(EchoRequest {
                    payload: payload.clone(),
                })
                .await
                .map(drop),
            Caller::PlaceOrder(shopper) => {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let key = format!("bench-{}-{n}", std::process::id());
                let (token, account) =
                    &shopper.customers[n as usize % shopper.customers.len().max(1)];
                let mut request = tonic::Request::new(PlaceOrderRequest {
                    items: vec![PlaceOrderItem {
                        product_id: shopper.product.clone(),
                        quantity: 1,
                    }],
                    payment_account_id: account.clone(),
                    idempotency_key: key,
                });
                request.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {token}")
                        .parse()
                        .map_err(|_| tonic::Status::internal("token is not ASCII"))?,
                );
                request.set_timeout(Duration::from_secs(10));
                shopper.orders.place_order(request).await.map(drop)
            }
        }
    }
}

/// One call's fate, for timelines: start offset and latency in µs.
#[derive(Clone, Copy)]
pub struct Event {
    /// When the call started, µs after the round began.
    pub start_us: u64,
    /// How long it took, µs.
    pub latency_us: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// What a round measured.
pub struct Sample {
    /// Latency of successful calls, µs.
    pub hist: Histogram<u64>,
    /// Successful calls.
    pub calls: u64,
    /// Failed calls (and, in the open loop, calls not started because too
    /// many were in flight).
    pub errors: u64,
    /// Wall time of the round.
    pub elapsed: Duration,
    /// The first few distinct error messages, to explain failures.
    pub error_examples: Vec<String>,
    /// Every call (closed loop with `timeline`).
    pub timeline: Vec<Event>,
    /// Open loop: how late the generator sent its worst call (µs).
    pub max_send_lag_us: u64,
}

fn record_error(examples: &mut Vec<String>, status: &tonic::Status) {
    let text = format!("{:?}: {}", status.code(), status.message());
    if examples.len() < 3 && !examples.contains(&text) {
        examples.push(text);
    }
}

/// `concurrency` loops each making one call after another until `duration`
/// is up.
pub async fn closed_loop(
    caller: &Caller,
    concurrency: usize,
    duration: Duration,
    timeline: bool,
) -> Sample {
    let started = Instant::now();
    let end = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut caller = caller.clone();
            tokio::spawn(async move {
                let mut hist = histogram();
                let (mut calls, mut errors) = (0u64, 0u64);
                let mut examples = Vec::new();
                let mut events = Vec::new();
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let result = caller.call().await;
                    let latency_us = (t.elapsed().as_micros() as u64).max(1);
                    match &result {
                        Ok(()) => {
                            calls += 1;
                            let _ = hist.record(latency_us);
                        }
                        Err(status) => {
                            errors += 1;
                            record_error(&mut examples, status);
                        }
                    }
                    if timeline {
                        events.push(Event {
                            start_us: (t - started).as_micros() as u64,
                            latency_us,
                            ok: result.is_ok(),
                        });
                    }
                }
                (hist, calls, errors, examples, events)
            })
        })
        .collect();
    let mut sample = Sample {
        hist: histogram(),
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        error_examples: Vec::new(),
        timeline: Vec::new(),
        max_send_lag_us: 0,
    };
    for task in tasks {
        let (hist, calls, errors, examples, events) = task.await.expect("load task");
        sample.hist.add(&hist).expect("same bounds");
        sample.calls += calls;
        sample.errors += errors;
        for e in examples {
            if sample.error_examples.len() < 3 && !sample.error_examples.contains(&e) {
                sample.error_examples.push(e);
            }
        }
        sample.timeline.extend(events);
    }
    sample.elapsed = started.elapsed();
    sample
}

/// Calls started at a fixed `rate` for `duration`, each on its own task, at
/// most `max_in_flight` at once (beyond that a call counts as an error).
/// Latency runs from the call's *intended* start, so a stalled client or
/// server is charged for every call it delayed (coordinated omission).
pub async fn open_loop(
    caller: &Caller,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
) -> Sample {
    let period = Duration::from_secs_f64(1.0 / rate);
    let total = (duration.as_secs_f64() * rate) as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let started = Instant::now();
    // Tokio's timer has 1 ms granularity, too coarse for a 1 ms period; a
    // thread sleeping with nanosleep paces far closer to the schedule.
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let intended = started + period * i as u32;
            if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tx.send(intended).is_err() {
                break;
            }
        }
    });
    let shared = Arc::new(Mutex::new((histogram(), 0u64, 0u64, Vec::<String>::new())));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut max_lag = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(intended) = rx.recv().await {
        max_lag = max_lag.max(intended.elapsed().as_micros() as u64);
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            shared.lock().expect("results").2 += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (mut caller, shared, in_flight) = (caller.clone(), shared.clone(), in_flight.clone());
        tasks.spawn(async move {
            let result = caller.call().await;
            let latency_us = (intended.elapsed().as_micros() as u64).max(1);
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let mut guard = shared.lock().expect("results");
            match result {
                Ok(()) => {
                    let _ = guard.0.record(latency_us);
                    guard.1 += 1;
                }
                Err(status) => {
                    guard.2 += 1;
                    record_error(&mut guard.3, &status);
                }
            }
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let _ = pacer.join();
    // A mesh call has a deadline, a raw one may not: bound the wait for stragglers.
    let drained = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let elapsed = started.elapsed();
    let abandoned = if drained.is_err() {
        tasks.len() as u64
    } else {
        0
    };
    tasks.abort_all();
    let guard = shared.lock().expect("results");
    Sample {
        hist: guard.0.clone(),
        calls: guard.1,
        errors: guard.2 + abandoned,
        elapsed,
        error_examples: guard.3.clone(),
        timeline: Vec::new(),
        max_send_lag_us: max_lag,
    }
}

/// How a scenario drives its contenders.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// This many calls in flight, each loop starting its next call when the
    /// last one answers.
    Closed { concurrency: usize },
    /// Calls started at this rate per second whatever the answers.
    Open { rate: f64 },
}

/// Warm-up, round length and number of rounds.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Unmeasured time per contender before the rounds.
    pub warmup: Duration,
    /// Measured time per round per contender.
    pub duration: Duration,
    /// Rounds; each runs every contender once.
    pub rounds: usize,
}

/// One contender: what it calls with, which processes do its work (their
/// CPU is charged to it), and what it measured so far.
pub struct Contender {
    /// Its name in tables.
    pub name: String,
    /// What one call does.
    pub caller: Caller,
    /// (label, pid) of every process on its path.
    pub procs: Vec<(String, u32)>,
    /// What it measured so far.
    pub acc: Acc,
}

impl Contender {
    /// A contender that has measured nothing yet.
    pub fn new(name: &str, caller: Caller, procs: Vec<(String, u32)>) -> Contender {
        Contender {
            name: name.to_owned(),
            caller,
            procs,
            acc: Acc::default(),
        }
    }
}

/// Totals over the rounds of one contender.
pub struct Acc {
    /// Latency of successful calls, µs.
    pub hist: Histogram<u64>,
    /// Successful calls.
    pub calls: u64,
    /// Failed calls.
    pub errors: u64,
    /// Measured wall time.
    pub elapsed: Duration,
    /// CPU seconds per process label.
    pub cpu: BTreeMap<String, f64>,
    /// The first few distinct errors.
    pub error_examples: Vec<String>,
    /// Open loop: the generator's worst lag behind schedule, µs.
    pub max_send_lag_us: u64,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            hist: histogram(),
            calls: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            cpu: BTreeMap::new(),
            error_examples: Vec::new(),
            max_send_lag_us: 0,
        }
    }
}

impl Acc {
    /// Adds a round.
    pub fn add(&mut self, sample: &Sample) {
        self.hist.add(&sample.hist).expect("same bounds");
        self.calls += sample.calls;
        self.errors += sample.errors;
        self.elapsed += sample.elapsed;
        self.max_send_lag_us = self.max_send_lag_us.max(sample.max_send_lag_us);
        for e in &sample.error_examples {
            if self.error_examples.len() < 3 && !self.error_examples.contains(e) {
                self.error_examples.push(e.clone());
            }
        }
    }

    /// The totals as a table row.
    pub fn row(&self, name: &str, mode: &str) -> Row {
        let q = |q: f64| self.hist.value_at_quantile(q);
        let cpu_total: f64 = self.cpu.values().sum();
        Row {
            contender: name.to_owned(),
            mode: mode.to_owned(),
            rps: self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9),
            calls: self.calls,
            errors: self.errors,
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: self.hist.max(),
            cpu_s: self.cpu.clone(),
            cpu_us_per_call: cpu_total * 1e6 / (self.calls.max(1) as f64),
            error_examples: self.error_examples.clone(),
            extra: BTreeMap::new(),
        }
    }
}

/// CPU seconds of each process now.
fn cpu_snapshot(procs: &[(String, u32)]) -> Vec<f64> {
    procs.iter().map(|(_, pid)| cpu_seconds(*pid)).collect()
}

/// One measured (or warm-up) round of `c`.
pub async fn round(c: &mut Contender, load: Load, duration: Duration, record: bool) {
    let before = cpu_snapshot(&c.procs);
    let sample = match load {
        Load::Closed { concurrency } => closed_loop(&c.caller, concurrency, duration, false).await,
        Load::Open { rate } => open_loop(&c.caller, rate, duration, 10_000).await,
    };
    if record {
        let after = cpu_snapshot(&c.procs);
        for ((label, _), (a, b)) in c.procs.iter().zip(after.iter().zip(&before)) {
            *c.acc.cpu.entry(label.clone()).or_default() += a - b;
        }
        c.acc.add(&sample);
    }
}

/// Contenders to run (by name, `--only`); empty: all of them.
static ONLY: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Runs only the contenders named in `names` (all when empty): for a
/// profile of one path. The others measure nothing, so their ratios are
/// meaningless in such a run.
pub fn run_only(names: Vec<String>) {
    let _ = ONLY.set(names);
}

fn chosen(c: &Contender) -> bool {
    ONLY.get()
        .is_none_or(|only| only.is_empty() || only.contains(&c.name))
}

/// Runs every contender's warm-up, then `rounds` rounds of all contenders
/// in turn (A, B, A, B ...), so drift in the machine hits them alike.
pub async fn interleave(contenders: &mut [Contender], load: Load, plan: Plan) {
    for c in contenders.iter_mut().filter(|c| chosen(c)) {
        round(c, load, plan.warmup, false).await;
    }
    for r in 0..plan.rounds {
        for c in contenders.iter_mut().filter(|c| chosen(c)) {
            round(c, load, plan.duration, true).await;
            eprintln!(
                "  round {}/{}: {:<28} {:>9.0} req/s so far",
                r + 1,
                plan.rounds,
                c.name,
                c.acc.calls as f64 / c.acc.elapsed.as_secs_f64().max(1e-9)
            );
        }
    }
}

/// The client's own process, as a contender's CPU entry.
pub fn this_process() -> (String, u32) {
    ("client".into(), std::process::id())
}
