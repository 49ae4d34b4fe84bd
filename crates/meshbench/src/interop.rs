//! Wire-level helpers for the gRPC interop test cases (`grpc.testing`),
//! shared by `interop-server` and `interop-client`.
//!
//! tonic does not show a message's compressed flag to handlers or callers,
//! nor let a unary handler add trailers, yet the interop cases assert on
//! both. These wrappers read the 5-byte gRPC message prefixes as the body
//! streams past ([`FlagBody`]) and add the echoed metadata on the way out
//! ([`InteropService`]), leaving the messages themselves to tonic.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use tonic::{body::Body, server::NamedService};
use tower::Service;

/// Metadata key whose value the server echoes in its initial metadata.
pub const ECHO_INITIAL: &str = "x-grpc-test-echo-initial";
/// Metadata key whose value the server echoes in its trailing metadata.
pub const ECHO_TRAILING: &str = "x-grpc-test-echo-trailing-bin";

/// The compressed flag of every gRPC message seen in one body, in order.
#[derive(Clone, Debug, Default)]
pub struct MessageFlags(Arc<Mutex<Vec<bool>>>);

impl MessageFlags {
    /// Whether message `index` (0-based) was compressed; `None` if it has
    /// not been seen (yet).
    pub fn compressed(&self, index: usize) -> Option<bool> {
        self.0.lock().expect("flags lock").get(index).copied()
    }

    /// Every flag seen so far.
    pub fn all(&self) -> Vec<bool> {
        self.0.lock().expect("flags lock").clone()
    }

    fn push(&self, compressed: bool) {
        self.0.lock().expect("flags lock").push(compressed);
    }
}

/// Splits a byte stream into gRPC length-prefixed messages, just far
/// enough to read each message's compressed flag.
#[derive(Debug, Default)]
struct PrefixParser {
    header: [u8; 5],
    have: usize,
    remaining: u64,
}

impl PrefixParser {
    fn feed(&mut self, mut data: &[u8], flags: &MessageFlags) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                data = &data[n..];
                self.remaining -= n as u64;
                continue;
            }
            let n = data.len().min(5 - self.have);
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                flags.push(self.header[0] & 1 == 1);
                let len = [
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ];
                self.remaining = u64::from(u32::from_be_bytes(len));
                self.have = 0;
            }
        }
    }
}

/// A body that records each message's compressed flag in [`MessageFlags`]
/// and, if given, adds `extra_trailers` to its trailers.
pub struct FlagBody<B> {
    inner: B,
    parser: PrefixParser,
    flags: MessageFlags,
    extra_trailers: Option<HeaderMap>,
    trailers: Option<Arc<Mutex<Option<HeaderMap>>>>,
}

impl<B> FlagBody<B> {
    /// Wraps `inner`, recording into `flags`.
    pub fn new(inner: B, flags: MessageFlags) -> Self {
        Self {
            inner,
            parser: PrefixParser::default(),
            flags,
            extra_trailers: None,
            trailers: None,
        }
    }
}

impl<B> HttpBody for FlagBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let mut frame = frame;
        if let Some(data) = frame.data_ref() {
            this.parser.feed(data, &this.flags);
        }
        if let Some(trailers) = frame.trailers_mut() {
            if let Some(extra) = this.extra_trailers.take() {
                trailers.extend(extra);
            }
            if let Some(seen) = &this.trailers {
                *seen.lock().expect("trailers lock") = Some(trailers.clone());
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps the generated `TestServiceServer` with what the interop server
/// features need below tonic:
///
/// - the compressed flag of each request message goes into the request's
///   extensions as [`MessageFlags`] (for `expect_compressed`);
/// - `x-grpc-test-echo-initial` is echoed in the response headers and
///   `x-grpc-test-echo-trailing-bin` in the trailers ("Echo Metadata"),
///   also when the call fails;
/// - streaming responses are sent uncompressed, as the reference servers
///   do unless asked: tonic cannot turn compression off per stream
///   message, so the client's `grpc-accept-encoding` is hidden from it.
#[derive(Clone, Debug)]
pub struct InteropService<S> {
    inner: S,
    unary_paths: &'static [&'static str],
}

impl<S> InteropService<S> {
    /// Wraps `inner`; responses to `unary_paths` may be compressed.
    pub fn new(inner: S, unary_paths: &'static [&'static str]) -> Self {
        Self { inner, unary_paths }
    }
}

impl<S: NamedService> NamedService for InteropService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for InteropService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let flags = MessageFlags::default();
        parts.extensions.insert(flags.clone());
        if !self.unary_paths.contains(&parts.uri.path()) {
            parts.headers.remove("grpc-accept-encoding");
        }
        let initial = parts.headers.get(ECHO_INITIAL).cloned();
        let trailing = parts.headers.get(ECHO_TRAILING).cloned();
        let req = http::Request::from_parts(parts, Body::new(FlagBody::new(body, flags)));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Ok(response) = fut.await;
            let (mut parts, body) = response.into_parts();
            if let Some(value) = initial {
                parts
                    .headers
                    .insert(HeaderName::from_static(ECHO_INITIAL), value);
            }
            let mut extra = None;
            if let Some(value) = trailing {
                let name = HeaderName::from_static(ECHO_TRAILING);
                if parts.headers.contains_key("grpc-status") {
                    // Trailers-only response: the headers are the trailers.
                    parts.headers.insert(name, value);
                } else {
                    extra = Some(HeaderMap::from_iter([(name, value)]));
                }
            }
            let body = FlagBody {
                extra_trailers: extra,
                ..FlagBody::new(body, MessageFlags::default())
            };
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// What a [`RecordingChannel`] saw of the last call's response.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Response headers (initial metadata).
    pub headers: HeaderMap,
    /// Trailers (trailing metadata); `None` for a trailers-only response.
    pub trailers: Option<HeaderMap>,
    /// Compressed flag of each response message.
    pub flags: MessageFlags,
}

/// A client channel that records, per call, the response's headers,
/// trailers and compressed flags, which tonic's client API merges or hides.
#[derive(Clone, Debug)]
pub struct RecordingChannel<C> {
    inner: C,
    last: Arc<Mutex<Seen>>,
    trailers: Arc<Mutex<Option<HeaderMap>>>,
}

impl<C> RecordingChannel<C> {
    /// Wraps `inner`.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            last: Arc::default(),
            trailers: Arc::default(),
        }
    }

    /// What the last call's response carried so far.
    pub fn seen(&self) -> Seen {
        let mut seen = self.last.lock().expect("seen lock").clone();
        seen.trailers = self.trailers.lock().expect("trailers lock").clone();
        seen
    }
}

impl<C, RB> Service<http::Request<Body>> for RecordingChannel<C>
where
    C: Service<http::Request<Body>, Response = http::Response<RB>>,
    C::Future: Send + 'static,
    C::Error: Send + 'static,
    RB: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<FlagBody<RB>>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let fut = self.inner.call(req);
        let (last, trailers) = (self.last.clone(), self.trailers.clone());
        *trailers.lock().expect("trailers lock") = None;
        Box::pin(async move {
            let response = fut.await?;
            let flags = MessageFlags::default();
            *last.lock().expect("seen lock") = Seen {
                headers: response.headers().clone(),
                trailers: None,
                flags: flags.clone(),
            };
            Ok(response.map(|body| FlagBody {
                trailers: Some(trailers),
                ..FlagBody::new(body, flags)
            }))
        })
    }
}

/// `n` zero bytes, the payload body every interop case uses.
pub fn zeros(n: usize) -> Vec<u8> {
    vec![0; n]
}

/// Decodes a `-bin` metadata value (unpadded or padded base64).
pub fn decode_bin(value: &HeaderValue) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let text = value.to_str().ok()?.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_read_across_chunk_boundaries() {
        // Two messages: compressed 3 bytes, then uncompressed 0 bytes,
        // then compressed 1 byte, fed one byte at a time.
        let wire = [1, 0, 0, 0, 3, 9, 9, 9, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 7];
        let flags = MessageFlags::default();
        let mut parser = PrefixParser::default();
        for b in wire {
            parser.feed(&[b], &flags);
        }
        assert_eq!(flags.all(), vec![true, false, true]);
        let flags = MessageFlags::default();
        PrefixParser::default().feed(&wire, &flags);
        assert_eq!(flags.all(), vec![true, false, true]);
    }
}
