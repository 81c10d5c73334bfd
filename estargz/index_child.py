"""Verify a TOC and build its layer index in a process of its own.

A service that serves lazy layers builds each layer's index in a process of its own,
so the build's CPU work runs on another core and does not hold the service's
interpreter lock; the memory it needs goes back to the system when that process
ends. The caller reopens the index with `Layer.open_index`.

Two ways to get such a process:
- `python -m estargz.index_child`: one build. It reads one request from stdin and
  writes one JSON line to stdout (`reply`); it ends without a reply if stdin closes
  empty.
- `python -m estargz.index_child --template`: a process that has this package
  imported and forks a build process for each socket its parent sends it (stdin is a
  unix socket; each message carries one descriptor). A fork starts in about a
  millisecond, against about 0.1 s of CPU for an interpreter and these imports,
  which would otherwise come just when a pull is under way. For each socket the
  template answers with the build process's id (4 bytes, big-endian) and forks no
  other process; it exits when its parent closes the socket (or dies). The build
  process reads its request from its socket until the parent shuts down writing,
  and answers as above. It is the template's child, reaped by the kernel.

Request: one JSON line (`request_header`), then the TOC as the blob stores it.
Reply: {"toc_digest": D, "entries": N, "seconds": S} when the index is complete at
`index_path`; {"error": "<FormatError class name>", "message": M} for bad input;
{"os_error": ERRNO, "message": M, "filename": F} or {"sqlite_error": CLASS, "message": M}
when the index cannot be written (a full disk). Any other failure ends a one-build
child with a non-zero status and a traceback on stderr, and makes a forked build
answer {"crash": TRACEBACK}.
"""

import io
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import traceback
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


READY = b"R"  # what a template sends once it can fork builds
PID_BYTES = 4  # of a build process's id, as a template sends it


def serve(connection: socket.socket) -> None:
    """A forked build: the request until the parent shuts down writing, the reply."""
    pieces = []
    while piece := connection.recv(1 << 20):
        pieces.append(piece)
    request = b"".join(pieces)
    if not request:
        return  # the parent gave up before asking
    try:
        answer = reply(io.BytesIO(request))
    except Exception:  # a bug: the parent raises it with this text
        answer = {"crash": traceback.format_exc()}
    connection.sendall(json.dumps(answer).encode() + b"\n")


def template(control: socket.socket) -> int:
    """Fork a build for each socket received on `control`, until it closes."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the builds
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's to handle; it ends us
    try:
        control.sendall(READY)
    except OSError:
        return 0  # the parent is gone already
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return 0
        if not message:
            return 0  # the parent is gone, or done
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return 1
        pid = os.fork()
        if pid == 0:  # the build
            status = 1
            try:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                with socket.socket(fileno=fds[0]) as connection:
                    serve(connection)
                status = 0
            finally:
                os._exit(status)
        os.close(fds[0])
        try:
            control.sendall(pid.to_bytes(PID_BYTES, "big"))
        except OSError:
            return 0  # the parent is gone; the build sees its socket closed and ends


def main(argv: list[str]) -> int:
    if "--template" in argv:
        with socket.socket(fileno=sys.stdin.fileno()) as control:
            return template(control)
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
