"""Named steps where a recovery test can make the process die, as a power cut would.

`LAZYPULL_CRASH_AT=<step>` in the environment (read once, at start) makes the process
SIGKILL itself when it reaches that step; unset, a crash point costs one string
comparison. tests/test_crash_recovery.py walks every step in STEPS and checks that a
restart, with `lazypull check`, finds the state whole.
"""

import os
import signal

ENVIRONMENT = "LAZYPULL_CRASH_AT"
STEPS = (
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
_WANTED = os.environ.get(ENVIRONMENT, "")


def crash_point(step: str) -> None:
    """Die here, with no chance to clean up, if the environment names this step."""
    if step == _WANTED:
        os.kill(os.getpid(), signal.SIGKILL)
