//! Telemetry: traces, golden metrics and logs, without a sidecar.
//!
//! - **Traces**: every call through a [`crate::MeshChannel`] and every call a
//!   [`crate::server::MeshServer`] receives is a `tracing` span named and
//!   attributed after OpenTelemetry's RPC conventions (`rpc.system`,
//!   `rpc.service`, `rpc.method`, `rpc.grpc.status_code`,
//!   `server.address`, `client.identity`). W3C `traceparent`/`tracestate`
//!   travel in gRPC metadata, so a call across services is one trace.
//!   Retries, hedges and ejections are span events.
//! - **Export**: [`init`] (with the `otlp` feature, on by default) exports
//!   spans over OTLP/gRPC when the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set,
//!   through a batch processor with a bounded queue that drops rather than
//!   blocks (`OTEL_BSP_*` tune it); `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER(_ARG)` are honoured.
//! - **Metrics**: a [`Metrics`] handle per mesh and server (by default the
//!   process's, [`metrics()`]) holds the golden metrics, served in the
//!   OpenMetrics text format by the admin port (`admin`, with the `admin`
//!   feature, on by default).
//! - **Logs**: `tracing` events to stderr, filtered by `RUST_LOG` (default
//!   `info`), human-readable or JSON (`LOG_FORMAT=json`); lines logged
//!   while handling a call carry its `trace_id`.

#[cfg(feature = "admin")]
pub mod admin;
pub(crate) mod metrics;
pub(crate) mod rpc;
#[cfg(test)]
mod rpc_tests;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

pub use metrics::{Direction, Metrics, code_name, metrics};

/// What [`init`] set up; call [`Telemetry::shutdown`] before exiting so
/// the last spans are exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes queued spans (bounded by the exporter's timeout) and stops
    /// the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The batch processor blocks while it flushes; keep that off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Sets up logs, traces and the trace exporter for a process running
/// `service` (its name in metrics and, unless `OTEL_SERVICE_NAME` says
/// otherwise, in traces). Call it once, inside the tokio runtime, before
/// serving. If a global `tracing` subscriber already exists it is kept.
pub fn init(service: &str) -> Telemetry {
    use std::io::IsTerminal;

    metrics().set_service(service);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    let fmt = if json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };

    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_owned());
    }
    #[cfg_attr(not(feature = "otlp"), allow(unused_mut))]
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    let wanted = (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
        || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    #[cfg_attr(not(feature = "otlp"), allow(unused_mut))]
    let mut exporting = false;
    let mut export_error: Option<String> = None;
    #[cfg(feature = "otlp")]
    if wanted {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                builder = builder.with_batch_exporter(exporter);
                exporting = true;
            }
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    #[cfg(not(feature = "otlp"))]
    if wanted {
        export_error =
            Some("mesh-client was built without its `otlp` feature, which exports traces".into());
    }
    // Without an exporter spans are still made: they carry the trace
    // context from inbound calls to outbound ones and into log lines.
    let provider = builder.build();
    let tracer = provider.tracer("mesh-client");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(
            Targets::new()
                .with_target("mesh_client", Level::DEBUG)
                .with_default(Level::INFO),
        );
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    if let Some(e) = export_error {
        tracing::warn!("OTLP trace export is configured but cannot start; not exporting: {e}");
    } else if exporting {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry {
        provider,
        exporting,
    }
}
