"""The Kubernetes manifests in manifests/kubernetes/: every document validates against
the Kubernetes OpenAPI schemas (offline, with the schemas kubernetes-validate ships),
the kustomize base lists and builds them, and the DaemonSet runs the service with the
config it parses, on the host paths that config names and containerd dials."""

import copy
import ipaddress
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from cli.main import build_parser
from oci.docker_config import CredentialStore
from snapshotter.config import Config, load_config, metrics_host_port
from snapshotter.warm.spec import read_dir

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
KUBERNETES = MANIFESTS / "kubernetes"
BASE = KUBERNETES / "base"

# The oldest Kubernetes the manifests promise to work on, and the newest schemas the
# installed kubernetes-validate ships. An older release of the package that lacks
# MIN_KUBERNETES fails loudly rather than validating against something else.
MIN_KUBERNETES = "1.28"
SHIPPED = sorted({v.rsplit(".", 1)[0] for v in all_versions()},
                 key=lambda v: tuple(map(int, v.split("."))))
KUBERNETES_VERSIONS = sorted({MIN_KUBERNETES, SHIPPED[-1]})
# kustomize's own document type: no Kubernetes schema, checked by hand below.
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass",
                  "RuntimeClass"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*") if p.suffix in (".yaml", ".yml"))


def all_documents() -> list[tuple[Path, int, dict[str, Any]]]:
    return [(path, i, doc) for path in yaml_files()
            for i, doc in enumerate(load_documents(path))]


def is_kustomization(doc: dict[str, Any]) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) == KUSTOMIZATION


def doc_id(entry: tuple[Path, int, dict[str, Any]]) -> str:
    path, i, doc = entry
    return f"{path.relative_to(KUBERNETES)}#{i}:{doc.get('kind')}/" \
           f"{doc.get('metadata', {}).get('name')}"


def validate(doc: dict[str, Any], where: str) -> None:
    for version in KUBERNETES_VERSIONS:
        problem = None
        try:
            # strict: the schemas that reject unknown fields, so a misspelt key fails.
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problem = f"{where} is not a valid Kubernetes {version} resource: " \
                      f"{path}: {exc.message}"
        except kubernetes_validate.SchemaNotFoundError as exc:
            problem = f"{where}: {exc.message}"
        if problem:  # outside the handler: the error's repr holds the whole schema
            pytest.fail(problem)


# -- every document --------------------------------------------------------------------

def test_schemas_are_shipped_offline() -> None:
    # The schemas come with the package (no download): the versions checked must be there.
    assert MIN_KUBERNETES in SHIPPED, f"kubernetes-validate ships only {SHIPPED}"
    assert yaml_files(), "no manifests under manifests/kubernetes"


@pytest.mark.parametrize("entry", [e for e in all_documents() if not is_kustomization(e[2])],
                         ids=doc_id)
def test_manifest_validates(entry: tuple[Path, int, dict[str, Any]]) -> None:
    validate(entry[2], doc_id(entry))


def test_validation_catches_mistakes() -> None:
    """The validator really checks: a misspelt field and a wrong type are rejected."""
    daemonset = copy.deepcopy(find(built_base(), "DaemonSet"))
    mount = daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    mount["mountpropagation"] = mount.pop("mountPropagation", "Bidirectional")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, MIN_KUBERNETES, strict=True)
    daemonset = copy.deepcopy(find(built_base(), "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, MIN_KUBERNETES, strict=True)


# -- the kustomize base ----------------------------------------------------------------

def kustomization() -> dict[str, Any]:
    docs = load_documents(BASE / "kustomization.yaml")
    assert len(docs) == 1 and is_kustomization(docs[0]), "kustomization.yaml"
    return docs[0]


def built_base() -> list[dict[str, Any]]:
    """What `kustomize build manifests/kubernetes/base` makes of the base, for the few
    kustomization fields it uses (test_kustomization_is_simple keeps it to those)."""
    kust = kustomization()
    out = []
    for resource in kust["resources"]:
        for doc in load_documents(BASE / resource):
            doc = copy.deepcopy(doc)
            meta = doc.setdefault("metadata", {})
            if doc["kind"] not in CLUSTER_SCOPED:
                meta["namespace"] = kust["namespace"]
            for entry in kust.get("labels", []):
                meta.setdefault("labels", {}).update(entry["pairs"])
                spec = doc.get("spec", {})
                if entry.get("includeTemplates") and "template" in spec:
                    spec["template"].setdefault("metadata", {}).setdefault(
                        "labels", {}).update(entry["pairs"])
                if entry.get("includeSelectors") and "selector" in spec:
                    spec["selector"].setdefault("matchLabels", {}).update(entry["pairs"])
            for image in kust.get("images", []):
                for container in doc.get("spec", {}).get("template", {}).get(
                        "spec", {}).get("containers", []):
                    name, _, tag = container["image"].partition(":")
                    if name == image["name"]:
                        container["image"] = f"{image.get('newName', name)}:" \
                                             f"{image.get('newTag', tag or 'latest')}"
            out.append(doc)
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in the base, got {len(found)}"
    return found[0]


def test_kustomization_is_simple() -> None:
    kust = kustomization()
    assert set(kust) <= KUSTOMIZATION_KEYS, \
        f"fields the test's build does not model: {set(kust) - KUSTOMIZATION_KEYS}"
    assert kust["namespace"] == "lazypull-system"
    for entry in kust.get("labels", []):
        assert set(entry) <= {"pairs", "includeSelectors", "includeTemplates"}
        assert all(isinstance(v, str) for v in entry["pairs"].values())
        # The DaemonSet's selector is immutable: labels added later must stay out of it.
        assert not entry.get("includeSelectors")


def test_kustomization_lists_every_file_of_the_base() -> None:
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    for resource in resources:
        assert (BASE / resource).is_file(), f"kustomization.yaml names missing {resource}"
    listed = {BASE / r for r in resources} | {BASE / "kustomization.yaml"}
    unlisted = [p.name for p in BASE.iterdir() if p.suffix in (".yaml", ".yml")
                and p not in listed]
    assert not unlisted, f"files in base/ that kustomization.yaml does not list: {unlisted}"


def test_built_base_validates() -> None:
    docs = built_base()
    namespace = find(docs, "Namespace")
    assert namespace["metadata"]["name"] == kustomization()["namespace"]
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
        assert any(d["kind"] == kind for d in docs), kind
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two resources of one kind share a name"
    for doc in docs:
        validate(doc, f"built {doc['kind']}/{doc['metadata']['name']}")


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl")
def test_kustomize_build_matches() -> None:
    """Where kustomize is at hand: it builds the base, to what the test's model builds."""
    command = kustomize_command()
    assert command is not None
    done = subprocess.run([*command, str(BASE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d is not None]
    for doc in docs:
        validate(doc, f"kustomize-built {doc['kind']}/{doc['metadata']['name']}")

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(docs, key=key) == sorted(built_base(), key=key)


# -- the DaemonSet and the config it runs the service with -----------------------------

def pod_spec() -> dict[str, Any]:
    return find(built_base(), "DaemonSet")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def volume(name: str) -> dict[str, Any]:
    found = [v for v in pod_spec()["volumes"] if v["name"] == name]
    assert len(found) == 1, f"volume {name}"
    return found[0]


def mount_at(path: str) -> dict[str, Any]:
    found = [m for m in container()["volumeMounts"] if m["mountPath"] == path]
    assert len(found) == 1, f"expected one volume mounted at {path}"
    return found[0]


def host_path_mount(path: str) -> dict[str, Any]:
    """The mount at `path` of the host's `path` (the same path on both sides)."""
    mount = mount_at(path)
    host = volume(mount["name"]).get("hostPath")
    assert host is not None, f"{path} is not a host path"
    assert host["path"] == path, f"{path} is mounted from the host's {host['path']}"
    return mount


def command_line() -> list[str]:
    c = container()
    return [*c.get("command", []), *c.get("args", [])]


def effective_config(tmp_path: Path) -> Config:
    """The config the DaemonSet's command runs the service with: the ConfigMap's file,
    read by load_config exactly as `lazypull snapshotter --config FILE` reads it,
    with the command's flags on top."""
    argv = command_line()
    assert argv[:2] == ["lazypull", "snapshotter"], argv
    args = build_parser().parse_args(argv[1:])
    assert args.config, "the command must name the config file"
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_toml_of(args.config))
    return load_config(str(config_file)).with_overrides(
        address=args.address, root=args.root, metrics_address=args.metrics_address,
        log_level=args.log_level).validate()


def config_toml_of(path: str) -> str:
    """The text of the file the pod sees at `path`, from the ConfigMap mounted there."""
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    if path in mounts:
        mount = mounts[path]
        assert "subPath" in mount, f"{path} is a whole volume, not a file"
        key = mount["subPath"]
    else:
        mount = mounts.get(os.path.dirname(path))
        assert mount is not None and "subPath" not in mount, \
            f"no volume is mounted at {path} (the command's --config)"
        key = os.path.basename(path)
    assert mount.get("readOnly"), "the config is mounted read-only"
    source = volume(mount["name"]).get("configMap")
    assert source is not None, f"{path} does not come from a ConfigMap"
    for item in source.get("items", []):
        if item["path"] == key:
            key = item["key"]
    data = find(built_base(), "ConfigMap", source["name"]).get("data", {})
    assert key in data, f"ConfigMap {source['name']} has no {key}"
    return data[key]


def test_config_is_the_one_the_service_parses(tmp_path: Path) -> None:
    config = effective_config(tmp_path)
    assert config.lazy
    # It names every path it relies on rather than leaning on defaults.
    text = config_toml_of(build_parser().parse_args(command_line()[1:]).config)
    named = tomllib.loads(text)
    for option in ("address", "root", "metrics_address", "hosts_dir", "docker_config"):
        assert option in named, f"config.toml should set {option}"


def test_config_paths_are_the_host_paths_mounted(tmp_path: Path) -> None:
    config = effective_config(tmp_path)
    spec = pod_spec()
    # The state directory, and the FUSE mount in it, on the host with Bidirectional
    # propagation: containerd on the host mounts overlays over the lazy layers.
    root = host_path_mount(config.root)
    assert root.get("mountPropagation") == "Bidirectional"
    assert not root.get("readOnly")
    assert os.path.dirname(config.fuse_mountpoint) == config.root
    assert volume(root["name"])["hostPath"]["type"] == "DirectoryOrCreate"
    # The socket: containerd dials the host's path, the service serves the pod's.
    run = host_path_mount(os.path.dirname(config.address))
    assert not run.get("readOnly")
    assert volume(run["name"])["hostPath"]["type"] == "DirectoryOrCreate"
    # Registry hosts as containerd sees them.
    certs = host_path_mount(config.hosts_dir)
    assert certs.get("readOnly")
    # containerd's socket directory, for later features.
    containerd = host_path_mount("/run/containerd")
    assert containerd.get("mountPropagation") == "HostToContainer"
    # FUSE needs the device.
    host_path_mount("/dev/fuse")
    assert volume(mount_at("/dev/fuse")["name"])["hostPath"]["type"] == "CharDevice"
    # Nothing else with Bidirectional propagation: it leaks mounts to the host.
    bidirectional = [m["mountPath"] for m in container()["volumeMounts"]
                     if m.get("mountPropagation") == "Bidirectional"]
    assert bidirectional == [config.root]
    assert not spec.get("hostPID")


def test_pull_secret_mount_is_the_config_docker_config(tmp_path: Path) -> None:
    config = effective_config(tmp_path)
    assert os.path.basename(config.docker_config) == ".dockerconfigjson"
    mount = mount_at(os.path.dirname(config.docker_config))
    assert mount.get("readOnly")
    secret = volume(mount["name"]).get("secret")
    assert secret is not None and secret.get("optional") is True, \
        "the pull secret is an optional Secret volume, so the pod starts without it"
    example = find([d for _, _, d in all_documents()], "Secret", secret["secretName"])
    assert example["type"] == "kubernetes.io/dockerconfigjson"
    assert example["metadata"]["namespace"] == kustomization()["namespace"]
    # The example is not in the base: applying the base never replaces real credentials.
    assert not any(d["kind"] == "Secret" for d in built_base())
    # The service reads the example's file (and no file at all) without error.
    path = tmp_path / ".dockerconfigjson"
    path.write_text(example["stringData"][".dockerconfigjson"])
    assert CredentialStore(str(path)).get("registry.example.com") is None
    assert CredentialStore(str(tmp_path / "absent")).get("registry.example.com") is None


def _warm_set_files() -> tuple[dict[str, Any], dict[str, str]]:
    """The warm_set_dir mount and the files the pod sees in it (from the ConfigMap)."""
    mount = mount_at("/etc/lazypull/warm.d")
    source = volume(mount["name"]).get("configMap")
    assert source is not None, "warm_set_dir comes from a ConfigMap"
    data = find(built_base(), "ConfigMap", source["name"]).get("data", {})
    files = {item["path"]: data[item["key"]] for item in source["items"]} \
        if source.get("items") else dict(data)
    return mount, files


def test_warm_set_dir_is_the_mounted_configmap(tmp_path: Path) -> None:
    config = effective_config(tmp_path)
    assert config.warm_set_dir == "/etc/lazypull/warm.d"
    mount, files = _warm_set_files()
    assert mount["mountPath"] == config.warm_set_dir
    # A whole directory (no subPath), so ConfigMap updates reach the running pod.
    assert "subPath" not in mount and mount.get("readOnly")
    assert "workspaces.toml" in files
    # The warm set pulls through the host's containerd, whose directory is mounted.
    assert os.path.dirname(config.containerd_address) == "/run/containerd"
    host_path_mount("/run/containerd")
    # Not shadowed by (nor shadowing) the config file's own mount.
    assert not config.warm_set_dir.startswith(
        build_parser().parse_args(command_line()[1:]).config + "/")


def test_warm_set_example_parses_with_the_services_loader(tmp_path: Path) -> None:
    _, files = _warm_set_files()
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name, text in files.items():
        (shipped / name).write_text(text)
    # As shipped the base warms nothing, and every file is one the service reads.
    assert read_dir(str(shipped)) == ([], [])
    # The commented-out example, uncommented, is a valid warm set.
    example = tmp_path / "example"
    example.mkdir()
    text = "\n".join(line.split("# ", 1)[1] if line.lstrip().startswith("# ") else
                     line.lstrip().removeprefix("#")
                     for line in files["workspaces.toml"].splitlines())
    (example / "workspaces.toml").write_text(text + "\n")
    specs, errors = read_dir(str(example))
    assert errors == [], errors
    assert [(s.policy, s.namespace, s.block_readiness) for s in specs] == \
        [("prefetch", "k8s.io", True), ("full", "k8s.io", False)]
    assert specs[1].refresh_seconds == 3600


def test_daemonset_runs_privileged_and_survives_updates() -> None:
    daemonset = find(built_base(), "DaemonSet")
    spec = pod_spec()
    c = container()
    assert c["securityContext"]["privileged"] is True
    # A rolling restart would break running workspaces: pods are replaced by hand.
    assert daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    selector = daemonset["spec"]["selector"]["matchLabels"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["serviceAccountName"] == find(built_base(), "ServiceAccount")["metadata"]["name"]
    assert c["image"].startswith("lazypull:"), "the image kustomize `images: name: lazypull` sets"
    assert c.get("imagePullPolicy") == "IfNotPresent"
    resources = c["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert set(resources["limits"]) == {"memory"}, "a memory limit only, no CPU throttling"
    # As long as the systemd unit gives the service to stop.
    unit = (MANIFESTS / "systemd" / "lazypull-snapshotter.service").read_text()
    stop = [line.split("=", 1)[1] for line in unit.splitlines()
            if line.startswith("TimeoutStopSec=")]
    assert stop and spec["terminationGracePeriodSeconds"] == int(stop[0])
    namespace = find(built_base(), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def probe_port(probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container().get("ports", []) if p.get("name") == port]
    assert len(named) == 1, f"probe port {port!r} names no container port"
    return named[0]


def test_probes_reach_the_metrics_address(tmp_path: Path) -> None:
    config = effective_config(tmp_path)
    assert config.metrics_address, "probes need the service's HTTP endpoint"
    host, port = metrics_host_port(config.metrics_address)
    c = container()
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        probe = c[kind]
        assert probe["httpGet"]["path"] == path
        assert probe_port(probe) == port, f"{kind} probes another port than {port}"
        if host in ("0.0.0.0", "::"):
            continue  # every address of the pod, its IP (the node's) included
        # A loopback-only endpoint is reachable by the kubelet only in the host's
        # network namespace, and only when the probe names the loopback address.
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        assert loopback, f"the kubelet cannot reach {config.metrics_address}"
        assert pod_spec().get("hostNetwork") and \
            probe["httpGet"].get("host") in ("127.0.0.1", "::1"), \
            f"{kind} cannot reach {config.metrics_address}"
    # Liveness restarts break workspaces: it gives the service minutes, not seconds.
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 120


# -- the containerd drop-in ------------------------------------------------------------

def dropins() -> dict[str, dict[str, Any]]:
    data = find(built_base(), "ConfigMap", "lazypull-containerd-dropin")["data"]
    return {name: tomllib.loads(text) for name, text in data.items()}


def test_containerd_dropin_is_the_containerd_snippets() -> None:
    """The drop-in carries manifests/containerd/'s settings, key for key."""
    found = dropins()
    assert set(found) == {"lazypull-proxy-plugin.toml", "lazypull-cri.toml"}
    for name, source in (("lazypull-proxy-plugin.toml", "proxy-plugin.toml"),
                         ("lazypull-cri.toml", "cri.toml")):
        with open(MANIFESTS / "containerd" / source, "rb") as f:
            assert found[name] == tomllib.load(f), f"{name} differs from {source}"
        assert found[name]["version"] == 2, "containerd 1.6 reads imports as version 1 else"


def test_containerd_dials_the_service_socket(tmp_path: Path) -> None:
    config = effective_config(tmp_path)
    plugin = dropins()["lazypull-proxy-plugin.toml"]["proxy_plugins"]["lazypull"]
    assert plugin == {"type": "snapshot", "address": config.address}
    cri = dropins()["lazypull-cri.toml"]["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"]["snapshotter"] == "lazypull"
    assert cri["registry"]["config_path"] == config.hosts_dir


def test_documents_are_plain_json() -> None:
    # kubectl sends JSON: every document must survive the round trip unchanged.
    for path, i, doc in all_documents():
        assert json.loads(json.dumps(doc)) == doc, f"{path}#{i}"
