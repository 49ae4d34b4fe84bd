//! Scenario: server streaming, the mesh vs a raw tonic channel: streams of
//! `MESSAGES` echoes each (`EchoStream`, no pause between messages) from one
//! server over one connection, a few streams at a time; messages per second.

use std::time::{Duration, Instant};

use mesh_client::MeshChannel;
use shop_api::echo::v1::{EchoStreamRequest, echo_service_client::EchoServiceClient};
use tonic::transport::Channel;

use super::{Ctx, overhead};
use crate::load::{Acc, Sample, histogram, this_process};
use crate::procs::{self, cpu_seconds};
use crate::report::{Goal, Scenario, ratio};

/// Messages per stream: long enough that the stream's own setup is a small
/// part of its cost, short enough that a round holds many streams.
const MESSAGES: i32 = 1000;

/// Who opens the streams.
#[derive(Clone)]
enum Streamer {
    Raw(EchoServiceClient<Channel>),
    Mesh(EchoServiceClient<MeshChannel>),
}

impl Streamer {
    /// Opens one stream and reads it to its end; the messages received.
    async fn stream(&mut self) -> Result<u64, tonic::Status> {
        let request = EchoStreamRequest {
            count: MESSAGES,
            interval_ms: 0,
        };
        let mut stream = match self {
            Streamer::Raw(c) => c.echo_stream(request).await?.into_inner(),
            Streamer::Mesh(c) => c.echo_stream(request).await?.into_inner(),
        };
        let mut received = 0;
        while stream.message().await?.is_some() {
            received += 1;
        }
        Ok(received)
    }
}

/// `streams` loops, each opening its next stream when the last one ends,
/// for `duration`: messages count as calls, a whole stream's time as the
/// latency, a stream that failed or came short as an error.
async fn streaming_loop(streamer: &Streamer, streams: usize, duration: Duration) -> Sample {
    let started = Instant::now();
    let end = started + duration;
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let mut streamer = streamer.clone();
            tokio::spawn(async move {
                let (mut hist, mut messages, mut errors) = (histogram(), 0u64, 0u64);
                let mut examples = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    match streamer.stream().await {
                        Ok(n) => {
                            messages += n;
                            if n == MESSAGES as u64 {
                                let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
                            } else {
                                errors += 1;
                            }
                        }
                        Err(status) => {
                            errors += 1;
                            if examples.len() < 3 {
                                examples.push(format!("{:?}: {}", status.code(), status.message()));
                            }
                        }
                    }
                }
                (hist, messages, errors, examples)
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
        let (hist, messages, errors, examples) = task.await.expect("stream task");
        sample.hist.add(&hist).expect("same bounds");
        sample.calls += messages;
        sample.errors += errors;
        for e in examples {
            if sample.error_examples.len() < 3 && !sample.error_examples.contains(&e) {
                sample.error_examples.push(e);
            }
        }
    }
    sample.elapsed = started.elapsed();
    sample
}

/// Runs the scenario: raw tonic and the mesh in turn, plaintext, over one
/// connection each to the same server.
pub async fn run(ctx: &Ctx) -> Result<Scenario, String> {
    let server = procs::echo(&ctx.dir, "echo-streaming", &[]).await?;
    let raw = overhead::raw_channel(server.addr).await?;
    let mesh = ctx
        .mesh()?
        .channel(&format!("static:///{}", server.addr))
        .map_err(|e| e.to_string())?;
    let streams = (ctx.concurrency / 4).max(1);
    let pids = [this_process(), ("server".to_string(), server.pid())];
    let mut contenders = [
        ("raw tonic", Streamer::Raw(EchoServiceClient::new(raw))),
        ("mesh", Streamer::Mesh(EchoServiceClient::new(mesh))),
    ]
    .map(|(name, s)| (name, s, Acc::default()));
    for (_, s, _) in &contenders {
        streaming_loop(s, streams, ctx.plan.warmup).await;
    }
    for r in 0..ctx.plan.rounds {
        for (name, s, acc) in contenders.iter_mut() {
            let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
            let sample = streaming_loop(s, streams, ctx.plan.duration).await;
            for ((label, pid), b) in pids.iter().zip(before) {
                *acc.cpu.entry(label.clone()).or_default() += cpu_seconds(*pid) - b;
            }
            acc.add(&sample);
            eprintln!(
                "  round {}/{}: {name:<28} {:>9.0} messages/s so far",
                r + 1,
                ctx.plan.rounds,
                acc.calls as f64 / acc.elapsed.as_secs_f64().max(1e-9)
            );
        }
    }
    let rows: Vec<_> = contenders
        .iter()
        .map(|(name, _, acc)| {
            let mut row = acc.row(name, "closed");
            let streams_done = acc.hist.len() as f64;
            row.extra.insert(
                "streams/s".into(),
                streams_done / acc.elapsed.as_secs_f64().max(1e-9),
            );
            row
        })
        .collect();
    let goals = vec![
        Goal::at_least(
            "mesh / raw tonic messages/s",
            ratio(rows[1].rps, rows[0].rps),
            "×",
            1.0,
        ),
        Goal::report(
            "mesh / raw tonic CPU per message",
            ratio(rows[1].cpu_us_per_call, rows[0].cpu_us_per_call),
            "×",
        ),
    ];
    Ok(Scenario {
        id: "streaming".into(),
        timeline: None,
        title: "Server streaming: mesh channel vs raw tonic channel".into(),
        setup: format!(
            "EchoStream of {MESSAGES} messages (4 B payload, no pause), {streams} streams at a time (closed loop), one connection, plaintext; the req/s column counts messages, the latency columns a whole stream, CPU µs/req is per message; {}",
            ctx.plan_text()
        ),
        rows,
        goals,
        notes: vec![],
    })
}
