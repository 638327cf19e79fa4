#!/usr/bin/env bash
# Set up this machine and run pybridge: installs what is missing (Docker, iptables, iproute2,
# pybridge in a root-owned virtual environment under /opt/pybridge), starts pybridge as a host
# service, and starts dockerd if no daemon answers. Idempotent: run it again at any time (it
# reinstalls pybridge when the checkout's code changed). Must run as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where the host service runs from (root-owned; see step 2).
SERVICE_VENV="${PYDRIVER_SERVICE_VENV:-/opt/pybridge/venv}"

say() { printf '[install] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "install.sh must run as root (it creates bridges and firewall rules)" >&2
    exit 1
fi

# 1. System packages, only those missing.
packages=()
command -v dockerd >/dev/null || packages+=(docker.io)
command -v iptables-nft-restore >/dev/null || command -v iptables-legacy-restore >/dev/null \
    || packages+=(iptables)
command -v ip >/dev/null || packages+=(iproute2)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
if [ "${#packages[@]}" -gt 0 ]; then
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${packages[@]}" >/dev/null
fi

# 2. pybridge itself, for the service: a regular (not editable) install into a root-owned
#    virtual environment, so the code root runs is not the checkout's, which its user may
#    edit. Reinstalled whenever the checkout's code differs from what is installed.
if [ ! -x "$SERVICE_VENV/bin/python" ]; then
    say "creating virtual environment $SERVICE_VENV"
    install -d -o root -g root -m 0755 "$(dirname "$SERVICE_VENV")"
    python3 -m venv "$SERVICE_VENV"
fi
source_hash="$(cd "$ROOT" && find pydriver pyproject.toml -type f \( -name '*.py' -o -name '*.toml' -o -name py.typed \) -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$SERVICE_VENV/.pydriver-source" 2>/dev/null)" != "$source_hash" ] \
    || ! "$SERVICE_VENV/bin/python" -c 'import pydriver, aiohttp, pyroute2, aetcd' 2>/dev/null; then
    say "installing pybridge into $SERVICE_VENV"
    build="$(mktemp -d)"  # build from a root-owned copy, not from the checkout itself
    cp -r "$ROOT/pydriver" "$ROOT/pyproject.toml" "$ROOT/README.md" "$build/"
    pip=("$SERVICE_VENV/bin/pip" install -q --disable-pip-version-check)
    "${pip[@]}" "$build[cluster]" >/dev/null  # with its dependencies (etcd's client too)
    "${pip[@]}" --force-reinstall --no-deps "$build" >/dev/null  # this code, same version or not
    rm -rf "$build"
    echo "$source_hash" >"$SERVICE_VENV/.pydriver-source"
    reinstalled=1
fi
# Root runs this code: it and every directory above it belong to root, writable by root alone.
chown -R root:root "$SERVICE_VENV"
chmod -R go-w "$SERVICE_VENV"
dir="$(dirname "$SERVICE_VENV")"
while [ "$dir" != / ]; do
    if [ "$(stat -c %u "$dir")" != 0 ] || [ -n "$(find "$dir" -maxdepth 0 -perm /022)" ]; then
        echo "install.sh: $dir is not owned and writable by root alone; pybridge runs as root" \
            "from $SERVICE_VENV, so choose a place under root-owned directories" >&2
        exit 1
    fi
    dir="$(dirname "$dir")"
done
ln -sf "$SERVICE_VENV/bin/pydriver" /usr/local/bin/pydriver  # pydriver status, doctor, ports

# 3. pybridge first, so it is there before dockerd restores containers that use it.
# (A new version takes over at once; the data plane stays up while it restarts.)
if [ -n "${reinstalled:-}" ]; then
    "$ROOT/scripts/pybridge-service.sh" restart
else
    "$ROOT/scripts/pybridge-service.sh" start
fi

# 4. dockerd, unless one already answers.
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: ${DOCKERD_LOG:-/var/log/dockerd.log})"
    "$ROOT/scripts/dockerd-service.sh" start
fi
say "ready: try 'docker network create -d pybridge mynet'"
