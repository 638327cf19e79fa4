#!/usr/bin/env bash
# Build a local Debian bookworm base image (python3, venv, iptables, iproute2) without a
# registry: debootstrap from Debian's packages, then `docker import`. Prints the image name.
# Cached: does nothing if the image exists.
set -euo pipefail

IMAGE="${PYBRIDGE_BASE_IMAGE:-pybridge-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi
command -v debootstrap >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
}
# The root filesystem is kept as a tarball, so each daemon version (with its own image store)
# imports the same one instead of running debootstrap again.
CACHE="${PYBRIDGE_BASE_CACHE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.cache/pybridge-base-bookworm.tar}"
if [ ! -s "$CACHE" ]; then
    root="$(mktemp -d)"
    trap 'rm -rf "$root"' EXIT
    echo "[base] debootstrap bookworm into $root" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,iptables,iproute2,ca-certificates \
        bookworm "$root" "$MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    mkdir -p "$(dirname "$CACHE")"
    tar -C "$root" -cf "$CACHE.tmp" . && mv "$CACHE.tmp" "$CACHE"
fi
docker import -c 'CMD ["/bin/sh"]' "$CACHE" "$IMAGE" >/dev/null
echo "$IMAGE"
