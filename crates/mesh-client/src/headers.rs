//! gRPC header names the call path reads or writes on every call, made
//! once: a name given as `&str` is parsed (checked and lower-cased) at
//! every lookup, about ten times per call across the layers.

use http::HeaderName;

/// The call's deadline, as the gRPC wire format encodes it.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The call's status code, in trailers (or a trailers-only response).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The status message, percent-encoded.
pub(crate) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// How many attempts of this call went before (gRFC A6).
pub(crate) const GRPC_PREVIOUS_RPC_ATTEMPTS: HeaderName =
    HeaderName::from_static("grpc-previous-rpc-attempts");

/// A server's retry pushback (gRFC A6).
pub(crate) const GRPC_RETRY_PUSHBACK_MS: HeaderName =
    HeaderName::from_static("grpc-retry-pushback-ms");
