#!/usr/bin/env bash
# What the infra scripts (redis.sh, prometheus.sh, alertmanager.sh) share:
# finding a Debian binary, installing its package with apt-get, and starting and
# stopping a process of ours. Sourced, not run; the caller defines log and die
# first.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    echo "infra/lib.sh is sourced by the infra scripts, not run" >&2
    exit 2
fi

# Debian installs the binaries in /usr/bin, but a minimal PATH may miss /usr/sbin
# style locations on other layouts; look in both.
find_bin() {
    command -v "$1" 2>/dev/null && return 0
    local d
    for d in /usr/bin /usr/sbin /usr/local/bin; do
        [[ -x $d/$1 ]] && {
            echo "$d/$1"
            return 0
        }
    done
    return 1
}

# apt_install PACKAGE BINARY...: install PACKAGE unless every BINARY is found.
apt_install() {
    local package=$1 bin missing=0
    shift
    for bin in "$@"; do
        find_bin "$bin" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "$package is missing and apt-get is not available"
    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || die "$package is missing; run as root or install it"
        sudo=(sudo -n)
    fi
    log "installing $package with apt-get (first run only)"
    # Lock timeout: another apt run (unattended-upgrades, a parallel first run)
    # holds the dpkg lock for a while; wait instead of failing at once.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 \
        update -qq </dev/null >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 \
        install -y -qq --no-install-recommends "$package" </dev/null >&2 ||
        die "apt-get install $package failed"
    for bin in "$@"; do
        find_bin "$bin" >/dev/null || die "$bin still missing after apt-get"
    done
}

# stop_pid PID: SIGTERM, then SIGKILL if it still runs 20 s later.
stop_pid() {
    local pid=$1
    log "stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "still running after 20s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
}

# The daemons started here (Prometheus, Alertmanager) share how they are run and
# stopped; each script defines `our_pid` (its process, found by its state
# directory) and `ready` (its health check) before calling these.

# start_daemon PIDFILE LOG COMMAND...: run COMMAND in the background with only
# stdin, stdout and stderr open (a daemon holding the caller's pipes would keep
# `make` waiting), its output appended to LOG, its pid in PIDFILE.
start_daemon() {
    local pidfile=$1 logfile=$2
    shift 2
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            ((fd > 2)) && eval "exec $fd>&-"
        done
        exec "$@" </dev/null >>"$logfile" 2>&1
    ) &
    echo $! >"$pidfile"
}

# await_ready NAME PIDFILE LOG TIMEOUT_S: wait for `ready`; if the process dies
# or the time runs out, show the log's tail, stop it and die.
await_ready() {
    local name=$1 pidfile=$2 logfile=$3
    local deadline=$((SECONDS + $4))
    until ready; do
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null || ((SECONDS >= deadline)); then
            log "not ready; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 || true
            stop_daemon "$pidfile"
            die "$name did not start"
        fi
        sleep 0.2
    done
    log "ready (pid $(cat "$pidfile"))"
}

# stop_daemon PIDFILE: stop the process `our_pid` finds, if any.
stop_daemon() {
    local pid
    if ! pid=$(our_pid); then
        rm -f "$1"
        log "not running"
        return 0
    fi
    stop_pid "$pid"
    rm -f "$1"
    log "stopped"
}
