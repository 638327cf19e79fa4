#!/usr/bin/env bash
# Run the whole test suite: lint, types, unit tests, privileged kernel tests and end-to-end
# tests against a real dockerd 20.10 (Debian bookworm) with pybridge as a host service; then
# the end-to-end tests again against the managed plugin built from this checkout, and again
# against dockerd 26.1 (Debian trixie), one daemon at a time. Sets up everything it needs
# first (install.sh). Must run as root. Arguments go to pytest and limit the run to the first
# pass (e.g. scripts/test.sh tests/unit, or -k ports). PYBRIDGE_TEST_PHASES picks the later
# passes (default "managed docker26").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYDRIVER_VENV:-$ROOT/.venv}"
cd "$ROOT"

"$ROOT/scripts/install.sh"
# busybox and a C compiler for the test image, docker-compose for the compose example.
need=()
command -v busybox >/dev/null || need+=(busybox-static)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v docker-compose >/dev/null || need+=(docker-compose)
if [ "${#need[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
# The tests' own environment (the service runs from the root-owned one install.sh made).
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
"$ROOT/scripts/pybridge-service.sh" restart

echo "[test] ruff";  "$VENV/bin/ruff" check pydriver tests bench
echo "[test] mypy";  "$VENV/bin/mypy"
echo "[test] pytest against dockerd $(docker version --format '{{.Server.Version}}')"
"$VENV/bin/pytest" "$@"

[ "$#" -eq 0 ] || exit 0
PHASES="${PYBRIDGE_TEST_PHASES:-managed docker26}"

if [[ " $PHASES " == *" managed "* ]]; then
    # The same end-to-end suite against the managed plugin built from this checkout (one
    # pybridge per host: the host service stops meanwhile). Covers disable/enable and upgrade.
    echo "[test] managed plugin"
    "$ROOT/scripts/pybridge-service.sh" stop
    managed_cleanup() {
        docker plugin disable -f pybridge:latest >/dev/null 2>&1 || true
        docker plugin rm -f pybridge:latest >/dev/null 2>&1 || true
        "$ROOT/scripts/pybridge-service.sh" start || true
    }
    trap managed_cleanup EXIT
    export PYTHON="$VENV/bin/python"
    PYBRIDGE_PLUGIN_BASE="$("$ROOT/plugin/base-image.sh")"
    export PYBRIDGE_PLUGIN_BASE
    "$ROOT/plugin/install.sh" pybridge:latest PYDRIVER_METRICS_ADDRESS=127.0.0.1:9327
    echo "[test] pytest tests/e2e against the managed plugin on dockerd $(docker version --format '{{.Server.Version}}')"
    PYBRIDGE_MODE=managed "$VENV/bin/pytest" tests/e2e
    managed_cleanup
    trap - EXIT
fi

if [[ " $PHASES " == *" docker26 "* ]]; then
    # The same end-to-end suite against dockerd 26.1; dockerd 20.10 comes back afterwards.
    "$ROOT/scripts/dockerd-service.sh" stop
    restore() {
        DOCKERD_VERSION=26 "$ROOT/scripts/dockerd-service.sh" stop || true
        "$ROOT/scripts/dockerd-service.sh" start || true
    }
    trap restore EXIT
    DOCKERD_VERSION=26 "$ROOT/scripts/dockerd-service.sh" start
    "$ROOT/scripts/pybridge-service.sh" restart
    echo "[test] pytest tests/e2e against dockerd $(docker version --format '{{.Server.Version}}')"
    DOCKERD_VERSION=26 "$VENV/bin/pytest" tests/e2e
    restore
    trap - EXIT
fi
