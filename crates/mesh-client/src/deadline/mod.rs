//! Deadlines: every outbound call has one, and calls made while handling an
//! inbound call inherit what is left of the inbound deadline.
//!
//! Why a task-local and not an argument: handlers are generated code with a
//! fixed signature, and threading a deadline through every call site is what
//! teams forget. The mesh server's deadline layer scopes the inbound
//! deadline around the handler's future ([`InboundDeadlineLayer`] does the
//! same for a server assembled by hand); the client layer
//! ([`DeadlineLayer`]) reads it from there. Work spawned onto other tasks
//! (a saga worker) deliberately does not inherit it.
//!
//! Every deadline has a ceiling. A deadline is a promise to hold resources
//! (a connection slot, a database transaction, a retry budget) for that long
//! in every service of a chain, and the caller at the edge chooses it: the
//! server layer cuts what it propagates to `ServerConfig::max_inbound_deadline`
//! and the client layer cuts every outgoing deadline, explicit, inherited or
//! default, to the method's `maxTimeout` from the mesh config.

mod layer;
mod timeout;

pub use layer::{
    CallDeadline, CallExpiry, DEFAULT_MAX_TIMEOUT, DeadlineLayer, DeadlinePolicy,
    InboundDeadlineLayer, TimeoutPolicy,
};
pub use timeout::{decode_grpc_timeout, encode_grpc_timeout};
pub(crate) use timeout::{grpc_timeout_header, header_timeout};

use std::{future::Future, time::Duration};

use tokio::time::Instant;

tokio::task_local! {
    static INBOUND_DEADLINE: Instant;
}

/// The deadline of the inbound call the current task is handling, if any.
pub fn inbound_deadline() -> Option<Instant> {
    INBOUND_DEADLINE.try_with(|d| *d).ok()
}

/// Time left before the inbound deadline, if the current task has one.
pub fn remaining() -> Option<Duration> {
    inbound_deadline().map(|d| d.saturating_duration_since(Instant::now()))
}

/// The least time left before a call's deadline for which a retry, a
/// hedge or a resend of a request handed back unsent is still sent: with
/// less, the server would be told `grpc-timeout: 1u` (or 0) and could not
/// answer in time, while a retry would spend retry budget. It is not
/// sent; the call ends with the last attempt's status, or
/// `DEADLINE_EXCEEDED` once the deadline has passed (gRFC A6).
pub const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(1);

/// Request extension: the response's body is read by a party this process
/// does not control (a proxy passing it on to an outside caller), so the
/// mesh ends the call at its deadline even if nobody reads the body.
///
/// Without it a body is held to its deadline only while it is polled, and
/// a proxy's server stops polling once its caller stops reading (HTTP/2
/// flow control): one outside caller that never reads could hold streams
/// of a connection the proxy shares with every other caller, past any
/// deadline. Marked, the call's response is released at the deadline by a
/// timer task of its own (a reset stream upstream, `DEADLINE_EXCEEDED`
/// trailers for a reader that comes back), which costs a task per call:
/// for an edge, not for calls between services that read their answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReleaseUnread;

/// `fut` scoped as the handling of an inbound call with this deadline
/// (for the server's deadline layer, which names its future's type).
pub(crate) fn scope_inbound<F: Future>(
    deadline: Instant,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<Instant, F> {
    INBOUND_DEADLINE.scope(deadline, fut)
}

/// Runs `fut` as if handling an inbound call with this deadline; outbound
/// calls made inside inherit it.
pub async fn with_deadline<F: Future>(deadline: Instant, fut: F) -> F::Output {
    INBOUND_DEADLINE.scope(deadline, fut).await
}
