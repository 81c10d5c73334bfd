"""The committed protobuf modules are exactly what their .proto sources generate."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_grpc.py", "_wire.py")


def test_regenerating_gives_the_committed_modules(tmp_path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "generate-protos.py"), str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "nothing was generated"
    for relative in generated:
        assert filecmp.cmp(tmp_path / relative, ROOT / relative, shallow=False), relative
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "snapshotter" / "api").rglob("*")
                       if p.is_file() and p.name.endswith(GENERATED_SUFFIXES))
    assert committed == generated
