"""Named steps where a recovery test can make the process die, as a power cut would.

`LAZYPULL_CRASH_AT=<step>` in the environment (read once, at start) makes the process
SIGKILL itself when it reaches that step; unset, a crash point costs one string
comparison. The FUSE manager inherits the service's environment, so the chunk cache's
steps (MANAGER_STEPS) are reached the same way. `LAZYPULL_CRASH_ONCE=<path>` makes
the crash happen once: the first process to reach the step creates that file and dies,
later ones (the manager the service starts again) go on. tests/test_crash_recovery.py
and tests/test_chunk_crash.py walk every step and check that a restart, with
`lazypull check`, finds the state whole.
"""

import os
import signal

ENVIRONMENT = "LAZYPULL_CRASH_AT"
ONCE_ENVIRONMENT = "LAZYPULL_CRASH_ONCE"
SERVICE_STEPS = (
    "prepare.staged",      # the new directory is built under a temporary name
    "prepare.placed",      # renamed to its id inside the open metadata transaction
    "prepare.committed",   # the transaction is committed, the answer not yet sent
    "commit.measured",     # the active snapshot's size is known, nothing written yet
    "commit.committed",
    "remove.deleted",      # the metadata is gone, the directory not yet renamed
    "remove.renamed",      # the directory is rm-<id>, not yet deleted
    "remote.served",       # the FUSE manager serves the layer; no snapshot names it yet
    "remote.placed",       # its directory is in place inside the open transaction
    "remote.committed",    # committed, the ALREADY_EXISTS answer not yet sent
)
MANAGER_STEPS = (
    "chunk.written",       # a large chunk's temp file is written, not yet renamed
    "chunk.renamed",       # the file is in place, its row not yet committed
    "chunk.packed",        # packed chunks' rows are in the open transaction
    "chunk.committed",     # the rows are committed, the read not yet answered
    "fetch.background",    # a background fetch stored its first request's chunks only
)
STEPS = SERVICE_STEPS + MANAGER_STEPS
_WANTED = os.environ.get(ENVIRONMENT, "")
_ONCE = os.environ.get(ONCE_ENVIRONMENT, "")


def crash_point(step: str) -> None:
    """Die here, with no chance to clean up, if the environment names this step."""
    if step == _WANTED and _first_time():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_time() -> bool:
    if not _ONCE:
        return True
    try:
        os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True
