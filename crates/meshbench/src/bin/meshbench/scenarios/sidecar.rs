//! Scenario 2: the mesh calling directly with mTLS vs the same calls
//! through two HAProxy sidecars (client-side and server-side, mTLS between
//! them, plaintext to the apps), as a sidecar mesh routes them.

use super::{Ctx, overhead};
use crate::load::{Caller, Contender, Load, interleave, this_process};
use crate::pki::{self, Pki};
use crate::procs::{self, Sidecars};
use crate::report::{Goal, Scenario, ratio};

/// Istio's published p99 added by two sidecars at 1000 requests/s.
const ISTIO_ADDED_P99_US: f64 = 298.0;

/// Runs the scenario: closed loop, then open loop; two results.
pub async fn run(ctx: &Ctx) -> Result<Vec<Scenario>, String> {
    let pki = Pki::new(&ctx.dir.join("sidecar-pki"))?;
    for who in ["server", "client", "client-sidecar", "server-sidecar"] {
        pki.issue("bench", who)?;
    }
    let app = procs::echo(&ctx.dir, "echo-app", &[]).await?;
    let app_tls = procs::echo(
        &ctx.dir,
        "echo-app-tls",
        &overhead::tls_flags(&pki.root.join("server")),
    )
    .await?;
    let sidecars = Sidecars::start(&ctx.dir, &pki.root, app.addr).await?;

    let raw = overhead::raw_channel(app.addr).await?;
    let via_sidecars = overhead::raw_channel(sidecars.client_side.addr).await?;
    let mesh = ctx
        .mesh()?
        .with_tls(pki.load("client")?)
        .channel_with_identity(
            &format!("static:///{}", app_tls.addr),
            &pki::identity("bench", "server"),
        )
        .map_err(|e| e.to_string())?;
    let server = |p: &procs::Proc| ("server".to_string(), p.pid());
    let contenders = || {
        vec![
            Contender::new(
                "mesh mTLS direct",
                Caller::mesh_echo(mesh.clone(), ctx.payload),
                vec![this_process(), server(&app_tls)],
            ),
            Contender::new(
                "2 HAProxy sidecars (mTLS between)",
                Caller::raw_echo(via_sidecars.clone(), ctx.payload),
                vec![
                    this_process(),
                    server(&app),
                    ("client sidecar".into(), sidecars.client_side.pid()),
                    ("server sidecar".into(), sidecars.server_side.pid()),
                ],
            ),
            Contender::new(
                "raw tonic plaintext direct (reference)",
                Caller::raw_echo(raw.clone(), ctx.payload),
                vec![this_process(), server(&app)],
            ),
        ]
    };

    let mut closed = contenders();
    let load = Load::Closed {
        concurrency: ctx.concurrency,
    };
    interleave(&mut closed, load, ctx.plan).await;
    let rows: Vec<_> = closed
        .iter()
        .map(|c| c.acc.row(&c.name, "closed"))
        .collect();
    let (mesh_row, side) = (&rows[0], &rows[1]);
    let closed_scenario = Scenario {
        id: "sidecar".into(),
        timeline: None,
        title: "Sidecar path: mesh direct vs two HAProxy sidecars".into(),
        setup: format!(
            "unary Echo, {} B payload, {} in flight (closed loop); sidecar path: app → HAProxy (h2c in, mTLS out) → HAProxy (mTLS in, h2c out) → app; CPU counts every process on the path; {}",
            ctx.payload,
            ctx.concurrency,
            ctx.plan_text()
        ),
        goals: vec![
            Goal::at_least(
                "mesh / sidecars throughput",
                ratio(mesh_row.rps, side.rps),
                "×",
                2.5,
            ),
            Goal::at_most(
                "mesh / sidecars p99",
                ratio(mesh_row.p99_us as f64, side.p99_us as f64),
                "×",
                0.4,
            ),
            Goal::at_most(
                "mesh / sidecars CPU per request",
                ratio(mesh_row.cpu_us_per_call, side.cpu_us_per_call),
                "×",
                1.0,
            ),
        ],
        rows,
        notes: vec![],
    };

    let rate = ctx.open_rate;
    let mut open = contenders();
    interleave(&mut open, Load::Open { rate }, ctx.open_plan).await;
    let rows: Vec<_> = open.iter().map(|c| c.acc.row(&c.name, "open")).collect();
    let (mesh_row, side, raw_row) = (&rows[0], &rows[1], &rows[2]);
    let added = |a: u64, b: u64| a as f64 - b as f64;
    let mut notes = vec![format!(
        "latency measured from each call's scheduled start (coordinated omission corrected); the generator's worst lag behind schedule was {} µs",
        open.iter()
            .map(|c| c.acc.max_send_lag_us)
            .max()
            .unwrap_or(0)
    )];
    notes.push(format!(
        "Istio publishes +{ISTIO_ADDED_P99_US} µs p99 for two sidecars at 1000 requests/s (its own hardware)"
    ));
    let open_scenario = Scenario {
        id: "sidecar-open".into(),
        timeline: None,
        title: format!("Sidecar path, open loop at {rate:.0} requests/s"),
        setup: format!(
            "unary Echo, {} B payload, {rate:.0} calls/s started on schedule whatever the answers (open loop), HdrHistogram; {}",
            ctx.payload,
            ctx.open_plan_text()
        ),
        goals: vec![
            Goal::report(
                "mesh mTLS added p50 over raw tonic plaintext",
                added(mesh_row.p50_us, raw_row.p50_us),
                "µs",
            ),
            Goal::at_most(
                "mesh mTLS added p99 over raw tonic plaintext",
                added(mesh_row.p99_us, raw_row.p99_us),
                "µs",
                ISTIO_ADDED_P99_US,
            ),
            Goal::report(
                "sidecars added p50 over raw tonic plaintext",
                added(side.p50_us, raw_row.p50_us),
                "µs",
            ),
            Goal::report(
                "sidecars added p99 over raw tonic plaintext",
                added(side.p99_us, raw_row.p99_us),
                "µs",
            ),
        ],
        rows,
        notes,
    };
    Ok(vec![closed_scenario, open_scenario])
}
