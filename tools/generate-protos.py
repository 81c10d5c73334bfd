"""Generate the Python modules for lazypull's .proto files (grpcio-tools' protoc).

Three kinds: `*_pb2.py` (messages), `*_grpc.py` (grpclib stubs and bases, what
the service and its containerd client use) and `*_pb2_grpc.py` (grpcio stubs, which
the tests use as an independent client).

Usage: python tools/generate-protos.py [OUTPUT_ROOT]
Without OUTPUT_ROOT the modules are written beside their .proto files; a test
generates into a temporary root and compares, so the committed modules never
drift from their sources.
"""

import os
import pathlib
import shutil
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_DIRS = ["snapshotter/api"]


def proto_files() -> list[str]:
    found: list[str] = []
    for directory in PROTO_DIRS:
        found += sorted(str(p.relative_to(ROOT)) for p in (ROOT / directory).rglob("*.proto"))
    return found


def generate(output_root: pathlib.Path) -> None:
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    # grpclib's protoc plugin is installed beside this interpreter.
    plugin = shutil.which("protoc-gen-grpclib_python",
                          path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if plugin is None:
        raise SystemExit("protoc-gen-grpclib_python not found (pip install grpclib)")
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={output_root}",
            f"--pyi_out={output_root}", f"--grpc_python_out={output_root}",
            f"--plugin=protoc-gen-grpclib_python={plugin}",
            f"--grpclib_python_out={output_root}", *proto_files()]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
