#!/usr/bin/env bash
# The fast lane: lint, types and the unit tests with coverage, in seconds, without root or
# Docker. Makes the development environment (.venv, or PYDRIVER_VENV) first if it is missing
# or older than pyproject.toml.
#     scripts/check.sh                  all of it
#     scripts/check.sh lint             ruff check, ruff format --check, mypy
#     scripts/check.sh unit [ARGS]      the unit tests (ARGS go to pytest), with the coverage floor
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYDRIVER_VENV:-$ROOT/.venv}"
cd "$ROOT"
PART="${1:-all}"
[ "$#" -eq 0 ] || shift
case "$PART" in
    all | lint | unit) ;;
    *) echo "usage: scripts/check.sh [all | lint | unit [PYTEST ARGS]]" >&2; exit 2 ;;
esac

# (Re)install when pyproject.toml changed since the last install (a new test dependency).
stamp="$VENV/.pyproject.sha256"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[check] installing pydriver[test] into $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
    echo "$want" >"$stamp"
fi

LINTED=(pydriver tests bench conftest.py plugin/lock.py)
if [ "$PART" != unit ]; then
    echo "[check] ruff check";  "$VENV/bin/ruff" check "${LINTED[@]}"
    echo "[check] ruff format"; "$VENV/bin/ruff" format --check "${LINTED[@]}"
    echo "[check] mypy";        "$VENV/bin/mypy"
fi
if [ "$PART" != lint ]; then
    # The floor (fail_under) and what counts are in pyproject.toml's [tool.coverage.*].
    echo "[check] unit tests with coverage"
    "$VENV/bin/coverage" erase
    "$VENV/bin/coverage" run -m pytest tests/unit -q "$@"
    "$VENV/bin/coverage" report
fi
