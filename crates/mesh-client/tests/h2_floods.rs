//! HTTP/2 abuse against a mesh server, with hand-written frames (a
//! well-behaved client library cannot send them): rapid HEADERS +
//! RST_STREAM, streams that provoke server-side resets, a CONTINUATION
//! flood, a flood of empty DATA frames and an oversized header list. Each
//! time the attacker's connection is closed (GOAWAY) or refused, the
//! server's memory stays bounded, and an honest client on another
//! connection keeps getting answers.
//!
//! The server is an in-process echo replica (`common::Replica`) on
//! `MeshServer`'s defaults, so its memory is this test process's: the
//! bound (64 MiB of growth) is far above what the other tests of this
//! binary, running beside it, allocate.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{EchoOptions, Replica, wait_serving};
use mesh_fixture::echo::{EchoRequest, echo_service_client::EchoServiceClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK for a POST to /mesh.echo.v1.EchoService/Echo over http, using
/// static-table indexes and literals without indexing.
fn request_block() -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    let path = b"/mesh.echo.v1.EchoService/Echo";
    block.push(0x04); // literal without indexing, name = :path (index 4)
    block.push(path.len() as u8);
    block.extend_from_slice(path);
    let (name, value) = (b"content-type", b"application/grpc");
    block.push(0x00);
    block.push(name.len() as u8);
    block.extend_from_slice(name);
    block.push(value.len() as u8);
    block.extend_from_slice(value);
    block
}

async fn attacker(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    tcp
}

/// Reads frames until the server sends GOAWAY or closes; true if it did so
/// within the time limit.
async fn closed_by_server(tcp: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    loop {
        let read = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await;
        match read {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => pending.extend_from_slice(&buf[..n]),
        }
        while pending.len() >= 9 {
            let len =
                ((pending[0] as usize) << 16) | ((pending[1] as usize) << 8) | pending[2] as usize;
            if pending.len() < 9 + len {
                break;
            }
            if pending[3] == GOAWAY {
                return true;
            }
            pending.drain(..9 + len);
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

async fn honest_call(addr: SocketAddr) {
    let mut client = EchoServiceClient::new(common::channel(addr));
    let mut request = tonic::Request::new(EchoRequest {
        payload: b"still here".to_vec(),
    });
    request.set_timeout(Duration::from_secs(5));
    let answer = client
        .echo(request)
        .await
        .expect("an honest client is still served");
    assert_eq!(answer.into_inner().payload, b"still here");
}

struct Target {
    replica: Replica,
}

async fn target() -> Target {
    let replica = Replica::start("echo", EchoOptions::default());
    wait_serving(replica.addr).await;
    honest_call(replica.addr).await;
    Target { replica }
}

impl Target {
    fn addr(&self) -> SocketAddr {
        self.replica.addr
    }
    /// The resident memory of the process serving (this one), KiB.
    fn rss(&self) -> u64 {
        rss_kib(std::process::id())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_flood_is_cut_off() {
    let server = target().await;
    let before = server.rss();
    let mut tcp = attacker(server.addr()).await;
    let block = request_block();
    let mut burst = Vec::new();
    for i in 0..5_000u32 {
        let stream = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS, stream, &block));
        burst.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())); // CANCEL
    }
    let _ = tcp.write_all(&burst).await;
    assert!(
        closed_by_server(&mut tcp, Duration::from_secs(10)).await,
        "rapid reset was not cut off"
    );
    honest_call(server.addr()).await;
    assert!(
        server.rss() < before + 64 * 1024,
        "memory grew from {before} KiB to {} KiB",
        server.rss()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_provoke_resets_are_cut_off() {
    let server = target().await;
    let mut tcp = attacker(server.addr()).await;
    // A request missing :path and :scheme: each is reset by the server.
    let mut burst = Vec::new();
    for i in 0..2_000u32 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &[0x83]));
    }
    let _ = tcp.write_all(&burst).await;
    assert!(
        closed_by_server(&mut tcp, Duration::from_secs(10)).await,
        "local error resets were not cut off"
    );
    honest_call(server.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off() {
    let server = target().await;
    let before = server.rss();
    let mut tcp = attacker(server.addr()).await;
    let _ = tcp.write_all(&frame(HEADERS, 0, 1, &request_block())).await;
    // Endless CONTINUATION frames of header bytes, never END_HEADERS.
    let mut chunk = vec![0x00, 4];
    chunk.extend_from_slice(b"x-fl");
    chunk.push(120);
    chunk.extend(std::iter::repeat_n(b'a', 120));
    let frames: Vec<u8> = (0..200)
        .flat_map(|_| frame(CONTINUATION, 0, 1, &chunk))
        .collect();
    let mut cut = false;
    for _ in 0..50 {
        if tcp.write_all(&frames).await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(
        cut || closed_by_server(&mut tcp, Duration::from_secs(10)).await,
        "CONTINUATION flood was not cut off"
    );
    honest_call(server.addr()).await;
    assert!(
        server.rss() < before + 64 * 1024,
        "memory grew from {before} KiB to {} KiB",
        server.rss()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_is_refused() {
    let server = target().await;
    let mut tcp = attacker(server.addr()).await;
    let mut block = request_block();
    // One 32 KiB header value: over the 16 KiB header list limit.
    block.extend_from_slice(&[0x00, 4]);
    block.extend_from_slice(b"x-big");
    block.truncate(block.len() - 1); // name "x-bi" keeps the length byte honest
    block.extend_from_slice(&[0x7f, 0x81, 0xff, 0x01]); // value length 32 768 (7-bit prefix, varint)
    block.extend(std::iter::repeat_n(b'b', 32_768));
    // Split over HEADERS + CONTINUATION frames of 16 KiB (the default max frame size).
    let mut frames = Vec::new();
    let chunks: Vec<&[u8]> = block.chunks(16_000).collect();
    for (i, part) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let (kind, flags) = if i == 0 {
            (HEADERS, 0)
        } else {
            (CONTINUATION, 0)
        };
        frames.extend(frame(
            kind,
            flags | if last { END_HEADERS } else { 0 },
            1,
            part,
        ));
    }
    let _ = tcp.write_all(&frames).await;
    // Refused: the stream is reset or the connection closed; either way no
    // request reaches the service.
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(read) = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
        match read {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if contains_frame(&seen, &[RST_STREAM, GOAWAY]) {
            break;
        }
    }
    assert!(
        closed || contains_frame(&seen, &[RST_STREAM, GOAWAY]),
        "the oversized request was not refused"
    );
    honest_call(server.addr()).await;
}

fn contains_frame(bytes: &[u8], kinds: &[u8]) -> bool {
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len =
            ((bytes[at] as usize) << 16) | ((bytes[at + 1] as usize) << 8) | bytes[at + 2] as usize;
        if kinds.contains(&bytes[at + 3]) {
            return true;
        }
        at += 9 + len;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_data_flood_keeps_memory_bounded() {
    let server = target().await;
    let before = server.rss();
    let mut tcp = attacker(server.addr()).await;
    let _ = tcp
        .write_all(&frame(HEADERS, END_HEADERS, 1, &request_block()))
        .await;
    let empties: Vec<u8> = (0..10_000).flat_map(|_| frame(DATA, 0, 1, &[])).collect();
    for _ in 0..20 {
        if tcp.write_all(&empties).await.is_err() {
            break;
        }
        // The honest client keeps being served during the flood.
        honest_call(server.addr()).await;
    }
    assert!(
        server.rss() < before + 64 * 1024,
        "memory grew from {before} KiB to {} KiB",
        server.rss()
    );
}
