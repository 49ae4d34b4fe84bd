//! Hostile input to a mesh server: message bounds checked from the length
//! prefix, a gzip bomb stopped while decompressing, and the server keeps
//! answering honest clients afterwards.

mod common;

use common::{EchoOptions, Replica, wait_serving};
use mesh_fixture::echo::{EchoRequest, echo_service_client::EchoServiceClient};
use tonic::{Code, codec::CompressionEncoding};

/// A payload whose encoded EchoRequest is exactly `size` bytes (for sizes
/// between 131 and 16 386: one tag byte and a two-byte length).
fn request_of(size: usize) -> EchoRequest {
    EchoRequest {
        payload: vec![b'x'; size - 3],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_limits_hold_at_the_edge_over_it_far_over_it_and_gzipped() {
    use prost::Message;
    assert_eq!(request_of(1024).encoded_len(), 1024);
    let server = Replica::start(
        "echo",
        EchoOptions {
            max_request_bytes: Some(1024),
            ..EchoOptions::default()
        },
    );
    let addr = server.addr;
    wait_serving(addr).await;
    let mut client =
        EchoServiceClient::new(common::channel(addr)).max_decoding_message_size(64 * 1024 * 1024);

    client
        .echo(request_of(1024))
        .await
        .expect("exactly the limit is accepted");
    let err = client.echo(request_of(1025)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message()
            .contains("found 1025 bytes, the limit is: 1024 bytes"),
        "{}",
        err.message()
    );
    let err = client
        .echo(EchoRequest {
            payload: vec![0; 16 * 1024 * 1024],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // 512 KiB of zeros gzips to about 520 bytes: under the limit on the
    // wire, 500 times over it once decompressed.
    let mut gzip =
        EchoServiceClient::new(common::channel(addr)).send_compressed(CompressionEncoding::Gzip);
    let err = gzip
        .echo(EchoRequest {
            payload: vec![0; 512 * 1024],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("exceeded while decompressing"),
        "{}",
        err.message()
    );
    // A small compressed request is fine.
    gzip.echo(request_of(500))
        .await
        .expect("gzip within the limit");

    // And honest clients are still served.
    client.echo(request_of(200)).await.unwrap();
}
