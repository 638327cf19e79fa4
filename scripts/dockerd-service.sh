#!/usr/bin/env bash
# Start, stop or restart dockerd on a machine with or without systemd: start | stop | restart.
# Without systemd, only the dockerd whose pid is in /var/run/docker.pid is ever stopped.
set -euo pipefail

LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
PIDFILE="${DOCKERD_PIDFILE:-/var/run/docker.pid}"

answers() { docker info >/dev/null 2>&1; }

start() {
    answers && return 0
    if [ -d /run/systemd/system ]; then
        systemctl start docker
    else
        # A dockerd that was killed leaves its pid file behind, and then refuses to start.
        if [ -f "$PIDFILE" ] && ! grep -q dockerd "/proc/$(cat "$PIDFILE")/cmdline" 2>/dev/null; then
            rm -f "$PIDFILE"
        fi
        setsid dockerd >>"$LOG" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 240); do
        answers && return 0
        sleep 0.25
    done
    echo "dockerd did not come up; see $LOG" >&2
    return 1
}

stop() {
    if [ -d /run/systemd/system ]; then
        systemctl stop docker
        return 0
    fi
    [ -f "$PIDFILE" ] || return 0
    local pid
    pid="$(cat "$PIDFILE")"
    grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null || return 0
    kill -TERM "$pid"
    for _ in $(seq 1 240); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    echo "dockerd (pid $pid) did not stop" >&2
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    *) echo "usage: $0 start|stop|restart" >&2; exit 2 ;;
esac
