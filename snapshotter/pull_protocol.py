"""`lazypull pull` handed to the running service: the socket, the messages, the
outcomes. Loaded by the pull command before anything else, so it imports nothing
heavy: the command that hands its pull over stays a small process.

The command connects to the service's pull socket (`pull.sock` beside its snapshots
socket), sends one JSON line (the request) and reads JSON lines back: `resolved` and
`layer` events as the pull goes, then `result` (PullResult.to_json) or `error`
({"code", "message"}, the code one of the command's exit codes).
"""

import os
from typing import Any

from . import json_lines
from .json_lines import encode as encode  # for the protocol's users

SOCKET_NAME = "pull.sock"
MAX_LINE = 1 << 20  # a request, or an answer line (a result lists every layer)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_PULL = 5
EXIT_UNREACHABLE = 6

REQUEST_FIELDS = {"reference": str, "address": str, "namespace": str, "snapshotter": str,
                  "platform": (str, type(None)), "plain_http": bool,
                  "hosts_dir": (str, type(None)), "docker_config": (str, type(None))}


class ProtocolError(ValueError):
    """A message that is not what the other side must send."""


def socket_path(service_address: str) -> str:
    """Where the service listening on `service_address` takes pulls."""
    return os.path.join(os.path.dirname(os.path.abspath(service_address)), SOCKET_NAME)


def decode(line: bytes) -> dict[str, Any]:
    try:
        return json_lines.decode(line)
    except json_lines.LineError as exc:
        raise ProtocolError(f"malformed message: {exc}") from None


def check_request(message: dict[str, Any]) -> dict[str, Any]:
    for name, kind in REQUEST_FIELDS.items():
        if not isinstance(message.get(name), kind):
            raise ProtocolError(f"request field {name!r} is missing or of the wrong type")
    return message


def classify(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and message for a pull's failure; None for one the command does
    not expect (a bug: the caller shows it as such)."""
    from oci.digest import DigestMismatchError
    from oci.reference import ReferenceError
    from oci.store import AuthError, NotFoundError, StoreError

    from .containerd_client import ContainerdError, ContainerdUnreachable, PullError

    if isinstance(exc, ReferenceError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, DigestMismatchError):
        return EXIT_PULL, str(exc)
    if isinstance(exc, ContainerdUnreachable):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, ValueError):  # a bad platform, among others
        return EXIT_USAGE, str(exc)
    if isinstance(exc, AuthError):
        return EXIT_AUTH, f"authentication failed: {exc}"
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND, f"not found: {exc}"
    if isinstance(exc, PullError | ContainerdError):
        return EXIT_PULL, str(exc)
    if isinstance(exc, StoreError):
        return EXIT_FAILURE, str(exc)
    return None
