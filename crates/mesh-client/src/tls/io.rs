//! Connections: the server's accept loop (TLS handshake with a timeout,
//! peer identity captured) and the client's connector.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::{MeshTls, ServerTls, SpiffeId, identity::leaf_info};

/// Who is on the other end of an inbound connection. Servers built with
/// `MeshServer` put it in every request's extensions.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// The peer's verified SPIFFE ID (mTLS only).
    pub identity: Option<SpiffeId>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// The verified SPIFFE ID of the caller of `request`, if any. Identity
/// claimed in request metadata is never consulted.
pub fn caller_identity<T>(request: &tonic::Request<T>) -> Option<&SpiffeId> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.as_ref())
}

/// A connection, plain or TLS: one implementation of the I/O traits for
/// both the server's accepted and the client's dialled connections.
pub(crate) enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // Vectored writes let HTTP/2 send headers and data in one syscall.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An accepted connection and who is on the other end.
pub(crate) struct MeshStream {
    io: MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>,
    info: PeerInfo,
}

impl Connected for MeshStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Accepts connections until `stop` or until the receiver is dropped,
/// handshaking TLS (bounded by the handshake timeout) off the accept path.
pub(crate) fn accept_loop(
    listener: TcpListener,
    tls: Option<ServerTls>,
    stop: CancellationToken,
) -> mpsc::Receiver<io::Result<MeshStream>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, do not spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                let info = PeerInfo {
                    remote_addr: Some(remote),
                    identity: None,
                    tls: false,
                };
                if tx
                    .send(Ok(MeshStream {
                        io: MaybeTls::Plain(tcp),
                        info,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let acceptor = TlsAcceptor::from(tls.config());
                match tokio::time::timeout(tls.handshake_timeout(), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|leaf| leaf_info(leaf).ok())
                            .and_then(|info| info.identity);
                        let info = PeerInfo {
                            remote_addr: Some(remote),
                            identity,
                            tls: true,
                        };
                        let _ = tx
                            .send(Ok(MeshStream {
                                io: MaybeTls::Tls(Box::new(stream)),
                                info,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::warn!(%remote, "TLS handshake refused: {e}"),
                    Err(_) => {
                        tracing::warn!(%remote, timeout = ?tls.handshake_timeout(), "TLS handshake timed out; connection dropped")
                    }
                }
            });
        }
    });
    rx
}

/// Makes a client connection to one endpoint: TCP, then (with TLS) a
/// handshake that presents this workload's certificate and checks the
/// server is `expected`.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<Arc<MeshTls>>,
    pub(crate) expected: Option<SpiffeId>,
}

/// A dialled connection.
pub(crate) type ClientStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = futures::future::BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.addr).await?;
            tcp.set_nodelay(true)?;
            let Some(tls) = this.tls else {
                return Ok(TokioIo::new(MaybeTls::Plain(tcp)));
            };
            let config = tls
                .client_config(this.expected)
                .map_err(|e| io::Error::other(e.to_string()))?;
            // The name is only for SNI; the server is verified by SPIFFE ID.
            let name = rustls::pki_types::ServerName::IpAddress(this.addr.ip().into());
            let stream = tokio::time::timeout(
                tls.handshake_timeout(),
                TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok(TokioIo::new(MaybeTls::Tls(Box::new(stream))))
        })
    }
}
