"""Generates the grpc.testing stubs from proto/grpc/testing with grpcio-tools
into a temporary directory (never committed) and imports them.

The protos import each other as "grpc/testing/...", which Python would
import as the `grpc.testing` package, inside grpcio's own `grpc`; the copies
here import each other as "interop_pb/..." instead. Only file names change:
package, messages, services and field numbers, which are what the wire
carries, stay exactly as written.
"""

import atexit
import os
import shutil
import sys
import tempfile

from grpc_tools import protoc

NAMES = ("empty", "messages", "test")


def load():
    """Returns (empty_pb2, messages_pb2, test_pb2_grpc)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = os.path.join(root, "proto", "grpc", "testing")
    out = tempfile.mkdtemp(prefix="interop-stubs-")
    atexit.register(shutil.rmtree, out, True)
    package = os.path.join(out, "interop_pb")
    os.makedirs(package)
    for name in NAMES:
        with open(os.path.join(source, name + ".proto"), encoding="utf-8") as f:
            text = f.read().replace('import "grpc/testing/', 'import "interop_pb/')
        with open(os.path.join(package, name + ".proto"), "w", encoding="utf-8") as f:
            f.write(text)
    args = ["protoc", "-I" + out, "--python_out=" + out, "--grpc_python_out=" + out]
    args += [os.path.join(package, name + ".proto") for name in NAMES]
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed on proto/grpc/testing")
    sys.path.insert(0, out)
    from interop_pb import empty_pb2, messages_pb2, test_pb2_grpc  # noqa: E402

    return empty_pb2, messages_pb2, test_pb2_grpc
