"""grpc.testing.TestService on grpcio, the reference implementation, written
from grpc/grpc doc/interop-test-descriptions.md ("Server").

Flags as the spec names them: --port, --use_tls (server-only TLS with
--tls_cert_file and --tls_key_file, PEM). Listens on 127.0.0.1 only.
"""

import argparse
import sys
import time
from concurrent import futures

import grpc

from interop_stubs import load

empty_pb2, messages_pb2, test_pb2_grpc = load()

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
CODES = {code.value[0]: code for code in grpc.StatusCode}


def echo_metadata(context):
    """Echo Metadata: the initial key back as initial metadata, the
    trailing-bin key back as trailing metadata."""
    metadata = dict(context.invocation_metadata())
    if ECHO_INITIAL in metadata:
        context.send_initial_metadata(((ECHO_INITIAL, metadata[ECHO_INITIAL]),))
    if ECHO_TRAILING in metadata:
        context.set_trailing_metadata(((ECHO_TRAILING, metadata[ECHO_TRAILING]),))


def echo_status(request, context):
    """Echo Status: a requested non-OK status ends the call with it."""
    if request.HasField("response_status") and request.response_status.code != 0:
        code = CODES.get(request.response_status.code, grpc.StatusCode.UNKNOWN)
        context.abort(code, request.response_status.message)


def payload(size, context):
    if size < 0:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "negative response size")
    return messages_pb2.Payload(body=b"\x00" * size)


def report_cancellation(method, context):
    """Prints "cancelled <method>" when the client cancels the call, so
    the test can check that a cancellation reached this server."""

    def done():
        # Still time left when the call ended unfinished: the client
        # cancelled it (not the deadline).
        remaining = context.time_remaining()
        if not finished and (remaining is None or remaining > 0):
            print(f"cancelled {method}", flush=True)

    finished = False
    context.add_callback(done)

    def finish():
        nonlocal finished
        finished = True

    return finish


def respond(parameters, context):
    for p in parameters:
        if p.interval_us > 0:
            time.sleep(p.interval_us / 1e6)
        yield messages_pb2.StreamingOutputCallResponse(payload=payload(p.size, context))


class TestService(test_pb2_grpc.TestServiceServicer):
    def EmptyCall(self, request, context):
        return empty_pb2.Empty()

    def UnaryCall(self, request, context):
        echo_metadata(context)
        echo_status(request, context)
        # CompressedRequest cannot be checked here: grpcio shows a handler
        # neither the message's compressed flag nor grpc-encoding.
        compressed = request.HasField("response_compressed") and request.response_compressed.value
        context.set_compression(grpc.Compression.Gzip if compressed else grpc.Compression.NoCompression)
        return messages_pb2.SimpleResponse(payload=payload(request.response_size, context))

    def CacheableUnaryCall(self, request, context):
        context.send_initial_metadata((("cache-control", "max-age=60, public"),))
        return messages_pb2.SimpleResponse(
            payload=messages_pb2.Payload(body=str(time.time_ns()).encode())
        )

    def StreamingOutputCall(self, request, context):
        echo_metadata(context)
        yield from respond(request.response_parameters, context)
        echo_status(request, context)

    def StreamingInputCall(self, request_iterator, context):
        finish = report_cancellation("StreamingInputCall", context)
        total = sum(len(r.payload.body) for r in request_iterator)
        finish()
        return messages_pb2.StreamingInputCallResponse(aggregated_payload_size=total)

    def FullDuplexCall(self, request_iterator, context):
        finish = report_cancellation("FullDuplexCall", context)
        echo_metadata(context)
        for request in request_iterator:
            if request.HasField("response_status") and request.response_status.code != 0:
                finish()  # ended by the requested status, not cancelled
            echo_status(request, context)
            yield from respond(request.response_parameters, context)
        finish()

    def HalfDuplexCall(self, request_iterator, context):
        echo_metadata(context)
        requests = list(request_iterator)
        for request in requests:
            echo_status(request, context)
            yield from respond(request.response_parameters, context)

    # UnimplementedCall is left out on purpose: grpcio answers UNIMPLEMENTED.


def boolean(text):
    return text.lower() in ("true", "1", "yes")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--use_tls", type=boolean, default=False)
    parser.add_argument("--tls_cert_file")
    parser.add_argument("--tls_key_file")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    test_pb2_grpc.add_TestServiceServicer_to_server(TestService(), server)
    address = f"127.0.0.1:{args.port}"
    if args.use_tls:
        with open(args.tls_key_file, "rb") as k, open(args.tls_cert_file, "rb") as c:
            credentials = grpc.ssl_server_credentials(((k.read(), c.read()),))
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        sys.exit(f"cannot listen on {address}")
    server.start()
    print(f"interop server listening on {address}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
