#!/usr/bin/env bash
# Python environment for modelgate: .venv from requirements.lock, exactly.
#
#   infra/bootstrap.sh          create/sync .venv (skipped in well under a second
#                               when nothing changed since the last sync)
#   infra/bootstrap.sh lock     regenerate requirements.lock from pyproject.toml
#
# uv does the installing (uv pip sync: hash-checked, removes strays, seconds
# instead of minutes). uv itself lives in its own venv, var/tools, pinned below, so
# the project venv holds only what the lock names plus modelgate itself.
#
# Environment (optional): PYTHON, the interpreter for new venvs (default python3.11).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3.11}
UV_VERSION=0.13.8
VENV=$ROOT/.venv
TOOLS=$ROOT/var/tools
UV=$TOOLS/bin/uv
LOCK=$ROOT/requirements.lock
# Kept inside the venv so deleting .venv also forgets the stamp.
STAMP=$VENV/.modelgate-sync

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() {
    printf '[bootstrap] error: %s\n' "$*" >&2
    exit 1
}

# What the venv was synced from: the lock (dependencies), pyproject.toml (the
# editable install's entry points and packages), the uv pin and this script.
wanted_stamp() {
    cat "$LOCK" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-32
}

ensure_uv() {
    if [[ -x $UV ]] && [[ "$("$UV" --version 2>/dev/null)" == "uv $UV_VERSION"* ]]; then
        return 0
    fi
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11"
    log "installing uv $UV_VERSION into $TOOLS"
    rm -rf "$TOOLS"
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check \
        "uv==$UV_VERSION" </dev/null || die "pip could not install uv==$UV_VERSION"
}

cmd_sync() {
    [[ -f $LOCK ]] || die "$LOCK missing; run 'make lock'"
    # Fast path, checked before any lock or interpreter start: this is what makes
    # the second `make test` start at once.
    local want
    want=$(wanted_stamp)
    if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi

    # Two `make` runs at once would both sync the same venv.
    mkdir -p "$ROOT/var"
    exec {lock_fd}>"$ROOT/var/bootstrap.lock"
    flock -w 900 "$lock_fd" || die "timed out waiting for another bootstrap"
    if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi

    local started=$SECONDS
    ensure_uv
    if [[ -x $VENV/bin/python ]]; then
        local version
        version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        [[ $version == 3.11 ]] ||
            die ".venv runs Python $version, not 3.11; remove .venv and run again"
    else
        command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11"
        log "creating .venv with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi

    log "syncing .venv with requirements.lock"
    # --require-hashes: every artifact must match a hash in the lock.
    "$UV" pip sync --quiet --python "$VENV/bin/python" --require-hashes "$LOCK" \
        </dev/null || die "uv pip sync failed"
    # Dependencies come from the lock only; --no-deps keeps the resolver out.
    log "installing modelgate (editable)"
    "$UV" pip install --quiet --python "$VENV/bin/python" --no-deps -e "$ROOT" \
        </dev/null || die "editable install of modelgate failed"
    echo "$want" >"$STAMP"
    log "environment ready in $((SECONDS - started))s"
}

cmd_lock() {
    ensure_uv
    log "regenerating requirements.lock from pyproject.toml"
    # The same command that produced the committed lock (see its header).
    "$UV" pip compile pyproject.toml --extra dev --python-version 3.11 \
        --generate-hashes -o requirements.lock </dev/null
}

case ${1:-sync} in
sync) cmd_sync ;;
lock) cmd_lock ;;
*)
    echo "usage: $0 [sync|lock]" >&2
    exit 2
    ;;
esac
