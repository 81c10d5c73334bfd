"""What the node's two processes load: heavy packages they do not need stay out.

The service and the FUSE manager run on every node, so their resident memory is
part of the product (see `python -m perf scale`). These checks keep two choices
from being undone by an innocent import: the service speaks gRPC through grpclib
(grpcio costs it about 9 MB more) and the FUSE manager runs pyfuse3 in asyncio mode
without loading trio. The service does not load the format library either, and
`lazypull pull`, which runs at every workspace start, loads neither trio nor the
image-layout code.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(statement: str) -> set[str]:
    """The modules (and, by their first name, the packages) loaded after `statement`;
    a name marked absent (None in sys.modules) is not loaded."""
    probe = (f"{statement}\nimport json, sys\n"
             "names = [m for m, module in sys.modules.items() if module is not None]\n"
             "print(json.dumps(sorted(set(names) | {m.split('.')[0] for m in names})))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=120)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_service_loads_grpclib_not_grpcio() -> None:
    loaded = loaded_after("import snapshotter.server")
    assert "grpclib" in loaded
    assert "grpc" not in loaded


def test_neither_process_loads_the_prometheus_client_library() -> None:
    loaded = loaded_after("import snapshotter.server, snapshotter.fusemanager.server")
    assert "snapshotter.prometheus" in loaded
    assert not {"prometheus_client", "http.server", "wsgiref"} & loaded


def test_the_service_does_not_load_the_format_library() -> None:
    """Only the FUSE manager reads TOCs; the service reads Prepare labels and records."""
    loaded = loaded_after("import snapshotter.server")
    assert "snapshotter" in loaded
    assert "estargz" not in loaded
    assert "zstandard" not in loaded
    assert "gzindex" not in loaded and "indexer" not in loaded


def test_the_fuse_manager_loads_the_index_lookup_not_the_indexer() -> None:
    """Plain gzip layers are read through their gzip index: the manager finds and
    reads indexes, it never builds them from images, nor converts."""
    loaded = loaded_after("import snapshotter.fusemanager.server")
    assert {"gzindex.reader", "indexer.lookup"} <= loaded
    assert not {"indexer.image", "indexer.hotfiles", "converter"} & loaded


def test_the_fuse_manager_loads_pyfuse3_without_trio() -> None:
    loaded = loaded_after("import snapshotter.fusemanager.server\n"
                          "from snapshotter.lazy.fuse_binding import pyfuse3\n"
                          "assert pyfuse3.trio.__name__ == 'pyfuse3.asyncio', pyfuse3.trio")
    assert "pyfuse3" in loaded
    assert "trio" not in loaded


def test_trio_loads_for_real_after_the_binding() -> None:
    """The stand-in is gone once pyfuse3 is loaded: other code importing trio gets it."""
    loaded = loaded_after("from snapshotter.lazy.fuse_binding import pyfuse3\n"
                          "import trio\nassert trio.run")
    assert "trio" in loaded


def test_the_stand_in_refuses_use_by_name() -> None:
    probe = ("import sys\nfrom snapshotter.lazy import fuse_binding\n"
             "standin = fuse_binding._TrioStandIn('trio')\n"
             "try:\n    standin.lowlevel\nexcept AttributeError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=120)
    assert "trio.lowlevel" in done.stdout and "asyncio mode" in done.stdout


def test_every_public_name_of_the_format_library_resolves() -> None:
    """estargz loads its modules on first use; each exported name must reach one."""
    import estargz

    assert sorted(estargz.__all__) == sorted(estargz._MODULE_OF)
    for name in estargz.__all__:
        assert getattr(estargz, name) is not None, name
    assert "build" in dir(estargz)


def test_the_command_line_loads_only_what_its_command_needs() -> None:
    loaded = loaded_after("import cli.main\ncli.main.build_parser('snapshotter')")
    assert "estargz.errors" in loaded  # what the command line catches
    assert not {"estargz.layer", "estargz.writer", "zstandard"} & loaded
    assert "grpclib" not in loaded  # the service's modules load when it runs


def test_the_pull_command_loads_neither_trio_nor_image_layouts() -> None:
    """`lazypull pull` as far as containerd (absent here), then the registry client it
    makes: httpcore, which imports trio if it can, runs without it."""
    loaded = loaded_after(
        "import asyncio, cli.main\n"
        "argv = ['pull', '-q', '--no-service', '--address', '/nonexistent/c.sock', 'r.io/a:b']\n"
        "assert cli.main.main(argv) == 6  # containerd unreachable\n"
        "from oci.registry import RegistryClient\n"
        "async def go():\n"
        "    async with RegistryClient() as client:\n"
        "        assert client\n"
        "asyncio.run(go())\n"
        "import httpcore._synchronization as sync\n"
        "assert sync.trio is None")
    assert {"grpclib", "httpx", "httpcore", "snapshotter.containerd_client.pull"} <= loaded
    assert not {"trio", "attr", "oci.layout", "grpc", "estargz.layer"} & loaded


def test_a_pull_handed_to_the_service_loads_no_http_client_there() -> None:
    """With a FUSE manager, the service's pulls read the registry through it: what the
    service loads for them (at start, in a thread) carries no HTTP client."""
    loaded = loaded_after("import snapshotter.server\n"
                          "from snapshotter.pull_handoff import _load_pull_modules\n"
                          "_load_pull_modules(relayed=True)")
    assert {"snapshotter.containerd_client.pull", "snapshotter.relayed_registry"} <= loaded
    assert not {"httpx", "httpcore", "h11", "certifi", "oci.registry", "oci.auth"} & loaded


def test_the_fuse_manager_with_its_registry_client_loads_no_trio() -> None:
    """httpcore imports trio if it can; in the manager trio stays absent (about 3.8 MB),
    and pyfuse3 still runs on its asyncio shim."""
    loaded = loaded_after("import snapshotter.fusemanager.server\n"
                          "from snapshotter.lazy.fuse_binding import pyfuse3\n"
                          "from oci.registry import RegistryClient\n"
                          "assert RegistryClient()\n"
                          "assert pyfuse3.trio.__name__ == 'pyfuse3.asyncio', pyfuse3.trio")
    assert {"pyfuse3", "httpcore", "h11"} <= loaded
    assert not {"trio", "attr", "outcome", "sortedcontainers"} & loaded
