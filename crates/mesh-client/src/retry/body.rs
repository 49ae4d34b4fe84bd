//! Buffering a request body so it can be replayed.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tonic::{Status, body::Body};

/// A request body after buffering.
pub(crate) enum Buffered {
    /// The whole body, replayable.
    Whole(Bytes),
    /// Over the limit: what was read followed by the rest, to send once.
    TooLarge(Body),
}

/// Reads `body` while it fits in `limit` bytes.
pub(crate) async fn buffer(mut body: Body, limit: usize) -> Result<Buffered, Status> {
    // A unary request is one chunk: it is kept apart so that case
    // allocates no list.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    let mut size = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        size += data.len();
        match first {
            None => first = Some(data),
            Some(_) => more.push(data),
        }
        if size > limit {
            let chunks = first.into_iter().chain(more);
            let head = futures::stream::iter(chunks.map(|b| Ok(http_body::Frame::data(b))));
            let rest = BodyStream::new(body);
            return Ok(Buffered::TooLarge(Body::new(StreamBody::new(
                head.chain(rest),
            ))));
        }
    }
    Ok(Buffered::Whole(match first {
        None => Bytes::new(),
        Some(first) if more.is_empty() => first,
        Some(first) => {
            let mut all = BytesMut::with_capacity(size);
            for chunk in std::iter::once(first).chain(more) {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    }))
}

/// The body of one attempt: the buffered request as one chunk.
///
/// It reports its end right after that chunk (so the chunk's DATA frame
/// carries END_STREAM, with no empty frame after it), but no exact size:
/// hyper would turn an exact size into a `content-length` header, which
/// gRPC does not use (tonic's own requests send none) and which costs an
/// HPACK literal to encode here and to decode and check at the server on
/// every call.
#[derive(Debug)]
pub(crate) struct ReplayBody {
    data: Option<Bytes>,
}

impl ReplayBody {
    /// An attempt's body of `data` (a cheap clone of the replay copy).
    pub(crate) fn new(data: Bytes) -> Self {
        Self {
            data: (!data.is_empty()).then_some(data),
        }
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Poll::Ready(
            self.data
                .take()
                .map(|data| Ok(http_body::Frame::data(data))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // A lower bound only: see the type's doc.
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(self.data.as_ref().map_or(0, |d| d.len() as u64));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[tokio::test]
    async fn an_attempt_body_ends_with_its_one_chunk_and_sends_no_length() {
        let mut body = ReplayBody::new(Bytes::from_static(b"\0\0\0\0\x02hi"));
        assert!(!body.is_end_stream());
        // No exact size: hyper adds `content-length` only for one.
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 7);
        let frame = body.frame().await.expect("a chunk").expect("no error");
        assert_eq!(frame.into_data().unwrap(), &b"\0\0\0\0\x02hi"[..]);
        // Ended right after the chunk: END_STREAM goes on its DATA frame.
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
        let empty = ReplayBody::new(Bytes::new());
        assert!(empty.is_end_stream(), "an empty body sends no DATA");
    }
}
