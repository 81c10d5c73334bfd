"""Image references: `[HOST[:PORT]/]REPO[:TAG][@DIGEST]`, with Docker's defaults."""

import re
from dataclasses import dataclass

from .digest import validate_digest

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HOST = re.compile(r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")


class ReferenceError(ValueError):
    """A string that is not a valid image reference."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            try:
                validate_digest(digest)
            except ValueError as exc:
                raise ReferenceError(f"{text!r}: {exc}") from None
        tag = None
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG.fullmatch(tag):
                raise ReferenceError(f"{text!r}: invalid tag {tag!r}")
        first, _, remainder = rest.partition("/")
        if remainder and ("." in first or ":" in first or first == "localhost"
                          or first != first.lower()):
            registry, repository = first, remainder
        else:
            registry, repository = DEFAULT_REGISTRY, rest
        if not _HOST.fullmatch(registry):
            raise ReferenceError(f"{text!r}: invalid registry host {registry!r}")
        if registry == DEFAULT_REGISTRY and "/" not in repository:
            repository = f"library/{repository}"
        if not _REPOSITORY.fullmatch(repository):
            raise ReferenceError(f"{text!r}: invalid repository name {repository!r}")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str | None) -> "Reference":
        return Reference(self.registry, self.repository, tag, self.digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
