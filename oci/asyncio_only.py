"""Imported before httpx by processes that run on asyncio alone (`lazypull pull`, the
snapshotter service): trio marked absent.

httpcore, httpx's own transport (the registry client uses it where the environment
names a proxy; oci.http1 otherwise), imports trio whenever it is installed (pyfuse3
needs it, so it always is), only to ask later which event loop it runs on. trio and
what it pulls in (attrs, outcome, sortedcontainers, ctypes: some 80 modules) were as
many imports again as the rest of `lazypull pull` needs, read from disk on a node
whose page cache is cold, and memory the service would keep. (The FUSE manager,
which runs pyfuse3, has its own stand-in: lazy.fuse_binding.)

With trio marked absent that import fails at once and httpcore uses anyio on asyncio,
as it would anyway. A process that loaded trio already keeps it.
"""

import sys

sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
