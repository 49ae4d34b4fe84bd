//! Scenario 1: what the mesh costs per call over a raw tonic channel, in
//! plaintext and with (m)TLS, on one connection to one server.

use tonic::transport::Endpoint;

use super::Ctx;
use crate::load::{Caller, Contender, Load, interleave, this_process};
use crate::pki::{self, Pki};
use crate::procs;
use crate::report::{Goal, Scenario, ratio};

/// Runs the scenario: five contenders over one connection each (two for
/// the routed one, one per backend).
pub async fn run(ctx: &Ctx) -> Result<Scenario, String> {
    let pki = Pki::new(&ctx.dir.join("overhead-pki"))?;
    let server_dir = pki.issue("bench", "server")?;
    let client_dir = pki.issue("bench", "client")?;
    let plain = procs::echo(&ctx.dir, "echo-plain", &[]).await?;
    let tls = procs::echo(&ctx.dir, "echo-tls", &tls_flags(&server_dir)).await?;

    let raw = raw_channel(plain.addr).await?;
    let h2 = crate::h2direct::connect(plain.addr).await?;
    let raw_tls = {
        let connector = pki::raw_tls_connector(&client_dir)?;
        Endpoint::from_shared(format!("http://{}", tls.addr))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("raw TLS channel: {e}"))?
    };
    let mesh = ctx.mesh()?;
    let mesh_plain = mesh
        .channel(&format!("static:///{}", plain.addr))
        .map_err(|e| e.to_string())?;
    let (routed_mesh, routed_target) = routed(plain.addr)?;
    let mesh_routed = routed_mesh
        .channel(&routed_target)
        .map_err(|e| e.to_string())?;
    let mesh_mtls = mesh
        .with_tls(pki.load("client")?)
        .channel_with_identity(
            &format!("static:///{}", tls.addr),
            &pki::identity("bench", "server"),
        )
        .map_err(|e| e.to_string())?;

    let at = |p: &procs::Proc| vec![this_process(), ("server".to_string(), p.pid())];
    let mut contenders = vec![
        Contender::new("raw tonic", Caller::raw_echo(raw, ctx.payload), at(&plain)),
        Contender::new(
            "mesh",
            Caller::mesh_echo(mesh_plain, ctx.payload),
            at(&plain),
        ),
        Contender::new(
            "mesh routed 50/50",
            Caller::mesh_echo(mesh_routed, ctx.payload),
            at(&plain),
        ),
        Contender::new(
            "raw tonic TLS",
            Caller::raw_echo(raw_tls, ctx.payload),
            at(&tls),
        ),
        Contender::new(
            "mesh mTLS",
            Caller::mesh_echo(mesh_mtls, ctx.payload),
            at(&tls),
        ),
        Contender::new(
            "tonic codec over h2 (reference)",
            Caller::h2_echo(h2, ctx.payload),
            at(&plain),
        ),
    ];
    let load = Load::Closed {
        concurrency: ctx.concurrency,
    };
    interleave(&mut contenders, load, ctx.plan).await;

    let rows: Vec<_> = contenders
        .iter()
        .map(|c| c.acc.row(&c.name, "closed"))
        .collect();
    let (raw, mesh, routed, raw_tls, mesh_tls, h2) =
        (&rows[0], &rows[1], &rows[2], &rows[3], &rows[4], &rows[5]);
    let goals = vec![
        Goal::at_least(
            "mesh / raw tonic throughput",
            ratio(mesh.rps, raw.rps),
            "×",
            0.97,
        ),
        Goal::at_most(
            "mesh / raw tonic p99",
            ratio(mesh.p99_us as f64, raw.p99_us as f64),
            "×",
            1.05,
        ),
        // The cost of routing on the hot path: a two-backend route
        // (matching, a weighted pick, the backend's own balancer) against
        // no route, same server, same run.
        Goal::at_least(
            "mesh routed / mesh throughput",
            ratio(routed.rps, mesh.rps),
            "×",
            0.98,
        ),
        Goal::at_most(
            "mesh routed / mesh p99",
            ratio(routed.p99_us as f64, mesh.p99_us as f64),
            "×",
            1.02,
        ),
        Goal::at_least(
            "mesh mTLS / mesh plaintext throughput",
            ratio(mesh_tls.rps, mesh.rps),
            "×",
            0.90,
        ),
        Goal::report(
            "mesh mTLS / raw tonic TLS throughput",
            ratio(mesh_tls.rps, raw_tls.rps),
            "×",
        ),
        // What a client over hyper pays above HTTP/2 itself.
        Goal::report(
            "tonic codec over h2 / raw tonic throughput",
            ratio(h2.rps, raw.rps),
            "×",
        ),
        Goal::report(
            "mesh / tonic codec over h2 throughput",
            ratio(mesh.rps, h2.rps),
            "×",
        ),
        Goal::report(
            "mesh mTLS / raw tonic TLS p99",
            ratio(mesh_tls.p99_us as f64, raw_tls.p99_us as f64),
            "×",
        ),
    ];
    Ok(Scenario {
        id: "overhead".into(),
        timeline: None,
        title: "Overhead: mesh channel vs raw tonic channel".into(),
        setup: format!(
            "unary Echo, {} B payload, {} in flight (closed loop), one connection, same mesh-echo binary; {}",
            ctx.payload,
            ctx.concurrency,
            ctx.plan_text()
        ),
        rows,
        goals,
        notes: vec![],
    })
}

/// A mesh whose target (returned with it) routes every call 50/50 over two
/// backends that are the same server written two ways (`static:///a` and
/// `http://a`): each backend its own resolver, endpoint set and
/// connection, so the only difference from the plain mesh contender is
/// the routing.
fn routed(addr: std::net::SocketAddr) -> Result<(mesh_client::Mesh, String), String> {
    let target = format!("static:///{addr}");
    let other = format!("http://{addr}");
    let config = mesh_client::MeshConfig::from_json(&format!(
        r#"{{"targets":{{{target:?}:{{"routes":[{{"name":"split","matches":[{{"method":{{"service":"mesh.echo.v1.EchoService"}}}}],
              "backendRefs":[{{"target":{target:?},"weight":50}},{{"target":{other:?},"weight":50}}]}}]}},
            {other:?}:{{}}}}}}"#
    ))
    .map_err(|e| e.to_string())?;
    Ok((super::descriptor_mesh(config)?, target))
}

/// Flags that give a mesh-echo server its certificate.
pub fn tls_flags(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--tls-dir".into(),
        dir.display().to_string(),
        "--trust-domain".into(),
        pki::TRUST_DOMAIN.into(),
        "--namespace".into(),
        "bench".into(),
    ]
}

/// A raw tonic channel with the same TCP settings the mesh uses.
pub async fn raw_channel(addr: std::net::SocketAddr) -> Result<tonic::transport::Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("raw channel to {addr}: {e}"))
}
