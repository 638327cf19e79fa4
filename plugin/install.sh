#!/usr/bin/env bash
# Build and enable the managed plugin from this checkout on a machine without registry
# access (a local Debian base image from debootstrap): plugin/install.sh [NAME[:TAG]]
# Extra `docker plugin set` arguments may follow the name (e.g. PYDRIVER_LOG_LEVEL=debug).
# Stop the host service first (scripts/pybridge-service.sh stop): run one pybridge per host.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${1:-pybridge:latest}"
shift || true
[[ "$NAME" == *:* ]] || NAME="$NAME:latest"

if "$ROOT/scripts/pybridge-service.sh" status >/dev/null 2>&1; then
    echo "pybridge runs as a host service; stop it first: scripts/pybridge-service.sh stop" >&2
    exit 1
fi
if [ -z "${PYBRIDGE_PLUGIN_BASE:-}" ]; then
    PYBRIDGE_PLUGIN_BASE="$("$ROOT/plugin/base-image.sh")"
    export PYBRIDGE_PLUGIN_BASE
fi
if docker plugin inspect "$NAME" >/dev/null 2>&1; then
    "$ROOT/plugin/upgrade.sh" "$NAME"
else
    "$ROOT/plugin/build.sh" "$NAME"
    [ "$#" -eq 0 ] || docker plugin set "$NAME" "$@"
    docker plugin enable "$NAME" >/dev/null
fi
echo "[plugin] $NAME is enabled: docker network create -d $NAME mynet"
