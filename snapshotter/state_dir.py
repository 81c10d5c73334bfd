"""The service's state directory and the small files in it, made safely.

The root holds snapshots, caches, sockets, the FUSE manager's pid and lock files:
root only (0700), tightened if it was made looser. The pid and lock files are never
followed through a symlink, so a link planted there cannot make the service write
or lock a file elsewhere.
"""

import contextlib
import os
import stat

ROOT_MODE = 0o700


class StateDirError(RuntimeError):
    pass


def ensure_private_dir(path: str, mode: int = ROOT_MODE) -> None:
    """Make `path` a directory of this mode, or tighten an existing one to it."""
    os.makedirs(path, mode=mode, exist_ok=True)
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise StateDirError(f"{path} belongs to uid {info.st_uid}, not to this service")
    if stat.S_IMODE(info.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(info.st_mode) & mode)


def open_lock_file(path: str) -> int:
    """A descriptor of the lock file at `path` (created 0600); refuses a symlink."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise StateDirError(f"{path} is a symlink: refusing to lock through it") from None
        raise StateDirError(f"cannot open {path}: {exc.strerror}") from None


def write_pid_file(path: str, pid: int) -> None:
    """Write `pid` to `path` by a rename, which replaces a link rather than following it."""
    temp = f"{path}.{pid}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, f"{pid}\n".encode())
    finally:
        os.close(fd)
    os.replace(temp, path)
