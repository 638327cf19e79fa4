#!/usr/bin/env bash
# Run the whole test suite: lint, types, unit tests, privileged kernel tests and end-to-end
# tests against a real dockerd -- Debian's 20.10, then (end-to-end tests again) Debian
# trixie's 26.1, one daemon at a time. Sets up everything it needs first (install.sh).
# Must run as root. Arguments go to pytest and limit the run to the first daemon
# (e.g. scripts/test.sh tests/unit, or -k ports).
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
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
"$ROOT/scripts/pybridge-service.sh" restart

echo "[test] ruff";  "$VENV/bin/ruff" check pydriver tests
echo "[test] mypy";  "$VENV/bin/mypy"
echo "[test] pytest against dockerd $(docker version --format '{{.Server.Version}}')"
"$VENV/bin/pytest" "$@"

if [ "$#" -eq 0 ] && [ "${PYDRIVER_SECOND_DAEMON:-26}" = 26 ]; then
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
fi
