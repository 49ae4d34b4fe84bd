"""The contract's Python stubs, generated from proto/ with grpcio-tools
(never committed): from MESH_STUBS_DIR when an image generated them at
build time, else into a temporary directory at start."""

import atexit
import importlib
import os
import shutil
import sys
import tempfile

PROTO = "mesh/recommendations/v1/recommendations.proto"


def default_proto_dir():
    """proto/ of the checkout this package sits in (services/recommendations)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "proto"))


def generate(proto_dir, out):
    """Runs grpc_tools.protoc on the contract into `out`."""
    from grpc_tools import protoc

    source = os.path.join(proto_dir, PROTO)
    if not os.path.isfile(source):
        raise SystemExit(f"--proto-dir: {source} does not exist")
    args = ["protoc", "-I" + proto_dir, "--python_out=" + out, "--grpc_python_out=" + out, source]
    if protoc.main(args) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {source}")


def load(proto_dir=None):
    """Returns (recommendations_pb2, recommendations_pb2_grpc)."""
    out = os.environ.get("MESH_STUBS_DIR")
    if not out:
        out = tempfile.mkdtemp(prefix="recommendations-stubs-")
        atexit.register(shutil.rmtree, out, True)
        generate(proto_dir or default_proto_dir(), out)
    if out not in sys.path:
        sys.path.insert(0, out)
    pb2 = importlib.import_module("mesh.recommendations.v1.recommendations_pb2")
    pb2_grpc = importlib.import_module("mesh.recommendations.v1.recommendations_pb2_grpc")
    return pb2, pb2_grpc


if __name__ == "__main__":
    # Build time: `python -m recommendations.stubs OUT [PROTO_DIR]`.
    generate(sys.argv[2] if len(sys.argv) > 2 else default_proto_dir(), sys.argv[1])
