#!/usr/bin/env bash
# Local Prometheus for modelgate: Debian's prometheus on loopback, scraping the
# metrics listeners of this host's modelgate processes and evaluating the alert
# rules of infra/prometheus/alerts.yml (docs/monitoring.md).
#
#   infra/prometheus.sh install   apt-get install prometheus (and promtool) if missing
#   infra/prometheus.sh start     install if needed, write the configuration, start,
#                                 wait until ready
#   infra/prometheus.sh stop      stop the instance this checkout started
#   infra/prometheus.sh status    exit 0 running (ours), 3 stopped
#   infra/prometheus.sh reload    write the configuration again and reload it
#
# Environment (all optional):
#   MODELGATE_VAR               state root, default <repo>/var
#   MODELGATE_PROMETHEUS_PORT   port, default 19090
#   MODELGATE_PROMETHEUS_INTERVAL_S  scrape and rule interval, default 15
#   MODELGATE_CONFIG            the settings file whose metrics ports are scraped
#                               (as for every modelgate command)
#
# The scrape targets come from `modelgate monitoring prometheus-config`, so they
# follow the settings (a metrics port moved for a shared machine is scraped where
# it is). Never the distro's systemd service, which may hold other data.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VAR=${MODELGATE_VAR:-$ROOT/var}
[[ $VAR == /* ]] || VAR=$PWD/$VAR
# Loopback only, on purpose: the API can delete series and has no login.
HOST=127.0.0.1
PORT=${MODELGATE_PROMETHEUS_PORT:-19090}
INTERVAL_S=${MODELGATE_PROMETHEUS_INTERVAL_S:-15}
START_TIMEOUT_S=30

PDIR=$VAR/prometheus
PIDFILE=$PDIR/prometheus.pid
LOG=$PDIR/prometheus.log
CONFIG=$PDIR/prometheus.yml
MODELGATE=$ROOT/.venv/bin/modelgate

log() { printf '[prometheus] %s\n' "$*" >&2; }
die() {
    printf '[prometheus] error: %s\n' "$*" >&2
    exit 1
}

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

cmd_install() {
    find_bin prometheus >/dev/null && find_bin promtool >/dev/null && return 0
    command -v apt-get >/dev/null || die "prometheus is missing and apt-get is not available"
    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || die "prometheus is missing; run as root or install it"
        sudo=(sudo -n)
    fi
    log "installing prometheus with apt-get (first run only)"
    # policy-rc.d on most images keeps the package's own service from starting;
    # either way this script never uses it.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 \
        update -qq </dev/null >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 \
        install -y -qq --no-install-recommends prometheus </dev/null >&2 ||
        die "apt-get install prometheus failed"
    find_bin promtool >/dev/null || die "promtool still missing after apt-get"
}

write_config() {
    [[ -x $MODELGATE ]] || die "no $MODELGATE: run make bootstrap first"
    mkdir -p "$PDIR"
    "$MODELGATE" monitoring prometheus-config --interval-s "$INTERVAL_S" \
        >"$CONFIG.new" ||
        die "modelgate monitoring prometheus-config failed"
    "$(find_bin promtool)" check config "$CONFIG.new" >&2 ||
        die "promtool refused the configuration (kept in $CONFIG.new)"
    mv "$CONFIG.new" "$CONFIG"
}

# /-/ready answers 200 once the configuration is loaded and the storage open.
ready() {
    local status=""
    { exec 3<>"/dev/tcp/$HOST/$PORT"; } 2>/dev/null || return 1
    printf 'GET /-/ready HTTP/1.0\r\nHost: %s\r\n\r\n' "$HOST" >&3
    read -r -t 3 _ status _ <&3 || true
    exec 3<&-
    [[ $status == 200 ]]
}

is_ours() {
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--web.listen-address=$HOST:$PORT"
}

our_pid() {
    local pid=""
    [[ -f $PIDFILE ]] && pid=$(cat "$PIDFILE")
    [[ -n $pid ]] && is_ours "$pid" && echo "$pid"
}

cmd_status() {
    local pid
    if pid=$(our_pid); then
        if ready; then
            echo "prometheus running (pid $pid) on http://$HOST:$PORT"
        else
            echo "prometheus starting or unhealthy (pid $pid) on $HOST:$PORT"
        fi
        return 0
    fi
    echo "prometheus stopped"
    return 3
}

cmd_start() {
    local pid
    if pid=$(our_pid); then
        log "already running (pid $pid) on http://$HOST:$PORT"
        return 0
    fi
    rm -f "$PIDFILE"
    if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
        die "port $HOST:$PORT is already in use by another process" \
            "(set MODELGATE_PROMETHEUS_PORT to move ours)"
    fi
    cmd_install
    write_config
    local server
    server=$(find_bin prometheus)
    log "starting prometheus on http://$HOST:$PORT, log $LOG"
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            ((fd > 2)) && eval "exec $fd>&-"
        done
        exec "$server" --config.file="$CONFIG" \
            --storage.tsdb.path="$PDIR/data" \
            --storage.tsdb.retention.time=7d \
            --web.listen-address="$HOST:$PORT" \
            --web.enable-lifecycle \
            </dev/null >>"$LOG" 2>&1
    ) &
    echo $! >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until ready; do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null || ((SECONDS >= deadline)); then
            log "not ready; last lines of $LOG:"
            tail -n 20 "$LOG" >&2 || true
            cmd_stop
            die "prometheus did not start"
        fi
        sleep 0.2
    done
    log "ready (pid $(cat "$PIDFILE"))"
}

cmd_reload() {
    local pid
    pid=$(our_pid) || die "not running"
    write_config
    kill -HUP "$pid"
    log "configuration reloaded"
}

cmd_stop() {
    local pid
    if ! pid=$(our_pid); then
        rm -f "$PIDFILE"
        log "not running"
        return 0
    fi
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
    rm -f "$PIDFILE"
    log "stopped"
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
reload) cmd_reload ;;
*)
    echo "usage: $0 install|start|stop|status|reload" >&2
    exit 2
    ;;
esac
