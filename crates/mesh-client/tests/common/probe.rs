//! Probing a server: waiting until it answers health SERVING over a mesh
//! channel, and plain HTTP/1.1 GETs for admin ports. Shared with the
//! shop's cross-service tests (`tests/common`).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Waits until the server behind `channel` answers health SERVING.
pub async fn wait_serving_on(channel: mesh_client::MeshChannel) {
    let target = channel.target().to_owned();
    let mut health = HealthClient::new(channel);
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(2));
        match health.check(request).await {
            Ok(r) if r.get_ref().status() == ServingStatus::Serving => return,
            Ok(r) => last = format!("{:?}", r.get_ref().status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{target} not serving after 30 s: {last}");
}

/// `GET http://addr{path}`: the status and body (plain HTTP/1.1, for admin ports).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("admin response");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
