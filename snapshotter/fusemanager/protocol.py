"""The wire protocol between the snapshotter and the FUSE manager.

One JSON object per line over a unix stream socket. Requests carry an id, the
operation and its arguments; answers carry the same id and either `result` or
`error` ({"kind", "message"}). Requests on one connection may be answered out of
order, so a long wait (a prefetch) does not hold up the others.
"""

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import json_lines
from ..json_lines import encode as encode  # for the protocol's users

PROTOCOL_VERSION = 1
# Metrics text and layer lists are the largest messages.
MAX_LINE_BYTES = 64 << 20
# An error's message is cut to this many characters: it may quote hostile input.
MAX_ERROR_MESSAGE = 4096
# sun_path holds 108 bytes; longer paths are reached through the directory's fd.
_SUN_PATH_MAX = 100


class ManagerError(Exception):
    """An operation the FUSE manager refused or failed; `kind` says how."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# Kinds of error on the wire.
UNAVAILABLE = "unavailable"
NOT_FOUND = "not_found"
INVALID = "invalid"
INTERNAL = "internal"
NOT_LAZY = "not_lazy"  # the layer cannot be served lazily (the message says why)
# A registry read relayed for the service's pull failed: its kind, for the pull's exit code.
REGISTRY_AUTH = "registry_auth"
REGISTRY_NOT_FOUND = "registry_not_found"
REGISTRY_DIGEST = "registry_digest"
REGISTRY_FAILED = "registry_failed"
# Relayed blobs are image configs (a few KiB) and small layers; larger ones (layers
# downloaded whole) the service streams with a client of its own.
RELAY_MAX_BLOB = 1 << 20


def decode(line: bytes) -> dict[str, Any]:
    try:
        return json_lines.decode(line)
    except json_lines.LineError as exc:
        raise ManagerError(INVALID, f"malformed message: {exc}") from None


@dataclass(frozen=True)
class Request:
    id: Any  # echoed in the answer, whatever JSON value it is
    op: str
    args: dict[str, Any] = field(default_factory=dict)


def request_of(message: dict[str, Any]) -> Request:
    """The request a decoded line holds; ManagerError(INVALID) if it is not one."""
    op, args = message.get("op"), message.get("args", {})
    if not isinstance(op, str):
        raise ManagerError(INVALID, f"op must be a string, not {op!r}"[:200])
    if not isinstance(args, dict):
        raise ManagerError(INVALID, "args must be an object")
    return Request(message.get("id"), op, args)


@dataclass(frozen=True)
class Answer:
    id: Any
    result: Any = None
    error: ManagerError | None = None


def answer_of(message: dict[str, Any]) -> Answer:
    """The answer a decoded line holds; ManagerError(INVALID) if it is not one."""
    error = message.get("error")
    if error is None:
        return Answer(message.get("id"), message.get("result"))
    if not isinstance(error, dict):
        raise ManagerError(INVALID, "malformed answer: error is not an object")
    kind, text = error.get("kind", INTERNAL), error.get("message", "")
    if not isinstance(kind, str) or not isinstance(text, str):
        raise ManagerError(INVALID, "malformed answer: error kind and message must be strings")
    return Answer(message.get("id"), error=ManagerError(kind, text))


@contextlib.contextmanager
def short_path(path: str) -> Iterator[str]:
    """A path to `path` that fits in a unix socket address."""
    if len(path) < _SUN_PATH_MAX:
        yield path
        return
    directory = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{os.path.basename(path)}"
    finally:
        os.close(directory)


def bound_socket(path: str) -> socket.socket:
    """A listening unix socket at `path`, replacing one a killed process left."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with short_path(path) as address:
        sock.bind(address)
    os.chmod(path, 0o600)  # the manager mounts and fetches: root only
    sock.listen(16)
    sock.setblocking(False)
    return sock


def connected_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as address:
            sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
