"""`lazypull estargz build|verify|toc` as a user runs them."""

import json
import subprocess
import sys

from .layers import coverage_tar


def lazypull(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], input=stdin,
                          capture_output=True)


def test_build_verify_toc(tmp_path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(coverage_tar())
    prio = tmp_path / "prio"
    prio.write_text("# hot files\n/usr/bin/tool\netc/hostname\nmissing/file\n")
    blob = tmp_path / "layer.esgz"
    built = lazypull("estargz", "build", str(tar), str(blob), "--prioritize-file", str(prio),
                     "--chunk-size", "4096")
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)
    assert result["missing_prioritized"] == ["missing/file"]
    assert b"prioritized file not in the layer: missing/file" in built.stderr
    assert result["blob_size"] == blob.stat().st_size

    verified = lazypull("estargz", "verify", str(blob), "--toc-digest", result["toc_digest"])
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["diff_id"] == result["diff_id"]
    assert report["prefetch_size"] == result["prefetch_size"] > 0

    toc = lazypull("estargz", "toc", str(blob), "--toc-digest", result["toc_digest"])
    assert toc.returncode == 0
    names = [e["name"] for e in json.loads(toc.stdout)["entries"]]
    assert names.index(".prefetch.landmark") > names.index("etc/hostname")


def test_build_from_stdin_as_zstd(tmp_path) -> None:
    blob = tmp_path / "layer.zst"
    built = lazypull("estargz", "build", "-", str(blob), "--zstd", stdin=coverage_tar())
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)
    assert result["compression"] == "zstd"
    assert result["annotations"]["io.containers.zstd-chunked.manifest-checksum"]
    assert lazypull("estargz", "verify", str(blob)).returncode == 0


def test_usage_errors_exit_2(tmp_path) -> None:
    assert lazypull("estargz", "build", "x").returncode == 2
    assert lazypull("estargz", "build", "x", "y", "--chunk-size", "0").returncode == 2
    missing = lazypull("estargz", "verify", str(tmp_path / "absent"))
    assert missing.returncode == 1
    assert missing.stderr.startswith(b"lazypull: No such file or directory")
    assert b"Traceback" not in missing.stderr


def test_build_errors_leave_no_output_and_no_traceback(tmp_path) -> None:
    bad_tar = tmp_path / "bad.tar"
    bad_tar.write_bytes(coverage_tar()[:700])  # cut inside the first file's data
    out = tmp_path / "out.esgz"
    done = lazypull("estargz", "build", str(bad_tar), str(out))
    assert done.returncode == 1 and b"truncated" in done.stderr
    assert not out.exists()
    prio = tmp_path / "prio"
    prio.write_bytes(b"\xff\xfe not utf-8\n")
    done = lazypull("estargz", "build", str(bad_tar), str(out), "--prioritize-file", str(prio))
    assert done.returncode == 1 and b"not UTF-8" in done.stderr
    assert b"Traceback" not in done.stderr
    small = lazypull("estargz", "build", str(bad_tar), str(out), "--chunk-size", "100")
    assert small.returncode == 2 and b"smaller than a tar block" in small.stderr
