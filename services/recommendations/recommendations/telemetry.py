"""Golden metrics, traces and the admin port, with mesh-client's names.

Metrics (crates/mesh-client/src/telemetry/metrics.rs): `mesh_requests_total`,
`mesh_responses_total{grpc_code}`, `mesh_response_latency_seconds` (the same
buckets), `mesh_in_flight_requests`, labelled `direction`, `peer` (the
caller's verified SPIFFE ID, `unknown` without one), `rpc_service`,
`rpc_method` (methods this server implements; others are `unknown`);
`mesh_authorization_denials_total`, `mesh_config_reloads_total`,
`mesh_certificate_expiry_timestamp_seconds`, `mesh_process_info`.

Traces: a server span per call named `package.Service/Method` with
OpenTelemetry's RPC attributes, continuing the caller's W3C `traceparent`;
exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, nothing otherwise.

The admin port answers HTTP/1.1 `/metrics` (OpenMetrics), `/live`, `/ready`
and, on the same port, plaintext HTTP/2 for `grpc.health.v1.Health` (the
kubelet's gRPC probes), told apart by the HTTP/2 connection preface.
"""

import asyncio
import logging
import os

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("recommendations.telemetry")

# As mesh-client: fine below a millisecond, up to the longest deadlines.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, float("inf"),
)
RPC = ("direction", "peer", "rpc_service", "rpc_method")

# mesh-client's Rust registry emits no `_created` series (and ends each
# HELP text with a full stop, which the texts below carry for the same
# exposition).
prometheus_client.disable_created_metrics()


class Metrics:
    """The process's golden metrics, in their own registry."""

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mesh_requests", "Calls started, by direction, peer and method.", RPC, registry=r)
        self.responses = Counter(
            "mesh_responses",
            "Calls finished, by direction, peer, method and gRPC status code.",
            RPC + ("grpc_code",),
            registry=r,
        )
        self.latency = Histogram(
            "mesh_response_latency",
            "Time from request to the end of the response (its trailers).",
            RPC,
            unit="seconds",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("mesh_in_flight_requests", "Calls started and not yet finished.", RPC, registry=r)
        self.denials = Counter(
            "mesh_authorization_denials",
            "Inbound calls the authorization policy denied (or would deny, in audit mode).",
            ("rpc_service", "rpc_method", "caller", "mode"),
            registry=r,
        )
        self.config_reloads = Counter(
            "mesh_config_reloads",
            "Changes of the mesh config file, applied or refused (the last good config stays).",
            ("outcome",),
            registry=r,
        )
        self.cert_expiry = Gauge(
            "mesh_certificate_expiry_timestamp",
            "When this workload's certificate expires (Unix time).",
            ("identity",),
            unit="seconds",
            registry=r,
        )
        self.process = Gauge(
            "mesh_process_info", "The service this process runs and its workload identity.", ("service", "identity"), registry=r
        )

    def set_identity(self, service, identity, not_after):
        self.process.clear()
        self.process.labels(service=service, identity=identity or "").set(1)
        self.cert_expiry.clear()
        if identity:
            self.cert_expiry.labels(identity=identity).set(not_after)

    def encode(self):
        return generate_latest(self.registry)


def setup_tracing(service_name):
    """A tracer: exporting over OTLP/gRPC when the standard variables ask
    for it (sampler and batching from `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`)."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting spans over OTLP")
    trace.set_tracer_provider(provider)
    return provider, trace.get_tracer("recommendations")


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def _pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class AdminServer:
    """The plaintext admin port (see the module docs)."""

    def __init__(self, metrics, ready, health_port):
        self.metrics = metrics
        self.ready = ready  # callable: True while serving (not draining)
        self.health_port = health_port  # loopback port of the health-only gRPC server

    async def start(self, host, port):
        self.server = await asyncio.start_server(self._connection, host, port)
        return self.server

    async def _connection(self, reader, writer):
        # Read only as far as the bytes could still be the HTTP/2 preface,
        # so a short HTTP/1.1 request is answered at once.
        head = b""
        try:
            while len(head) < len(H2_PREFACE) and H2_PREFACE.startswith(head):
                chunk = await asyncio.wait_for(reader.read(len(H2_PREFACE) - len(head)), 10)
                if not chunk:
                    break
                head += chunk
        except (asyncio.TimeoutError, ConnectionError):
            writer.close()
            return
        if head == H2_PREFACE:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.health_port)
            except OSError:
                writer.close()
                return
            up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        await self._http1(head, reader, writer)

    async def _http1(self, head, reader, writer):
        try:
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) if b"\r\n\r\n" not in head else b""
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            writer.close()
            return
        line = (head + rest).split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        path = parts[1] if len(parts) >= 2 else ""
        if path == "/metrics":
            status, ctype, body = 200, CONTENT_TYPE_LATEST, self.metrics.encode()
        elif path == "/live":
            status, ctype, body = 200, "text/plain", b"live\n"
        elif path == "/ready":
            ok = self.ready()
            status, ctype, body = (200 if ok else 503), "text/plain", (b"ready\n" if ok else b"draining\n")
        else:
            status, ctype, body = 404, "text/plain", b"not found\n"
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n".encode()
        )
        if parts[0] != "HEAD":
            writer.write(body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
