#!/usr/bin/env bash
# Reference-counted local stack (Kafka + Redis) for modelgate.
#
#   infra/stack.sh acquire HOLDER [--pid PID]   start what is missing, register HOLDER
#   infra/stack.sh release HOLDER               unregister; stop when no holder is left
#   infra/stack.sh up | down                    acquire | release the holder "manual"
#   infra/stack.sh status [--porcelain]         holders and services
#   infra/stack.sh env                          the addresses, without starting anything
#   infra/stack.sh reset                        drop every holder and stop what we started
#
# A holder given --pid lives only as long as that process (pytest, `modelgate demo`);
# one whose process is gone, even killed with SIGKILL, is pruned at the next
# operation. A holder without --pid (`up`) stays until released.
#
# Services are stopped only if this stack started them. A Kafka or Redis already
# answering on our ports when the first holder arrives (started by hand, by another
# tool) is used and left running.
#
# The ledger (holders, lock, which checkout started the services) is keyed by the
# ports, not by the checkout: two clones share 127.0.0.1:19092, so a test run in a
# clean clone and one in a working tree must see each other's holders, or the first
# to finish would stop the broker under the other. Override with
# MODELGATE_STACK_STATE. Services' data and logs stay in the starting checkout's var/.
#
# On acquire, stdout gets exactly two lines, KAFKA_BOOTSTRAP=... and REDIS_URL=...;
# progress goes to stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VAR=${MODELGATE_VAR:-$ROOT/var}
[[ $VAR == /* ]] || VAR=$PWD/$VAR
export MODELGATE_VAR=$VAR
KAFKA_PORT=${MODELGATE_KAFKA_PORT:-19092}
REDIS_PORT=${MODELGATE_REDIS_PORT:-16379}
export MODELGATE_KAFKA_PORT=$KAFKA_PORT MODELGATE_REDIS_PORT=$REDIS_PORT
KAFKA_SH=$ROOT/infra/kafka/kafka.sh
REDIS_SH=$ROOT/infra/redis.sh

STATE=${MODELGATE_STACK_STATE:-${TMPDIR:-/tmp}/modelgate-stack-$(id -u)/k$KAFKA_PORT-r$REDIS_PORT}
HOLDERS=$STATE/holders

log() { printf '[stack] %s\n' "$*" >&2; }
die() {
    printf '[stack] error: %s\n' "$*" >&2
    exit 1
}

init_state() {
    mkdir -p -m 700 "$(dirname "$STATE")"
    mkdir -p -m 700 "$STATE" "$HOLDERS"
    # /tmp is shared: refuse a ledger someone else created for us.
    [[ -O $STATE ]] || die "$STATE is not owned by $(id -un); set MODELGATE_STACK_STATE"
}

# Every operation that reads and then changes holders or services runs under one
# exclusive lock, so two acquires never both start Kafka and a release never stops
# it between another holder's check and its registration.
take_lock() {
    exec {LOCK_FD}>"$STATE/lock"
    if ! flock -n "$LOCK_FD"; then
        log "waiting for another stack operation to finish"
        flock -w 900 "$LOCK_FD" || die "timed out after 900s waiting for $STATE/lock"
    fi
}

svc_script() {
    case $1 in
    kafka) echo "$KAFKA_SH" ;;
    redis) echo "$REDIS_SH" ;;
    esac
}

# Process start time in clock ticks (field 22 of /proc/PID/stat), recorded with a
# holder's pid so a recycled pid does not keep a dead holder alive.
proc_start() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    rest=${stat##*) } # comm may hold spaces and parentheses; fields follow the last ')'
    # shellcheck disable=SC2206
    local fields=($rest)
    echo "${fields[19]}"
}

holder_alive() {
    local file=$1 pid="" start=""
    pid=$(sed -n 's/^pid=//p' "$file")
    start=$(sed -n 's/^start=//p' "$file")
    [[ -z $pid ]] && return 0
    [[ "$(proc_start "$pid" || true)" == "$start" ]]
}

prune() {
    local f
    for f in "$HOLDERS"/*; do
        [[ -e $f ]] || continue
        if ! holder_alive "$f"; then
            log "pruning holder ${f##*/} (its process $(sed -n 's/^pid=//p' "$f") is gone)"
            rm -f "$f"
        fi
    done
}

live_holders() {
    local f
    for f in "$HOLDERS"/*; do
        [[ -e $f ]] && echo "${f##*/}"
    done
    return 0
}

# Status of a service, as the exit code of its script: 0 running from the var dir
# given, 3 stopped, 4 some other process answers on the port.
svc_status() {
    local svc=$1 var=$2 rc=0
    MODELGATE_VAR=$var "$(svc_script "$svc")" status >/dev/null 2>&1 || rc=$?
    return "$rc"
}

# Make one service answer, recording in $STATE/owner.<svc> the var dir of the
# instance we start, so any later release (from any checkout) can stop it.
ensure_service() {
    local svc=$1 owner=$STATE/owner.$1 rc ovar
    if [[ -f $owner ]]; then
        ovar=$(sed -n 's/^var=//p' "$owner")
        rc=0
        svc_status "$svc" "$ovar" || rc=$?
        if ((rc == 0)); then
            # Ours and alive; start is a no-op that waits until it is ready.
            MODELGATE_VAR=$ovar "$(svc_script "$svc")" start || return 1
            return 0
        fi
        log "$svc started by this stack is gone (from $ovar); starting it again"
        rm -f "$owner"
    fi

    rc=0
    svc_status "$svc" "$VAR" || rc=$?
    case $rc in
    0 | 4)
        log "$svc is already running and was not started by this stack; using it as is"
        return 0
        ;;
    esac
    # Record ownership before starting: if this script is killed mid-start (Ctrl-C
    # while the jars download), the next release still knows to stop what came up.
    printf 'var=%s\nroot=%s\n' "$VAR" "$ROOT" >"$owner"
    "$(svc_script "$svc")" start || return 1
}

stop_owned() {
    local svc owner ovar
    for svc in kafka redis; do
        owner=$STATE/owner.$svc
        [[ -f $owner ]] || continue
        ovar=$(sed -n 's/^var=//p' "$owner")
        MODELGATE_VAR=$ovar "$(svc_script "$svc")" stop || true
        rm -f "$owner"
    done
}

print_env() {
    echo "KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
    echo "REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
}

check_name() {
    [[ ${1:-} =~ ^[A-Za-z0-9._@:+-]{1,100}$ ]] ||
        die "holder name must be 1-100 characters of [A-Za-z0-9._@:+-], got '${1:-}'"
}

cmd_acquire() {
    local holder=${1:-} pid=""
    check_name "$holder"
    shift
    if [[ ${1:-} == --pid ]]; then
        pid=${2:-}
        [[ $pid =~ ^[0-9]+$ ]] || die "--pid needs a process id"
    fi
    local t0=$SECONDS start=""
    if [[ -n $pid ]]; then
        start=$(proc_start "$pid") || die "process $pid does not exist"
    fi

    init_state
    take_lock
    prune
    log "acquiring for $holder (ledger $STATE)"
    local ok=1
    ensure_service redis || ok=0
    ((ok)) && { ensure_service kafka || ok=0; }
    if ((!ok)); then
        # Leave nothing half-started that no holder will ever release.
        [[ -z "$(live_holders)" ]] && stop_owned
        die "could not start the stack for $holder"
    fi
    printf 'pid=%s\nstart=%s\nacquired=%s\n' "$pid" "$start" "$(date -u +%FT%TZ)" \
        >"$HOLDERS/$holder"
    log "acquired by $holder in $((SECONDS - t0))s; holders: $(live_holders | paste -sd' ' -)"
    print_env
}

cmd_release() {
    local holder=${1:-}
    check_name "$holder"
    init_state
    take_lock
    if [[ -e $HOLDERS/$holder ]]; then
        rm -f "$HOLDERS/$holder"
    else
        log "$holder held nothing"
    fi
    prune
    local left
    left=$(live_holders | paste -sd' ' -)
    if [[ -n $left ]]; then
        log "released by $holder; still held by: $left"
        return 0
    fi
    if [[ -f $STATE/owner.kafka || -f $STATE/owner.redis ]]; then
        log "released by $holder; no holder left, stopping the services this stack started"
        stop_owned
    else
        log "released by $holder; no holder left, nothing of ours to stop"
    fi
}

# Human report by default; with --porcelain, one key=value per line for
# gateway.stack: holder=NAME (repeated), kafka=STATE, redis=STATE, where STATE is
# running, starting, foreign (answering, not ours) or stopped.
cmd_status() {
    local porcelain=${1:-}
    init_state
    exec {LOCK_FD}>"$STATE/lock"
    # Prune only if no operation is under way; status must never block on one.
    if flock -n "$LOCK_FD"; then prune; fi
    [[ -n $porcelain ]] || echo "ledger: $STATE"
    local f any=0 pid
    for f in "$HOLDERS"/*; do
        [[ -e $f ]] || continue
        # Another operation may hold the lock, so pruning above may not have run.
        holder_alive "$f" || continue
        any=1
        if [[ -n $porcelain ]]; then
            echo "holder=${f##*/}"
            continue
        fi
        pid=$(sed -n 's/^pid=//p' "$f")
        echo "holder: ${f##*/} (${pid:+pid $pid, }since $(sed -n 's/^acquired=//p' "$f"))"
    done
    [[ -n $porcelain ]] || ((any)) || echo "holder: none"
    local svc owner ovar line rc state owned=0
    for svc in kafka redis; do
        owner=$STATE/owner.$svc
        ovar=$VAR
        [[ -f $owner ]] && ovar=$(sed -n 's/^var=//p' "$owner") && owned=1
        rc=0
        line=$(MODELGATE_VAR=$ovar "$(svc_script "$svc")" status 2>/dev/null) || rc=$?
        case $rc in
        0) [[ $line == *starting* ]] && state=starting || state=running ;;
        4) state=foreign ;;
        *) state=stopped ;;
        esac
        if [[ -n $porcelain ]]; then
            echo "$svc=$state"
        else
            echo "$line"
            [[ -f $owner ]] && echo "  (started by this stack from $ovar)"
        fi
    done
    if [[ -z $porcelain ]] && ((!any && owned)); then
        echo "no live holder keeps the services this stack started;" \
            "'$0 reset' stops them (the next release would too)"
    fi
    return 0
}

cmd_reset() {
    init_state
    take_lock
    rm -f "$HOLDERS"/*
    stop_owned
    log "every holder dropped; services this stack started are stopped"
}

case ${1:-} in
acquire)
    shift
    cmd_acquire "$@"
    ;;
release) cmd_release "${2:-}" ;;
up) cmd_acquire manual ;;
down) cmd_release manual ;;
status) cmd_status "${2:-}" ;;
env) print_env ;;
reset) cmd_reset ;;
*)
    echo "usage: $0 acquire HOLDER [--pid PID]|release HOLDER|up|down|status [--porcelain]|env|reset" >&2
    exit 2
    ;;
esac
