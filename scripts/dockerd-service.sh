#!/usr/bin/env bash
# Start, stop or restart dockerd: start | stop | restart | pid | fetch.
#
# DOCKERD_VERSION picks the daemon: "20.10" (default: Debian bookworm's docker.io, installed
# by install.sh), "26" (Debian trixie's docker.io 26.1, fetched into .cache/docker26) or "28"
# (Debian sid's docker.io 28.5 with sid's containerd 2.1 and bookworm's runc, fetched into
# .cache/docker28); the fetched ones run with their own data root, exec root and pid file. Run
# only one dockerd at a time: they all use /run/docker/plugins, the same iptables chains and
# docker0.
# Without systemd, only the dockerd whose pid is in its pid file is ever stopped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${DOCKERD_VERSION:-20.10}"
D26="${DOCKERD26_DIR:-$ROOT/.cache/docker26}"
D28="${DOCKERD28_DIR:-$ROOT/.cache/docker28}"
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
    28)
        LOG="${DOCKERD_LOG:-/var/log/dockerd28.log}"
        PIDFILE="/run/docker28.pid"
        DOCKERD=("$D28/root/usr/sbin/dockerd" --data-root /var/lib/docker28
                 --exec-root /run/docker28 --pidfile "$PIDFILE")
        # Its own docker-proxy, containerd 2.1 and shim, docker-init; runc is bookworm's.
        EXTRA_PATH="$D28/root/usr/sbin:$D28/root/usr/bin:"
        ;;
    *) echo "DOCKERD_VERSION must be 20.10, 26 or 28" >&2; exit 2 ;;
esac

answers() { docker info >/dev/null 2>&1; }
systemd_managed() { [ "$VERSION" = 20.10 ] && [ -d /run/systemd/system ]; }

# Debian packages of another release, downloaded with a private apt configuration and unpacked
# into DIR/root (nothing is installed): fetch_debs DIR SUITE PACKAGE...
fetch_debs() {
    local dir="$1" suite="$2"
    shift 2
    echo "[dockerd] fetching $* from Debian $suite into $dir"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
        >"$dir/sources.list"
    local apt=(-q -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
               -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache")
    apt-get "${apt[@]}" update >/dev/null
    (cd "$dir/debs" && apt-get "${apt[@]}" download "$@" >/dev/null 2>&1)
    local deb
    for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root"; done
}

fetch() {
    case "$VERSION" in
        26)
            [ -x "$D26/root/usr/sbin/dockerd" ] || fetch_debs "$D26" trixie docker.io
            ;;
        28)
            # sid's runc needs a newer glibc than bookworm's: dockerd 28 runs with bookworm's.
            command -v runc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q runc >/dev/null
            [ -x "$D28/root/usr/sbin/dockerd" ] \
                || fetch_debs "$D28" sid docker.io containerd tini-static docker-compose
            # sid moves on: say so when it no longer has a 28.x (29.0.0-29.0.2 crash with any
            # remote network driver, moby#51554).
            local version
            version="$("$D28/root/usr/sbin/dockerd" --version)"
            case "$version" in
                "Docker version 28."*) ;;
                *) echo "[dockerd] Debian sid's docker.io is no longer 28.x ($version):" \
                       "update DOCKERD_VERSION=28 in scripts/dockerd-service.sh" >&2
                   return 1 ;;
            esac
            ;;
    esac
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
