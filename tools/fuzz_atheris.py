"""Coverage-guided fuzzing of the parsers of untrusted input with atheris (libFuzzer).

Not part of the test suite (tests/test_fuzz_parsers.py is, with hypothesis): a
longer, coverage-guided search to run by hand. atheris is a test extra of its own:

    pip install atheris        # a prebuilt wheel; no compiler needed
    python tools/fuzz_atheris.py TARGET -max_total_time=300 [CORPUS_DIR]

TARGET is one of the names in TARGETS. A crash is any exception other than the
parser's own error type; libFuzzer writes its input to crash-<sha1>, which then
belongs in tests/test_fuzz_parsers.py as an @example.
"""

import contextlib
import io
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from estargz import FooterError, TarError, TOCError, parse_toc
    from estargz.footer import parse_footer
    from estargz.tarindex import scan_tar
    from oci.manifest import ManifestError, parse_manifest
    from snapshotter.filters import FilterError, parse_filters
    from snapshotter.fusemanager.protocol import ManagerError, answer_of, decode, request_of


def toc(data: bytes) -> None:
    with contextlib.suppress(TOCError):
        parse_toc(data)


def footer(data: bytes) -> None:
    if len(data) < 8:
        return
    extra, tail = int.from_bytes(data[:8], "little") >> 20, data[8:]
    with contextlib.suppress(FooterError):
        parse_footer(tail, len(tail) + extra)


def tar(data: bytes) -> None:
    try:
        for _ in scan_tar(io.BytesIO(data)):
            pass
    except TarError:
        pass


def manifest(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data)


def filters(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    with contextlib.suppress(FilterError):
        parse_filters(text.split("\n"))


def protocol(data: bytes) -> None:
    try:
        message = decode(data)
        request_of(message)
        answer_of(message)
    except ManagerError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "toc": toc, "footer": footer, "tar": tar, "manifest": manifest, "filters": filters,
    "protocol": protocol,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
