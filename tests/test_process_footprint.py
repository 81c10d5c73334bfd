"""What the node's two processes load: heavy packages they do not need stay out.

The service and the FUSE manager run on every node, so their resident memory is
part of the product (see `python -m perf scale`). These checks keep choices
from being undone by an innocent import: the service speaks gRPC through grpclib
(grpcio costs it about 9 MB more) with its own protobuf wire codec (protobuf's
runtime about 3 MB more), and the FUSE manager runs pyfuse3 in asyncio mode
without loading trio. The service does not load the format library either, and
`lazypull pull`, which runs at every workspace start, loads neither trio nor the
image-layout code.
"""

import json
import re
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


def test_the_service_and_its_containerd_client_load_no_protobuf_runtime() -> None:
    loaded = loaded_after("import snapshotter.server, snapshotter.containerd_client.pull")
    assert {"snapshotter.api.wire", "snapshotter.containerd_client.client"} <= loaded
    assert "google" not in loaded
    assert not {m for m in loaded if m.endswith(("_pb2", "_grpc"))}


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


NO_PROXIES = ("import os\n"
              "for name in ('http_proxy', 'https_proxy', 'all_proxy'):\n"
              "    os.environ.pop(name, None)\n"
              "    os.environ.pop(name.upper(), None)\n")


def test_the_pull_command_loads_neither_trio_nor_image_layouts() -> None:
    """`lazypull pull` as far as containerd (absent here), then the registry client it
    makes: its HTTP/1.1 transport (oci.http1) needs neither httpcore nor anyio."""
    loaded = loaded_after(
        NO_PROXIES + "import asyncio, cli.main\n"
        "argv = ['pull', '-q', '--no-service', '--address', '/nonexistent/c.sock', 'r.io/a:b']\n"
        "assert cli.main.main(argv) == 6  # containerd unreachable\n"
        "from oci.registry import RegistryClient\n"
        "async def go():\n"
        "    async with RegistryClient() as client:\n"
        "        assert client\n"
        "asyncio.run(go())\n")
    assert {"grpclib", "httpx", "h11", "snapshotter.containerd_client.pull"} <= loaded
    assert not {"trio", "attr", "oci.layout", "grpc", "estargz.layer", "httpcore",
                "anyio"} & loaded


def test_requests_of_the_registry_client_load_no_httpcore_anyio_or_http2() -> None:
    """A request, answered by a server on 127.0.0.1: about 6 MB of modules (httpcore,
    anyio and its asyncio backend, h2) that httpx's own transport would load stay out;
    so does the CA bundle of a plain-HTTP registry. With a proxy in the environment the
    client keeps httpx's transport, which goes through it."""
    request = (
        "import asyncio\n"
        "from oci.registry import RegistryClient\n"
        "async def answer(reader, writer):\n"
        "    await reader.readuntil(b'\\r\\n\\r\\n')\n"
        "    writer.write(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok')\n"
        "    await writer.drain()\n"
        "async def go():\n"
        "    server = await asyncio.start_server(answer, '127.0.0.1', 0)\n"
        "    port = server.sockets[0].getsockname()[1]\n"
        "    async with RegistryClient() as client:\n"
        "        assert (await client._http.get(f'http://127.0.0.1:{port}/v2/')).text == 'ok'\n"
        "    server.close()\n"
        "asyncio.run(go())\n")
    loaded = loaded_after(NO_PROXIES + "import snapshotter.fusemanager.server\n" + request)
    assert {"h11", "oci.http1", "pyfuse3"} <= loaded
    assert not {"httpcore", "anyio", "sniffio", "h2", "hpack", "certifi"} & loaded
    proxied = loaded_after("import os\nos.environ['HTTPS_PROXY'] = 'http://127.0.0.1:9'\n"
                           "from oci.registry import RegistryClient\n"
                           "assert RegistryClient()\n")
    assert "httpcore" in proxied


def test_a_pull_handed_to_the_service_loads_no_http_client_there() -> None:
    """With a FUSE manager, the service's pulls read the registry through it: what the
    service loads for them (at start, in a thread) carries no HTTP client."""
    loaded = loaded_after("import snapshotter.server\n"
                          "from snapshotter.pull_handoff import _load_pull_modules\n"
                          "_load_pull_modules(relayed=True)")
    assert {"snapshotter.containerd_client.pull", "snapshotter.relayed_registry"} <= loaded
    assert not {"httpx", "httpcore", "h11", "certifi", "oci.registry", "oci.auth"} & loaded


def test_the_fuse_manager_with_its_registry_client_loads_no_trio() -> None:
    """httpcore (httpx's transport, used where a proxy is set) imports trio if it can;
    in the manager trio stays absent (about 3.8 MB), and pyfuse3 still runs on its
    asyncio shim."""
    loaded = loaded_after("import snapshotter.fusemanager.server\n"
                          "from snapshotter.lazy.fuse_binding import pyfuse3\n"
                          "from oci.registry import RegistryClient\n"
                          "assert RegistryClient()\n"
                          "assert pyfuse3.trio.__name__ == 'pyfuse3.asyncio', pyfuse3.trio")
    assert {"pyfuse3", "h11"} <= loaded
    assert not {"trio", "attr", "outcome", "sortedcontainers"} & loaded


# -- what the FUSE manager holds once a layer is mounted -----------------------------------


def test_the_memory_tier_is_sized_for_the_chunks_being_read() -> None:
    """The kernel keeps what a FUSE read returned (keep_cache): the tier holds the chunks
    being read, a few whole 4 MiB chunks, not an image's worth (64 MiB cost the manager
    13 to 22 MB at READY with the python workspace image)."""
    from snapshotter.config import Config
    from snapshotter.lazy.memory_tier import ENTRY_OVERHEAD

    assert 3 * ((4 << 20) + ENTRY_OVERHEAD) <= Config().cache_memory_bytes <= 16 << 20


def test_a_layer_index_serves_with_a_small_page_cache(tmp_path: Path) -> None:
    """Built or reopened, an open layer keeps at most 512 KiB of its index in SQLite's
    page cache: the manager holds one per lazy layer."""
    import io

    import estargz
    from estargz import BuildOptions, Layer, build
    from tests.layers import coverage_tar

    out = io.BytesIO()
    result = build(io.BytesIO(coverage_tar()), out, BuildOptions(chunk_size=4096))
    blob = out.getvalue()
    footer = estargz.parse_footer(blob[-estargz.footer.MAX_FOOTER_SIZE:], len(blob))
    toc = blob[footer.toc_offset:footer.toc_offset + footer.toc_length]
    path = str(tmp_path / "index.db")
    built = estargz.load_toc(footer, toc, result.toc_digest, index_path=path)
    reopened = Layer.open_index(path, footer, result.toc_digest)
    assert reopened is not None
    for layer in (built, reopened):
        ((kib,),) = layer._db.execute("PRAGMA cache_size").fetchall()
        assert kib == -512
        layer.close()


def test_the_memory_report_says_where_the_memory_goes(tmp_path: Path) -> None:
    """LAZYPULL_TRACEMALLOC=DIR: SIGUSR2 writes a report, traced (allocation sites) or,
    with LAZYPULL_TRACEMALLOC_FRAMES=0, untraced (the small-object allocator's arenas,
    which it cannot count while tracing); glibc's and SQLite's figures either way."""
    probe = ("import asyncio, os, signal, sqlite3, tracemalloc\n"
             "from snapshotter import memory_trace\n"
             "async def main():\n"
             "    assert memory_trace.install(asyncio.get_running_loop())\n"
             "    held = [bytes(1 << 20) for _ in range(3)]\n"
             "    os.kill(os.getpid(), signal.SIGUSR2)\n"
             "    for _ in range(500):\n"
             "        await asyncio.sleep(0.01)\n"
             "        if os.listdir(os.environ['LAZYPULL_TRACEMALLOC']):\n"
             "            break\n"
             "    print(tracemalloc.is_tracing())\n"
             "sqlite3.connect(':memory:').execute('SELECT 1')\n"
             "asyncio.run(main())\n")
    reports = {}
    for frames in ("12", "0"):
        directory = tmp_path / frames
        env = {"PATH": "/usr/bin:/bin", "LAZYPULL_TRACEMALLOC": str(directory),
               "LAZYPULL_TRACEMALLOC_FRAMES": frames}
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True, timeout=120)
        assert done.stdout.strip() == str(frames != "0")
        (report,) = directory.iterdir()
        reports[frames] = report.read_text()
    traced, untraced = reports["12"], reports["0"]
    assert "== by traceback ==" in traced
    assert re.search(r"^ +3\.1\d MB +\d+ <string>:5$", traced, re.M)  # `held`, by its line
    assert "# arenas allocated current" in untraced and "by traceback" not in untraced
    for text in (traced, untraced):
        assert "malloc in use:" in text and "sqlite in use:" in text
        assert "Anonymous:" in text  # smaps_rollup
