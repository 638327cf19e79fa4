#!/usr/bin/env bash
# Start, stop or restart dockerd: start | stop | restart | pid | fetch.
#
# DOCKERD_VERSION picks the daemon: "20.10" (default: Debian bookworm's docker.io, installed
# by install.sh) or "26" (Debian trixie's docker.io 26.1, fetched into .cache/docker26 and run
# with its own data root, exec root and pid file). Run only one dockerd at a time: both use
# /run/docker/plugins, the same iptables chains and docker0.
# Without systemd, only the dockerd whose pid is in its pid file is ever stopped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${DOCKERD_VERSION:-20.10}"
D26="${DOCKERD26_DIR:-$ROOT/.cache/docker26}"
case "$VERSION" in
    20.10)
        LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
        PIDFILE="/var/run/docker.pid"
        DOCKERD=(/usr/sbin/dockerd)
        EXTRA_PATH=""
        ;;
    26)
        LOG="${DOCKERD_LOG:-/var/log/dockerd26.log}"
        PIDFILE="/run/docker26.pid"
        DOCKERD=("$D26/root/usr/sbin/dockerd" --data-root /var/lib/docker26
                 --exec-root /run/docker26 --pidfile "$PIDFILE")
        EXTRA_PATH="$D26/root/usr/sbin:"  # its own docker-proxy
        ;;
    *) echo "DOCKERD_VERSION must be 20.10 or 26" >&2; exit 2 ;;
esac

answers() { docker info >/dev/null 2>&1; }
systemd_managed() { [ "$VERSION" = 20.10 ] && [ -d /run/systemd/system ]; }

fetch() {
    [ "$VERSION" = 26 ] || return 0
    [ -x "$D26/root/usr/sbin/dockerd" ] && return 0
    echo "[dockerd] fetching docker.io 26.1 from Debian trixie into $D26"
    mkdir -p "$D26/lists/partial" "$D26/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        >"$D26/sources.list"
    local apt=(-q -o "Dir::Etc::SourceList=$D26/sources.list" -o Dir::Etc::SourceParts=/dev/null
               -o "Dir::State::Lists=$D26/lists" -o "Dir::Cache=$D26/cache")
    apt-get "${apt[@]}" update >/dev/null
    (cd "$D26" && apt-get "${apt[@]}" download docker.io >/dev/null 2>&1)
    dpkg -x "$D26"/docker.io_*.deb "$D26/root"
}

running_pid() {
    [ -f "$PIDFILE" ] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

start() {
    answers && return 0
    if systemd_managed; then
        systemctl start docker
    else
        fetch
        # A dockerd that was killed leaves its pid file behind, and then refuses to start.
        running_pid >/dev/null || rm -f "$PIDFILE"
        PATH="$EXTRA_PATH$PATH" setsid "${DOCKERD[@]}" >>"$LOG" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 240); do
        answers && return 0
        sleep 0.25
    done
    echo "dockerd $VERSION did not come up; see $LOG" >&2
    return 1
}

stop() {
    if systemd_managed; then
        systemctl stop docker
        return 0
    fi
    local pid
    pid="$(running_pid)" || return 0
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
    pid) running_pid ;;
    fetch) fetch ;;
    *) echo "usage: $0 start|stop|restart|pid|fetch" >&2; exit 2 ;;
esac
