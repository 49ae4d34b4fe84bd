"""The interop test cases on grpcio, the reference implementation, written
from grpc/grpc doc/interop-test-descriptions.md ("Client").

Flags as the spec names them: --server_host, --server_port, --test_case
(one case, a comma-separated list, or "all"), --use_tls (with
--ca_file, the PEM CA that issued the server's certificate, and
--server_host_override, the name it carries). Prints "PASS <case>" or
"FAIL <case>: <reason>" per case; exits 0 only when every case passed.
"""

import argparse
import queue
import sys
import threading

import grpc

from interop_stubs import load

empty_pb2, messages_pb2, test_pb2_grpc = load()

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
INITIAL_VALUE = "test_initial_metadata_value"
TRAILING_VALUE = b"\xab\xab\xab"
STATUS_MESSAGE = "test status message"
SPECIAL_MESSAGE = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
SIZES = (31415, 9, 2653, 58979)
BODIES = (27182, 8, 1828, 45904)
TIMEOUT = 15  # seconds; every call has a deadline


class Failure(Exception):
    pass


def check(ok, reason):
    if not ok:
        raise Failure(reason)


def zeros(n):
    return b"\x00" * n


def large_request(expect_compressed=None, response_compressed=None):
    request = messages_pb2.SimpleRequest(
        response_size=314159, payload=messages_pb2.Payload(body=zeros(271828))
    )
    if expect_compressed is not None:
        request.expect_compressed.value = expect_compressed
    if response_compressed is not None:
        request.response_compressed.value = response_compressed
    return request


def output_request(sizes, body=0):
    request = messages_pb2.StreamingOutputCallRequest(
        response_parameters=[messages_pb2.ResponseParameters(size=s) for s in sizes]
    )
    if body:
        request.payload.body = zeros(body)
    return request


def check_payload(payload, size, what):
    check(len(payload.body) == size, f"{what}: payload is {len(payload.body)} bytes, expected {size}")
    check(payload.body == zeros(size), f"{what}: payload is not all zeros")


def expect_code(call, code, what):
    try:
        result = call()
    except grpc.RpcError as e:
        check(e.code() == code, f"{what}: expected {code}, got {e.code()} {e.details()!r}")
        return e
    raise Failure(f"{what}: expected {code}, got OK {result!r}"[:300])


class Pipe:
    """A request iterator fed from the test, closed by add(None)."""

    def __init__(self):
        self._queue = queue.Queue()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is None:
            raise StopIteration
        return item

    def add(self, item):
        self._queue.put(item)

    def close(self):
        self._queue.put(None)


def empty_unary(stub, channel):
    check(stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT) is not None, "no response")


def large_unary(stub, channel):
    check_payload(stub.UnaryCall(large_request(), timeout=TIMEOUT).payload, 314159, "response")


def client_compressed_unary(stub, channel):
    expect_code(
        lambda: stub.UnaryCall(large_request(expect_compressed=True), timeout=TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "probe (uncompressed, expect_compressed=true)",
    )
    response = stub.UnaryCall(
        large_request(expect_compressed=True), timeout=TIMEOUT, compression=grpc.Compression.Gzip
    )
    check_payload(response.payload, 314159, "compressed request")
    response = stub.UnaryCall(large_request(expect_compressed=False), timeout=TIMEOUT)
    check_payload(response.payload, 314159, "uncompressed request")


def server_compressed_unary(stub, channel):
    # grpcio does not show the client a message's compressed flag; the
    # mesh client checks it, here the calls must succeed with the payload.
    for compressed in (True, False):
        response = stub.UnaryCall(large_request(response_compressed=compressed), timeout=TIMEOUT)
        check_payload(response.payload, 314159, f"response_compressed={compressed}")


def client_streaming(stub, channel):
    requests = (
        messages_pb2.StreamingInputCallRequest(payload=messages_pb2.Payload(body=zeros(n)))
        for n in BODIES
    )
    response = stub.StreamingInputCall(requests, timeout=TIMEOUT)
    check(
        response.aggregated_payload_size == 74922,
        f"aggregated_payload_size is {response.aggregated_payload_size}, expected 74922",
    )


def server_streaming(stub, channel):
    sizes = [len(r.payload.body) for r in stub.StreamingOutputCall(output_request(SIZES), timeout=TIMEOUT)]
    check(sizes == list(SIZES), f"response sizes {sizes}, expected {list(SIZES)}")


def ping_pong(stub, channel):
    pipe = Pipe()
    responses = stub.FullDuplexCall(pipe, timeout=TIMEOUT)
    try:
        for size, body in zip(SIZES, BODIES):
            pipe.add(output_request([size], body))
            check_payload(next(responses).payload, size, "response")
    finally:
        pipe.close()
    check(next(responses, None) is None, "a fifth response after half-close")


def empty_stream(stub, channel):
    check(list(stub.FullDuplexCall(iter([]), timeout=TIMEOUT)) == [], "a response to an empty stream")


def cancel_after_begin(stub, channel):
    pipe = Pipe()
    future = stub.StreamingInputCall.future(pipe, timeout=TIMEOUT)
    future.cancel()
    pipe.close()
    check(future.code() == grpc.StatusCode.CANCELLED, f"call ended with {future.code()}")


def cancel_after_first_response(stub, channel):
    pipe = Pipe()
    responses = stub.FullDuplexCall(pipe, timeout=TIMEOUT)
    pipe.add(output_request([31415], 27182))
    check_payload(next(responses).payload, 31415, "first response")
    responses.cancel()
    pipe.close()
    expect_code(lambda: next(responses), grpc.StatusCode.CANCELLED, "after cancel")


def timeout_on_sleeping_server(stub, channel):
    pipe = Pipe()
    responses = stub.FullDuplexCall(pipe, timeout=0.001)
    pipe.add(output_request([], 27182))
    try:
        expect_code(lambda: next(responses), grpc.StatusCode.DEADLINE_EXCEEDED, "1 ms deadline")
    finally:
        pipe.close()


def echo_status(message):
    return messages_pb2.EchoStatus(code=2, message=message)


def check_status(error, message, what):
    check(
        error.details() == message,
        f"{what}: expected message {message!r}, got {error.details()!r}",
    )


def status_code_and_message(stub, channel):
    request = messages_pb2.SimpleRequest(response_status=echo_status(STATUS_MESSAGE))
    error = expect_code(lambda: stub.UnaryCall(request, timeout=TIMEOUT), grpc.StatusCode.UNKNOWN, "UnaryCall")
    check_status(error, STATUS_MESSAGE, "UnaryCall")
    request = messages_pb2.StreamingOutputCallRequest(response_status=echo_status(STATUS_MESSAGE))
    error = expect_code(
        lambda: list(stub.FullDuplexCall(iter([request]), timeout=TIMEOUT)),
        grpc.StatusCode.UNKNOWN,
        "FullDuplexCall",
    )
    check_status(error, STATUS_MESSAGE, "FullDuplexCall")


def special_status_message(stub, channel):
    request = messages_pb2.SimpleRequest(response_status=echo_status(SPECIAL_MESSAGE))
    error = expect_code(lambda: stub.UnaryCall(request, timeout=TIMEOUT), grpc.StatusCode.UNKNOWN, "UnaryCall")
    check_status(error, SPECIAL_MESSAGE, "UnaryCall")


def unimplemented_method(stub, channel):
    expect_code(
        lambda: stub.UnimplementedCall(empty_pb2.Empty(), timeout=TIMEOUT),
        grpc.StatusCode.UNIMPLEMENTED,
        "TestService/UnimplementedCall",
    )


def unimplemented_service(stub, channel):
    other = test_pb2_grpc.UnimplementedServiceStub(channel)
    expect_code(
        lambda: other.UnimplementedCall(empty_pb2.Empty(), timeout=TIMEOUT),
        grpc.StatusCode.UNIMPLEMENTED,
        "UnimplementedService/UnimplementedCall",
    )


def check_echoed(initial, trailing, what):
    initial = dict(initial or ())
    trailing = dict(trailing or ())
    check(
        initial.get(ECHO_INITIAL) == INITIAL_VALUE,
        f"{what}: initial metadata {ECHO_INITIAL} is {initial.get(ECHO_INITIAL)!r}",
    )
    check(
        trailing.get(ECHO_TRAILING) == TRAILING_VALUE,
        f"{what}: trailing metadata {ECHO_TRAILING} is {trailing.get(ECHO_TRAILING)!r}",
    )


def custom_metadata(stub, channel):
    metadata = ((ECHO_INITIAL, INITIAL_VALUE), (ECHO_TRAILING, TRAILING_VALUE))
    response, call = stub.UnaryCall.with_call(large_request(), metadata=metadata, timeout=TIMEOUT)
    check_payload(response.payload, 314159, "UnaryCall")
    check_echoed(call.initial_metadata(), call.trailing_metadata(), "UnaryCall")
    responses = stub.FullDuplexCall(iter([output_request([314159], 271828)]), metadata=metadata, timeout=TIMEOUT)
    received = list(responses)
    check(len(received) == 1, f"FullDuplexCall: {len(received)} responses, expected 1")
    check_payload(received[0].payload, 314159, "FullDuplexCall")
    check_echoed(responses.initial_metadata(), responses.trailing_metadata(), "FullDuplexCall")


CASES = {
    f.__name__: f
    for f in (
        empty_unary,
        large_unary,
        client_compressed_unary,
        server_compressed_unary,
        client_streaming,
        server_streaming,
        ping_pong,
        empty_stream,
        cancel_after_begin,
        cancel_after_first_response,
        timeout_on_sleeping_server,
        status_code_and_message,
        special_status_message,
        unimplemented_method,
        unimplemented_service,
        custom_metadata,
    )
}


def boolean(text):
    return text.lower() in ("true", "1", "yes")


def run(case, stub, channel):
    """The case's outcome, run on a thread so a hung case fails alone."""
    outcome = {}

    def target():
        try:
            CASES[case](stub, channel)
            outcome["error"] = None
        except Failure as e:
            outcome["error"] = str(e)
        except grpc.RpcError as e:
            outcome["error"] = f"{e.code()} {e.details()!r}"
        except Exception as e:  # a broken case is a failure, not a crash
            outcome["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT + 5)
    return outcome.get("error", f"no outcome within {TIMEOUT + 5} s (hung)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server_host", default="127.0.0.1")
    parser.add_argument("--server_port", type=int, required=True)
    parser.add_argument("--test_case", default="all")
    parser.add_argument("--use_tls", type=boolean, default=False)
    parser.add_argument("--ca_file")
    parser.add_argument("--server_host_override")
    args = parser.parse_args()
    cases = list(CASES) if args.test_case == "all" else args.test_case.split(",")
    target = f"{args.server_host}:{args.server_port}"
    if args.use_tls:
        with open(args.ca_file, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = []
        if args.server_host_override:
            options.append(("grpc.ssl_target_name_override", args.server_host_override))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    stub = test_pb2_grpc.TestServiceStub(channel)
    failed = 0
    for case in cases:
        if case not in CASES:
            error = f"unknown test case {case!r}"
        else:
            error = run(case, stub, channel)
        if error is None:
            print(f"PASS {case}", flush=True)
        else:
            failed += 1
            print(f"FAIL {case}: {error}".replace("\n", "\\n"), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
