"""The recommendations server: configuration, the mesh's server-side
contract (mTLS identity, authorization, deadlines, telemetry, health,
reflection, drain) and the service itself.

Configuration comes from flags or the environment, with the Rust services'
names (`--listen`/`LISTEN_ADDR`, `--tls-dir`/`TLS_DIR`, ...); invalid
configuration exits with code 64 and lists every problem.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from recommendations import identity as ident
from recommendations import stubs
from recommendations.policy import PolicyError, PolicyFile
from recommendations.store import Store, Unavailable
from recommendations.telemetry import AdminServer, Metrics, setup_tracing

log = logging.getLogger("recommendations")

NAME = "recommendations"
SERVICE = "mesh.recommendations.v1.RecommendationsService"
HEALTH = "grpc.health.v1.Health"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
LIVENESS = "liveness"
REFUSED_BY_HEADER = "mesh-refused-by"
EXIT_CONFIG = 64

MAX_ID_CHARS = 128
MAX_PRODUCTS = 100
MAX_RESULTS = 20
DEFAULT_RESULTS = 5


def _env(name, default=None):
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def parse_args(argv):
    p = argparse.ArgumentParser(prog=NAME, description="The shop's recommendations service (Python, on the mesh)")
    p.add_argument("--listen", default=_env("LISTEN_ADDR", "127.0.0.1:50056"), help="gRPC address (LISTEN_ADDR)")
    p.add_argument(
        "--database-url",
        default=_env("DATABASE_URL", "sqlite://recommendations.db"),
        help="sqlite://PATH or postgres://... (DATABASE_URL)",
    )
    p.add_argument("--tls-dir", default=_env("TLS_DIR"), help="tls.crt, tls.key, ca.crt; plaintext without (TLS_DIR)")
    p.add_argument("--mesh-config", default=_env("MESH_CONFIG"), help="mesh policy JSON; its authorization is enforced (MESH_CONFIG)")
    p.add_argument("--trust-domain", default=_env("TRUST_DOMAIN", "shop.local"), help="SPIFFE trust domain (TRUST_DOMAIN)")
    p.add_argument("--namespace", default=_env("MESH_NAMESPACE", "shop"), help="namespace of identities (MESH_NAMESPACE)")
    p.add_argument("--admin-addr", default=_env("ADMIN_ADDR"), help="plaintext admin port: /metrics, /live, /ready, gRPC health (ADMIN_ADDR)")
    p.add_argument("--drain-grace-ms", default=_env("DRAIN_GRACE_MS", "0"), help="NOT_SERVING before closing on SIGTERM (DRAIN_GRACE_MS)")
    p.add_argument("--drain-timeout-ms", default=_env("DRAIN_TIMEOUT_MS", "25000"), help="longest wait for in-flight calls (DRAIN_TIMEOUT_MS)")
    p.add_argument("--max-request-bytes", default=_env("MAX_REQUEST_BYTES", str(4 * 1024 * 1024)), help="(MAX_REQUEST_BYTES)")
    p.add_argument("--max-response-bytes", default=_env("MAX_RESPONSE_BYTES", str(4 * 1024 * 1024)), help="(MAX_RESPONSE_BYTES)")
    p.add_argument("--max-concurrent-calls", default=_env("MAX_CONCURRENT_CALLS", "1024"), help="beyond it RESOURCE_EXHAUSTED at once")
    p.add_argument("--proto-dir", default=_env("PROTO_DIR"), help="proto/ to generate stubs from (PROTO_DIR)")
    p.add_argument(
        "--fault-file",
        default=_env("FAULT_FILE"),
        help='chaos hook for tests: JSON {"delayMs": N, "error": "UNAVAILABLE"} applied to each call while present (FAULT_FILE)',
    )
    args = p.parse_args(argv)
    problems = []

    def number(flag, low, high):
        raw = getattr(args, flag.replace("-", "_"))
        try:
            value = int(raw)
        except ValueError:
            problems.append(f"--{flag}: must be a whole number, got {raw!r}")
            return low
        if not low <= value <= high:
            problems.append(f"--{flag}: must be {low} to {high}, got {value}")
        return value

    args.drain_grace_ms = number("drain-grace-ms", 0, 600_000)
    args.drain_timeout_ms = number("drain-timeout-ms", 0, 600_000)
    args.max_request_bytes = number("max-request-bytes", 1024, 64 * 1024 * 1024)
    args.max_response_bytes = number("max-response-bytes", 1024, 64 * 1024 * 1024)
    args.max_concurrent_calls = number("max-concurrent-calls", 1, 100_000)
    for flag in ("listen", "admin_addr"):
        value = getattr(args, flag)
        if value is None:
            continue
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            problems.append(f"--{flag.replace('_', '-')}: {value!r} is not host:port")
    if not args.database_url.startswith(("sqlite:", "postgres://", "postgresql://")):
        problems.append(f"--database-url: {args.database_url!r} is neither sqlite://PATH nor postgres://...")
    if args.mesh_config and not os.path.isfile(args.mesh_config):
        problems.append(f"--mesh-config: {args.mesh_config} is not a file")
    if args.tls_dir and not os.path.isdir(args.tls_dir):
        problems.append(f"--tls-dir: {args.tls_dir} is not a directory")
    return args, problems


class Faults:
    """The `--fault-file` chaos hook (absent file: no fault)."""

    def __init__(self, path):
        self.path = path
        self._stamp = None
        self._fault = {}

    def current(self):
        if not self.path:
            return {}
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            return {}
        if stamp != self._stamp:
            try:
                with open(self.path, encoding="utf-8") as f:
                    self._fault = json.load(f)
            except (OSError, ValueError):
                self._fault = {}
            self._stamp = stamp
        return self._fault

    async def apply(self, context):
        fault = self.current()
        if fault.get("delayMs"):
            await asyncio.sleep(int(fault["delayMs"]) / 1000)
        if fault.get("error"):
            code = getattr(grpc.StatusCode, str(fault["error"]), grpc.StatusCode.UNAVAILABLE)
            await context.abort(code, f"injected fault: {code.name}")


def _check_ids(field, values, low, high):
    problems = []
    if not low <= len(values) <= high:
        problems.append(f"{field}: must list {low} to {high}, got {len(values)}")
    for i, v in enumerate(values):
        if not 1 <= len(v) <= MAX_ID_CHARS:
            problems.append(f"{field}[{i}]: must be 1 to {MAX_ID_CHARS} characters, got {len(v)}")
            break
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            problems.append(f"{field}[{i}]: must not contain control characters")
            break
    return problems


def servicer_class(pb2, pb2_grpc):
    class Recommendations(pb2_grpc.RecommendationsServiceServicer):
        def __init__(self, store, faults, health):
            self.store = store
            self.faults = faults
            self.health = health
            self._recovering = None

        async def _db(self, context, work, *args):
            remaining = context.time_remaining()
            try:
                return await asyncio.wait_for(asyncio.to_thread(work, *args), remaining)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed while reading the database")
            except Unavailable as e:
                log.warning("database unavailable: %s", e)
                self._database_down()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the recommendations database is unavailable; retry shortly")

        def _database_down(self):
            # NOT_SERVING until the database answers again, so balancers
            # send the calls elsewhere meanwhile.
            if self._recovering is not None and not self._recovering.done():
                return
            self._recovering = asyncio.ensure_future(self._recover())

        async def _recover(self):
            await self.health.set_ready(False)
            while True:
                await asyncio.sleep(1)
                try:
                    await asyncio.to_thread(self.store.ping)
                except Unavailable:
                    continue
                log.info("database reachable again")
                await self.health.set_ready(True)
                return

        async def Recommend(self, request, context):
            await self.faults.apply(context)
            problems = []
            if len(request.user_id) > MAX_ID_CHARS:
                problems.append(f"user_id: must be at most {MAX_ID_CHARS} characters, got {len(request.user_id)}")
            problems += _check_ids("product_ids", request.product_ids, 0, MAX_PRODUCTS)
            if not 0 <= request.max_results <= MAX_RESULTS:
                problems.append(f"max_results: must be 0 to {MAX_RESULTS}, got {request.max_results}")
            if problems:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
            limit = request.max_results or DEFAULT_RESULTS
            ids = await self._db(context, self.store.recommend, list(request.product_ids), limit)
            return pb2.RecommendResponse(product_ids=ids)

        async def RecordOrder(self, request, context):
            await self.faults.apply(context)
            problems = []
            if not 1 <= len(request.order_id) <= MAX_ID_CHARS:
                problems.append(f"order_id: must be 1 to {MAX_ID_CHARS} characters, got {len(request.order_id)}")
            problems += _check_ids("product_ids", request.product_ids, 1, MAX_PRODUCTS)
            if problems:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
            recorded = await self._db(context, self.store.record_order, request.order_id, list(request.product_ids))
            return pb2.RecordOrderResponse(recorded=recorded)

    return Recommendations


# Health watches one peer address may hold open at once: a client replica
# watches once per connection it holds here (a few, reconnects included).
WATCHES_PER_CALLER = 16


class Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health: Check and Watch. Draining sets everything but
    `liveness` NOT_SERVING; closing ends every Watch stream, which would
    otherwise hold the drain open.

    Watch streams never end, and gRPC counts them against the server's
    `maximum_concurrent_rpcs`; health is open to every caller, so without
    a cap of their own one peer's watches could take every place and
    refuse everyone's calls. At most `max_watches` are open at once, and
    `WATCHES_PER_CALLER` per peer address (not per SPIFFE ID: every
    replica of a caller shares its ID, and a replica refused its watch
    would route around this server); beyond them RESOURCE_EXHAUSTED.
    This bounds well-formed watches only: a peer that opens streams and
    never sends their request message holds places too, since gRPC Python
    reads the request before any handler or interceptor runs; who can
    reach the port at all is the network policy's to bound."""

    def __init__(self, services, max_watches=256):
        self.statuses = {s: health_pb2.HealthCheckResponse.SERVING for s in services}
        self.statuses[LIVENESS] = health_pb2.HealthCheckResponse.SERVING
        self.changed = asyncio.Condition()
        self.closed = False
        self.draining = False
        self.max_watches = max_watches
        self.per_caller = min(WATCHES_PER_CALLER, max_watches)
        self.watching = {}

    async def Check(self, request, context):
        status = self.statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        # `ipv4:10.0.0.5:4567` → `ipv4:10.0.0.5` (`ipv6:[::1]:4567` alike).
        caller = context.peer().rsplit(":", 1)[0]
        held = self.watching.get(caller, 0)
        if held >= self.per_caller or sum(self.watching.values()) >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health watches open (at most {self.per_caller} per address, "
                f"{self.max_watches} in all); use Check, or fewer connections",
            )
        self.watching[caller] = held + 1
        try:
            async for update in self._watch(request):
                yield update
        finally:
            left = self.watching.get(caller, 1) - 1
            if left:
                self.watching[caller] = left
            else:
                self.watching.pop(caller, None)

    async def _watch(self, request):
        last = None
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        while True:
            status = self.statuses.get(request.service, unknown)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.closed:
                return
            # A predicate, not a bare wait: a change made while the last
            # message was being sent is seen here, not lost until the next.
            async with self.changed:
                await self.changed.wait_for(
                    lambda: self.closed or self.statuses.get(request.service, unknown) != last
                )

    async def set_ready(self, ready):
        """SERVING or NOT_SERVING for everything but `liveness` (a drain
        stays a drain)."""
        if self.draining:
            return
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self.statuses:
            if service != LIVENESS:
                self.statuses[service] = status
        async with self.changed:
            self.changed.notify_all()

    async def drain(self):
        self.draining = True
        for service in self.statuses:
            if service != LIVENESS:
                self.statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        async with self.changed:
            self.changed.notify_all()

    async def close(self):
        self.closed = True
        async with self.changed:
            self.changed.notify_all()


class MeshInterceptor(grpc.aio.ServerInterceptor):
    """Authorization, deadline, span and golden metrics around every call."""

    def __init__(self, known, policy, metrics, tracer, tls):
        self.known = known
        self.policy = policy
        self.metrics = metrics
        self.tracer = tracer
        self.tls = tls

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        path = details.method
        if handler is None:
            async def unknown(request, context):
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this server does not serve {path.lstrip('/')}")

            handler = grpc.unary_unary_rpc_method_handler(unknown)
        return self._wrap(handler, path)

    def _wrap(self, handler, path):
        run = self._run
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                return await run(path, context, lambda: inner(request, context))

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner = handler.unary_stream

            async def server_stream(request, context):
                async for item in self._stream(path, context, lambda: inner(request, context)):
                    yield item

            return grpc.unary_stream_rpc_method_handler(server_stream, handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            inner = handler.stream_unary

            async def client_stream(requests, context):
                return await run(path, context, lambda: inner(requests, context))

            return grpc.stream_unary_rpc_method_handler(client_stream, handler.request_deserializer, handler.response_serializer)
        inner = handler.stream_stream

        async def bidi(requests, context):
            async for item in self._stream(path, context, lambda: inner(requests, context)):
                yield item

        return grpc.stream_stream_rpc_method_handler(bidi, handler.request_deserializer, handler.response_serializer)

    async def _admit(self, path, context):
        """The caller's identity, after authorization (aborts on a denial)."""
        caller = ident.caller_identity(context) if self.tls else None
        method = path.lstrip("/")
        policy = self.policy.policy
        if policy is not None and not policy.allows(caller, method):
            service, name = self._labels(path)
            audit = policy.mode == "audit"
            self.metrics.denials.labels(service, name, caller or "unauthenticated", "audit" if audit else "enforce").inc()
            who = caller or "an unauthenticated caller (no client certificate identity)"
            if audit:
                log.warning("authorization audit: would deny %s calling %s", who, method)
            else:
                log.info("authorization denied: %s calling %s", who, method)
                context.set_trailing_metadata(((REFUSED_BY_HEADER, "authorization"),))
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{who} is not allowed to call {method}")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline had passed when it arrived")
        return caller

    def _labels(self, path):
        if path in self.known:
            service, _, name = path.lstrip("/").partition("/")
            return service, name
        return "unknown", "unknown"

    def _begin(self, path, context, caller):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        service, name = self._labels(path)
        labels = ("inbound", caller or "unknown", service, name)
        self.metrics.requests.labels(*labels).inc()
        self.metrics.in_flight.labels(*labels).inc()
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if k in ("traceparent", "tracestate")}
        parent = TraceContextTextMapPropagator().extract(carrier)
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        if caller:
            attributes["client.identity"] = caller
        span = self.tracer.start_span(f"{service}/{name}", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
        return labels, span, time.monotonic()

    def _end(self, labels, span, started, code):
        from opentelemetry.trace import Status, StatusCode

        self.metrics.in_flight.labels(*labels).dec()
        self.metrics.latency.labels(*labels).observe(time.monotonic() - started)
        self.metrics.responses.labels(*labels, code.name).inc()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    @staticmethod
    def _code(context, error):
        """The status a call ended with."""
        if isinstance(error, asyncio.CancelledError):
            remaining = context.time_remaining()
            return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        if isinstance(code, int):
            return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK

    async def _run(self, path, context, call):
        from opentelemetry import trace

        caller = await self._admit(path, context)
        labels, span, started = self._begin(path, context, caller)
        error = None
        try:
            with trace.use_span(span, end_on_exit=False):
                return await call()
        except BaseException as e:
            error = e
            raise
        finally:
            self._end(labels, span, started, self._code(context, error))

    async def _stream(self, path, context, call):
        from opentelemetry import trace

        caller = await self._admit(path, context)
        labels, span, started = self._begin(path, context, caller)
        error = None
        try:
            with trace.use_span(span, end_on_exit=False):
                async for item in call():
                    yield item
        except BaseException as e:
            error = e
            raise
        finally:
            self._end(labels, span, started, self._code(context, error))


def _reflection_v1(servicer):
    """grpc.reflection.v1 served by the v1alpha servicer: the two protocols'
    messages are the same on the wire (grpcio-reflection ships only v1alpha;
    grpcurl 1.8 speaks v1alpha, newer tools v1)."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler})


def setup_logging():
    level = getattr(logging, _env("LOG_LEVEL", "INFO").upper(), logging.INFO)
    if _env("LOG_FORMAT") == "json":

        class Json(logging.Formatter):
            def format(self, record):
                from opentelemetry import trace

                line = {"level": record.levelname, "target": record.name, "message": record.getMessage()}
                ctx = trace.get_current_span().get_span_context()
                if ctx.is_valid:
                    line["trace_id"] = format(ctx.trace_id, "032x")
                return json.dumps(line)

        handler = logging.StreamHandler()
        handler.setFormatter(Json())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(args):
    pb2, pb2_grpc = stubs.load(args.proto_dir)
    metrics = Metrics()
    tls = None
    if args.tls_dir:
        tls = ident.FileIdentity(
            args.tls_dir,
            on_reload=lambda m: metrics.set_identity(NAME, m.spiffe_id, m.not_after),
        )
        metrics.set_identity(NAME, tls.spiffe_id, tls.material.not_after)
        parsed = ident.parse_spiffe_id(tls.spiffe_id)
        if parsed[0] != args.trust_domain or parsed[1] != args.namespace:
            log.warning("the certificate's identity %s is outside %s/ns/%s", tls.spiffe_id, args.trust_domain, args.namespace)
    else:
        metrics.set_identity(NAME, None, 0)
        log.warning("PLAINTEXT: no --tls-dir, so no identities and no authorization policy; for debugging on loopback only")
    policy = PolicyFile(args.mesh_config, metrics)
    if policy.policy is None:
        log.warning("no authorization policy: every caller may call every method")
    stop_watch = policy.start()
    provider, tracer = setup_tracing(NAME)
    store = await asyncio.to_thread(Store, args.database_url)

    # A quarter of the calls' places at most, so watches never take them all.
    health = Health(["", SERVICE], max_watches=max(1, args.max_concurrent_calls // 4))
    known = {f"/{SERVICE}/Recommend", f"/{SERVICE}/RecordOrder", f"/{HEALTH}/Check", f"/{HEALTH}/Watch"}
    known |= {f"/{r}/ServerReflectionInfo" for r in (REFLECTION_V1, REFLECTION_V1ALPHA)}
    options = [
        ("grpc.max_receive_message_length", args.max_request_bytes),
        ("grpc.max_send_message_length", args.max_response_bytes),
        ("grpc.max_concurrent_streams", 256),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # mesh-client pings every 5 s, also on connections whose only
        # stream is a quiet health watch; gRPC core's default (one ping
        # per 5 min without data, GOAWAY after 2 strikes) would close them.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_connection_age_ms", 3_600_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
        # As the Rust servers: a TLS handshake gets 10 s.
        ("grpc.server_handshake_timeout_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        interceptors=[MeshInterceptor(known, policy, metrics, tracer, tls is not None)],
        options=options,
        maximum_concurrent_rpcs=args.max_concurrent_calls,
    )
    servicer = servicer_class(pb2, pb2_grpc)(store, Faults(args.fault_file), health)
    pb2_grpc.add_RecommendationsServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [SERVICE, HEALTH, REFLECTION_V1ALPHA, REFLECTION_V1]
    reflection = ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection, server)
    server.add_generic_rpc_handlers((_reflection_v1(reflection),))
    if tls:
        port = server.add_secure_port(args.listen, tls.server_credentials())
    else:
        port = server.add_insecure_port(args.listen)
    if port == 0:
        raise OSError(f"--listen: cannot bind {args.listen}")

    draining = False
    admin = None
    probe = None
    if args.admin_addr:
        # Health for the kubelet's plaintext probes, behind the admin port.
        probe = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, probe)
        probe_port = probe.add_insecure_port("127.0.0.1:0")
        await probe.start()
        host, _, admin_port = args.admin_addr.rpartition(":")
        admin = await AdminServer(metrics, lambda: not draining, probe_port).start(host.strip("[]"), int(admin_port))

    await server.start()
    log.info("serving %s on %s (%s)", SERVICE, args.listen, f"mTLS as {tls.spiffe_id}" if tls else "plaintext")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("draining: health NOT_SERVING, finishing in-flight calls")
    draining = True
    await health.drain()
    await asyncio.sleep(args.drain_grace_ms / 1000)
    await health.close()
    await server.stop(args.drain_timeout_ms / 1000)
    if probe:
        await probe.stop(0)
    if admin:
        admin.close()
    stop_watch.set()
    provider.shutdown()
    log.info("drained; exiting")
    return 0


def main(argv):
    setup_logging()
    args, problems = parse_args(argv)
    if problems:
        for p in problems:
            print(f"recommendations: {p}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(serve(args))
    except (ident.IdentityError, PolicyError) as e:
        print(f"recommendations: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"recommendations: {e}", file=sys.stderr)
        return 1
