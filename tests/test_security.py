"""What the node service protects: its state directory, sockets, pid and lock files,
and the FUSE mount's options (see docs/security.md)."""

import os
import stat
from pathlib import Path

import pytest

from snapshotter.state_dir import StateDirError, ensure_private_dir, open_lock_file, write_pid_file


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def fuse_mount_options(mountpoint: Path) -> set[str]:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == str(mountpoint) and fields[2].startswith("fuse"):
                return set(fields[3].split(","))
    raise AssertionError(f"no FUSE mount at {mountpoint}")


def test_a_running_service_keeps_its_state_private(snapshotter_factory, tmp_path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    root.chmod(0o755)  # made loose beforehand, e.g. by an image or a hand
    victim = tmp_path / "victim"
    victim.write_text("not the service's\n")
    os.symlink(victim, root / "fuse-manager.pid")  # planted links are replaced, not followed
    service = snapshotter_factory(root)
    assert mode_of(root) == 0o700
    assert mode_of(service.address) == 0o660 and os.stat(service.address).st_uid == 0
    manager_socket = root / "fuse-manager.sock"
    assert stat.S_ISSOCK(os.lstat(manager_socket).st_mode) and mode_of(manager_socket) == 0o600
    pid_file = root / "fuse-manager.pid"
    assert not pid_file.is_symlink()
    assert int(pid_file.read_text()) == service.fuse_manager_pid
    assert victim.read_text() == "not the service's\n"
    lock = root / "fuse-manager.lock"
    assert stat.S_ISREG(os.lstat(lock).st_mode) and mode_of(lock) == 0o600
    # Read-only, no setuid or devices, and the kernel checks file modes for every user
    # (allow_other lets containers running as other users read their files).
    options = fuse_mount_options(root / "fuse")
    assert {"ro", "nosuid", "nodev", "allow_other", "default_permissions"} <= options


def test_the_fuse_manager_refuses_a_lock_file_that_is_a_link(snapshotter_factory,
                                                              tmp_path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("x")
    os.symlink(victim, root / "fuse-manager.lock")
    with pytest.raises(RuntimeError, match="is a symlink: refusing to lock through it"):
        snapshotter_factory(root)
    assert victim.read_text() == "x"


def test_state_files_are_never_followed_through_links(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "lock"
    os.symlink(victim, link)
    with pytest.raises(StateDirError, match="symlink"):
        open_lock_file(str(link))
    pid = tmp_path / "pid"
    os.symlink(victim, pid)
    write_pid_file(str(pid), 4242)
    assert victim.read_text() == "keep" and pid.read_text() == "4242\n"
    assert not pid.is_symlink()


def test_the_state_directory_is_made_private_or_refused(tmp_path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    ensure_private_dir(str(loose))
    assert mode_of(loose) == 0o700
    fresh = tmp_path / "a" / "b"
    ensure_private_dir(str(fresh))
    assert mode_of(fresh) == 0o700
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises((StateDirError, FileExistsError)):
        ensure_private_dir(str(not_a_dir))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    with pytest.raises(StateDirError, match="belongs to uid 12345"):
        ensure_private_dir(str(foreign))
