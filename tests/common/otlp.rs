//! A real OTLP trace receiver for tests: the official trace service
//! definition, served by tonic on loopback, keeping every span it is sent.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::span::SpanKind,
};

/// A span as received, with the service that exported it.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent: Vec<u8>,
    pub name: String,
    pub kind: SpanKind,
    pub attributes: HashMap<String, String>,
    pub events: Vec<String>,
}

/// A test OTLP collector: the official trace service definition, served
/// by tonic, keeping every span it is sent.
#[derive(Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<Received>>>);

fn text(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = text(
                &resource_spans
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default(),
            );
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent: span.parent_span_id.clone(),
                        name: span.name.clone(),
                        kind: span.kind(),
                        attributes: text(&span.attributes),
                        events: span.events.iter().map(|e| e.name.clone()).collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves a collector on a free loopback port.
    pub async fn start() -> (Collector, SocketAddr) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, addr)
    }

    /// Every span of `trace_id` received so far.
    pub fn spans_of(&self, trace_id: &[u8]) -> Vec<Received> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits (bounded) until a span matching `find` has arrived; returns
    /// it and every span of its trace.
    pub async fn wait_for(
        &self,
        what: &str,
        find: impl Fn(&Received) -> bool,
    ) -> (Received, Vec<Received>) {
        let started = Instant::now();
        loop {
            let found = self.0.lock().unwrap().iter().find(|s| find(s)).cloned();
            if let Some(span) = found {
                // One more batch interval for the rest of the trace.
                tokio::time::sleep(Duration::from_millis(700)).await;
                let trace = self
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.trace_id == span.trace_id)
                    .cloned()
                    .collect();
                return (span, trace);
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no {what} span arrived; got {:#?}",
                self.0.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
