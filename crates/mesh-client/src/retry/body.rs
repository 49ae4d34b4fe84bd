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
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        size += data.len();
        chunks.push(data);
        if size > limit {
            let head =
                futures::stream::iter(chunks.into_iter().map(|b| Ok(http_body::Frame::data(b))));
            let rest = BodyStream::new(body);
            return Ok(Buffered::TooLarge(Body::new(StreamBody::new(
                head.chain(rest),
            ))));
        }
    }
    Ok(Buffered::Whole(match chunks.len() {
        1 => chunks.pop().expect("one chunk"),
        _ => {
            let mut all = BytesMut::with_capacity(size);
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    }))
}
