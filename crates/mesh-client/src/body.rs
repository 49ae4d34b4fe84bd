use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

type Report = Box<dyn FnOnce(Option<Code>) + Send>;

pin_project! {
    /// A response body that reports the call's gRPC status from its
    /// trailers (or `None` on a body error) when the stream ends.
    pub(crate) struct ObservedBody<B> {
        #[pin]
        inner: B,
        report: Option<Report>,
    }
}

impl<B> ObservedBody<B> {
    pub(crate) fn new(inner: B, report: impl FnOnce(Option<Code>) + Send + 'static) -> Self {
        Self {
            inner,
            report: Some(Box::new(report)),
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Only a trailers frame ends the call; data frames leave the report armed.
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(report) = this.report.take()
                {
                    report(Some(grpc_status(trailers).unwrap_or(Code::Unknown)));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(report) = this.report.take() {
                    report(None);
                }
            }
            Poll::Ready(None) => {
                if let Some(report) = this.report.take() {
                    // A gRPC response always ends in trailers; none is a broken stream.
                    report(Some(Code::Internal));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The status in a response's headers (a trailers-only response).
pub(crate) fn header_status(response: &http::Response<tonic::body::Body>) -> Option<Code> {
    grpc_status(response.headers())
}
