#!/usr/bin/env bash
# Run the whole test suite: lint, types, unit tests, privileged kernel tests and end-to-end
# tests against a real dockerd. Sets up everything it needs first (scripts/install.sh).
# Must run as root. Extra arguments go to pytest (e.g. -k ping, tests/unit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYDRIVER_VENV:-$ROOT/.venv}"
cd "$ROOT"

"$ROOT/scripts/install.sh"
# busybox for the test image; the plugin picks up code changes on restart.
command -v busybox >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null
}
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
"$ROOT/scripts/pybridge-service.sh" restart

echo "[test] ruff";  "$VENV/bin/ruff" check pydriver tests
echo "[test] mypy";  "$VENV/bin/mypy"
echo "[test] pytest"
exec "$VENV/bin/pytest" "$@"
