#!/usr/bin/env bash
# Install the Debian packages lazypull's demo and tests need (Debian 12, as root).
# Only missing packages are installed, so a prepared machine pays nothing.
set -euo pipefail

packages=(
  python3 python3-venv python3-dev gcc make tar gzip
  # the reference eStargz implementation, for interoperability tests (offline GOPATH build)
  golang-go golang-github-containerd-stargz-snapshotter-dev
  # containerd's snapshotter conformance suite (offline GOPATH build)
  golang-github-containerd-containerd-dev
  # real components the tests start: registry, image tools, containerd + runc
  docker-registry apache2-utils skopeo umoci containerd runc busybox-static
  # FUSE for lazy layers (pyfuse3 builds against libfuse3)
  fuse3 libfuse3-dev pkg-config
  # the cold-start benchmark builds workspace images from Debian packages, shapes a link
  # (ip, tc) and records the files a workload opens (strace); its stargz-snapshotter
  # comparator builds from golang-go and the two Go source packages above
  debootstrap iproute2 strace
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
