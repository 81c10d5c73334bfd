"""How a layer's tree is shown to overlayfs, whether through the FUSE mount or written
out as a plain directory (materialize.py): the form containerd's unpacker gives a
lower directory, as stargz-snapshotter presents it too.

- a `.wh.NAME` whiteout appears as NAME, a character device 0/0;
- a directory that holds `.wh..wh..opq` carries `trusted.overlay.opaque=y`, and the
  marker itself stays hidden, as does aufs bookkeeping (`.wh..wh.*`);
- the prefetch landmarks at the layer's root are hidden;
- overlay xattrs from the image (redirects, metacopy, opaque) never steer the kernel:
  the only one shown is the one derived from the marker.
"""

import os
import stat
from dataclasses import dataclass

from estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Node
from estargz.layer import OPAQUE_WHITEOUT, WHITEOUT_PREFIX

OPAQUE_XATTR = b"trusted.overlay.opaque"
HIDDEN_XATTR_PREFIX = "trusted.overlay."
AUFS_META_PREFIX = WHITEOUT_PREFIX + WHITEOUT_PREFIX
LANDMARKS = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(frozen=True, slots=True)
class DirView:
    """A layer directory as presented: hidden markers gone, whiteouts renamed."""

    entries: dict[bytes, tuple[Node, bool]]  # name -> (node, presented as a whiteout)
    names: list[bytes]  # sorted; readdir offsets index into it, so they stay valid


def present_directory(directory: Node, is_layer_root: bool) -> DirView:
    """The listing of `directory`."""
    entries: dict[bytes, tuple[Node, bool]] = {}
    whiteouts: dict[bytes, Node] = {}
    for name, child in directory.children.items():
        if name == OPAQUE_WHITEOUT or name.startswith(AUFS_META_PREFIX) \
                or (is_layer_root and name in LANDMARKS):
            continue
        elif name.startswith(WHITEOUT_PREFIX):
            hidden = name[len(WHITEOUT_PREFIX) :]
            if hidden not in ("", ".", ".."):
                whiteouts[os.fsencode(hidden)] = child
        else:
            entries[os.fsencode(name)] = (child, False)
    for name, marker in whiteouts.items():
        entries.setdefault(name, (marker, True))  # an entry of this layer wins over its whiteout
    return DirView(entries, sorted(entries))


def hidden_name(name: str, in_layer_root: bool) -> bool:
    """Names the presented tree never shows under their own name."""
    return name.startswith(WHITEOUT_PREFIX) or (in_layer_root and name in LANDMARKS)


def presented_mode(node: Node, whiteout: bool) -> int:
    """st_mode as presented: type bits and permissions."""
    if whiteout:
        return stat.S_IFCHR  # overlayfs: a 0/0 char device hides the name
    # A real filesystem shows every symlink as 0777, whatever the tar said.
    permissions = 0o777 if node.kind == "symlink" else node.mode & 0o7777
    return TYPE_BITS[node.kind] | permissions


def presented_xattrs(node: Node, whiteout: bool) -> dict[bytes, bytes]:
    if whiteout:
        return {}
    xattrs = {os.fsencode(name): value for name, value in node.xattrs.items()
              if not name.startswith(HIDDEN_XATTR_PREFIX)}
    if node.kind == "dir" and node.is_opaque_dir:
        xattrs[OPAQUE_XATTR] = b"y"
    return xattrs
