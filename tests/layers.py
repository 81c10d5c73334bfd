"""Tar layers for tests: every entry kind a container layer can hold."""

import io
import os
import tarfile

LONG_DIR = "deep/" + "/".join(["d" * 40] * 3)  # > 100 characters
LONG_NAME = LONG_DIR + "/" + "f" * 120


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes = b"") -> None:
    info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    tar.addfile(info, io.BytesIO(data) if data else None)


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_700_000_000
    info.uid, info.gid, info.uname, info.gname = 1000, 1000, "dev", "dev"
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def big_payload(size: int, seed: int = 7) -> bytes:
    """Deterministic, poorly compressible bytes."""
    out = bytearray()
    state = seed
    while len(out) < size:
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out += state.to_bytes(8, "little")
    return bytes(out[:size])


def coverage_tar(tar_format: int = tarfile.PAX_FORMAT, big_size: int = 40_000) -> bytes:
    """A layer with every kind of entry, long names, xattrs and whiteouts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        _add(tar, _info("etc", tarfile.DIRTYPE))
        _add(tar, _info("etc/hostname"), b"workspace\n")
        _add(tar, _info("etc/empty"))
        _add(tar, _info("usr", tarfile.DIRTYPE, mode=0o700, uid=0, gid=0, uname="root",
                        gname="root"))
        _add(tar, _info("usr/bin", tarfile.DIRTYPE))
        _add(tar, _info("usr/bin/tool", mode=0o4755, mtime=1_234_567_890), big_payload(big_size))
        _add(tar, _info("usr/bin/tool-link", tarfile.LNKTYPE, linkname="usr/bin/tool"))
        _add(tar, _info("usr/bin/sym", tarfile.SYMTYPE, linkname="tool"))
        _add(tar, _info("dev", tarfile.DIRTYPE))
        _add(tar, _info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666))
        _add(tar, _info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660))
        _add(tar, _info("dev/pipe", tarfile.FIFOTYPE))
        _add(tar, _info(LONG_DIR, tarfile.DIRTYPE))
        _add(tar, _info(LONG_NAME), b"long name content\n")
        _add(tar, _info("deep/long-link", tarfile.SYMTYPE, linkname=LONG_NAME))
        _add(tar, _info("deep/long-hardlink", tarfile.LNKTYPE, linkname=LONG_NAME))
        _add(tar, _info("var", tarfile.DIRTYPE))
        _add(tar, _info("var/.wh.cache"))  # whiteout of a lower layer's var/cache
        _add(tar, _info("opt", tarfile.DIRTYPE))
        _add(tar, _info("opt/.wh..wh..opq"))  # opaque directory
        _add(tar, _info("opt/new"), b"new\n")
        if tar_format == tarfile.PAX_FORMAT:
            caps = _info("usr/bin/ping", pax_headers={
                "SCHILY.xattr.security.capability": "\x01\x00\x00\x02 \x00\x00\x00",
                "SCHILY.xattr.user.comment": "ünïcode",
            })
            _add(tar, caps, b"ping\n")
            _add(tar, _info("usr/bin/übung"), b"unicode name\n")
    return buf.getvalue()


def tree_tar(root: str, arcname: str = ".") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=arcname, filter=lambda i: None if "__pycache__" in i.name else i)
    return buf.getvalue()


def stdlib_dir() -> str:
    return os.path.dirname(os.__file__)
