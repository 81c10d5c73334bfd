"""The node service's manifests. Kubernetes (manifests/kubernetes/): every document
validates against the Kubernetes OpenAPI schemas (offline, with the schemas
kubernetes-validate ships), the kustomize base lists and builds them, and the DaemonSet's
two containers (the FUSE manager and the snapshotter) run their commands with the config
they parse, on the host paths that config names and containerd dials. systemd
(manifests/systemd/): the two units run the same commands with the shipped config, the
snapshotter's after, and independently of, the manager's."""

import argparse
import copy
import dataclasses
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from cli.main import build_parser
from oci.docker_config import CredentialStore
from snapshotter.config import DEFAULT_CONFIG_PATH, Config, metrics_host_port
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
    for i in range(len(pod_spec()["containers"])):
        daemonset = copy.deepcopy(find(built_base(), "DaemonSet"))
        mount = daemonset["spec"]["template"]["spec"]["containers"][i]["volumeMounts"][0]
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


# -- the DaemonSet, its two containers and the config they run with ---------------------

MANAGER, SNAPSHOTTER = "fuse-manager", "snapshotter"
# Each container's `lazypull` subcommand.
COMMANDS = {MANAGER: "fuse-manager", SNAPSHOTTER: "snapshotter"}
# Where each subcommand's run() imports the function it hands the resolved config to.
SERVE_MODULES = {"fuse-manager": "snapshotter.fusemanager.server",
                 "snapshotter": "snapshotter.server"}


def pod_spec() -> dict[str, Any]:
    return find(built_base(), "DaemonSet")["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    containers = pod_spec()["containers"]
    names = [c["name"] for c in containers]
    assert sorted(names) == sorted(COMMANDS), f"the pod's containers are {names}"
    return next(c for c in containers if c["name"] == name)


def volume(name: str) -> dict[str, Any]:
    found = [v for v in pod_spec()["volumes"] if v["name"] == name]
    assert len(found) == 1, f"volume {name}"
    return found[0]


def mounts(name: str) -> dict[str, dict[str, Any]]:
    found = container(name).get("volumeMounts", [])
    paths = [m["mountPath"] for m in found]
    assert len(paths) == len(set(paths)), f"{name}: two volumes mounted at one path"
    return {m["mountPath"]: m for m in found}


def mount_at(name: str, path: str) -> dict[str, Any]:
    found = mounts(name).get(path)
    assert found is not None, f"{name}: no volume mounted at {path}"
    return found


def host_path_mount(name: str, path: str) -> dict[str, Any]:
    """The mount at `path` of the host's `path` (the same path on both sides)."""
    mount = mount_at(name, path)
    host = volume(mount["name"]).get("hostPath")
    assert host is not None, f"{name}: {path} is not a host path"
    assert host["path"] == path, f"{name}: {path} is mounted from the host's {host['path']}"
    return mount


def command_line(name: str) -> list[str]:
    c = container(name)
    return [*c.get("command", []), *c.get("args", [])]


def parsed(argv: list[str]) -> argparse.Namespace:
    """argv as the `lazypull` program parses it."""
    assert os.path.basename(argv[0]) == "lazypull", argv
    return build_parser().parse_args(argv[1:])


def resolved_config(argv: list[str], config_text: str, tmp_path: Path) -> Config:
    """The config `argv` would serve with: its command's own run(), with the config file
    holding `config_text`, stopped where it hands the config to the service."""
    args = parsed(argv)
    assert args.config, f"{argv} must name the config file"
    config_file = tmp_path / f"{args.command}-{len(list(tmp_path.iterdir()))}.toml"
    config_file.write_text(config_text)
    args.config = str(config_file)
    served: list[Config] = []

    def serve(config: Config, *_: object) -> int:
        served.append(config)
        return 0

    with pytest.MonkeyPatch.context() as patch:
        for module in SERVE_MODULES.values():
            stand_in = types.ModuleType(module)
            stand_in.run = serve  # type: ignore[attr-defined]
            patch.setitem(sys.modules, module, stand_in)
        status = args.run(args)
    assert status == 0 and len(served) == 1, f"{argv} does not start (exit status {status})"
    return served[0]


def config_path(name: str) -> str:
    argv = command_line(name)
    assert argv[:2] == ["lazypull", COMMANDS[name]], argv
    path = parsed(argv).config
    assert path, f"the {name} container's command must name the config file"
    return path


def effective_config(name: str, tmp_path: Path) -> Config:
    """The config the container's command runs with: the ConfigMap's file, read by the
    command's own code exactly as `lazypull COMMAND --config FILE` reads it, with the
    command's flags on top."""
    return resolved_config(command_line(name), config_toml_of(name, config_path(name)),
                           tmp_path)


def config_source(name: str, path: str) -> tuple[str, str]:
    """The ConfigMap and key the container sees at `path`."""
    found = mounts(name)
    if path in found:
        mount = found[path]
        assert "subPath" in mount, f"{name}: {path} is a whole volume, not a file"
        key = mount["subPath"]
    else:
        mount = found.get(os.path.dirname(path))
        assert mount is not None and "subPath" not in mount, \
            f"{name}: no volume is mounted at {path} (the command's --config)"
        key = os.path.basename(path)
    assert mount.get("readOnly"), f"{name}: the config is mounted read-only"
    source = volume(mount["name"]).get("configMap")
    assert source is not None, f"{name}: {path} does not come from a ConfigMap"
    for item in source.get("items", []):
        if item["path"] == key:
            key = item["key"]
    return source["name"], key


def config_toml_of(name: str, path: str) -> str:
    """The text of the file the container sees at `path`, from the ConfigMap there."""
    configmap, key = config_source(name, path)
    data = find(built_base(), "ConfigMap", configmap).get("data", {})
    assert key in data, f"ConfigMap {configmap} has no {key}"
    return data[key]


@pytest.mark.parametrize("name", [MANAGER, SNAPSHOTTER])
def test_config_is_the_one_the_command_parses(name: str, tmp_path: Path) -> None:
    config = effective_config(name, tmp_path)
    assert config.lazy
    # It names every path it relies on rather than leaning on defaults.
    named = tomllib.loads(config_toml_of(name, config_path(name)))
    for option in ("address", "root", "metrics_address", "hosts_dir", "docker_config"):
        assert option in named, f"config.toml should set {option}"


def test_both_containers_run_with_one_config(tmp_path: Path) -> None:
    assert config_path(MANAGER) == config_path(SNAPSHOTTER)
    assert config_source(MANAGER, config_path(MANAGER)) == \
        config_source(SNAPSHOTTER, config_path(SNAPSHOTTER))
    manager = effective_config(MANAGER, tmp_path)
    snapshotter = effective_config(SNAPSHOTTER, tmp_path)
    # The snapshotter waits for the fuse-manager container's manager...
    assert parsed(command_line(SNAPSHOTTER)).fuse_manager == "external"
    assert snapshotter.fuse_manager == "external"
    # ...which it finds on the socket, with the mount point, of the same root, and
    # which reaches the registries as it does: the same config in every other respect.
    assert dataclasses.replace(snapshotter, fuse_manager=manager.fuse_manager) == manager
    assert snapshotter.fuse_manager_address == manager.fuse_manager_address


def test_fuse_manager_mounts(tmp_path: Path) -> None:
    config = effective_config(MANAGER, tmp_path)
    c = container(MANAGER)
    # FUSE mounts, and Bidirectional propagation, need a privileged container.
    assert c.get("securityContext", {}).get("privileged") is True
    # The state directory, and the FUSE mount in it, on the host with Bidirectional
    # propagation: containerd on the host mounts overlays over the lazy layers.
    root = host_path_mount(MANAGER, config.root)
    assert root.get("mountPropagation") == "Bidirectional"
    assert not root.get("readOnly")
    assert volume(root["name"])["hostPath"]["type"] == "DirectoryOrCreate"
    assert os.path.dirname(config.fuse_mountpoint) == config.root
    assert os.path.dirname(config.fuse_manager_address) == config.root
    # FUSE needs the device.
    host_path_mount(MANAGER, "/dev/fuse")
    assert volume(mount_at(MANAGER, "/dev/fuse")["name"])["hostPath"]["type"] == "CharDevice"
    # It fetches from the registries: their hosts as containerd sees them.
    assert host_path_mount(MANAGER, config.hosts_dir).get("readOnly")
    # Nothing else with Bidirectional propagation: it leaks mounts to the host.
    bidirectional = [path for path, m in mounts(MANAGER).items()
                     if m.get("mountPropagation") == "Bidirectional"]
    assert bidirectional == [config.root]


def test_snapshotter_mounts(tmp_path: Path) -> None:
    config = effective_config(SNAPSHOTTER, tmp_path)
    c = container(SNAPSHOTTER)
    # It makes no mounts: not privileged, and no way to become so.
    security = c.get("securityContext", {})
    assert not security.get("privileged")
    assert security.get("allowPrivilegeEscalation") is False
    assert "/dev/fuse" not in mounts(SNAPSHOTTER)
    # The same state directory as the manager's (the same host path), without holding
    # on to the manager's FUSE mount: HostToContainer, and no Bidirectional anywhere.
    root = host_path_mount(SNAPSHOTTER, config.root)
    assert root.get("mountPropagation") == "HostToContainer"
    assert not root.get("readOnly")
    assert root["name"] == mount_at(MANAGER, config.root)["name"]
    assert not [path for path, m in mounts(SNAPSHOTTER).items()
                if m.get("mountPropagation") == "Bidirectional"]
    # The socket: containerd dials the host's path, the service serves the pod's.
    run = host_path_mount(SNAPSHOTTER, os.path.dirname(config.address))
    assert not run.get("readOnly")
    assert volume(run["name"])["hostPath"]["type"] == "DirectoryOrCreate"
    # Registry hosts as containerd sees them (TOCs, the warm set's tags).
    assert host_path_mount(SNAPSHOTTER, config.hosts_dir).get("readOnly")
    # containerd's socket directory, for the warm set.
    containerd = host_path_mount(SNAPSHOTTER, "/run/containerd")
    assert containerd.get("mountPropagation") == "HostToContainer"
    assert not pod_spec().get("hostPID")


@pytest.mark.parametrize("name", [MANAGER, SNAPSHOTTER])
def test_pull_secret_mount_is_the_config_docker_config(name: str, tmp_path: Path) -> None:
    config = effective_config(name, tmp_path)
    assert os.path.basename(config.docker_config) == ".dockerconfigjson"
    mount = mount_at(name, os.path.dirname(config.docker_config))
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
    mount = mount_at(SNAPSHOTTER, "/etc/lazypull/warm.d")
    source = volume(mount["name"]).get("configMap")
    assert source is not None, "warm_set_dir comes from a ConfigMap"
    data = find(built_base(), "ConfigMap", source["name"]).get("data", {})
    files = {item["path"]: data[item["key"]] for item in source["items"]} \
        if source.get("items") else dict(data)
    return mount, files


def test_warm_set_dir_is_the_mounted_configmap(tmp_path: Path) -> None:
    config = effective_config(SNAPSHOTTER, tmp_path)
    assert config.warm_set_dir == "/etc/lazypull/warm.d"
    mount, files = _warm_set_files()
    assert mount["mountPath"] == config.warm_set_dir
    # A whole directory (no subPath), so ConfigMap updates reach the running pod.
    assert "subPath" not in mount and mount.get("readOnly")
    assert "workspaces.toml" in files
    # The warm set pulls through the host's containerd, whose directory is mounted.
    assert os.path.dirname(config.containerd_address) == "/run/containerd"
    host_path_mount(SNAPSHOTTER, "/run/containerd")
    # Not shadowed by (nor shadowing) the config file's own mount.
    assert not config.warm_set_dir.startswith(config_path(SNAPSHOTTER) + "/")


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


QUANTITY_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "": 1}


def memory_bytes(quantity: str | int) -> int:
    number = str(quantity).rstrip("KMGTi")
    unit = str(quantity)[len(number):]
    assert unit in QUANTITY_UNITS, f"memory quantity {quantity!r} in a unit not handled here"
    return int(number) * QUANTITY_UNITS[unit]


def test_daemonset_survives_updates() -> None:
    daemonset = find(built_base(), "DaemonSet")
    spec = pod_spec()
    # A rolling restart would break running workspaces: pods are replaced by hand.
    assert daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    selector = daemonset["spec"]["selector"]["matchLabels"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["serviceAccountName"] == find(built_base(), "ServiceAccount")["metadata"]["name"]
    # As long as each systemd unit gives its process to stop.
    for unit in UNITS:
        stop = unit_values(unit, "Service", "TimeoutStopSec")
        assert len(stop) == 1 and spec["terminationGracePeriodSeconds"] == int(stop[0]), unit
    namespace = find(built_base(), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


@pytest.mark.parametrize("name", [MANAGER, SNAPSHOTTER])
def test_container_image_and_resources(name: str) -> None:
    c = container(name)
    assert c["image"].startswith("lazypull:"), "the image kustomize `images: name: lazypull` sets"
    assert c.get("imagePullPolicy") == "IfNotPresent"
    resources = c["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert set(resources["limits"]) == {"memory"}, "a memory limit only, no CPU throttling"
    assert memory_bytes(resources["limits"]["memory"]) >= \
        memory_bytes(resources["requests"]["memory"])


def test_fuse_manager_is_never_restarted_by_the_kubelet_on_its_own() -> None:
    c = container(MANAGER)
    # A restart unmounts the lazy layers under running workspaces: no probe may cause one.
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & c.keys()
    # An OOM kill is such a restart: ample room (2Gi at least), and more than the
    # snapshotter, whose restart costs nothing.
    manager = memory_bytes(c["resources"]["limits"]["memory"])
    snapshotter = memory_bytes(container(SNAPSHOTTER)["resources"]["limits"]["memory"])
    assert manager >= 2 << 30 and manager > snapshotter


def probe_port(name: str, probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    assert isinstance(port, str), "probes name the container's port rather than a number"
    named = [p["containerPort"] for p in container(name).get("ports", [])
             if p.get("name") == port]
    assert len(named) == 1, f"probe port {port!r} names no port of the {name} container"
    return named[0]


def test_probes_reach_the_metrics_address(tmp_path: Path) -> None:
    config = effective_config(SNAPSHOTTER, tmp_path)
    assert config.metrics_address, "probes need the service's HTTP endpoint"
    host, port = metrics_host_port(config.metrics_address)
    c = container(SNAPSHOTTER)
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        probe = c[kind]
        assert probe["httpGet"]["path"] == path
        assert probe_port(SNAPSHOTTER, probe) == port, f"{kind} probes another port than {port}"
        if host in ("0.0.0.0", "::"):
            continue  # every address of the pod, its IP (the node's) included
        # A loopback-only endpoint is reachable by the kubelet only in the host's
        # network namespace, and only when the probe names the loopback address.
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        assert loopback, f"the kubelet cannot reach {config.metrics_address}"
        assert pod_spec().get("hostNetwork") and \
            probe["httpGet"].get("host") in ("127.0.0.1", "::1"), \
            f"{kind} cannot reach {config.metrics_address}"
    # A liveness restart aborts the pulls in flight: it gives the service minutes.
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
    config = effective_config(SNAPSHOTTER, tmp_path)
    plugin = dropins()["lazypull-proxy-plugin.toml"]["proxy_plugins"]["lazypull"]
    assert plugin == {"type": "snapshot", "address": config.address}
    cri = dropins()["lazypull-cri.toml"]["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"]["snapshotter"] == "lazypull"
    assert cri["registry"]["config_path"] == config.hosts_dir


def test_documents_are_plain_json() -> None:
    # kubectl sends JSON: every document must survive the round trip unchanged.
    for path, i, doc in all_documents():
        assert json.loads(json.dumps(doc)) == doc, f"{path}#{i}"


# -- the systemd units -----------------------------------------------------------------

SYSTEMD = MANIFESTS / "systemd"
MANAGER_UNIT = "lazypull-fuse-manager.service"
SNAPSHOTTER_UNIT = "lazypull-snapshotter.service"
UNITS = {MANAGER_UNIT: "fuse-manager", SNAPSHOTTER_UNIT: "snapshotter"}
# systemd options that give a unit a mount namespace (or /dev, or devices) of its own:
# a FUSE mount made there would not be the one containerd mounts overlays over.
PRIVATE_MOUNTS = {
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateUsers", "ProtectSystem",
    "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectProc", "ProcSubset", "ReadOnlyPaths",
    "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountFlags",
    "DynamicUser", "DevicePolicy", "DeviceAllow", "MountAPIVFS", "NetworkNamespacePath",
}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections and their settings, in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines not handled here"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number} is no setting: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    return parse_unit((SYSTEMD / name).read_text())


def unit_values(name: str, section: str, key: str) -> list[str]:
    return [v for k, v in unit(name).get(section, []) if k == key]


def unit_list(name: str, section: str, key: str) -> list[str]:
    """A list-valued setting (Wants=, After=, ...): every occurrence, split."""
    return [item for value in unit_values(name, section, key) for item in value.split()]


def exec_start(name: str) -> list[str]:
    found = unit_values(name, "Service", "ExecStart")
    assert len(found) == 1, f"{name}: one ExecStart"
    argv = shlex.split(found[0])
    assert argv and argv[0].startswith("/"), f"{name}: ExecStart names no absolute program"
    return argv


def test_systemd_units_are_the_two() -> None:
    assert sorted(p.name for p in SYSTEMD.iterdir()) == sorted(UNITS)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_basics(name: str) -> None:
    assert set(unit(name)) == {"Unit", "Service", "Install"}
    assert unit_values(name, "Service", "Type") == ["simple"]
    assert unit_values(name, "Service", "Restart") == ["always"]
    assert "containerd.service" in unit_list(name, "Unit", "Before")
    assert unit_list(name, "Install", "WantedBy") == ["multi-user.target"]
    assert unit_values(name, "Service", "LimitNOFILE") == ["1048576"]
    assert len(unit_values(name, "Service", "OOMScoreAdjust")) == 1
    # Each unit's control group holds its own process and its children only: the
    # default KillMode ends all of them, and nothing of one unit lives in the other's.
    assert unit_values(name, "Service", "KillMode") in ([], ["control-group"])


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_command_runs_with_the_shipped_config(name: str, tmp_path: Path) -> None:
    argv = exec_start(name)
    args = parsed(argv)
    assert args.command == UNITS[name]
    # /etc/lazypull/config.toml is manifests/lazypull/config.toml, installed.
    assert args.config == DEFAULT_CONFIG_PATH
    config = resolved_config(argv, (MANIFESTS / "lazypull" / "config.toml").read_text(),
                             tmp_path)
    assert config.lazy
    if name == SNAPSHOTTER_UNIT:
        assert args.fuse_manager == "external"
        assert config.fuse_manager == "external"


def test_systemd_units_run_with_one_config(tmp_path: Path) -> None:
    text = (MANIFESTS / "lazypull" / "config.toml").read_text()
    manager = resolved_config(exec_start(MANAGER_UNIT), text, tmp_path)
    snapshotter = resolved_config(exec_start(SNAPSHOTTER_UNIT), text, tmp_path)
    assert parsed(exec_start(MANAGER_UNIT)).config == \
        parsed(exec_start(SNAPSHOTTER_UNIT)).config
    assert dataclasses.replace(snapshotter, fuse_manager=manager.fuse_manager) == manager
    assert snapshotter.fuse_manager_address == manager.fuse_manager_address


def test_systemd_snapshotter_unit_follows_the_manager() -> None:
    # Started with it and after it...
    assert MANAGER_UNIT in unit_list(SNAPSHOTTER_UNIT, "Unit", "Wants")
    assert MANAGER_UNIT in unit_list(SNAPSHOTTER_UNIT, "Unit", "After")
    # ...but not stopped with it: it stays up and reconnects when the manager restarts.
    for key in ("Requires", "Requisite", "BindsTo", "PartOf"):
        assert MANAGER_UNIT not in unit_list(SNAPSHOTTER_UNIT, "Unit", key), key
    # The manager depends on the snapshotter in no way: restarting the snapshotter must
    # not restart the manager (that would break the running containers).
    for key, value in unit(MANAGER_UNIT)["Unit"]:
        assert SNAPSHOTTER_UNIT not in value.split(), f"{MANAGER_UNIT}: {key}={value}"
    # Of the two, the kernel's OOM killer picks the one whose death costs nothing.
    oom = {name: int(unit_values(name, "Service", "OOMScoreAdjust")[0]) for name in UNITS}
    assert oom[MANAGER_UNIT] < oom[SNAPSHOTTER_UNIT]


def test_systemd_manager_unit_mounts_in_the_hosts_namespace() -> None:
    for section in unit(MANAGER_UNIT).values():
        for key, value in section:
            assert key not in PRIVATE_MOUNTS, f"{MANAGER_UNIT}: {key}={value}"


def systemd_verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify",
                           *(str(p) for p in sorted(directory.iterdir()))],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """Where systemd-analyze is at hand: no unknown setting, no bad value (with a program
    that exists here in place of /usr/local/bin/lazypull)."""
    true = shutil.which("true")
    assert true is not None
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        program = exec_start(name)[0]
        (units / name).write_text((SYSTEMD / name).read_text().replace(program, true))
    done = systemd_verify(units)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # It reports a misspelt setting.
    text = (units / MANAGER_UNIT).read_text()
    (units / MANAGER_UNIT).write_text(text.replace("RestartSec=", "RestartSecs="))
    done = systemd_verify(units)
    assert "RestartSecs" in done.stderr
