#!/usr/bin/env bash
# MLServer (Seldon's Open Inference Protocol server) for modelgate's remote-backend
# tests, in a venv of its own: MLServer pins fastapi<0.125, which the gateway's
# venv does not satisfy.
#
#   infra/mlserver/mlserver.sh install        create/sync var/mlserver-venv from
#                                             infra/mlserver/requirements.lock
#   infra/mlserver/mlserver.sh start [REPO]   serve the model repository REPO
#                                             (default var/mlserver/repo; the digits
#                                             model is exported into it on first use;
#                                             delete the directory to export again)
#   infra/mlserver/mlserver.sh stop [REPO]    stop the server started on REPO
#   infra/mlserver/mlserver.sh status [REPO]  exit 0 running, 3 stopped
#
# Environment (all optional):
#   MODELGATE_MLSERVER_PORT        HTTP port, default 18080 (always 127.0.0.1)
#   MODELGATE_MLSERVER_GRPC_PORT   gRPC port, default HTTP port + 1; MLServer 1.7
#                                  cannot switch gRPC off, so it listens on
#                                  loopback and nothing uses it
#   PYTHON                         interpreter for the venv, default python3.11
#
# The model file MLServer loads is a joblib file (pickle) that modelgate writes
# itself (gateway.backends.mlserver); MLServer unpickles it, modelgate never does.
# The repository's settings.json (written by the exporter) binds 127.0.0.1 and
# switches MLServer's metrics server off, so only the HTTP and gRPC ports open.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3.11}
VENV=$ROOT/var/mlserver-venv
LOCK=$ROOT/infra/mlserver/requirements.lock
UV=$ROOT/var/tools/bin/uv
STAMP=$VENV/.modelgate-sync
HOST=127.0.0.1
PORT=${MODELGATE_MLSERVER_PORT:-18080}
GRPC_PORT=${MODELGATE_MLSERVER_GRPC_PORT:-$((PORT + 1))}
START_TIMEOUT_S=120

log() { printf '[mlserver] %s\n' "$*" >&2; }
die() {
    printf '[mlserver] error: %s\n' "$*" >&2
    exit 1
}

wanted_stamp() { cat "$LOCK" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-32; }

cmd_install() {
    local want
    want=$(wanted_stamp)
    if [[ -x $VENV/bin/mlserver && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi
    mkdir -p "$ROOT/var"
    exec {lock_fd}>"$ROOT/var/mlserver-install.lock"
    flock -w 900 "$lock_fd" || die "timed out waiting for another install"
    if [[ -x $VENV/bin/mlserver && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi
    # uv comes from the gateway's bootstrap (var/tools), pinned there.
    [[ -x $UV ]] || "$ROOT/infra/bootstrap.sh" || die "bootstrap (for uv) failed"
    local started=$SECONDS
    if [[ ! -x $VENV/bin/python ]]; then
        command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11"
        log "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
    log "syncing $VENV with infra/mlserver/requirements.lock"
    "$UV" pip sync --quiet --python "$VENV/bin/python" --require-hashes "$LOCK" \
        </dev/null || die "uv pip sync failed"
    echo "$want" >"$STAMP"
    log "MLServer venv ready in $((SECONDS - started))s"
}

repo_dir() {
    local repo=${1:-$ROOT/var/mlserver/repo}
    [[ $repo == /* ]] || repo=$PWD/$repo
    echo "$repo"
}

# True if the pid file names a live MLServer, so a stale file whose number was
# reused by another process is never signalled.
running_pid() {
    local pidfile=$1/mlserver.pid pid
    [[ -f $pidfile ]] || return 1
    pid=$(cat "$pidfile")
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q mlserver || return 1
    echo "$pid"
}

ready() {
    "$VENV/bin/python" - "$1" <<'PY'
import sys, urllib.request
# No proxy from the environment: the server is on loopback.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

cmd_start() {
    local repo
    repo=$(repo_dir "${1:-}")
    cmd_install
    if running_pid "$repo" >/dev/null; then
        log "already running on $repo"
        return 0
    fi
    if [[ ! -f $repo/settings.json ]]; then
        log "exporting the digits model into $repo"
        "$ROOT/.venv/bin/python" -m gateway.backends.mlserver "$repo" ||
            die "could not export the model repository (run make bootstrap first?)"
    fi
    log "starting MLServer on http://$HOST:$PORT (gRPC $HOST:$GRPC_PORT) serving $repo"
    # Ports come from the environment; host, metrics (off) and parallel_workers
    # (0: inference in the server process, not a pool) from $repo/settings.json.
    (
        cd "$repo"
        MLSERVER_HOST=$HOST MLSERVER_HTTP_PORT=$PORT MLSERVER_GRPC_PORT=$GRPC_PORT \
            setsid "$VENV/bin/mlserver" start "$repo" \
            >"$repo/mlserver.log" 2>&1 </dev/null &
        echo $! >"$repo/mlserver.pid"
    )
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until ready "$PORT"; do
        if ! running_pid "$repo" >/dev/null; then
            tail -n 30 "$repo/mlserver.log" >&2 || true
            die "MLServer exited during start (log: $repo/mlserver.log)"
        fi
        ((SECONDS < deadline)) || die "MLServer not ready after ${START_TIMEOUT_S}s"
        sleep 0.5
    done
    log "ready"
}

cmd_stop() {
    local repo pid
    repo=$(repo_dir "${1:-}")
    pid=$(running_pid "$repo") || {
        rm -f "$repo/mlserver.pid"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.2; done
    if [[ -d /proc/$pid ]]; then
        log "MLServer $pid ignored TERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$repo/mlserver.pid"
    log "stopped"
}

cmd_status() {
    local repo pid
    repo=$(repo_dir "${1:-}")
    if pid=$(running_pid "$repo"); then
        echo "mlserver running (pid $pid) on $repo"
        return 0
    fi
    echo "mlserver stopped ($repo)"
    return 3
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start "${2:-}" ;;
stop) cmd_stop "${2:-}" ;;
status) cmd_status "${2:-}" ;;
*)
    echo "usage: $0 install|start|stop|status [REPO]" >&2
    exit 2
    ;;
esac
