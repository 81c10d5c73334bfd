"""Verify a TOC and build its layer index in a process of its own.

A service that serves lazy layers builds each layer's index in a child started with
`python -m estargz.index_child`, so the build's CPU work runs on another core and
does not hold the service's interpreter lock; the memory it needs goes back to the
system when the child ends. The child reads one request from stdin and writes one
JSON line to stdout (`reply`); the caller reopens the index with `Layer.open_index`.
A child may be started ahead of its request, so that its imports are done when the
TOC arrives; it ends without a reply when its stdin closes or stays empty.

Request: one JSON line (`request_header`), then the TOC as the blob stores it.
Reply: {"toc_digest": D, "entries": N, "seconds": S} when the index is complete at
`index_path`; {"error": "<FormatError class name>", "message": M} for bad input;
{"os_error": ERRNO, "message": M, "filename": F} or {"sqlite_error": CLASS, "message": M}
when the index cannot be written (a full disk). Any other failure ends the child
with a non-zero status and a traceback on stderr.
"""

import json
import os
import select
import sqlite3
import sys
import time
from typing import Any, BinaryIO

from . import errors
from .footer import Compression, Footer
from .reader import load_toc

# The errors a build reports by name, raised again as the same class by the caller.
FORMAT_ERRORS: dict[str, type[errors.FormatError]] = {
    cls.__name__: cls for cls in (errors.FormatError, errors.FooterError, errors.TOCError,
                                  errors.DigestMismatch, errors.TarError,
                                  errors.VerificationError)
}


def request_header(footer: Footer, expected_digest: str | None, max_toc_size: int,
                   index_path: str) -> bytes:
    """The first line of a request: everything but the TOC bytes that follow it."""
    return json.dumps({
        "compression": str(footer.compression), "toc_offset": footer.toc_offset,
        "toc_length": footer.toc_length, "payload_end": footer.payload_end,
        "footer_size": footer.footer_size,
        "toc_uncompressed_size": footer.toc_uncompressed_size,
        "expected_digest": expected_digest, "max_toc_size": max_toc_size,
        "index_path": index_path,
    }).encode() + b"\n"


def reply(stdin: BinaryIO) -> dict[str, Any]:
    """Build the index a request read from `stdin` asks for; the reply to write."""
    header = json.loads(stdin.readline())
    footer = Footer(Compression(header["compression"]), header["toc_offset"],
                    header["toc_length"], header["payload_end"], header["footer_size"],
                    header["toc_uncompressed_size"])
    toc = stdin.read()
    started = time.perf_counter()
    try:
        layer = load_toc(footer, toc, header["expected_digest"], header["max_toc_size"],
                         index_path=header["index_path"])
    except errors.FormatError as exc:
        # A subclass the caller does not know is reported as its nearest known base.
        name = next(cls.__name__ for cls in type(exc).__mro__
                    if FORMAT_ERRORS.get(cls.__name__) is cls)
        return {"error": name, "message": str(exc)}
    except OSError as exc:  # a full disk, say: the caller raises it as OSError again
        return {"os_error": exc.errno, "message": exc.strerror or str(exc),
                "filename": exc.filename}
    except sqlite3.Error as exc:  # SQLite's word for the same, raised as its class again
        return {"sqlite_error": type(exc).__name__, "message": str(exc)}
    answer = {"toc_digest": layer.toc_digest, "entries": layer.entry_count,
              "seconds": round(time.perf_counter() - started, 4)}
    layer.close()
    return answer


def main(argv: list[str]) -> int:
    # `--wait SECONDS`: started ahead as a spare, the child gives up waiting for its
    # request after that long (its parent normally ends it sooner).
    wait = float(argv[argv.index("--wait") + 1]) if "--wait" in argv else None
    if wait is not None and not select.select([sys.stdin], [], [], wait)[0]:
        return 0
    if not sys.stdin.buffer.peek(1):  # the parent closed the pipe: nothing to build
        return 0
    answer = reply(sys.stdin.buffer)
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    # Nothing is left to clean up (the index is closed, the reply written): skipping
    # the interpreter's teardown lets the waiting caller go on about 10 ms sooner.
    os._exit(status)
