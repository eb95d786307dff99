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
#   MODELGATE_PROMETHEUS_KINDS  the processes to scrape, comma-separated from
#                               worker,frontdoor,admin,guard,forwarder; default all
#                               but forwarder (an add-on; name it if you run one)
#   MODELGATE_PROMETHEUS_RULES  rule files, comma-separated; default
#                               infra/prometheus/alerts.yml
#   MODELGATE_ALERTMANAGER_PORT where firing alerts go: infra/alertmanager.sh's
#                               Alertmanager on 127.0.0.1, default 19095; 0 for none
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
KINDS=${MODELGATE_PROMETHEUS_KINDS:-}
RULES=${MODELGATE_PROMETHEUS_RULES:-}
ALERTMANAGER_PORT=${MODELGATE_ALERTMANAGER_PORT:-19095}
START_TIMEOUT_S=30
NAME=prometheus

PDIR=$VAR/prometheus
PIDFILE=$PDIR/prometheus.pid
LOG=$PDIR/prometheus.log
CONFIG=$PDIR/prometheus.yml
MODELGATE=$ROOT/.venv/bin/modelgate

# shellcheck source=infra/lib.sh
. "$ROOT/infra/lib.sh"

cmd_install() {
    # policy-rc.d on most images keeps the package's own service from
    # starting; either way this script never uses it.
    apt_install prometheus prometheus promtool
}

write_config() {
    [[ -x $MODELGATE ]] || die "no $MODELGATE: run make bootstrap first"
    mkdir -p "$PDIR"
    local kinds=() kind
    if [[ -n $KINDS ]]; then
        IFS=, read -r -a kinds <<<"$KINDS"
    fi
    local args=(--interval-s "$INTERVAL_S")
    for kind in "${kinds[@]}"; do
        args+=(--kind "$kind")
    done
    local rules=() rule
    if [[ -n $RULES ]]; then
        IFS=, read -r -a rules <<<"$RULES"
    fi
    for rule in "${rules[@]}"; do
        args+=(--rules "$rule")
    done
    [[ $ALERTMANAGER_PORT =~ ^[0-9]+$ ]] ||
        die "MODELGATE_ALERTMANAGER_PORT must be a port or 0, got '$ALERTMANAGER_PORT'"
    if ((ALERTMANAGER_PORT != 0)); then
        args+=(--alertmanager "$HOST:$ALERTMANAGER_PORT")
    fi
    "$MODELGATE" monitoring prometheus-config "${args[@]}" >"$CONFIG.new" ||
        die "modelgate monitoring prometheus-config failed"
    "$(find_bin promtool)" check config "$CONFIG.new" >&2 ||
        die "promtool refused the configuration (kept in $CONFIG.new)"
    mv "$CONFIG.new" "$CONFIG"
}

is_ours() { reads_config "$1"; }

cmd_start() {
    already_running MODELGATE_PROMETHEUS_PORT && return 0
    cmd_install
    write_config
    local server
    server=$(find_bin prometheus)
    start_daemon "$server" --config.file="$CONFIG" \
        --storage.tsdb.path="$PDIR/data" \
        --storage.tsdb.retention.time=7d \
        --web.listen-address="$HOST:$PORT" \
        --web.enable-lifecycle
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) stop_daemon ;;
status) daemon_status ;;
reload) daemon_reload ;;
*)
    echo "usage: $0 install|start|stop|status|reload" >&2
    exit 2
    ;;
esac
