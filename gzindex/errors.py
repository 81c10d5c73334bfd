"""Errors of the gzip index format, all `estargz.FormatError`s, so the CLI and the
services report them as they report any bad blob: a message, never bad bytes."""

from estargz.errors import DigestMismatch, FormatError


class CorruptLayerError(FormatError):
    """The gzip layer is not valid gzip: bad header, deflate data, CRC or length."""


class IndexFormatError(FormatError):
    """The index blob is truncated, of an unknown version, or inconsistent."""


class SpanDigestMismatch(DigestMismatch):
    """Bytes inflated from the layer do not hash to their span's digest."""
