"""The registry client against a real docker-registry 2.8 on loopback: pushing and
pulling blobs and manifests, ranges, mounts, auth (Basic and Bearer), retries,
and the errors a person sees when a registry misbehaves."""

import asyncio
import json
import os
import time
import tracemalloc
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest

from oci import mediatypes as mt
from oci.digest import DigestMismatchError, sha256_of
from oci.docker_config import Credentials, StaticCredentials
from oci.hosts import HostsConfig
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.registry import (
    PushResult,
    RegistryClient,
    RegistryDigestError,
    RegistryStore,
    RegistryUnavailableError,
    RetryPolicy,
    open_registry_store,
)
from oci.store import AuthError, NotFoundError, StoreError
from tests.fixtures.fault_proxy import WireFault
from tests.fixtures.registry import (
    PASSWORD,
    USER,
    RegistryServer,
    TokenRegistry,
    write_tls_files,
)
from tests.fixtures.token_server import TokenServerConfig

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)
ANONYMOUS = StaticCredentials({})


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


class RequestLog:
    """An httpx request hook that remembers (method, path, query, headers)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)

    def count(self, method: str, path_part: str = "", query_part: str = "") -> int:
        return sum(1 for r in self.requests if r.method == method and path_part in r.url.path
                   and query_part in str(r.url.query, "ascii"))


def make_client(log: RequestLog | None = None, credentials: Any = ANONYMOUS,
                **options: Any) -> RegistryClient:
    hooks = {"request": [log]} if log else None
    options.setdefault("retry", FAST_RETRY)
    # trust_env=False: no proxy from the environment, so traffic stays on loopback.
    return RegistryClient(credentials=credentials, event_hooks=hooks, trust_env=False,
                          **options)


def write_blob(directory: Path, data: bytes, media_type: str = mt.OCI_LAYER_GZIP
               ) -> tuple[Descriptor, str]:
    path = directory / f"blob-{sha256_of(data)[7:19]}"
    path.write_bytes(data)
    return Descriptor(media_type, sha256_of(data), len(data)), str(path)


def image_manifest(config: Descriptor, layers: list[Descriptor]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": config.to_json(), "layers": [layer.to_json() for layer in layers],
    }, indent=2).encode()


async def push_image(client: RegistryClient, reference: Reference, directory: Path,
                     layer: bytes) -> tuple[bytes, Descriptor]:
    """Push a config, one layer and a manifest tagged with the reference's tag."""
    config, config_path = write_blob(directory, b'{"architecture":"amd64","os":"linux"}',
                                     mt.OCI_CONFIG)
    layer_desc, layer_path = write_blob(directory, layer)
    await client.push_blob(reference, config, config_path)
    await client.push_blob(reference, layer_desc, layer_path)
    manifest = image_manifest(config, [layer_desc])
    await client.put_manifest(reference, manifest, mt.OCI_MANIFEST, reference.tag)
    return manifest, layer_desc


async def read_stream(client: RegistryClient, reference: Reference,
                      descriptor: Descriptor) -> bytes:
    return b"".join([chunk async for chunk in client.stream_blob(reference, descriptor)])


def ref(server: RegistryServer | str, name: str) -> Reference:
    host = server if isinstance(server, str) else server.host
    return Reference.parse(f"{host}/{name}")


# -- blobs ----------------------------------------------------------------------------------


def test_monolithic_push_then_head_stream_and_range(registry, tmp_path):
    data = os.urandom(300_000)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(registry, "blobs/monolithic:v1")
    log = RequestLog()

    async def scenario():
        async with make_client(log) as client:
            assert await client.push_blob(reference, descriptor, path) is PushResult.UPLOADED
            assert log.count("POST", "/blobs/uploads/") == 1
            assert log.count("PATCH") == 0
            assert log.count("PUT", "/blobs/uploads/") == 1
            assert await client.blob_size(reference, descriptor.digest) == len(data)
            assert await read_stream(client, reference, descriptor) == data
            assert await client.fetch_range(reference, descriptor.digest, 12_345, 4096) == \
                data[12_345:12_345 + 4096]
            tail = await client.fetch_range(reference, descriptor.digest, len(data) - 10, 10)
            assert tail == data[-10:]
            assert await client.fetch_range(reference, descriptor.digest, 5, 0) == b""
            # A second push finds the blob and uploads nothing.
            posts = log.count("POST")
            assert await client.push_blob(reference, descriptor, path) is PushResult.EXISTS
            assert log.count("POST") == posts

    run(scenario())


def connections_opened(client: RegistryClient) -> list[object]:
    """The origins of the connections the client's transport opens from now on."""
    transport = client._transports[client._http]
    real_connect, opened = transport._connect, []

    async def counted(origin, timeout):
        opened.append(origin)
        return await real_connect(origin, timeout)
    transport._connect = counted  # type: ignore[method-assign]
    return opened


def test_connections_opened_ahead_carry_the_range_requests(registry, tmp_path):
    """preconnect opens connections to the registry's host until that many are idle;
    the range requests that follow side by side open none; a registry nobody answers
    for opens none and fails nothing."""
    data = os.urandom(100_000)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(registry, "blobs/preconnect:v1")

    async def scenario():
        async with make_client() as pusher:
            await pusher.push_blob(reference, descriptor, path)
        async with make_client() as client:
            opened = connections_opened(client)
            assert await client.preconnect(reference, 4) == 4
            parts = await asyncio.gather(*(client.fetch_range(
                reference, descriptor.digest, i * 25_000, 25_000) for i in range(4)))
            assert b"".join(parts) == data and len(opened) == 4
            assert await client.preconnect(ref("127.0.0.1:9", "none:v1"), 2) == 0

    run(scenario())


def test_chunked_push_sends_patches_with_content_range(registry, tmp_path):
    chunk = 64 * 1024
    data = os.urandom(3 * chunk + 5)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(registry, "blobs/chunked:v1")
    log = RequestLog()

    async def scenario():
        async with make_client(log, chunk_size=chunk) as client:
            assert await client.push_blob(reference, descriptor, path) is PushResult.UPLOADED
            patches = [r for r in log.requests if r.method == "PATCH"]
            assert [r.headers["content-range"] for r in patches] == [
                f"0-{chunk - 1}", f"{chunk}-{2 * chunk - 1}", f"{2 * chunk}-{3 * chunk - 1}",
                f"{3 * chunk}-{3 * chunk + 4}"]
            final_put = [r for r in log.requests if r.method == "PUT"][-1]
            assert final_put.url.params["digest"] == descriptor.digest
            assert await read_stream(client, reference, descriptor) == data

    run(scenario())


def test_chunked_push_holds_one_chunk_at_a_time(registry, tmp_path):
    chunk = 2 << 20
    data = os.urandom(16 * chunk)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(registry, "blobs/chunked-memory:v1")

    async def scenario():
        async with make_client(chunk_size=chunk) as client:
            tracemalloc.start()
            try:
                result = await client.push_blob(reference, descriptor, path)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert result is PushResult.UPLOADED
            # The chunk being sent and what the HTTP stack copies of it; the chunks
            # before it are gone.
            assert peak < 4 * chunk, f"peak of {peak / chunk:.1f} chunks"

    run(scenario())


def test_cross_repository_mount_uploads_nothing(registry, tmp_path):
    data = os.urandom(100_000)
    descriptor, path = write_blob(tmp_path, data)
    source, target = ref(registry, "mount/source:v1"), ref(registry, "mount/target:v1")
    log = RequestLog()

    async def scenario():
        async with make_client(log) as client:
            await client.push_blob(source, descriptor, path)
            log.requests.clear()
            result = await client.push_blob(target, descriptor, path, mount_from=["mount/source"])
            assert result is PushResult.MOUNTED
            assert log.count("POST", "/mount/target/blobs/uploads/", "mount=") == 1
            assert log.count("PATCH") == 0 and log.count("PUT") == 0
            assert await read_stream(client, target, descriptor) == data

    run(scenario())


def test_mount_from_repository_without_the_blob_falls_back_to_upload(registry, tmp_path):
    data = os.urandom(10_000)
    descriptor, path = write_blob(tmp_path, data)
    target = ref(registry, "mount/fallback:v1")
    log = RequestLog()

    async def scenario():
        async with make_client(log) as client:
            result = await client.push_blob(target, descriptor, path,
                                            mount_from=["mount/empty", "mount/also-empty"])
            assert result is PushResult.UPLOADED
            assert log.count("POST", "", "mount=") == 2
            # The session the first refused mount opened was cancelled, the second one used.
            assert log.count("DELETE", "/blobs/uploads/") == 1
            assert log.count("POST", "/blobs/uploads/") == 2
            assert await client.blob_size(target, descriptor.digest) == len(data)

    run(scenario())


def test_local_file_that_does_not_match_its_digest_is_not_pushed(registry, tmp_path):
    descriptor, path = write_blob(tmp_path, os.urandom(5000))
    Path(path).write_bytes(os.urandom(5000))  # same size, other bytes
    reference = ref(registry, "blobs/liar:v1")

    async def scenario():
        async with make_client() as client:
            with pytest.raises(RegistryDigestError, match=descriptor.digest):
                await client.push_blob(reference, descriptor, path)
            assert await client.blob_size(reference, descriptor.digest) is None

    run(scenario())


def test_corrupted_blob_in_storage_raises_digest_error(registry, tmp_path):
    data = os.urandom(50_000)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(registry, "blobs/corrupt:v1")

    async def scenario():
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
            registry.blob_data_path(descriptor.digest).write_bytes(os.urandom(len(data)))
            with pytest.raises(DigestMismatchError) as caught:
                await read_stream(client, reference, descriptor)
            assert isinstance(caught.value, StoreError)
            assert descriptor.digest in str(caught.value)
            assert reference.repository in str(caught.value)

    run(scenario())


def test_truncated_blob_in_storage_is_reported(registry, tmp_path):
    data = os.urandom(50_000)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(registry, "blobs/truncated:v1")

    async def scenario():
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
            registry.blob_data_path(descriptor.digest).write_bytes(data[:20_000])
            with pytest.raises(StoreError, match="truncated: got 20000 of 50000 bytes"):
                await read_stream(client, reference, descriptor)

    run(scenario())


# -- manifests ------------------------------------------------------------------------------


def test_manifest_put_get_and_resolve_by_tag_and_digest(registry, tmp_path):
    reference = ref(registry, "images/app:v1")

    async def scenario():
        async with make_client() as client:
            manifest, layer = await push_image(client, reference, tmp_path, os.urandom(2000))
            digest = sha256_of(manifest)
            data, media_type, got_digest = await client.get_manifest(reference)
            assert (data, media_type, got_digest) == (manifest, mt.OCI_MANIFEST, digest)
            assert await client.get_manifest(reference, digest) == (manifest, mt.OCI_MANIFEST,
                                                                     digest)
            resolved = await client.resolve(reference)
            assert (resolved.digest, resolved.size, resolved.media_type) == \
                (digest, len(manifest), mt.OCI_MANIFEST)
            # An index pushed by digest only, pointing at the manifest.
            index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
                {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(manifest),
                 "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
            index_digest = await client.put_manifest(reference, index, mt.OCI_INDEX)
            assert index_digest == sha256_of(index)
            assert await client.get_manifest(reference, index_digest) == \
                (index, mt.OCI_INDEX, index_digest)
            by_digest = await client.resolve(reference.with_tag(None).with_digest(index_digest))
            assert by_digest.media_type == mt.OCI_INDEX

            store = open_registry_store(f"docker://{reference}", client)
            assert store.name == f"docker://{reference}"
            assert store.default_object == "v1"
            assert (await store.get_manifest("v1"))[2] == digest
            assert await store.has_blob(layer)
            assert b"".join([c async for c in store.get_blob(layer)]) == \
                Path(tmp_path / f"blob-{layer.digest[7:19]}").read_bytes()
            await store.aclose()  # does not close a client it does not own
            assert (await client.resolve(reference)).digest == digest

    run(scenario())


def test_registry_stores_copy_an_image_by_mounting_its_blobs(registry, tmp_path):
    source_ref = ref(registry, "copy/source:v1")
    target_ref = ref(registry, "copy/target:latest")
    log = RequestLog()

    async def scenario():
        async with make_client(log) as client:
            manifest, _ = await push_image(client, source_ref, tmp_path, os.urandom(5000))
            source = RegistryStore(source_ref, client)
            target = open_registry_store(target_ref, client, mount_from=["copy/source"])
            data, media_type, digest = await source.get_manifest(source.default_object)
            parsed = json.loads(data)
            log.requests.clear()
            for raw in [parsed["config"], *parsed["layers"]]:
                blob = Descriptor.from_json(raw, "blob")
                assert not await target.has_blob(blob)
                path = tmp_path / "copied"
                path.write_bytes(b"".join([c async for c in source.get_blob(blob)]))
                await target.put_blob(blob, str(path))
                assert await target.has_blob(blob)
            assert log.count("PATCH") == 0 and log.count("PUT") == 0  # all mounted
            assert await target.put_manifest(data, media_type, "latest") == digest
            assert await target.get_manifest("latest") == (manifest, mt.OCI_MANIFEST, digest)

    run(scenario())


def test_not_found_errors_name_what_is_missing(registry):
    reference = ref(registry, "images/missing:nope")
    digest = sha256_of(b"never pushed")
    descriptor = Descriptor(mt.OCI_LAYER_GZIP, digest, 12)

    async def scenario():
        async with make_client() as client:
            with pytest.raises(NotFoundError, match=r"images/missing:nope"):
                await client.get_manifest(reference)
            with pytest.raises(NotFoundError, match=r"images/missing:nope"):
                await client.resolve(reference)
            with pytest.raises(NotFoundError, match=digest):
                await read_stream(client, reference, descriptor)
            with pytest.raises(NotFoundError, match=digest):
                await client.fetch_range(reference, digest, 0, 4)
            assert await client.blob_size(reference, digest) is None
            assert not await client.has_blob(reference, digest)

    run(scenario())


# -- faults between client and registry -----------------------------------------------------


@pytest.fixture
def proxied(registry, fault_proxy_factory):
    """A fault proxy in front of the shared registry."""
    return fault_proxy_factory(registry.host)


def test_503_then_success_is_retried(proxied, tmp_path):
    reference = ref(proxied.host, "retry/app:v1")

    async def scenario():
        async with make_client() as client:
            manifest, _ = await push_image(client, reference, tmp_path, b"layer")
            proxied.add(WireFault("status", "GET", r"/manifests/v1", times=2))
            before = len(proxied.requests("GET", "/manifests/v1"))
            assert (await client.get_manifest(reference))[0] == manifest
            assert len(proxied.requests("GET", "/manifests/v1")) - before == 3

    run(scenario())


def test_429_waits_for_retry_after(proxied, tmp_path):
    reference = ref(proxied.host, "retry/limited:v1")
    descriptor, path = write_blob(tmp_path, b"rate limited bytes")

    async def scenario():
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
            proxied.add(WireFault("rate_limit", "HEAD", r"/blobs/sha256:", retry_after=1,
                                  times=1))
            heads = len(proxied.requests("HEAD", "/blobs/"))
            started = time.monotonic()
            assert await client.blob_size(reference, descriptor.digest) == descriptor.size
            assert time.monotonic() - started >= 0.95
            assert len(proxied.requests("HEAD", "/blobs/")) == heads + 2  # the 429, the retry

    run(scenario())


def test_retries_are_bounded(proxied):
    reference = ref(proxied.host, "retry/down:v1")
    proxied.add(WireFault("status", "GET", r"/manifests/"))

    async def scenario():
        async with make_client() as client:
            with pytest.raises(RegistryUnavailableError, match="HTTP 503"):
                await client.get_manifest(reference)
        assert len(proxied.requests("GET", "/manifests/")) == FAST_RETRY.max_attempts

    run(scenario())


def test_upload_that_fails_midway_starts_again(proxied, tmp_path):
    chunk = 32 * 1024
    data = os.urandom(3 * chunk)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(proxied.host, "retry/upload:v1")
    proxied.add(WireFault("status", "PATCH", r"/blobs/uploads/", status=500, times=1))
    log = RequestLog()

    async def scenario():
        async with make_client(log, chunk_size=chunk) as client:
            assert await client.push_blob(reference, descriptor, path) is PushResult.UPLOADED
            # The session with the failed chunk was abandoned, a new one carried the blob.
            assert log.count("POST", "/blobs/uploads/") == 2
            assert log.count("PATCH") == 1 + 3
            assert await read_stream(client, reference, descriptor) == data

    run(scenario())


def test_html_page_for_a_manifest_is_a_clear_error(proxied):
    reference = ref(proxied.host, "portal/app:v1")
    page = b"<html><body><h1>Please log in</h1></body></html>"
    proxied.add(WireFault("answer", "GET", r"/manifests/v1", status=200, body=page,
                          headers={"Content-Type": "text/html; charset=utf-8"}))

    async def scenario():
        async with make_client() as client:
            with pytest.raises(StoreError, match=r"registry returned text/html for manifest "
                                                 r".*portal/app:v1"):
                await client.get_manifest(reference)

    run(scenario())


def test_manifest_that_is_not_json_is_a_clear_error(proxied):
    reference = ref(proxied.host, "portal/garbage:v1")
    proxied.add(WireFault("answer", "GET", r"/manifests/v1", status=200,
                          body=b"\x00\x01 not json", headers={"Content-Type": mt.OCI_MANIFEST}))

    async def scenario():
        async with make_client() as client:
            with pytest.raises(StoreError, match="not JSON"):
                await client.get_manifest(reference)

    run(scenario())


def test_manifest_by_tag_is_checked_against_docker_content_digest(proxied, tmp_path):
    reference = ref(proxied.host, "tamper/app:v1")

    async def scenario():
        async with make_client() as client:
            manifest, _ = await push_image(client, reference, tmp_path, b"layer bytes")
            forged = manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":2')
            proxied.add(WireFault("answer", "GET", r"/manifests/v1", status=200, body=forged,
                                  headers={"Content-Type": mt.OCI_MANIFEST,
                                           "Docker-Content-Digest": sha256_of(manifest)}))
            with pytest.raises(RegistryDigestError, match=sha256_of(manifest)):
                await client.get_manifest(reference)

    run(scenario())


def test_oversized_manifest_is_refused(registry, tmp_path):
    reference = ref(registry, "images/big:v1")

    async def scenario():
        async with make_client() as client:
            await push_image(client, reference, tmp_path, b"x")
        async with make_client(max_manifest_size=100) as small:
            with pytest.raises(StoreError, match="larger than the 100 bytes allowed"):
                await small.get_manifest(reference)

    run(scenario())


def test_resolve_falls_back_to_get_when_head_is_refused(proxied, tmp_path):
    reference = ref(proxied.host, "resolve/app:v1")

    async def scenario():
        async with make_client() as client:
            manifest, _ = await push_image(client, reference, tmp_path, b"layer")
            proxied.add(WireFault("answer", "HEAD", r"/manifests/v1", status=405, times=1))
            gets = len(proxied.requests("GET", "/manifests/v1"))
            resolved = await client.resolve(reference)
            assert resolved.digest == sha256_of(manifest)
            assert resolved.size == len(manifest)
            assert len(proxied.requests("GET", "/manifests/v1")) == gets + 1

    run(scenario())


def test_range_read_takes_only_a_206_with_the_range_asked_for(proxied, tmp_path):
    reference = ref(proxied.host, "ranges/app:v1")
    data = os.urandom(4000)
    descriptor, path = write_blob(tmp_path, data)
    always = FAST_RETRY.max_attempts
    answers = [(dict(status=200, body=data), "ignored the Range request"),
               (dict(status=206, body=data[:20], headers={"Content-Range": "bytes 0-19/4000"}),
                "Content-Range 'bytes 0-19/4000'"),
               (dict(status=206, body=data[10:20],
                     headers={"Content-Range": "bytes 10-29/4000"}), "got 10 bytes, expected 20")]

    async def scenario():
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
            for answer, message in answers:
                fault = WireFault("answer", "GET", times=always, **answer)
                proxied.add(fault)
                with pytest.raises(RegistryUnavailableError, match=message):
                    await client.fetch_range(reference, descriptor.digest, 10, 20)
                assert fault.hits == always  # asked again each time, then gave up
            sent = proxied.requests("GET", "/blobs/sha256:")[-1]
            assert sent.headers["Range"] == "bytes=10-29"
            # The same answers once, then a right one: the caller gets the right bytes.
            for answer, _ in answers:
                fault = WireFault("answer", "GET", times=1, **answer)
                proxied.add(fault)
                assert await client.fetch_range(reference, descriptor.digest, 10, 20) == \
                    data[10:30]
                assert fault.hits == 1

    run(scenario())


def test_range_read_asks_the_registry_again_when_its_redirect_target_fails(
        proxied, fault_proxy_factory, tmp_path):
    storage = fault_proxy_factory()  # answers only faults: a failing blob store
    reference = ref(proxied.host, "ranges/redirected:v1")
    data = os.urandom(3000)
    descriptor, path = write_blob(tmp_path, data)

    async def scenario():
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
            proxied.add(WireFault("answer", "GET", status=307, times=1,
                                  headers={"Location": f"{storage.url}/storage/blob"}))
            storage.add(WireFault("status", "GET", r"^/storage/"))
            assert await client.fetch_range(reference, descriptor.digest, 5, 10) == data[5:15]
            # One try at the failing target, then the registry again, which answered.
            assert len(storage.requests("GET")) == 1
            assert await read_stream(client, reference, descriptor) == data
            proxied.add(WireFault("answer", "GET", status=307,
                                  headers={"Location": f"{storage.url}/storage/blob"}))
            with pytest.raises(RegistryUnavailableError,
                               match=rf"{storage.host} \(redirected from {proxied.host}\) "
                                     "answered HTTP 503"):
                await client.fetch_range(reference, descriptor.digest, 5, 10)

    run(scenario())


def test_broken_download_resumes_with_a_range_request(proxied, tmp_path):
    data = os.urandom(200_000)
    reference = ref(proxied.host, "resume/app:v1")
    descriptor, path = write_blob(tmp_path, data)

    async def scenario():
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
            proxied.add(WireFault("cut", "GET", cut_after=70_000, times=1))
            assert await read_stream(client, reference, descriptor) == data
            ranges = [r.headers.get("Range") for r in proxied.requests("GET", "/blobs/sha256:")]
            assert ranges[0] is None
            assert ranges[1].startswith("bytes=") and ranges[1].endswith(f"-{len(data) - 1}")
            assert int(ranges[1][6:].split("-")[0]) > 0

    run(scenario())


def test_download_whose_body_ends_early_resumes(proxied, tmp_path):
    data = os.urandom(100_000)
    reference = ref(proxied.host, "resume/short:v1")
    descriptor, path = write_blob(tmp_path, data)

    async def scenario():
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
            # A 200 whose Content-Length says the body is complete, but it is not.
            proxied.add(WireFault("answer", "GET", status=200, body=data[:30_000], times=1))
            assert await read_stream(client, reference, descriptor) == data
            resumed = proxied.requests("GET", "/blobs/sha256:")[-1]
            assert resumed.headers["Range"] == f"bytes=30000-{len(data) - 1}"

    run(scenario())


async def streamed(client: RegistryClient, reference: Reference, digest: str, offset: int,
                   length: int) -> list[bytes]:
    return [part async for part in client.stream_range(reference, digest, offset, length)]


def pushed_random_blob(host: str, name: str, size: int, directory: Path
                       ) -> tuple[bytes, Reference, Descriptor]:
    data = os.urandom(size)
    reference = ref(host, name)
    descriptor, path = write_blob(directory, data)

    async def push() -> None:
        async with make_client() as client:
            await client.push_blob(reference, descriptor, path)
    run(push())
    return data, reference, descriptor


def test_a_streamed_range_comes_as_it_arrives_and_resumes_where_it_broke(proxied, tmp_path):
    data, reference, descriptor = pushed_random_blob(proxied.host, "stream/app:v1", 600_000,
                                                     tmp_path)

    async def scenario():
        async with make_client() as client:
            parts = await streamed(client, reference, descriptor.digest, 1000, 500_000)
            assert b"".join(parts) == data[1000:501_000] and len(parts) > 1
            assert await streamed(client, reference, descriptor.digest, 7, 0) == []
            # Read one after another, streamed ranges share one kept-alive connection.
            opened = connections_opened(client)
            for offset in range(0, 500_000, 100_000):
                parts = await streamed(client, reference, descriptor.digest, offset, 100_000)
                assert b"".join(parts) == data[offset:offset + 100_000]
            assert len(opened) == 0
            # A connection cut mid-body: the rest is asked for from where it stopped,
            # and no byte comes twice.
            proxied.add(WireFault("cut", "GET", cut_after=150_000, times=1))
            parts = await streamed(client, reference, descriptor.digest, 1000, 500_000)
            assert b"".join(parts) == data[1000:501_000]
            ranges = [r.headers["Range"] for r in proxied.requests("GET", "/blobs/sha256:")]
            resumed_at = int(ranges[-1][6:].split("-")[0])
            assert ranges[-2] == "bytes=1000-500999" and ranges[-1].endswith("-500999")
            assert 1000 < resumed_at <= 151_000
            # A body that ends early is resumed the same way.
            proxied.add(WireFault("answer", "GET", status=206, body=data[1000:41_000],
                                  headers={"Content-Range": "bytes 1000-500999/600000"},
                                  times=1))
            parts = await streamed(client, reference, descriptor.digest, 1000, 500_000)
            assert b"".join(parts) == data[1000:501_000]
            assert proxied.requests("GET", "/blobs/sha256:")[-1].headers["Range"] == \
                "bytes=41000-500999"

    run(scenario())


def test_a_streamed_range_takes_only_the_range_asked_for_and_gives_up(proxied, tmp_path):
    data, reference, descriptor = pushed_random_blob(proxied.host, "stream/bad:v1", 4000,
                                                     tmp_path)
    always = FAST_RETRY.max_attempts

    async def scenario():
        async with make_client() as client:
            # A 200 with the whole blob, or another range: asked again, never yielded.
            for answer, message in [(dict(status=200, body=data), "ignored the Range"),
                                    (dict(status=206, body=data[:20], headers={
                                        "Content-Range": "bytes 0-19/4000"}),
                                     "Content-Range 'bytes 0-19/4000'")]:
                fault = WireFault("answer", "GET", times=always, **answer)
                proxied.add(fault)
                with pytest.raises(RegistryUnavailableError, match=message):
                    await streamed(client, reference, descriptor.digest, 10, 20)
                assert fault.hits == always
                proxied.clear()
            # Cut every time: the resumptions are bounded too, and say where it broke.
            proxied.add(WireFault("cut", "GET", cut_after=100, times=always + 5))
            got: list[bytes] = []
            with pytest.raises(RegistryUnavailableError, match="also after resuming"):
                async for part in client.stream_range(reference, descriptor.digest, 0, 4000):
                    got.append(part)
            assert data.startswith(b"".join(got))

    run(scenario())


def test_redirect_to_another_host_drops_authorization(basic_auth_registry, fault_proxy_factory,
                                                      tmp_path):
    front = fault_proxy_factory(basic_auth_registry.host)
    storage = fault_proxy_factory()  # plays blob storage on another port
    data = os.urandom(3000)
    descriptor, path = write_blob(tmp_path, data)
    reference = ref(front.host, "redirect/app:v1")
    credentials = StaticCredentials({front.host: Credentials(USER, PASSWORD)})

    async def scenario():
        async with make_client(credentials=credentials) as client:
            await client.push_blob(reference, descriptor, path)
            front.add(WireFault("answer", "GET", status=307, times=1, headers={
                "Location": f"{storage.url}/storage/{descriptor.digest}?signature=abc"}))
            storage.add(WireFault("answer", "GET", r"^/storage/", status=200, body=data,
                                  headers={"Content-Type": "application/octet-stream"},
                                  times=1))
            assert await read_stream(client, reference, descriptor) == data
        assert front.requests("GET", "/blobs/")[-1].headers["Authorization"].startswith("Basic")
        assert [r.headers.get("Authorization") for r in storage.requests("GET")] == [None]

    run(scenario())


# -- authentication -------------------------------------------------------------------------


def test_basic_auth_with_right_credentials(basic_auth_registry, tmp_path):
    reference = ref(basic_auth_registry, "basic/app:v1")
    credentials = StaticCredentials({basic_auth_registry.host: Credentials(USER, PASSWORD)})

    async def scenario():
        async with make_client(credentials=credentials) as client:
            manifest, layer = await push_image(client, reference, tmp_path, b"basic layer")
            assert (await client.get_manifest(reference))[0] == manifest
            assert await client.fetch_range(reference, layer.digest, 0, 5) == b"basic"

    run(scenario())


def test_basic_auth_with_wrong_credentials_is_an_auth_error(basic_auth_registry):
    reference = ref(basic_auth_registry, "basic/app:v1")
    credentials = StaticCredentials({basic_auth_registry.host: Credentials(USER, "wrong")})

    async def scenario():
        async with make_client(credentials=credentials) as client:
            with pytest.raises(AuthError) as caught:
                await client.get_manifest(reference)
        message = str(caught.value)
        assert basic_auth_registry.host in message and "basic/app" in message
        assert "wrong" not in message  # never show the password

    run(scenario())


def test_basic_auth_without_credentials_is_an_auth_error(basic_auth_registry):
    reference = ref(basic_auth_registry, "basic/app:v1")

    async def scenario():
        async with make_client() as client:
            with pytest.raises(AuthError, match="requires a username and password"):
                await client.resolve(reference)

    run(scenario())


def test_bearer_token_is_fetched_once_and_reused(token_registry: TokenRegistry, tmp_path):
    server, tokens = token_registry.registry, token_registry.tokens
    reference = ref(server, "bearer/app:v1")
    credentials = StaticCredentials({server.host: Credentials(USER, PASSWORD)})

    async def scenario():
        async with make_client(credentials=credentials) as client:
            manifest, layer = await push_image(client, reference, tmp_path, b"token layer")
            assert (await client.get_manifest(reference))[0] == manifest
            assert await client.fetch_range(reference, layer.digest, 0, 5) == b"token"
            assert (await client.resolve(reference)).digest == sha256_of(manifest)
        # One token (pull,push) served every request of the push and the pulls.
        assert tokens.token_count == 1
        assert tokens.issued[0].account == USER
        assert tokens.issued[0].scopes == ["repository:bearer/app:pull,push"]

    run(scenario())


def test_concurrent_requests_share_one_token(token_registry: TokenRegistry, tmp_path):
    server, tokens = token_registry.registry, token_registry.tokens
    reference = ref(server, "bearer/concurrent:v1")
    credentials = StaticCredentials({server.host: Credentials(USER, PASSWORD)})
    descriptor, path = write_blob(tmp_path, os.urandom(1000))

    async def scenario():
        async with make_client(credentials=credentials) as client:
            await client.push_blob(reference, descriptor, path)
            pushes = tokens.token_count
            await asyncio.gather(*[client.fetch_range(reference, descriptor.digest, i, 10)
                                   for i in range(8)])
            assert tokens.token_count == pushes  # pull is covered by the pull,push token

    run(scenario())


def test_bearer_token_is_refreshed_after_it_expires(token_registry: TokenRegistry, tmp_path):
    server, tokens = token_registry.registry, token_registry.tokens
    tokens.config.expires_in = 1
    reference = ref(server, "bearer/expiry:v1")
    credentials = StaticCredentials({server.host: Credentials(USER, PASSWORD)})
    descriptor, path = write_blob(tmp_path, b"expiring")

    async def scenario():
        async with make_client(credentials=credentials) as client:
            await client.push_blob(reference, descriptor, path)
            assert await client.has_blob(reference, descriptor.digest)
            assert tokens.token_count == 1
            await asyncio.sleep(1.0)
            assert await client.has_blob(reference, descriptor.digest)
            assert tokens.token_count == 2

    run(scenario())


def test_bearer_with_wrong_credentials_is_an_auth_error(token_registry: TokenRegistry):
    server, tokens = token_registry.registry, token_registry.tokens
    reference = ref(server, "bearer/app:v1")
    credentials = StaticCredentials({server.host: Credentials(USER, "not-the-password")})

    async def scenario():
        async with make_client(credentials=credentials) as client:
            with pytest.raises(AuthError, match="refused a token") as caught:
                await client.get_manifest(reference)
        assert "not-the-password" not in str(caught.value)
        assert tokens.refused == 1

    run(scenario())


def test_anonymous_token_allows_pull_but_not_push(token_registry: TokenRegistry, tmp_path):
    server, tokens = token_registry.registry, token_registry.tokens
    tokens.config.anonymous_actions = frozenset({"pull"})
    reference = ref(server, "public/app:v1")
    credentials = StaticCredentials({server.host: Credentials(USER, PASSWORD)})

    async def scenario():
        async with make_client(credentials=credentials) as client:
            manifest, _ = await push_image(client, reference, tmp_path, b"public layer")
        async with make_client() as anonymous:
            assert (await anonymous.get_manifest(reference))[0] == manifest
            with pytest.raises(AuthError, match="public/app"):
                await anonymous.put_manifest(reference, manifest, mt.OCI_MANIFEST, "v2")
        assert {t.account for t in tokens.issued[1:]} == {""}

    run(scenario())


def test_identity_token_and_access_token_field(token_registry: TokenRegistry, tmp_path):
    server, tokens = token_registry.registry, token_registry.tokens
    tokens.config.token_field = "access_token"
    tokens.config.refresh_tokens = {"identity-token-123": USER}
    reference = ref(server, "oauth/app:v1")
    credentials = StaticCredentials({server.host: Credentials(identity_token="identity-token-123")})

    async def scenario():
        async with make_client(credentials=credentials) as client:
            manifest, _ = await push_image(client, reference, tmp_path, b"oauth layer")
            assert (await client.get_manifest(reference))[0] == manifest
        assert [t.method for t in tokens.issued] == ["POST"]
        assert tokens.issued[0].account == USER

    run(scenario())


def test_token_server_config_is_per_test(token_registry: TokenRegistry):
    # Tests above change their token server's config; each test gets a fresh one.
    assert token_registry.tokens.config == TokenServerConfig(users={USER: PASSWORD})


# -- TLS ------------------------------------------------------------------------------------


def test_tls_registry_with_ca_from_hosts_toml(registry_factory, tmp_path):
    tls = write_tls_files(tmp_path)
    server = registry_factory(tls=tls)
    reference = ref(server, "tls/app:v1")
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / server.host).mkdir(parents=True)
    (hosts_dir / server.host / "registry-ca.pem").write_bytes(tls.ca.read_bytes())
    (hosts_dir / server.host / "hosts.toml").write_text(
        f'server = "https://{server.host}"\nca = "registry-ca.pem"\n')
    untrusted_dir = tmp_path / "untrusted.d"
    (untrusted_dir / server.host).mkdir(parents=True)
    (untrusted_dir / server.host / "hosts.toml").write_text(f'server = "https://{server.host}"\n')

    async def scenario():
        async with make_client(hosts=HostsConfig(str(hosts_dir))) as client:
            manifest, _ = await push_image(client, reference, tmp_path, b"tls layer")
            assert (await client.get_manifest(reference))[0] == manifest
        async with make_client(hosts=HostsConfig(str(untrusted_dir))) as client:
            with pytest.raises(RegistryUnavailableError, match=f"cannot reach {server.host}"):
                await client.get_manifest(reference)
        # Without a hosts file, a loopback registry is spoken to in plain HTTP: it refuses.
        async with make_client() as client:
            with pytest.raises(StoreError, match="HTTP 400"):
                await client.get_manifest(reference)

    run(scenario())
