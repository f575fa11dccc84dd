#!/usr/bin/env bash
# Fetch the Debian 12 kernel that `linux-image-amd64` points at and unpack it into a
# cache, for the QEMU guest test harness (src/metac/testing/guest.py, docs/testing-guest.md).
# The kernel is NOT installed on this host: no /boot, no /lib/modules, no initramfs
# hooks. The package is only downloaded (`apt-get download`) and unpacked
# (`dpkg-deb -x`), then `depmod -b` writes modules.dep and modules.alias, so that
# modprobe works inside the guest.
#
#   <cache>/<kernel release>/vmlinuz
#   <cache>/<kernel release>/lib/modules/<kernel release>/...
#   <cache>/current -> <kernel release>
#
# Idempotent and fast when done (one `apt-cache depends`, no download).
# Usage:  bash scripts/guest-kernel.sh           (as root)
# Env:    METAC_GUEST_KERNEL_CACHE   cache dir (default /var/cache/metac/guest-kernel)
set -euo pipefail

CACHE="${METAC_GUEST_KERNEL_CACHE:-/var/cache/metac/guest-kernel}"
META=linux-image-amd64

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { printf 'guest-kernel: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo bash $0"
for tool in apt-get apt-cache dpkg-deb depmod; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian 12 only; depmod is in package kmod)"
done

# The package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
wanted_pkg() {
    apt-cache depends "$META" 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1
}

PKG="$(wanted_pkg)"
if [ -z "$PKG" ]; then
    log "apt lists do not know $META yet; running apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
    PKG="$(wanted_pkg)"
fi

# Offline or a stale list: keep using what is already unpacked.
have_current() { [ -e "$CACHE/current/vmlinuz" ]; }

if [ -z "$PKG" ]; then
    have_current && { log "cannot resolve $META; keeping $(readlink "$CACHE/current")"; exit 0; }
    die "cannot resolve the kernel package of $META (apt-cache depends $META)"
fi
RELEASE="${PKG#linux-image-}"
DEST="$CACHE/$RELEASE"

if [ -e "$DEST/.complete" ]; then
    [ "$(readlink "$CACHE/current" 2>/dev/null)" = "$RELEASE" ] || ln -sfn "$RELEASE" "$CACHE/current"
    exit 0
fi

log "fetching $PKG for the QEMU guest (not installed on this host)"
mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.fetch-XXXXXX")"
trap 'rm -rf -- "$WORK"' EXIT
# apt-get download writes into the current directory; _apt must be able to write
# there, or apt warns and downloads unsandboxed.
chmod 0755 "$WORK"
if ! (cd "$WORK" && apt-get download -q "$PKG" >/dev/null 2>&1); then
    apt-get update -q >/dev/null 2>&1 || true
    if ! (cd "$WORK" && apt-get download -q "$PKG" >/dev/null); then
        have_current && { log "download of $PKG failed; keeping $(readlink "$CACHE/current")"; exit 0; }
        die "apt-get download $PKG failed"
    fi
fi
DEB="$(find "$WORK" -maxdepth 1 -name "${PKG}_*.deb" | head -n1)"
[ -n "$DEB" ] || die "apt-get download $PKG left no .deb"

mkdir -p "$WORK/x"
dpkg-deb -x "$DEB" "$WORK/x"
[ -f "$WORK/x/boot/vmlinuz-$RELEASE" ] || die "$DEB has no boot/vmlinuz-$RELEASE"
[ -d "$WORK/x/lib/modules/$RELEASE" ] || die "$DEB has no lib/modules/$RELEASE"
mkdir -p "$WORK/out/lib"
mv "$WORK/x/boot/vmlinuz-$RELEASE" "$WORK/out/vmlinuz"
mv "$WORK/x/boot/config-$RELEASE" "$WORK/out/config" 2>/dev/null || true
mv "$WORK/x/lib/modules" "$WORK/out/lib/modules"
depmod -b "$WORK/out" "$RELEASE" || die "depmod -b $WORK/out $RELEASE failed"
printf '%s\n' "$PKG $(dpkg-deb -f "$DEB" Version)" >"$WORK/out/.complete"

rm -rf -- "$DEST"
mv "$WORK/out" "$DEST"
ln -sfn "$RELEASE" "$CACHE/current"
# Older releases are of no use once current moved on (about 400 MB each).
for old in "$CACHE"/*/; do
    old="${old%/}"
    [ -L "$old" ] || [ "$(basename "$old")" = "$RELEASE" ] || rm -rf -- "$old"
done
log "done: $DEST (vmlinuz, lib/modules/$RELEASE)"
