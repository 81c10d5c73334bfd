"""One JSON object per line: how the service talks to its FUSE manager and to the
pull command. Imports nothing but json, so the pull command stays small."""

import json
from typing import Any


class LineError(ValueError):
    """A line that is not one JSON object."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise LineError(f"not a JSON line: {exc}") from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise LineError("nested too deeply") from None
    if not isinstance(message, dict):
        raise LineError("not an object")
    return message
