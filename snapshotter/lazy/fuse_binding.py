"""pyfuse3 in asyncio mode, loaded without trio.

pyfuse3 imports trio when it loads, but in asyncio mode (`pyfuse3.asyncio.enable()`)
every call it makes goes through its asyncio shim and trio is never used. trio and
the packages it pulls in cost the FUSE manager about 3 MB of resident memory, so a
stand-in takes trio's place while pyfuse3 loads; anything that touches it fails
with AttributeError naming what it wanted.
"""

import sys
import types


class _TrioStandIn(types.ModuleType):
    def __getattr__(self, name: str) -> None:
        raise AttributeError(f"trio.{name}: pyfuse3 runs in asyncio mode here, without trio")


def _load() -> types.ModuleType:
    if "pyfuse3" in sys.modules or sys.modules.get("trio") is not None:
        import pyfuse3
    else:
        # trio may be marked absent already (oci.asyncio_only): then it stays so.
        absent = "trio" in sys.modules
        sys.modules["trio"] = _TrioStandIn("trio")
        try:
            import pyfuse3
        finally:
            # A later `import trio` (from other code) loads the real one, unless absent.
            if isinstance(sys.modules.get("trio"), _TrioStandIn):
                if absent:
                    sys.modules["trio"] = None  # type: ignore[assignment]
                else:
                    del sys.modules["trio"]
    import pyfuse3.asyncio

    pyfuse3.asyncio.enable()
    return pyfuse3


pyfuse3 = _load()
