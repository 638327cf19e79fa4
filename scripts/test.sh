#!/usr/bin/env bash
# Run the whole test suite: lint, types, unit tests, privileged kernel tests and end-to-end
# tests against a real dockerd 20.10 (Debian bookworm) with pybridge as a host service; then
# the end-to-end tests again against the managed plugin built from this checkout, and against
# dockerd 26.1 (Debian trixie) and 28.5 (Debian sid) with the host service, each followed by
# the managed plugin's life-cycle and reboot tests on that daemon; one daemon at a time. Sets
# up everything it needs first (install.sh). Must run as root. Arguments go to pytest and
# limit the run to the first pass (e.g. scripts/test.sh tests/unit, or -k ports).
# PYBRIDGE_TEST_PHASES picks the later passes (default "managed docker26 docker28").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYDRIVER_VENV:-$ROOT/.venv}"
cd "$ROOT"

"$ROOT/scripts/install.sh"

# What an interrupted run (killed mid-way: a session's end, a reboot) may have left in dockerd's
# store: test containers and networks, and above all the managed plugin pybridge:latest, whose
# name dockerd resolves `-d pybridge` to before it looks at the host service's socket ("could
# not resolve driver pybridge in registry" for every test). The tests' own names only.
remove_leftovers() {
    local containers networks
    containers="$(docker ps -aq --filter name=pbt)"
    # shellcheck disable=SC2086
    [ -z "$containers" ] || docker rm -f $containers >/dev/null || true
    networks="$(docker network ls -q --filter name=pbt)"
    # shellcheck disable=SC2086
    [ -z "$networks" ] || docker network rm $networks >/dev/null || true
    if docker plugin inspect pybridge:latest >/dev/null 2>&1; then
        echo "[test] removing the managed plugin pybridge:latest that an interrupted run left"
        docker plugin disable -f pybridge:latest >/dev/null 2>&1 || true
        docker plugin rm -f pybridge:latest >/dev/null
    fi
}
remove_leftovers
# busybox and a C compiler for the test image, docker-compose for the compose example.
need=()
command -v busybox >/dev/null || need+=(busybox-static)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v docker-compose >/dev/null || need+=(docker-compose)
# ping on the hosts themselves (the multi-host harness, link-local probes in the kernel tests).
command -v ping >/dev/null || need+=(iputils-ping)
# etcd for the cluster tests (networks that span hosts); installing it starts nothing.
# etcdctl (the harness's health checks) is only suggested by etcd-server, so asked for too.
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -q >/dev/null || true  # (a fresh machine may have no package lists yet)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
# The tests' own environment (the service runs from the root-owned one install.sh made).
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test,cluster]"
"$ROOT/scripts/pybridge-service.sh" restart
# dockerd 28's packages (downloaded only) bring Compose v2, which the compose test uses too.
DOCKERD_VERSION=28 "$ROOT/scripts/dockerd-service.sh" fetch

# When a pass fails: what pybridge and the daemon said (CI keeps only this script's output).
show_logs() {
    local log
    echo "[test] --- the last lines of /var/log/pydriver.log"
    tail -n 60 /var/log/pydriver.log 2>/dev/null || true
    for log in /var/log/dockerd.log /var/log/dockerd26.log /var/log/dockerd28.log; do
        [ -f "$log" ] || continue
        echo "[test] --- errors and plugin lines of $log"
        grep -aiE 'level=(error|fatal|panic)|plugin|pybridge' "$log" | tail -n 40 || true
    done
}

# The fast lane first: lint, format, types, unit tests with the coverage floor.
PYDRIVER_VENV="$VENV" "$ROOT/scripts/check.sh"
echo "[test] pytest against dockerd $(docker version --format '{{.Server.Version}}')"
"$VENV/bin/pytest" "$@" || { show_logs; exit 1; }

[ "$#" -eq 0 ] || exit 0
PHASES="${PYBRIDGE_TEST_PHASES:-managed docker26 docker28}"
export PYTHON="$VENV/bin/python"
# The tests of the managed plugin's own life cycle and of a reboot with it, for the daemons
# whose whole suite runs with the host service only.
MANAGED_SUBSET=(tests/e2e/test_managed.py tests/e2e/test_reboot.py tests/e2e/test_basics.py)

# What to undo when the script ends, whatever happens: the last pushed first.
CLEANUPS=()
run_cleanups() {
    local i
    for ((i = ${#CLEANUPS[@]} - 1; i >= 0; i--)); do "${CLEANUPS[i]}" || true; done
}
trap run_cleanups EXIT
pop_cleanup() {
    local last="${CLEANUPS[-1]}"
    unset 'CLEANUPS[-1]'
    "$last"
}

managed_cleanup() {
    docker plugin disable -f pybridge:latest >/dev/null 2>&1 || true
    docker plugin rm -f pybridge:latest >/dev/null 2>&1 || true
    "$ROOT/scripts/pybridge-service.sh" start || true
}

# Run pytest against the managed plugin built from this checkout, on the daemon running now
# (one pybridge per host: the host service stops meanwhile, and comes back afterwards).
with_managed_plugin() {
    "$ROOT/scripts/pybridge-service.sh" stop
    CLEANUPS+=(managed_cleanup)
    PYBRIDGE_PLUGIN_BASE="$("$ROOT/plugin/base-image.sh")"
    export PYBRIDGE_PLUGIN_BASE
    "$ROOT/plugin/install.sh" pybridge:latest PYDRIVER_METRICS_ADDRESS=127.0.0.1:9327
    echo "[test] pytest $* against the managed plugin on dockerd $(docker version --format '{{.Server.Version}}')"
    PYBRIDGE_MODE=managed "$VENV/bin/pytest" "$@" || { show_logs; exit 1; }
    pop_cleanup
}

back_to_default_daemon() {
    "$ROOT/scripts/dockerd-service.sh" stop || true
    unset DOCKERD_VERSION
    "$ROOT/scripts/dockerd-service.sh" start || true
}

# The whole suite with the host service, then the managed subset, on another daemon version;
# dockerd 20.10 comes back afterwards.
on_daemon() {
    "$ROOT/scripts/dockerd-service.sh" stop
    export DOCKERD_VERSION="$1"
    CLEANUPS+=(back_to_default_daemon)
    "$ROOT/scripts/dockerd-service.sh" start
    remove_leftovers
    "$ROOT/scripts/pybridge-service.sh" restart
    echo "[test] pytest tests/e2e against dockerd $(docker version --format '{{.Server.Version}}')"
    "$VENV/bin/pytest" tests/e2e || { show_logs; exit 1; }
    with_managed_plugin "${MANAGED_SUBSET[@]}"
    pop_cleanup
}

if [[ " $PHASES " == *" managed "* ]]; then
    # The whole end-to-end suite against the managed plugin on dockerd 20.10.
    with_managed_plugin tests/e2e
fi
if [[ " $PHASES " == *" docker26 "* ]]; then
    on_daemon 26
fi
if [[ " $PHASES " == *" docker28 "* ]]; then
    on_daemon 28
fi
