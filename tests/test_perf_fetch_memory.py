"""perf fetch-memory end to end on a small generated layer (figures are not checked)."""

from pathlib import Path

import pytest

from perf import fetch_memory


def test_fetch_memory_fetches_the_whole_layer_and_leaves_nothing_in_flight(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fetch_memory.main(["--files", "500", "--workdir", str(tmp_path),
                              "--idle-seconds", "0.05", "--give-way"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
                 if ": " in line and not line.startswith(" "))
    assert lines["files"] == "500" and int(lines["spans"]) >= 500
    assert int(lines["fetched_bytes"]) > 0
    assert lines["inflight_after"] == "0" and lines["refused_after"] == "0"
    assert float(lines["traced_peak_mb"]) > 0
