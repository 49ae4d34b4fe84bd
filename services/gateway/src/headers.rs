//! What the gateway lets through, both ways: an allow-list of headers per
//! direction, everything else dropped.
//!
//! Why an allow-list and not a deny-list: the mesh and the services read
//! metadata that decides where a call goes and under which policy (a
//! route matching `x-canary: true`, `grpc-previous-rpc-attempts`, trace
//! context, the gateway's own `x-verified-subject` and `x-shop-client`),
//! and the set grows with every feature. A header an outside client sends
//! reaches the shop only if it is named here; a new internal header is
//! safe from the outside the day it is added.
//!
//! Into the mesh ([`REQUEST_HEADERS`]): what a gRPC call needs
//! (`content-type`, `te`, `grpc-timeout`, which the mesh then cuts to
//! `--max-inbound-deadline-ms` and the method's `maxTimeout`, the
//! compression headers) and `authorization` (the services check the
//! token again). Not even `user-agent`: a route may match on any header
//! that passes, so routes behind the gateway should match only on
//! headers the gateway sets or none an outside caller can send. The gateway then adds its own
//! `x-verified-subject` and `x-shop-client`. Trace context (`traceparent`,
//! `tracestate`, `baggage`) is dropped: the gateway is the root of every
//! trace (its server ignores an outside `traceparent`, see
//! `ServerConfig::trust_trace_context`), so an outside caller can neither
//! force sampling on nor join its own trace id to the shop's traces.
//!
//! Back to the client ([`RESPONSE_HEADERS`], in the headers and in the
//! trailers): the gRPC status and its details, the compression headers,
//! and `retry-after` / `grpc-retry-pushback-ms` (auth's login limit tells
//! the caller when to come back). Every `mesh-*` header (an injected
//! fault's `mesh-fault-injected`, `mesh-mirrored`, the shedding mark
//! `mesh-shed`, ...) and anything else
//! a service or the mesh sets stays inside.

use http::HeaderMap;
use http_body_util::BodyExt;
use tonic::body::Body;

/// Request headers an outside caller may send into the shop.
pub const REQUEST_HEADERS: &[&str] = &[
    "content-type",
    "te",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "authorization",
];

/// Response headers and trailers the shop may send back to the outside.
pub const RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
    "grpc-accept-encoding",
    "retry-after",
    "grpc-retry-pushback-ms",
];

/// Removes every header of `headers` not in `allowed`.
fn retain(headers: &mut HeaderMap, allowed: &[&'static str]) {
    let drop: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| !allowed.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in drop {
        headers.remove(&name);
    }
    // One value each: the gateway verifies the first `authorization`, and a
    // reader of the last (or of all) must not see an unverified second one.
    for name in allowed {
        let mut values = headers.get_all(*name).iter();
        if let (Some(first), Some(_)) = (values.next(), values.next()) {
            let first = first.clone();
            headers.insert(*name, first);
        }
    }
}

/// Keeps only the request headers an outside caller may send.
pub fn filter_request(headers: &mut HeaderMap) {
    retain(headers, REQUEST_HEADERS);
}

/// Keeps only the response headers and trailers that may leave the shop.
pub fn filter_response(response: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    retain(&mut parts.headers, RESPONSE_HEADERS);
    let body = body.map_frame(|mut frame| {
        if let Some(trailers) = frame.trailers_mut() {
            retain(trailers, RESPONSE_HEADERS);
        }
        frame
    });
    http::Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_s_shed_mark_stays_inside() {
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "8")
            .header("mesh-shed", "1")
            .body(Body::empty())
            .unwrap();
        let response = filter_response(response);
        assert!(response.headers().get("mesh-shed").is_none());
        assert_eq!(response.headers()["grpc-status"], "8");
    }

    #[test]
    fn only_the_allowed_headers_pass_either_way() {
        let mut request = HeaderMap::new();
        for name in [
            "content-type",
            "authorization",
            "grpc-timeout",
            "x-canary",
            "mesh-fault",
            "traceparent",
            "x-verified-subject",
            "grpc-previous-rpc-attempts",
        ] {
            request.append(name, "1".parse().unwrap());
        }
        request.append("authorization", "2".parse().unwrap());
        filter_request(&mut request);
        let mut kept: Vec<&str> = request.keys().map(|n| n.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["authorization", "content-type", "grpc-timeout"]);
        let tokens: Vec<_> = request.get_all("authorization").iter().collect();
        assert_eq!(
            tokens,
            ["1"],
            "only the first value, the one verified, passes"
        );
    }
}
