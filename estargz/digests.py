"""sha256 digests in the `sha256:<hex>` form used by OCI and the TOC."""

import hashlib
import re

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_sha256_digest(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None
