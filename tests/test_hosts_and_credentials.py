"""containerd hosts.toml endpoints, Docker config credentials and WWW-Authenticate
parsing: on their own, and with a real docker-registry on loopback."""

import asyncio
import base64
import json
import os
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from oci import mediatypes as mt
from oci.auth import parse_www_authenticate
from oci.digest import sha256_of
from oci.docker_config import (
    CredentialsError,
    CredentialStore,
    StaticCredentials,
    default_config_path,
)
from oci.hosts import ALL_CAPABILITIES, HostsConfig, HostsConfigError, TLSSettings
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.registry import RegistryClient, RegistryUnavailableError, RetryPolicy
from oci.store import AuthError
from tests.fixtures.registry import PASSWORD, USER, RegistryServer, free_port

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)


def make_client(hosts: HostsConfig | None = None, credentials: Any = None) -> RegistryClient:
    # trust_env=False: no proxy from the environment, so traffic stays on loopback.
    return RegistryClient(hosts, credentials or StaticCredentials({}), FAST_RETRY,
                          trust_env=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- WWW-Authenticate -----------------------------------------------------------------------


def test_parse_bearer_challenge_with_quoted_params():
    [challenge] = parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:library/ubuntu:pull,push repository:other:pull",error="invalid_token"')
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example.com/token"
    assert challenge.service == "registry.example.com"
    assert challenge.scopes == ["repository:library/ubuntu:pull,push", "repository:other:pull"]
    assert challenge.params["error"] == "invalid_token"


def test_parse_several_challenges_unquoted_values_and_escapes():
    challenges = parse_www_authenticate([
        'Basic realm="Registry \\"Realm\\"", BEARER Realm=https://a.example/token, '
        'Service = svc',
        "Negotiate",
    ])
    assert [c.scheme for c in challenges] == ["basic", "bearer", "negotiate"]
    assert challenges[0].realm == 'Registry "Realm"'
    assert challenges[1].realm == "https://a.example/token"
    assert challenges[1].service == "svc"
    assert challenges[2].params == {}
    assert parse_www_authenticate("") == []


# -- hosts.toml -----------------------------------------------------------------------------


def test_default_endpoints_without_a_hosts_directory():
    hosts = HostsConfig(None)
    [remote] = hosts.endpoints("registry.example.com:5000")
    assert (remote.url, remote.path, remote.capabilities) == \
        ("https://registry.example.com:5000", "/v2", ALL_CAPABILITIES)
    assert remote.api_url("/a/b/manifests/v1") == \
        "https://registry.example.com:5000/v2/a/b/manifests/v1"
    assert hosts.endpoints("docker.io")[0].url == "https://registry-1.docker.io"
    # Loopback registries on a port other than 443 speak plain HTTP, as in containerd.
    assert hosts.endpoints("localhost:5000")[0].url == "http://localhost:5000"
    assert hosts.endpoints("127.0.0.1:5000")[0].url == "http://127.0.0.1:5000"
    assert hosts.endpoints("[::1]:5000")[0].url == "http://[::1]:5000"
    assert hosts.endpoints("localhost")[0].url == "https://localhost"
    assert hosts.endpoints("localhost:443")[0].url == "https://localhost:443"


def test_plain_http_only_when_configured():
    assert HostsConfig(None).endpoints("registry.internal:5000")[0].scheme == "https"
    insecure = HostsConfig(None, insecure=["registry.internal:5000"])
    assert insecure.endpoints("registry.internal:5000")[0].scheme == "http"
    assert insecure.endpoints("other.internal:5000")[0].scheme == "https"
    everything = HostsConfig(None, plain_http=True)
    assert everything.endpoints("registry.internal")[0].scheme == "http"
    assert everything.endpoints("docker.io")[0].url == "https://registry-1.docker.io"


def test_hosts_toml_hosts_in_file_order_then_server(tmp_path):
    write(tmp_path / "registry.example.com" / "hosts.toml", '''
server = "https://registry.example.com"
capabilities = ["pull", "resolve", "push"]

[host."https://mirror-b.example.com/us"]
  capabilities = ["pull"]
  ca = "mirror.pem"
  skip_verify = true
  [host."https://mirror-b.example.com/us".header]
    x-custom = ["one", "two"]

[host."http://mirror-a.example.com:8080"]
  capabilities = ["pull", "resolve"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"], "both.pem"]

[host."https://non-compliant.example.com/v2/upstream"]
  override_path = true
''')
    endpoints = HostsConfig(str(tmp_path)).endpoints("registry.example.com")
    assert [e.url for e in endpoints] == [
        "https://mirror-b.example.com", "http://mirror-a.example.com:8080",
        "https://non-compliant.example.com", "https://registry.example.com"]
    mirror_b, mirror_a, odd, server = endpoints
    assert mirror_b.path == "/us/v2"
    assert mirror_b.capabilities == {"pull"}
    assert mirror_b.tls == TLSSettings(verify=False, ca_files=(
        str(tmp_path / "registry.example.com" / "mirror.pem"),))
    assert mirror_b.headers == (("x-custom", "one"), ("x-custom", "two"))
    assert mirror_b.mirror_of == "registry.example.com"
    assert mirror_a.capabilities == {"pull", "resolve"}
    assert mirror_a.tls.client_certs == (
        ("/etc/certs/client.cert", "/etc/certs/client.key"),
        (str(tmp_path / "registry.example.com" / "both.pem"), ""))
    assert odd.path == "/v2/upstream" and odd.capabilities == ALL_CAPABILITIES
    assert server.path == "/v2" and server.mirror_of is None
    assert server.api_url("/repo/tags/list") == "https://registry.example.com/v2/repo/tags/list"


def test_host_directory_names_and_default_namespace(tmp_path):
    write(tmp_path / "reg.example_5000_" / "hosts.toml", 'server = "https://a.example"\n')
    write(tmp_path / "reg.example:5000" / "hosts.toml", 'server = "https://b.example"\n')
    write(tmp_path / "_default" / "hosts.toml",
          '[host."https://mirror.example"]\n  capabilities = ["pull", "resolve"]\n')
    hosts = HostsConfig(str(tmp_path))
    assert [e.url for e in hosts.endpoints("reg.example:5000")] == ["https://a.example"]
    # No directory of its own: _default's mirror first, then the registry itself.
    assert [e.url for e in hosts.endpoints("quay.example")] == \
        ["https://mirror.example", "https://quay.example"]
    assert hosts.endpoints("quay.example")[0].mirror_of == "quay.example"


def test_docker_certificate_directory_without_hosts_toml(tmp_path):
    directory = tmp_path / "secure.example"
    for name in ("ca.crt", "client.cert", "client.key", "stray.key"):
        write(directory / name, "placeholder")
    [endpoint] = HostsConfig(str(tmp_path)).endpoints("secure.example")
    assert endpoint.url == "https://secure.example"
    assert endpoint.tls.ca_files == (str(directory / "ca.crt"),)
    assert endpoint.tls.client_certs == ((str(directory / "client.cert"),
                                          str(directory / "client.key")),)


def test_broken_hosts_toml_names_the_file(tmp_path):
    broken = write(tmp_path / "bad.example" / "hosts.toml", 'server = "https://x\n')
    with pytest.raises(HostsConfigError, match=str(broken)):
        HostsConfig(str(tmp_path)).endpoints("bad.example")
    write(tmp_path / "caps.example" / "hosts.toml",
          '[host."https://m.example"]\n  capabilities = ["pull", "teleport"]\n')
    with pytest.raises(HostsConfigError, match="teleport"):
        HostsConfig(str(tmp_path)).endpoints("caps.example")


def test_hosts_toml_changes_are_picked_up(tmp_path):
    path = write(tmp_path / "live.example" / "hosts.toml", 'server = "https://one.example"\n')
    hosts = HostsConfig(str(tmp_path))
    assert hosts.endpoints("live.example")[0].url == "https://one.example"
    path.write_text('server = "https://two.example:8443"\n')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert hosts.endpoints("live.example")[0].url == "https://two.example:8443"


# -- hosts.toml against a real registry -----------------------------------------------------


async def seed_image(server: RegistryServer, repository: str, tmp_path: Path,
                     **client_options: Any) -> tuple[Reference, bytes, Descriptor]:
    """Push a one-layer image straight to the registry; returns (reference, manifest, layer)."""
    reference = Reference.parse(f"{server.host}/{repository}:v1")
    layer_bytes = os.urandom(3000)
    (tmp_path / "layer").write_bytes(layer_bytes)
    (tmp_path / "config").write_bytes(b"{}")
    layer = Descriptor(mt.OCI_LAYER_GZIP, sha256_of(layer_bytes), len(layer_bytes))
    config = Descriptor(mt.OCI_CONFIG, sha256_of(b"{}"), 2)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                           "config": config.to_json(), "layers": [layer.to_json()]}).encode()
    async with make_client(**client_options) as client:
        await client.push_blob(reference, config, str(tmp_path / "config"))
        await client.push_blob(reference, layer, str(tmp_path / "layer"))
        await client.put_manifest(reference, manifest, mt.OCI_MANIFEST, "v1")
    return reference, manifest, layer


def test_mirror_that_is_down_falls_back_to_the_server(registry, tmp_path):
    hosts_dir = tmp_path / "certs.d"
    write(hosts_dir / registry.host / "hosts.toml", f'''
server = "http://{registry.host}"

[host."http://127.0.0.1:{free_port()}"]
  capabilities = ["pull", "resolve"]
''')

    async def scenario():
        reference, manifest, layer = await seed_image(registry, "mirror/down", tmp_path)
        async with make_client(HostsConfig(str(hosts_dir))) as client:
            started = time.monotonic()
            assert (await client.get_manifest(reference))[0] == manifest
            assert await client.fetch_range(reference, layer.digest, 0, 10) == \
                (tmp_path / "layer").read_bytes()[:10]
            # A mirror gets one try: no backoff is spent on it before falling back.
            assert time.monotonic() - started < 1.0

    asyncio.run(scenario())


def test_connection_errors_to_the_last_host_are_retried_then_reported(tmp_path):
    port = free_port()  # free: nothing listens there
    reference = Reference.parse(f"127.0.0.1:{port}/gone/app:v1")

    async def scenario():
        async with make_client() as client:
            with pytest.raises(RegistryUnavailableError, match=f"cannot reach 127.0.0.1:{port}"):
                await client.get_manifest(reference)

    asyncio.run(scenario())


def test_mirror_without_resolve_is_not_used_for_tags(registry, fault_proxy_factory, tmp_path):
    mirror = fault_proxy_factory(registry.host)
    hosts_dir = tmp_path / "certs.d"
    write(hosts_dir / registry.host / "hosts.toml", f'''
server = "http://{registry.host}"

[host."http://{mirror.host}"]
  capabilities = ["pull"]
''')

    async def scenario():
        reference, manifest, layer = await seed_image(registry, "mirror/pull-only", tmp_path)
        async with make_client(HostsConfig(str(hosts_dir))) as client:
            _, _, digest = await client.get_manifest(reference)  # by tag: resolve
            assert (await client.resolve(reference)).digest == digest
            assert mirror.requests() == []
            assert (await client.get_manifest(reference, digest))[0] == manifest  # by digest
            assert await client.fetch_range(reference, layer.digest, 5, 5) == \
                (tmp_path / "layer").read_bytes()[5:10]
            paths = [r.path for r in mirror.requests("GET")]
            ns = quote(registry.host, safe="")  # containerd names the registry meant
            assert paths == [f"/v2/mirror/pull-only/manifests/{digest}?ns={ns}",
                             f"/v2/mirror/pull-only/blobs/{layer.digest}?ns={ns}"]
            # Pushing goes to hosts with the push capability only.
            await client.put_manifest(reference, manifest, mt.OCI_MANIFEST, "v2")
            assert mirror.requests("PUT") == []

    asyncio.run(scenario())


def test_scheme_of_the_server_comes_from_hosts_toml(registry, tmp_path):
    hosts_dir = tmp_path / "certs.d"
    # Without a scheme a server means https, which this plain-HTTP registry does not speak.
    write(hosts_dir / registry.host / "hosts.toml", f'server = "{registry.host}"\n')
    reference = Reference.parse(f"{registry.host}/scheme/app:v1")

    async def scenario():
        async with make_client(HostsConfig(str(hosts_dir))) as client:
            with pytest.raises(RegistryUnavailableError, match="cannot reach"):
                await client.resolve(reference)

    assert HostsConfig(str(hosts_dir)).endpoints(registry.host)[0].scheme == "https"
    asyncio.run(scenario())


def test_localhost_name_reaches_a_loopback_registry_over_http(registry, tmp_path):
    async def scenario():
        local = Reference.parse(f"localhost:{registry.host.split(':')[1]}/local/app:v1")
        _, manifest, _ = await seed_image(registry, "local/app", tmp_path)
        async with make_client() as client:
            assert (await client.get_manifest(local))[0] == manifest

    asyncio.run(scenario())


# -- Docker config credentials --------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auths_entries_and_docker_hub_key_variants(tmp_path):
    config = write(tmp_path / "config.json", json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
        "http://127.0.0.1:5000": {"username": "local", "password": "secret"},
        "token.example": {"identitytoken": "refresh-me"},
        "empty.example": {},
    }}))
    store = CredentialStore(str(config))
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        found = store.get(name)
        assert found is not None and (found.username, found.password) == ("hubuser", "hubpass")
    local = store.get("127.0.0.1:5000")
    assert local is not None and (local.username, local.password) == ("local", "secret")
    token = store.get("token.example")
    assert token is not None and token.identity_token == "refresh-me"
    assert store.get("empty.example") is None
    assert store.get("unknown.example") is None
    assert "secret" not in repr(local) and "refresh-me" not in repr(token)


def test_docker_config_location_and_kubernetes_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
    assert default_config_path() == str(tmp_path / "dockercfg" / "config.json")
    write(tmp_path / "dockercfg" / "config.json",
          json.dumps({"auths": {"env.example": {"auth": b64("env:user")}}}))
    found = CredentialStore().get("env.example")
    assert found is not None and found.username == "env"
    secret = write(tmp_path / ".dockerconfigjson", json.dumps(
        {"auths": {"k8s.example:443": {"username": "kube", "password": "pw", "auth":
                                       b64("kube:pw")}}}))
    found = CredentialStore(str(secret)).get("k8s.example:443")
    assert found is not None and (found.username, found.password) == ("kube", "pw")
    legacy = write(tmp_path / ".dockercfg", json.dumps({"old.example": {"auth": b64("o:ld")}}))
    found = CredentialStore(str(legacy)).get("old.example")
    assert found is not None and found.password == "ld"


def test_config_is_reloaded_when_it_changes(tmp_path):
    path = write(tmp_path / "config.json",
                 json.dumps({"auths": {"r.example": {"auth": b64("first:pw")}}}))
    store = CredentialStore(str(path))
    assert store.get("r.example").username == "first"
    path.write_text(json.dumps({"auths": {"r.example": {"auth": b64("second:pw")}}}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert store.get("r.example").username == "second"
    path.unlink()
    assert store.get("r.example") is None
    with pytest.raises(CredentialsError, match="not valid JSON"):
        write(path, "{oops")
        store.get("r.example")


@pytest.fixture
def credential_helper(tmp_path, monkeypatch) -> Path:
    """`docker-credential-test` on PATH; it logs what it was asked for to asked.log."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "asked.log"
    script = write(bin_dir / "docker-credential-test", f'''#!/bin/sh
[ "$1" = get ] || exit 2
read server
echo "$server" >> {log}
case "$server" in
  helped.example|https://index.docker.io/v1/)
    printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}' "$server" ;;
  127.0.0.1:*)
    printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}' "$server" ;;
  oauth.example)
    printf '{{"ServerURL":"%s","Username":"<token>","Secret":"id-token"}}' "$server" ;;
  broken.example)
    echo "backend exploded" >&2; exit 1 ;;
  *)
    echo "credentials not found in native keychain"; exit 1 ;;
esac
''')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_credential_helpers_and_credential_store(tmp_path, credential_helper):
    config = write(tmp_path / "config.json", json.dumps({
        "credHelpers": {"helped.example": "test", "docker.io": "test",
                        "oauth.example": "test", "broken.example": "test",
                        "missing.example": "absent"},
        "credsStore": "test",
        "auths": {"filed.example": {"auth": b64("filed:pw")}},
    }))
    store = CredentialStore(str(config))
    helped = store.get("helped.example")
    assert helped is not None and (helped.username, helped.password) == (USER, PASSWORD)
    assert store.get("registry-1.docker.io").username == USER
    assert store.get("oauth.example").identity_token == "id-token"
    # credsStore is asked first; when it has nothing, the file's own entry counts.
    assert store.get("filed.example").username == "filed"
    assert store.get("nowhere.example") is None
    with pytest.raises(CredentialsError, match="backend exploded"):
        store.get("broken.example")
    with pytest.raises(CredentialsError, match="docker-credential-absent is not on PATH"):
        store.get("missing.example")
    asked = credential_helper.read_text().split()
    assert asked[:3] == ["helped.example", "https://index.docker.io/v1/", "oauth.example"]
    store.get("helped.example")  # answered from the cache, not by a second helper run
    assert credential_helper.read_text().split().count("helped.example") == 1


def test_docker_config_credentials_against_basic_auth_registry(basic_auth_registry, tmp_path):
    config = write(tmp_path / "config.json", json.dumps(
        {"auths": {basic_auth_registry.host: {"auth": b64(f"{USER}:{PASSWORD}")}}}))
    wrong = write(tmp_path / "wrong.json", json.dumps(
        {"auths": {basic_auth_registry.host: {"auth": b64(f"{USER}:nope")}}}))

    async def scenario():
        reference, manifest, _ = await seed_image(
            basic_auth_registry, "config/app", tmp_path, credentials=CredentialStore(str(config)))
        async with make_client(credentials=CredentialStore(str(config))) as client:
            assert (await client.get_manifest(reference))[0] == manifest
        async with make_client(credentials=CredentialStore(str(wrong))) as client:
            with pytest.raises(AuthError, match="config/app"):
                await client.get_manifest(reference)

    asyncio.run(scenario())


def test_credential_helper_against_token_auth_registry(token_registry, tmp_path,
                                                       credential_helper):
    server = token_registry.registry
    config = write(tmp_path / "config.json", json.dumps({"credHelpers": {server.host: "test"}}))

    async def scenario():
        reference, manifest, _ = await seed_image(
            server, "helper/app", tmp_path, credentials=CredentialStore(str(config)))
        async with make_client(credentials=CredentialStore(str(config))) as client:
            assert (await client.get_manifest(reference))[0] == manifest

    asyncio.run(scenario())
    assert server.host in credential_helper.read_text().split()
    assert {t.account for t in token_registry.tokens.issued} == {USER}
