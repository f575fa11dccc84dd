#!/usr/bin/env bash
# Install everything metac needs on Debian 12, idempotently:
#   1. the Debian packages listed in scripts/debian-packages.txt (apt-get update
#      and apt-get install run only when one of them is missing), as root;
#   2. a virtualenv at <repo>/.venv with `pip install -e '.[test]'` (skipped on a
#      re-run when pyproject.toml, the interpreter and the checkout path are unchanged);
#   3. as root: `metac` on PATH (a symlink /usr/local/bin/metac to the venv's script) and
#      its bash completion (/usr/share/bash-completion/completions/metac).
#
# Usage (from any directory):  bash scripts/install-deps.sh
# Env:  METAC_FORCE_PIP=1   re-run pip install even if nothing changed.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PKG_FILE="scripts/debian-packages.txt"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.metac-install-stamp"

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- Debian packages
[ -r "$PKG_FILE" ] || die "$REPO_ROOT/$PKG_FILE is missing"
mapfile -t PKGS < <(sed -e 's/#.*//' "$PKG_FILE" | tr -s ' \t' '\n\n' | sed '/^$/d')

is_installed() {
    local status
    status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" || return 1
    [[ "$status" == ii* ]]
}

command -v dpkg-query >/dev/null 2>&1 \
    || die "dpkg-query not found: this script supports Debian 12 only; install by hand: ${PKGS[*]}"

MISSING=()
for p in "${PKGS[@]}"; do
    is_installed "$p" || MISSING+=("$p")
done

if ((${#MISSING[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        die "missing Debian packages (${MISSING[*]}); run as root: sudo bash $REPO_ROOT/scripts/install-deps.sh  (or: sudo apt-get install ${MISSING[*]})"
    fi
    log "installing Debian packages: ${MISSING[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${MISSING[@]}" \
        || die "apt-get install failed for: ${MISSING[*]}"
    STILL=()
    for p in "${MISSING[@]}"; do is_installed "$p" || STILL+=("$p"); done
    ((${#STILL[@]} == 0)) || die "Debian packages still not installed: ${STILL[*]}"
fi

# The QEMU guest tests' kernel (scripts/guest-kernel.sh) is not fetched here: the
# node does not need it, and `make run` must work offline. The guest harness
# (metac.testing.guest.ensure_kernel) fetches it when a guest test first runs.

# ---------------------------------------------------------------- Python
py_ok() { # usable interpreter >= 3.11 with the venv module
    "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

pick_python() {
    local c
    if [ -x /usr/bin/python3 ] && py_ok /usr/bin/python3; then
        echo /usr/bin/python3; return 0
    fi
    for c in python3 python3.13 python3.12 python3.11; do
        c="$(command -v "$c" 2>/dev/null)" || continue
        if py_ok "$c"; then echo "$c"; return 0; fi
    done
    return 1
}

# Reuse an existing venv only if it works, is >= 3.11 and was made for this path
# (a venv copied along with the tree has scripts pointing at the old path).
if [ -e "$VENV" ]; then
    if ! py_ok "$VENV/bin/python"; then
        log "existing $VENV is broken or older than Python 3.11; recreating it"
        rm -rf -- "$VENV"
    elif [ -e "$STAMP" ] && ! grep -qxF "root=$REPO_ROOT" "$STAMP"; then
        log "existing $VENV was made for another checkout path; recreating it"
        rm -rf -- "$VENV"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    PY="$(pick_python)" || die "no python3 >= 3.11 with the venv module found; install it: apt-get install python3 python3-venv"
    log "creating virtualenv $VENV with $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
    "$PY" -m venv "$VENV" || die "'$PY -m venv $VENV' failed; install: apt-get install python3-venv"
fi

want_stamp="$(
    echo "root=$REPO_ROOT"
    echo "python=$("$VENV/bin/python" -c 'import sys; print(sys.version)' | head -n1)"
    echo "pyproject=$(sha256sum pyproject.toml | cut -d' ' -f1)"
)"

if [ "${METAC_FORCE_PIP:-0}" != 1 ] && [ -x "$VENV/bin/metac" ] \
    && [ "$(cat "$STAMP" 2>/dev/null)" = "$want_stamp" ]; then
    log "virtualenv up to date ($VENV)"
else
    log "pip install -e '.[test]' into $VENV"
    rm -f -- "$STAMP"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    "$VENV/bin/python" -m pip install -q -e '.[test]' \
        || die "pip install -e '.[test]' failed (see the errors above)"
    [ -x "$VENV/bin/metac" ] || die "pip install finished but $VENV/bin/metac is missing"
    printf '%s\n' "$want_stamp" >"$STAMP"
    log "done: $VENV/bin/metac"
fi

# ---------------------------------------------------------------- PATH and completion
LINK=/usr/local/bin/metac
COMPLETION=/usr/share/bash-completion/completions/metac
if [ "$(id -u)" -ne 0 ]; then
    log "not root: skipped $LINK and $COMPLETION; use $VENV/bin/metac"
    exit 0
fi
if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
    log "$LINK exists and is not a symlink: left alone (use $VENV/bin/metac)"
else
    [ "$(readlink "$LINK" 2>/dev/null)" = "$VENV/bin/metac" ] || log "$LINK -> $VENV/bin/metac"
    install -d /usr/local/bin
    ln -sfn "$VENV/bin/metac" "$LINK"
fi
install -d "$(dirname "$COMPLETION")"
"$VENV/bin/metac" completion bash >"$COMPLETION.tmp" \
    || die "'metac completion bash' failed"
mv -f "$COMPLETION.tmp" "$COMPLETION"
