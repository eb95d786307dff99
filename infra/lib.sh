#!/usr/bin/env bash
# What the infra scripts (redis.sh, prometheus.sh, alertmanager.sh) share:
# their log lines, finding a Debian binary, installing its package with
# apt-get, and starting and stopping a process of ours. Sourced, not run; the
# caller sets NAME (what its log lines start with) first.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    echo "infra/lib.sh is sourced by the infra scripts, not run" >&2
    exit 2
fi

log() { printf '[%s] %s\n' "$NAME" "$*" >&2; }
die() {
    printf '[%s] error: %s\n' "$NAME" "$*" >&2
    exit 1
}

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

# What follows runs a process of ours. The caller sets PIDFILE (where the
# process's pid is kept), HOST and PORT (where it listens) and defines
# `is_ours PID`: whether PID is that process, so that a stale pid file whose
# number was reused by another process is never signalled.

# close_inherited_fds: close every descriptor above 2 in this (sub)shell, before
# it execs a daemon: one holding the caller's pipes would keep `make` waiting,
# one holding stack.sh's flock would keep the lock after stack.sh is gone.
close_inherited_fds() {
    local fd
    for fd in /proc/self/fd/*; do
        fd=${fd##*/}
        ((fd > 2)) && eval "exec $fd>&-"
    done
    return 0
}

# our_pid: print the pid of our process; fail if none runs.
our_pid() {
    local pid=""
    [[ -f $PIDFILE ]] && pid=$(cat "$PIDFILE")
    [[ -n $pid ]] && is_ours "$pid" && echo "$pid"
}

# stop_daemon: stop the process `our_pid` finds, if any; remove the pid file.
stop_daemon() {
    local pid
    if ! pid=$(our_pid); then
        rm -f "$PIDFILE"
        log "not running"
        return 0
    fi
    stop_pid "$pid"
    rm -f "$PIDFILE"
    log "stopped"
}

# refuse_taken_port PORT_VARIABLE: die if something answers on HOST:PORT,
# naming the variable that moves ours.
refuse_taken_port() {
    if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
        die "port $HOST:$PORT is already in use by another process" \
            "(set $1 to move ours)"
    fi
}

# The HTTP daemons (Prometheus, Alertmanager) share more: each is ours when it
# reads this state directory's CONFIG, whatever port it was started on (stop
# and status need not be given the same port), answers /-/ready, and reloads
# on SIGHUP. The caller also sets LOG, CONFIG and START_TIMEOUT_S and
# defines `write_config` (it writes CONFIG).

# reads_config PID: PID is a process started with this CONFIG.
reads_config() {
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "--config.file=$CONFIG"
}

# http_ready: /-/ready answers 200 (the configuration is loaded, and for
# Prometheus the storage open).
http_ready() {
    local status=""
    { exec 3<>"/dev/tcp/$HOST/$PORT"; } 2>/dev/null || return 1
    printf 'GET /-/ready HTTP/1.0\r\nHost: %s\r\n\r\n' "$HOST" >&3
    read -r -t 3 _ status _ <&3 || true
    exec 3<&-
    [[ $status == 200 ]]
}

# listening_on PID: the address PID was told to listen on.
listening_on() {
    tr '\0' '\n' <"/proc/$1/cmdline" | sed -n 's/^--web.listen-address=//p'
}

# daemon_status: say whether ours runs; exit status 0 running, 3 stopped.
daemon_status() {
    local pid
    if pid=$(our_pid); then
        echo "$NAME running (pid $pid) on http://$(listening_on "$pid")"
        return 0
    fi
    echo "$NAME stopped"
    return 3
}

# already_running PORT_VARIABLE: true (and says so) if ours runs. Otherwise
# false, after checking PORT is one and free and clearing a stale pid file;
# dies if either check fails. Checked at start only: stop and status find
# ours by its configuration, whatever PORT says now.
already_running() {
    local pid
    if pid=$(our_pid); then
        log "already running (pid $pid) on http://$(listening_on "$pid")"
        return 0
    fi
    if [[ ! $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
        die "$1 must be a port (1-65535), got '$PORT'"
    fi
    rm -f "$PIDFILE"
    refuse_taken_port "$1"
    return 1
}

# start_daemon COMMAND...: run COMMAND in the background with only stdin,
# stdout and stderr open, its output appended to LOG, its pid in PIDFILE; then wait
# for `http_ready`. If the process dies or START_TIMEOUT_S runs out, show the
# log's tail, stop it and die.
start_daemon() {
    log "starting $NAME on http://$HOST:$PORT, log $LOG"
    (
        close_inherited_fds
        exec "$@" </dev/null >>"$LOG" 2>&1
    ) &
    echo $! >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until http_ready; do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null || ((SECONDS >= deadline)); then
            log "not ready; last lines of $LOG:"
            tail -n 20 "$LOG" >&2 || true
            stop_daemon
            die "$NAME did not start"
        fi
        sleep 0.2
    done
    log "ready (pid $(cat "$PIDFILE"))"
}

# daemon_reload: write the configuration again and have ours reload it.
daemon_reload() {
    local pid
    pid=$(our_pid) || die "not running"
    write_config
    kill -HUP "$pid"
    log "configuration reloaded"
}
