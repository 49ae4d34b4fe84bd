//! Talking to a server: plain channels, waiting for SERVING, request
//! helpers and status assertions. (Waiting on a mesh channel and plain
//! HTTP for admin ports are mesh-client's tests' `common/probe.rs`.)

use std::{net::SocketAddr, time::Duration};

use tonic::transport::Channel;

/// A plaintext channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// Waits until `addr` answers health SERVING (plaintext).
pub async fn wait_serving(addr: SocketAddr) {
    let channel = mesh_client::Mesh::from_config(mesh_client::MeshConfig::default())
        .unwrap()
        .channel(&format!("static:///{addr}"))
        .unwrap();
    super::probe::wait_serving_on(channel).await;
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII token"),
    );
    request
}

/// Asserts a call failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Ok(v) => panic!("expected {code:?} containing {needle:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "wrong code; message: {}",
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "message {:?} does not contain {needle:?}",
                status.message()
            );
        }
    }
}
