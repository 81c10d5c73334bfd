"""Typed errors of the format library.

Every problem with a blob, a TOC or an input tar surfaces as a `FormatError`
subclass with a message that names what is wrong, so callers (and the CLI) can
report it without a traceback and never mistake bad bytes for data.
"""


class FormatError(Exception):
    """Base of every error raised for malformed or untrusted input."""


class FooterError(FormatError):
    """The blob has no recognisable eStargz or zstd:chunked footer."""


class TOCError(FormatError):
    """The table of contents is unreadable, too large or inconsistent."""


class DigestMismatch(FormatError):
    """Bytes do not hash to the digest that vouches for them."""


class TarError(FormatError):
    """An input tar stream is truncated, malformed or uses an unsupported feature."""


class VerificationError(FormatError):
    """A full check found the blob's stream disagreeing with its TOC."""
