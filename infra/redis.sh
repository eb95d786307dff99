#!/usr/bin/env bash
# Local Redis for modelgate: our own redis-server on loopback, never the distro's
# systemd service (which may not exist, may be stopped, or may hold other data).
#
#   infra/redis.sh install   apt-get install redis-server if it is missing
#   infra/redis.sh start     install if needed, start, wait for PING
#   infra/redis.sh stop      stop the instance this checkout started
#   infra/redis.sh status    exit 0 running (ours), 3 stopped, 4 port answered by a
#                            Redis this checkout did not start
#
# Environment (all optional):
#   MODELGATE_VAR               state root, default <repo>/var
#   MODELGATE_REDIS_PORT        port, default 16379
#   MODELGATE_REDIS_MAXMEMORY   maxmemory, default 512mb
#
# Nothing is persisted (--save '' --appendonly no): counters and detector state
# are rebuilt from traffic, and a fresh start must not inherit yesterday's blocks.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VAR=${MODELGATE_VAR:-$ROOT/var}
[[ $VAR == /* ]] || VAR=$PWD/$VAR
# Loopback only, on purpose: this instance has no password.
HOST=127.0.0.1
PORT=${MODELGATE_REDIS_PORT:-16379}
MAXMEMORY=${MODELGATE_REDIS_MAXMEMORY:-512mb}
START_TIMEOUT_S=20
NAME=redis

RDIR=$VAR/redis
PIDFILE=$RDIR/redis.pid
LOG=$RDIR/redis.log

# shellcheck source=infra/lib.sh
. "$ROOT/infra/lib.sh"

cmd_install() {
    apt_install redis-server redis-server redis-cli
}

ping() {
    local cli
    cli=$(find_bin redis-cli) || return 1
    [[ "$(timeout 3 "$cli" -h "$HOST" -p "$PORT" ping 2>/dev/null)" == PONG ]]
}

# True if PID is a live redis-server serving our port, so a stale pid file whose
# number was reused by another process is never signalled.
is_ours() {
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE "redis-server $HOST:$PORT( |$)"
}

cmd_status() {
    local pid
    if pid=$(our_pid); then
        if ping; then
            echo "redis running (pid $pid) on $HOST:$PORT"
        else
            echo "redis starting or unhealthy (pid $pid) on $HOST:$PORT"
        fi
        return 0
    fi
    if ping; then
        echo "redis: a server this checkout did not start answers on $HOST:$PORT"
        return 4
    fi
    echo "redis stopped"
    return 3
}

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until ping; do
        if ((SECONDS >= deadline)); then
            log "no PONG after ${START_TIMEOUT_S}s; last lines of $LOG:"
            tail -n 20 "$LOG" >&2 || true
            die "redis did not start"
        fi
        sleep 0.2
    done
}

cmd_start() {
    local pid
    if pid=$(our_pid); then
        wait_ready
        log "already running (pid $pid) on $HOST:$PORT"
        return 0
    fi
    rm -f "$PIDFILE"
    refuse_taken_port MODELGATE_REDIS_PORT

    cmd_install
    mkdir -p "$RDIR"
    local server
    server=$(find_bin redis-server)
    log "starting redis on $HOST:$PORT, log $LOG"
    (
        close_inherited_fds
        # No config file: every setting is here so nothing from /etc/redis applies.
        exec "$server" --bind "$HOST" --port "$PORT" --protected-mode yes \
            --save '' --appendonly no --dir "$RDIR" \
            --daemonize yes --pidfile "$PIDFILE" --logfile "$LOG" \
            --maxmemory "$MAXMEMORY" --maxmemory-policy noeviction \
            </dev/null >/dev/null 2>&1
    ) || die "redis-server refused to start; see $LOG"
    wait_ready
    # --daemonize writes the pid file just after forking; PONG can come first.
    local i
    for i in $(seq 1 25); do
        [[ -s $PIDFILE ]] && break
        sleep 0.2
    done
    log "ready (pid $(cat "$PIDFILE" 2>/dev/null || echo '?'))"
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) stop_daemon ;;
status) cmd_status ;;
*)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
