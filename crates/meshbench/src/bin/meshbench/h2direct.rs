//! A gRPC client with nothing between tonic's codec and the `h2` crate:
//! no `tower::Buffer`, no hyper dispatcher task, no task per request. A
//! reference for the overhead scenario (what a client over hyper pays
//! above HTTP/2 itself), not a client to use: unary calls only (the
//! request body is sent before the response is awaited), no keepalive,
//! no reconnect.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as _, Frame};
use tonic::body::Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 connection, driven by `h2` directly.
#[derive(Clone)]
pub struct H2Channel {
    send: h2::client::SendRequest<Bytes>,
    authority: http::uri::Authority,
}

/// Connects to `addr` (plaintext, TCP_NODELAY) with the mesh's windows.
pub async fn connect(addr: SocketAddr) -> Result<H2Channel, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("h2 channel to {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(32 * 256 * 1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("h2 handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(H2Channel {
        send,
        authority: addr.to_string().parse().map_err(|e| format!("{e}"))?,
    })
}

impl tower::Service<http::Request<Body>> for H2Channel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (send, authority) = (self.send.clone(), self.authority.clone());
        Box::pin(async move {
            let mut send = send.ready().await?;
            let (mut parts, body) = req.into_parts();
            let mut uri = parts.uri.into_parts();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(authority);
            parts.uri = http::Uri::from_parts(uri)?;
            let (response, mut stream) =
                send.send_request(http::Request::from_parts(parts, ()), false)?;
            send_body(body, &mut stream).await?;
            let response = response.await?;
            Ok(response.map(|recv| {
                Body::new(Received {
                    recv,
                    data_done: false,
                    done: false,
                })
            }))
        })
    }
}

/// Sends the whole request body (h2 buffers what the window does not
/// take yet), as hyper's pipe does: END_STREAM on the last data frame if
/// the body says it is the last, else on an empty one.
async fn send_body(mut body: Body, stream: &mut h2::SendStream<Bytes>) -> Result<(), BoxError> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => {
                stream.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(e)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(e.into());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    stream.send_data(data, end)?;
                    if end {
                        return Ok(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        stream.send_trailers(trailers)?;
                        return Ok(());
                    }
                }
            },
        }
    }
}

/// A response body read from h2, giving the window back as data is read.
struct Received {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl http_body::Body for Received {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        let trailers = ready!(self.recv.poll_trailers(cx));
        self.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
