#!/usr/bin/env bash
# Build pybridge's managed plugin from this checkout and create it in Docker:
#     plugin/build.sh [--enable] [--no-create] [NAME[:TAG]]     (default pybridge:latest)
# PYBRIDGE_PLUGIN_BASE picks the rootfs base image (default python:3.11-slim-bookworm; without
# a registry, plugin/base-image.sh builds a local one). --enable enables it afterwards;
# --no-create only prepares the plugin directory plugin/build (config.json + rootfs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENABLE=0
CREATE=1
NAME="pybridge:latest"
for arg in "$@"; do
    case "$arg" in
        --enable) ENABLE=1 ;;
        --no-create) CREATE=0 ;;
        *) NAME="$arg" ;;
    esac
done
[[ "$NAME" == *:* ]] || NAME="$NAME:latest"
BASE="${PYBRIDGE_PLUGIN_BASE:-python:3.11-slim-bookworm}"
BUILD="$ROOT/plugin/build"
ROOTFS_IMAGE="pybridge-plugin-rootfs:build"

say() { printf '[plugin] %s\n' "$*"; }

say "collecting wheels"
WHEELS="$ROOT/plugin/wheels"
PIP="${PYTHON:-python3} -m pip"
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
$PIP wheel -q --no-deps -w "$WHEELS" "$ROOT"
# Exactly the wheels plugin/requirements.lock names, checked against its hashes (pip refuses
# any other file), so two builds of one commit install the same dependencies. To change them:
# python3 plugin/lock.py.
$PIP download -q --dest "$WHEELS" --only-binary=:all: --python-version 3.11 \
    --implementation cp --abi cp311 --platform "manylinux2014_$(uname -m)" \
    --platform "manylinux_2_17_$(uname -m)" --platform "manylinux_2_28_$(uname -m)" \
    --platform any --require-hashes -r "$ROOT/plugin/requirements.lock"
cp "$ROOT/plugin/requirements.lock" "$WHEELS/requirements.lock"

say "building the root filesystem on $BASE"
DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE" -t "$ROOTFS_IMAGE" \
    -f "$ROOT/plugin/Dockerfile" "$ROOT" >/dev/null
rm -rf "$BUILD"
mkdir -p "$BUILD/rootfs"
container="$(docker create "$ROOTFS_IMAGE" true)"
docker export "$container" | tar -C "$BUILD/rootfs" -x
docker rm "$container" >/dev/null
cp "$ROOT/config.json" "$BUILD/config.json"
rm -rf "$WHEELS"
if [ "$CREATE" = 0 ]; then
    say "plugin directory ready: $BUILD"
    exit 0
fi

# What the mounts in config.json need on the host.
mkdir -p /var/lib/pydriver

say "creating plugin $NAME"
docker plugin create "$NAME" "$BUILD" >/dev/null
rm -rf "$BUILD"
if [ "$ENABLE" = 1 ]; then
    docker plugin enable "$NAME" >/dev/null
    say "enabled: docker network create -d $NAME mynet"
fi
