#!/usr/bin/env bash
# Set up this machine and run pybridge: installs what is missing (Docker, iptables, iproute2,
# a Python venv with pybridge), starts pybridge as a host service, and starts dockerd if no
# daemon answers. Idempotent: run it again at any time. Must run as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYDRIVER_VENV:-$ROOT/.venv}"

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

# 2. pybridge itself, in its own virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import pydriver, aiohttp, pyroute2' 2>/dev/null \
    || [ "$ROOT/pyproject.toml" -nt "$VENV/.pydriver-installed" ]; then
    say "installing pybridge into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT"
    touch "$VENV/.pydriver-installed"
fi

# 3. pybridge first, so it is there before dockerd restores containers that use it.
"$ROOT/scripts/pybridge-service.sh" start

# 4. dockerd, unless one already answers.
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: ${DOCKERD_LOG:-/var/log/dockerd.log})"
    "$ROOT/scripts/dockerd-service.sh" start
fi
say "ready: try 'docker network create -d pybridge mynet'"
