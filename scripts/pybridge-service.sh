#!/usr/bin/env bash
# Run pybridge (`pydriver serve`) as a background host service: start | stop | restart | status.
# Only ever stops the process recorded in its own pid file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# scripts/install.sh installs pybridge there, root-owned (never run root code from a checkout).
VENV="${PYDRIVER_SERVICE_VENV:-/opt/pybridge/venv}"
PIDFILE="${PYDRIVER_PIDFILE:-/run/pydriver.pid}"
LOG="${PYDRIVER_LOG:-/var/log/pydriver.log}"
SOCKET="${PYDRIVER_SOCKET:-/run/docker/plugins/pybridge.sock}"
# Metrics on loopback for this host service (the plugin itself serves none unless asked).
export PYDRIVER_METRICS_ADDRESS="${PYDRIVER_METRICS_ADDRESS-127.0.0.1:9327}"

running_pid() {
    [ -f "$PIDFILE" ] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    # Check it is still our pydriver, not a recycled pid.
    [ -n "$pid" ] && grep -q pydriver "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

start() {
    if pid="$(running_pid)"; then
        echo "pybridge already running (pid $pid)"
        return 0
    fi
    if [ ! -x "$VENV/bin/pydriver" ]; then
        echo "pybridge is not installed in $VENV: run scripts/install.sh" >&2
        return 1
    fi
    mkdir -p "$(dirname "$LOG")"
    # The log may hold addresses and names of every container: root and its group only.
    (umask 027 && touch "$LOG") && chmod 0640 "$LOG"
    # One descriptor per published port (pybridge holds them): as many as the kernel allows.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    setsid "$VENV/bin/pydriver" serve --socket "$SOCKET" >>"$LOG" 2>&1 </dev/null &
    local started=$!
    echo "$started" >"$PIDFILE"
    for _ in $(seq 1 100); do
        if [ -S "$SOCKET" ]; then
            echo "pybridge running (pid $started, socket $SOCKET, log $LOG)"
            return 0
        fi
        # (Alive, not running_pid: until the child has exec'd, its command line is still
        # this script's.)
        if ! kill -0 "$started" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "pybridge did not start; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    return 1
}

stop() {
    local sig="${1:-TERM}"
    if ! pid="$(running_pid)"; then
        echo "pybridge is not running"
        rm -f "$PIDFILE"
        return 0
    fi
    kill "-$sig" "$pid"
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$PIDFILE"
    echo "pybridge stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop TERM ;;
    kill) stop KILL ;;
    restart) stop TERM; start ;;
    status)
        if pid="$(running_pid)"; then echo "running (pid $pid)"; else echo "stopped"; exit 3; fi ;;
    *) echo "usage: $0 start|stop|kill|restart|status" >&2; exit 2 ;;
esac
