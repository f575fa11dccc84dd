#!/usr/bin/env bash
# Check that the README's two set-up commands work on a really fresh Debian 12:
#   1. debootstrap a minimal Debian 12 root (--variant=minbase bookworm) in a new directory;
#   2. git clone this checkout (its committed HEAD: what a new user gets) into it;
#   3. enter the root with bubblewrap, so / is a mount as on a real machine, and run the
#      README's set-up and test command there ("bash scripts/install-deps.sh && make test",
#      read from README.md, so the check and the docs cannot drift apart).
#
# Usage (as root, from any directory):
#   bash scripts/fresh-check.sh [--root DIR] [--keep] [--mirror URL] [--cache DIR]
#                               [--setup-only] [--host-ca] [-- PYTEST_ARGS...]
#
#   --root DIR     where to build the root (default: a new /var/tmp/metac-fresh.XXXXXX);
#                  a DIR that already holds a finished debootstrap is reused as is
#   --keep         keep the root afterwards (default: deleted, unless --root was given)
#   --mirror URL   Debian mirror (default: http://deb.debian.org/debian)
#   --cache DIR    keep downloaded .debs here between runs (debootstrap's --cache-dir)
#   --setup-only   run only the set-up command (bash scripts/install-deps.sh), then check
#                  that `metac --version` works; skip the test suite
#   --host-ca      trust this host's CA bundle inside the root (pip, curl, Python): for a
#                  network whose HTTPS goes through a TLS-inspecting proxy with its own CA
#   PYTEST_ARGS    passed to `make test` as PYTEST_ARGS (e.g. -- -x tests/unit)
#
# Needs: root, debootstrap, bubblewrap, git, network access to the mirror and to PyPI.
# The whole suite takes a long time (the root starts with nothing installed).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
ROOT=""
KEEP=0
CACHE=""
SETUP_ONLY=0
HOST_CA=0
PYTEST_ARGS=()

log() { printf 'fresh-check: %s\n' "$*" >&2; }
die() { printf 'fresh-check: error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
    case "$1" in
        --root) ROOT="$2"; KEEP=1; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --mirror) MIRROR="$2"; shift 2 ;;
        --cache) CACHE="$2"; shift 2 ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        --host-ca) HOST_CA=1; shift ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and the tests need it)"
for tool in debootstrap:debootstrap bwrap:bubblewrap git:git; do
    command -v "${tool%%:*}" >/dev/null 2>&1 \
        || die "${tool%%:*} not found; install the Debian package '${tool##*:}'"
done

# The README's commands, exactly as documented (indented code lines of its Set-up section).
SETUP_CMD="$(grep -m1 -E '^    bash scripts/install-deps\.sh && make run' "$REPO_ROOT/README.md" \
    | sed 's/^ *//; s/ && make run.*//')"
TEST_CMD="$(grep -m1 -E '^    bash scripts/install-deps\.sh && make test' "$REPO_ROOT/README.md" \
    | sed 's/^ *//')"
[ -n "$SETUP_CMD" ] && [ -n "$TEST_CMD" ] \
    || die "README.md no longer shows the set-up commands this script runs; update both"

if [ -z "$ROOT" ]; then
    ROOT="$(mktemp -d /var/tmp/metac-fresh.XXXXXX)"
fi
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"

cleanup() {
    local rc=$?
    if [ "$KEEP" -eq 0 ]; then
        log "removing $ROOT (use --keep to look at it)"
        rm -rf --one-file-system -- "$ROOT"
    else
        log "the root is kept at $ROOT"
    fi
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1. a fresh Debian 12
if [ -e "$ROOT/.metac-fresh-bootstrapped" ]; then
    log "reusing the Debian root in $ROOT"
else
    log "debootstrap --variant=minbase $SUITE into $ROOT (mirror $MIRROR)"
    extra=()
    if [ -n "$CACHE" ]; then
        mkdir -p "$CACHE"
        extra+=(--cache-dir "$(cd "$CACHE" && pwd)")
    fi
    debootstrap --variant=minbase "${extra[@]}" "$SUITE" "$ROOT" "$MIRROR" \
        || die "debootstrap failed (is $MIRROR reachable?)"
    touch "$ROOT/.metac-fresh-bootstrapped"
fi
# apt inside the root resolves names like this host does.
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
CA_ENV=()
if [ "$HOST_CA" -eq 1 ]; then
    bundle=/etc/ssl/certs/ca-certificates.crt
    [ -r "$bundle" ] || die "--host-ca: $bundle not found on this host"
    install -d "$ROOT/etc/ssl"
    cp -L "$bundle" "$ROOT/etc/ssl/host-ca-bundle.crt"
    for var in PIP_CERT SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE; do
        CA_ENV+=("$var=/etc/ssl/host-ca-bundle.crt")
    done
fi

# ---------------------------------------------------------------- 2. a fresh clone
CLONE=/root/metac
rm -rf --one-file-system -- "${ROOT:?}$CLONE"
log "git clone $REPO_ROOT ($(git -C "$REPO_ROOT" rev-parse --short HEAD)) into $ROOT$CLONE"
git clone -q --no-hardlinks "$REPO_ROOT" "$ROOT$CLONE"
if [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]; then
    log "note: uncommitted changes in $REPO_ROOT are not part of the check (a clone has HEAD)"
fi

# ---------------------------------------------------------------- 3. the README's commands
if [ "$SETUP_ONLY" -eq 1 ]; then
    inner="$SETUP_CMD && metac --version && metac help fs mount >/dev/null"
    inner+=" && test -s /usr/share/bash-completion/completions/metac"
    inner+=" && echo 'fresh-check: set-up OK (metac on PATH, help, completion installed)'"
else
    inner="$TEST_CMD"
    if ((${#PYTEST_ARGS[@]})); then
        # Each argument shell-quoted, as make's recipe splits PYTEST_ARGS with the shell.
        inner+=" PYTEST_ARGS=$(printf '%q' "$(printf '%q ' "${PYTEST_ARGS[@]}")")"
    fi
fi
log "in the fresh root: $inner"
# As the issue describes a "fresh machine": / is a bind mount, own /run and /tmp, the
# host's /dev and /sys, a new PID namespace, every capability; a clean environment.
bwrap --bind "$ROOT" / --dev-bind /dev /dev --proc /proc --bind /sys /sys \
    --tmpfs /run --tmpfs /tmp --cap-add ALL --unshare-pid --die-with-parent \
    --chdir "$CLONE" \
    env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${CA_ENV[@]}" \
    bash -c "$inner"
log "passed: $inner"
