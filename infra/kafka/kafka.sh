#!/usr/bin/env bash
# Local Apache Kafka for modelgate: one KRaft node that is both broker and
# controller, bound to 127.0.0.1 only, run from the official jars with plain java.
#
#   infra/kafka/kafka.sh install   fetch the jars named by infra/kafka/pom.xml
#   infra/kafka/kafka.sh installed exit 0 if those jars are fetched, 1 if not
#   infra/kafka/kafka.sh format    format storage (new cluster id, standalone quorum)
#   infra/kafka/kafka.sh format --force   wipe var/kafka/data and format again
#   infra/kafka/kafka.sh start     install + format if needed, start, wait until ready
#   infra/kafka/kafka.sh stop      stop the broker this checkout started
#   infra/kafka/kafka.sh status    exit 0 running (ours), 3 stopped, 4 port held by
#                                  a Kafka this checkout did not start
#   infra/kafka/kafka.sh probe     exit 0 if a broker on the client port answers
#   infra/kafka/kafka.sh ports     print the client and controller ports it would use
#
# Environment (all optional):
#   MODELGATE_VAR                    state root, default <repo>/var
#   MODELGATE_KAFKA_PORT             client port, default 19092
#   MODELGATE_KAFKA_CONTROLLER_PORT  controller port, default 19093, or the client
#                                    port + 1 when only MODELGATE_KAFKA_PORT is set
#   MODELGATE_KAFKA_HEAP             JVM heap flags, default "-Xms256m -Xmx512m"
#   MODELGATE_KAFKA_START_TIMEOUT_S  bounded wait for readiness, default 120
#
# Everything runs as the calling user; nothing listens beyond loopback.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VAR=${MODELGATE_VAR:-$ROOT/var}
[[ $VAR == /* ]] || VAR=$PWD/$VAR
# Loopback only, on purpose: this broker has no authentication.
HOST=127.0.0.1
PORT=${MODELGATE_KAFKA_PORT:-19092}
# A client port moved alone would otherwise leave the controller on 19093, where
# the shared stack's controller already listens, and the private broker would die.
if [[ -n ${MODELGATE_KAFKA_PORT:-} ]]; then
    CONTROLLER_PORT=${MODELGATE_KAFKA_CONTROLLER_PORT:-$((PORT + 1))}
else
    CONTROLLER_PORT=${MODELGATE_KAFKA_CONTROLLER_PORT:-19093}
fi
HEAP=${MODELGATE_KAFKA_HEAP:--Xms256m -Xmx512m}
START_TIMEOUT_S=${MODELGATE_KAFKA_START_TIMEOUT_S:-120}

POM=$ROOT/infra/kafka/pom.xml
BROKER_PROPS=$ROOT/infra/kafka/broker.properties
LOG4J_CONF=$ROOT/infra/kafka/log4j2.properties
KDIR=$VAR/kafka
LIBS=$KDIR/libs
DATA=$KDIR/data
PROPS=$KDIR/server.properties
PIDFILE=$KDIR/kafka.pid
LOG=$KDIR/kafka.log
FORMAT_STAMP=$DATA/.modelgate-format

VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n 1)

log() { printf '[kafka] %s\n' "$*" >&2; }
die() {
    printf '[kafka] error: %s\n' "$*" >&2
    exit 1
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH: $2"
}

# The jars are current when the stamp names this pom's exact content; editing the
# version (or anything else in the pom) fetches again.
libs_stamp() {
    printf 'kafka=%s pom=%s\n' "$VERSION" "$(sha256sum "$POM" | cut -c1-16)"
}

libs_current() {
    [[ -f $LIBS/.installed && "$(cat "$LIBS/.installed")" == "$(libs_stamp)" ]]
}

cmd_install() {
    libs_current && return 0
    need java "install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
    need mvn "install Maven (apt-get install maven)"
    mkdir -p "$KDIR"

    # Two installs at once (two checkouts' first runs, or make and pytest) would
    # both write the same directory; the second waits and then finds it current.
    exec {lock_fd}>"$KDIR/install.lock"
    flock -w 900 "$lock_fd" || die "timed out waiting for another jar install"
    if libs_current; then
        exec {lock_fd}>&-
        return 0
    fi
    if [[ -f $PIDFILE ]] && is_ours "$(cat "$PIDFILE")"; then
        die "the running broker uses $LIBS; stop it before changing the Kafka version"
    fi

    log "fetching Apache Kafka $VERSION broker jars from Maven Central into $LIBS"
    log "(first run only: about 45 MB, cached in ~/.m2 afterwards)"
    local started=$SECONDS tmp="$KDIR/libs.tmp.$$"
    rm -rf "$tmp"
    # Output to a file: with -q it holds only errors, plus the stray colour resets
    # Debian's Maven 3.8 prints even in batch mode.
    if ! mvn -B -q -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" </dev/null >"$KDIR/mvn.log" 2>&1; then
        rm -rf "$tmp"
        sed 's/\x1b\[[0-9;]*m//g' "$KDIR/mvn.log" | tail -n 40 >&2
        die "mvn could not resolve org.apache.kafka:kafka_2.13:$VERSION" \
            "(full output in $KDIR/mvn.log)"
    fi
    [[ -f $tmp/kafka_2.13-$VERSION.jar ]] || {
        rm -rf "$tmp"
        die "mvn finished but kafka_2.13-$VERSION.jar is missing from $tmp"
    }
    libs_stamp >"$tmp/.installed"
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars in $((SECONDS - started))s"
    exec {lock_fd}>&-
}

write_props() {
    mkdir -p "$KDIR" "$DATA"
    {
        echo "# Generated by infra/kafka/kafka.sh at each start; edit"
        echo "# infra/kafka/broker.properties or the MODELGATE_KAFKA_* variables instead."
        echo "listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT"
        echo "advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT"
        # A dynamic quorum (KIP-853) bootstrapped by `format --standalone`, as the
        # Kafka 4 quickstart does, instead of a static controller.quorum.voters.
        echo "controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT"
        echo "log.dirs=$DATA"
        echo
        cat "$BROKER_PROPS"
    } >"$PROPS.tmp"
    mv "$PROPS.tmp" "$PROPS"
}

java_opts() {
    # shellcheck disable=SC2206 # HEAP is a list of flags on purpose.
    local heap=($HEAP)
    JAVA_OPTS=(
        "${heap[@]}"
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent
        -Djava.awt.headless=true
        "-Dlog4j2.configurationFile=$LOG4J_CONF"
        "-Dkafka.logs.dir=$KDIR"
        # Crash files go next to the log, not into whatever directory we ran from.
        "-XX:ErrorFile=$KDIR/hs_err_pid%p.log"
    )
}

cmd_format() {
    local force=${1:-}
    cmd_install
    if [[ -f $DATA/meta.properties ]]; then
        if [[ $force == --force ]]; then
            [[ -f $PIDFILE ]] && is_ours "$(cat "$PIDFILE")" &&
                die "stop the broker before formatting its storage"
            log "wiping $DATA"
            rm -rf "$DATA"
        else
            # The standalone quorum records the controller's endpoint in the metadata
            # log, so storage formatted for another controller port cannot start.
            local was
            was=$(cat "$FORMAT_STAMP" 2>/dev/null || echo unknown)
            [[ $was == "controller_port=$CONTROLLER_PORT" ]] ||
                die "$DATA was formatted with $was, not controller_port=$CONTROLLER_PORT;" \
                    "run '$0 format --force' (drops local topics) or restore the port"
            return 0
        fi
    fi

    write_props
    # Kafka cluster ids are 16 random bytes in unpadded url-safe base64 (what
    # `kafka-storage random-uuid` prints); skip ids starting with '-' as Kafka's
    # own Uuid.randomUuid does, because the CLI would read one as an option.
    local cluster_id
    cluster_id=-
    while [[ $cluster_id == -* ]]; do
        cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    done
    log "formatting $DATA (cluster id $cluster_id, standalone controller)"
    java_opts
    # The tool prints the whole broker config; keep it in a file unless it fails.
    if ! java "${JAVA_OPTS[@]}" -cp "$LIBS/*" kafka.tools.StorageTool format \
        --config "$PROPS" --cluster-id "$cluster_id" --standalone \
        </dev/null >"$KDIR/format.log" 2>&1; then
        tail -n 30 "$KDIR/format.log" >&2
        die "kafka-storage format failed (full output in $KDIR/format.log)"
    fi
    echo "controller_port=$CONTROLLER_PORT" >"$FORMAT_STAMP"
}

# True if PID is a live broker started from this checkout's server.properties, so a
# stale pid file whose number was reused by another process is never signalled.
is_ours() {
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "kafka.Kafka $PROPS"
}

# Speaks the Kafka protocol on the client port: ApiVersions, then Metadata. Ready
# means the broker answered and lists itself, which KRaft does only once the
# broker is unfenced, i.e. able to create topics and serve produce requests.
# Uses the system python3 because the project venv may not exist yet.
probe() {
    python3 - "$HOST" "$PORT" <<'PY'
import socket
import struct
import sys

host, port = sys.argv[1], int(sys.argv[2])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def call(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    client = b"modelgate-probe"
    msg = struct.pack(">hhih", api_key, version, corr, len(client)) + client + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    data = recv_exact(sock, size)
    if struct.unpack(">i", data[:4])[0] != corr:
        raise ValueError("correlation id mismatch")
    return data[4:]


try:
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.settimeout(3)
        # ApiVersions v0: error_code, then [api_key, min_version, max_version].
        data = call(sock, 18, 0, 1, b"")
        error, count = struct.unpack(">hi", data[:6])
        if error != 0:
            sys.exit(2)
        ranges = {}
        for i in range(count):
            key, lo, hi = struct.unpack(">hhh", data[6 + 6 * i : 12 + 6 * i])
            ranges[key] = (lo, hi)
        lo, hi = ranges.get(3, (0, -1))
        # Metadata v4-v8 share one non-flexible layout we can write by hand.
        version = max(lo, 4)
        if version > min(hi, 8):
            sys.exit(2)
        body = struct.pack(">ib", -1, 0)  # all topics, no auto-creation
        if version >= 8:
            body += struct.pack(">bb", 0, 0)
        data = call(sock, 3, version, 2, body)
        (brokers,) = struct.unpack(">i", data[4:8])  # after throttle_time_ms
        sys.exit(0 if brokers >= 1 else 1)
except (OSError, ValueError, struct.error):
    sys.exit(1)
PY
}

port_open() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

cmd_status() {
    local pid=""
    [[ -f $PIDFILE ]] && pid=$(cat "$PIDFILE")
    if [[ -n $pid ]] && is_ours "$pid"; then
        if probe; then
            echo "kafka $VERSION running (pid $pid) on $HOST:$PORT"
        else
            echo "kafka $VERSION starting or unhealthy (pid $pid) on $HOST:$PORT"
        fi
        return 0
    fi
    if probe; then
        echo "kafka: a broker this checkout did not start answers on $HOST:$PORT"
        return 4
    fi
    echo "kafka stopped"
    return 3
}

wait_ready() {
    local pid=$1 deadline=$((SECONDS + START_TIMEOUT_S))
    until probe; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            log "broker exited during start; last lines of $LOG:"
            tail -n 40 "$LOG" >&2 || true
            die "kafka did not start"
        fi
        if ((SECONDS >= deadline)); then
            log "broker not ready after ${START_TIMEOUT_S}s; last lines of $LOG:"
            tail -n 40 "$LOG" >&2 || true
            die "kafka did not become ready (still running as pid $pid; '$0 stop' ends it)"
        fi
        sleep 0.5
    done
}

cmd_start() {
    local pid=""
    [[ -f $PIDFILE ]] && pid=$(cat "$PIDFILE")
    if [[ -n $pid ]] && is_ours "$pid"; then
        wait_ready "$pid"
        log "already running (pid $pid) on $HOST:$PORT"
        return 0
    fi
    rm -f "$PIDFILE"
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        port_open "$p" && die "port $HOST:$p is already in use by another process" \
            "(set MODELGATE_KAFKA_PORT / MODELGATE_KAFKA_CONTROLLER_PORT to move ours)"
    done

    cmd_install
    cmd_format
    write_props
    java_opts

    # One start per log file; keep the previous one for post-mortems.
    [[ -f $LOG ]] && mv -f "$LOG" "$LOG.1"
    log "starting Kafka $VERSION on $HOST:$PORT (controller $CONTROLLER_PORT), log $LOG"
    local started=$SECONDS
    # setsid: the broker must outlive this shell and ignore a Ctrl-C aimed at the
    # command that started it; whoever started it stops it with `stop`. The fd loop
    # closes descriptors inherited from callers (stack.sh holds its flock on one),
    # or the broker would keep that lock, or a caller's pipe, open for its lifetime.
    (
        cd "$KDIR"
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            ((fd > 2)) && eval "exec $fd>&-"
        done
        exec setsid java "${JAVA_OPTS[@]}" -cp "$LIBS/*" kafka.Kafka "$PROPS" \
            </dev/null >>"$LOG" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$PIDFILE"
    wait_ready "$pid"
    log "ready in $((SECONDS - started))s (pid $pid)"
}

cmd_stop() {
    local pid=""
    [[ -f $PIDFILE ]] && pid=$(cat "$PIDFILE")
    if [[ -z $pid ]] || ! is_ours "$pid"; then
        rm -f "$PIDFILE"
        log "not running"
        return 0
    fi
    log "stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # A single combined node shuts down in a few seconds; the bound covers a slow
    # log flush on a busy machine before falling back to SIGKILL.
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "still running after 60s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.3
    done
    rm -f "$PIDFILE"
    log "stopped"
}

case ${1:-} in
install) cmd_install ;;
installed) libs_current ;;
format) cmd_format "${2:-}" ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
probe) probe ;;
version) echo "$VERSION" ;;
ports) echo "client=$PORT controller=$CONTROLLER_PORT" ;;
*)
    echo "usage: $0 install|installed|format [--force]|start|stop|status|probe|version|ports" >&2
    exit 2
    ;;
esac
