#!/usr/bin/env bash
# Benchmarks: pybridge against Docker's built-in bridge in the same run; writes
# docs/benchmarks.md. Sets up what it needs first (install.sh). Must run as root.
# Arguments go to bench/run.py (--reps N, --cycles N, --output FILE, --json FILE).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYDRIVER_VENV:-$ROOT/.venv}"
cd "$ROOT"
"$ROOT/scripts/install.sh" >/dev/null
command -v busybox >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null
command -v gcc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev >/dev/null
# Across hosts: etcd, iperf3, and dockerd 28's packages for the harness's daemons.
command -v etcd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null
command -v etcdctl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-client >/dev/null
command -v iperf3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q iperf3 >/dev/null
# The tests' own environment (the service runs from the root-owned one install.sh made).
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test,cluster]"
"$ROOT/scripts/pybridge-service.sh" restart >/dev/null
exec "$VENV/bin/python" -m bench.run "$@"
