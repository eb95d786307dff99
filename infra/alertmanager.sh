#!/usr/bin/env bash
# Local Alertmanager for modelgate: Debian's prometheus-alertmanager on
# loopback, receiving the alerts of infra/prometheus.sh's Prometheus and
# grouping, inhibiting and sending them as infra/alertmanager/alertmanager.yml
# says (docs/monitoring.md, "Alertmanager").
#
#   infra/alertmanager.sh install   apt-get install prometheus-alertmanager if missing
#   infra/alertmanager.sh start     install if needed, write the configuration, start,
#                                   wait until ready
#   infra/alertmanager.sh stop      stop the instance this checkout started
#   infra/alertmanager.sh status    exit 0 running (ours), 3 stopped
#   infra/alertmanager.sh reload    write the configuration again and reload it
#
# Environment (all optional):
#   MODELGATE_VAR                    state root, default <repo>/var
#   MODELGATE_ALERTMANAGER_PORT      port, default 19095 (infra/prometheus.sh sends
#                                    its alerts there)
#   MODELGATE_ALERTMANAGER_GROUP_WAIT_S      first notification of a new group after
#   MODELGATE_ALERTMANAGER_GROUP_INTERVAL_S  this long; later changes to a group
#   MODELGATE_ALERTMANAGER_REPEAT_INTERVAL_S this long; unchanged groups again after
#                                    this long (defaults: the shipped file's)
#   MODELGATE_CONFIG                 the settings file; monitoring.webhook_url is where
#                                    notifications go (none: kept in Alertmanager only)
#
# The configuration comes from `modelgate monitoring alertmanager-config`, which
# adds the webhook of the settings to the shipped file. Written readable by the
# owner only: a webhook URL often carries its secret. The gossip listener is off
# (one instance; Alertmanager's default would listen on every interface).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VAR=${MODELGATE_VAR:-$ROOT/var}
[[ $VAR == /* ]] || VAR=$PWD/$VAR
# Loopback only, on purpose: the API silences alerts and has no login.
HOST=127.0.0.1
PORT=${MODELGATE_ALERTMANAGER_PORT:-19095}
START_TIMEOUT_S=30
NAME=alertmanager

ADIR=$VAR/alertmanager
PIDFILE=$ADIR/alertmanager.pid
LOG=$ADIR/alertmanager.log
CONFIG=$ADIR/alertmanager.yml
MODELGATE=$ROOT/.venv/bin/modelgate

# shellcheck source=infra/lib.sh
. "$ROOT/infra/lib.sh"

cmd_install() {
    # Debian names the server prometheus-alertmanager; amtool comes with it.
    apt_install prometheus-alertmanager prometheus-alertmanager amtool
}

write_config() {
    [[ -x $MODELGATE ]] || die "no $MODELGATE: run make bootstrap first"
    mkdir -p "$ADIR"
    local args=() name var
    for name in group-wait group-interval repeat-interval; do
        var=MODELGATE_ALERTMANAGER_${name//-/_}_S
        var=${var^^}
        [[ -n ${!var:-} ]] && args+=("--$name-s" "${!var}")
    done
    (
        umask 077
        "$MODELGATE" monitoring alertmanager-config "${args[@]}" >"$CONFIG.new"
    ) || die "modelgate monitoring alertmanager-config failed"
    "$(find_bin amtool)" check-config "$CONFIG.new" >&2 ||
        die "amtool refused the configuration (kept in $CONFIG.new)"
    mv "$CONFIG.new" "$CONFIG"
}

is_ours() { reads_config "$1"; }

cmd_start() {
    # The port is checked here only (already_running): 0, which tells
    # infra/prometheus.sh to send nowhere, must not block stop and status.
    already_running MODELGATE_ALERTMANAGER_PORT && return 0
    cmd_install
    write_config
    local server
    server=$(find_bin prometheus-alertmanager)
    start_daemon "$server" --config.file="$CONFIG" \
        --storage.path="$ADIR/data" \
        --web.listen-address="$HOST:$PORT" \
        --cluster.listen-address=
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
