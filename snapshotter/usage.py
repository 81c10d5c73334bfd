"""Disk usage of a directory tree, counted as containerd's fs.DiskUsage counts it:
allocated blocks, and each inode once however many links it has."""

import os
import stat


def disk_usage(root: str) -> tuple[int, int]:
    """(bytes allocated, inodes) below `root`, `root` included."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # removed while we walked: a running container may do that
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            continue
        seen.add(ident)
        size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as entries:
                    stack.extend(entry.path for entry in entries)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return size, len(seen)
