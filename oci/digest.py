"""Content digests (`algorithm:hex`) and streaming verification."""

import hashlib
import re

_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")


class DigestMismatchError(ValueError):
    """Content does not hash to the digest that names it."""


def validate_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}")
    return digest


def is_digest(text: str) -> bool:
    try:
        validate_digest(text)
    except ValueError:
        return False
    return True


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Digester:
    """Hash bytes as they stream by and compare with an expected digest at the end."""

    def __init__(self, expected: str):
        algorithm, _, _ = validate_digest(expected).partition(":")
        self.expected = expected
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return f"{self._hash.name}:{self._hash.hexdigest()}"

    def verify(self, what: str) -> None:
        if self.digest != self.expected:
            raise DigestMismatchError(f"{what}: content is {self.digest}, expected {self.expected}")


def verify_bytes(data: bytes, expected: str, what: str) -> None:
    digester = Digester(expected)
    digester.update(data)
    digester.verify(what)
