//! Buffering a request body so it can be replayed.

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
