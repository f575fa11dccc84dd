"""Run a command inside a QEMU guest that boots a stock Debian 12 kernel over this host's root.

Why: this host's kernel has no 9p and no NBD client, so the fs service's kernel
data paths (``mount -t 9p -o trans=fd``, ``NBD_SET_SOCK``/``NBD_DO_IT``) can
only run on another kernel. Debian's has both as modules.

How (see docs/testing-guest.md):

* ``scripts/guest-kernel.sh`` unpacks the kernel package that
  ``linux-image-amd64`` points at into ``/var/cache/metac/guest-kernel/<release>``
  (``vmlinuz`` and ``lib/modules``; not installed on the host).
* :func:`build_initramfs` makes (and caches next to the kernel) a gzip'd newc
  cpio holding a static busybox, the modules needed to reach the host root over
  virtio-9p, and an ``/init`` script.
* ``/init`` mounts the host root read-only over virtio-9p, puts an overlay with
  a tmpfs upper layer on top (so ``/lib/modules/<release>`` can be bound in and
  stray writes land in RAM), fresh tmpfs on ``/tmp``, ``/run``, ``/var/tmp``
  and ``/root`` (except the job's own directory, kept as the overlay shows it: a
  checkout may live in /tmp), and switches root into it. A second small script then
  runs the job the host wrote into a read-write "io" share, records its exit
  status and powers the guest off.
* QEMU runs with TCG (``-accel tcg,thread=multi``: this host's ``/dev/kvm`` is
  a variant stock kernels do not boot on) and no network device at all.

Everything the host side makes (the io directory, the QEMU process) is removed
or killed by PID when :func:`run_in_guest` returns, also on a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from metac.core.supervisor import die_with_parent
from metac.vm import initrd as _initrd
from metac.vm.initrd import Cpio as _Cpio

__all__ = [
    "GuestError",
    "GuestKernel",
    "GuestResult",
    "GuestUnavailable",
    "build_initramfs",
    "ensure_kernel",
    "find_kernel",
    "run_in_guest",
]

KERNEL_CACHE_ENV = "METAC_GUEST_KERNEL_CACHE"
DEFAULT_KERNEL_CACHE = "/var/cache/metac/guest-kernel"
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
EXIT_MARKER = "METAC-GUEST-EXIT="
START_MARKER = "METAC-GUEST-START"
#: Where the job sees the io share; files it writes to ``$METAC_GUEST_OUT`` come back.
GUEST_IO = "/run/metac-guest/io"
GUEST_OUT = f"{GUEST_IO}/out"
#: The largest msize the 6.1 virtio transport takes ((128 - 3) pages).
VIRTIO_MSIZE = 512000
#: Modules /init loads before it can mount the host root (with their deps).
INIT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class GuestUnavailable(RuntimeError):
    """QEMU, the unpacked kernel or a static busybox is missing (the message says what to run)."""


class GuestError(RuntimeError):
    """The guest did not run the job to its end (boot failure, panic, timeout)."""

    def __init__(self, message: str, console: str = "", output: str = "") -> None:
        tail = "\n".join(console.splitlines()[-40:])
        out_tail = "\n".join(output.splitlines()[-40:])
        super().__init__(f"{message}\n--- console tail ---\n{tail}\n--- output tail ---\n{out_tail}")
        self.console = console
        self.output = output


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked Debian kernel: ``<dir>/vmlinuz`` and ``<dir>/lib/modules/<release>``."""

    dir: Path
    release: str

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def modules_dir(self) -> Path:
        return self.dir / "lib" / "modules" / self.release


@dataclass
class GuestResult:
    """What one guest run gave: the job's exit status and output, and timings."""

    returncode: int
    output: str  # the job's stdout and stderr
    console: str  # the serial console: kernel, /init and the markers
    files: dict[str, bytes] = field(default_factory=dict)  # from $METAC_GUEST_OUT
    boot_seconds: float = 0.0  # QEMU start until the job started
    run_seconds: float = 0.0  # the job itself


# --------------------------------------------------------------------------- kernel, modules


#: The script that fetches and unpacks the guest kernel (in a source checkout).
GUEST_KERNEL_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "guest-kernel.sh"


def ensure_kernel(cache: str | os.PathLike[str] | None = None) -> GuestKernel:
    """The unpacked guest kernel, fetched with ``scripts/guest-kernel.sh`` when first needed.

    Only the guest tests need this kernel, so the set-up (and ``make run``) never
    downloads it; the first guest run does, as root, from a source checkout."""
    try:
        return find_kernel(cache)
    except GuestUnavailable:
        if os.geteuid() != 0 or not GUEST_KERNEL_SCRIPT.is_file():
            raise
    env = dict(os.environ)
    if cache:
        env[KERNEL_CACHE_ENV] = os.fspath(cache)
    proc = subprocess.run(["bash", str(GUEST_KERNEL_SCRIPT)], env=env, check=False,
                          stdin=subprocess.DEVNULL, timeout=1800)
    if proc.returncode != 0:
        raise GuestUnavailable(f"{GUEST_KERNEL_SCRIPT} failed with exit status {proc.returncode}")
    return find_kernel(cache)


def find_kernel(cache: str | os.PathLike[str] | None = None) -> GuestKernel:
    """The kernel ``scripts/guest-kernel.sh`` unpacked (``<cache>/current``)."""
    root = Path(cache or os.environ.get(KERNEL_CACHE_ENV) or DEFAULT_KERNEL_CACHE)
    current = root / "current"
    try:
        kdir = current.resolve(strict=True)
    except OSError:
        kdir = None
    if kdir is None or not (kdir / "vmlinuz").is_file() or not (kdir / ".complete").exists():
        raise GuestUnavailable(
            f"no guest kernel in {current}; run as root: bash scripts/guest-kernel.sh "
            "(the guest tests run it when first needed)")
    kernel = GuestKernel(kdir, kdir.name)
    if not (kernel.modules_dir / "modules.dep").is_file():
        raise GuestUnavailable(f"{kernel.modules_dir}/modules.dep is missing; "
                               "run: bash scripts/guest-kernel.sh")
    return kernel


def find_qemu() -> str:
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise GuestUnavailable(f"{QEMU} not found; install the Debian package qemu-system-x86 "
                               "(bash scripts/install-deps.sh)")
    return qemu


def module_closure(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``names`` and their deps, deps first
    (``metac.vm.initrd.module_closure``); a module the tree lacks is GuestUnavailable."""
    try:
        return _initrd.module_closure(modules_dir, names)
    except KeyError as exc:
        raise GuestUnavailable(f"module {exc.args[0]} is not in {modules_dir}/modules.dep") \
            from None


def _is_static_elf(path: str) -> bool:
    """True if ``path`` is an ELF executable without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


# --------------------------------------------------------------------------- initramfs

# /init, run by the kernel from the initramfs (busybox sh). $1.. are unused; the
# host's path of the unpacked kernel comes as metac.kdir= on the command line.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

fail() {
    echo "metac-guest init: $*"
    echo "METAC-GUEST-EXIT=init-failed"
    echo o >/proc/sysrq-trigger
    sleep 30
}

kdir=
cwd=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        metac.kdir=*) kdir="${arg#metac.kdir=}" ;;
        metac.cwd=*) cwd="${arg#metac.cwd=}" ;;
    esac
done
release="$(uname -r)"

while read -r ko; do
    insmod "/modules/$ko" || fail "insmod $ko"
done </modules/load-order

mkdir -p /host /upper
ok=
for i in 1 2 3 4 5 6 7 8 9 10; do
    if mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=@MSIZE@ \
            hostroot /host 2>/dev/null; then ok=1; break; fi
    sleep 0.5
done
[ -n "$ok" ] || fail "cannot mount the host root (virtio-9p tag hostroot)"
# The host root stays read-only: writes land in a tmpfs upper layer.
mount -t tmpfs -o mode=0755 upper /upper || fail "tmpfs /upper"
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w guestroot /newroot \
    || fail "overlay root"
# The job's directory (metac.cwd=) may live under a directory that gets a fresh tmpfs
# below (a CI clone in /tmp, say): keep its overlay view aside and put it back after.
kept=
if [ -n "$cwd" ] && [ -d "/newroot$cwd" ]; then
    case "$cwd" in /tmp/*|/var/tmp/*|/run/*|/root/*)
        mkdir -p /kept && mount --bind "/newroot$cwd" /kept && kept=1 ;;
    esac
fi
# Fresh tmpfs where tests make sockets, mounts and scratch files, not the overlay: a
# 9p export of a directory on the overlay failed (ENOTDIR through the mount).
for d in tmp var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d" || fail "tmpfs /$d"
done
for d in run root; do
    mount -t tmpfs -o mode=0755 tmpfs "/newroot/$d" || fail "tmpfs /$d"
done
chmod 0700 /newroot/root
if [ -n "$kept" ]; then
    mkdir -p "/newroot$cwd" && mount --move /kept "/newroot$cwd" || fail "keep $cwd"
fi

# modprobe (and the kernel's request_module) look in /lib/modules/$(uname -r).
if [ -n "$kdir" ] && [ -d "/newroot$kdir/lib/modules/$release" ]; then
    mkdir -p "/newroot/lib/modules/$release"
    mount -o bind,ro "/newroot$kdir/lib/modules/$release" "/newroot/lib/modules/$release" \
        || fail "bind /lib/modules/$release"
else
    echo "metac-guest init: no modules at $kdir/lib/modules/$release: modprobe will not work"
fi
# Nodes whose first open loads their module (/dev/fuse, /dev/loop-control, ...), as
# systemd's kmod-static-nodes makes them: devtmpfs has them only once it is loaded.
devname="/newroot/lib/modules/$release/modules.devname"
[ -f "$devname" ] && grep -v '^#' "$devname" | while read -r _ node spec; do
    kind="${spec%"${spec#?}"}"; nums="${spec#?}"
    mkdir -p "$(dirname "/dev/$node")"
    [ -e "/dev/$node" ] || mknod -m 0600 "/dev/$node" "$kind" "${nums%:*}" "${nums#*:}"
done

mkdir -p /newroot/run/metac-guest/io
cp /stage2.sh /newroot/run/metac-guest/stage2.sh
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=@MSIZE@ metacio \
    /newroot/run/metac-guest/io || fail "cannot mount the io share (tag metacio)"

mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o mode=0620,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount --move /sys /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount --move /proc /newroot/proc
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
hostname metac-guest
exec switch_root /newroot /bin/sh /run/metac-guest/stage2.sh
fail "switch_root failed"
"""

# After switch_root: PID 1 is the host's /bin/sh. It runs the job, records the
# status in the io share and on the console, and powers off (the host's static
# /bin/busybox, a dependency anyway). While it waits for the job it also reaps
# orphans (dash waits for any child).
STAGE2_SCRIPT = r"""#!/bin/sh
io=/run/metac-guest/io
mkdir -p "$io/out"
echo "METAC-GUEST-START" >/dev/console
/bin/sh "$io/job.sh" </dev/null >"$io/output.log" 2>&1
rc=$?
echo "$rc" >"$io/status"
sync
echo "METAC-GUEST-EXIT=$rc" >/dev/console
# reboot(2) at once; PID 1 must not exit (that would be a kernel panic).
/bin/busybox poweroff -f
echo o >/proc/sysrq-trigger
while :; do /bin/busybox sleep 60; done
"""


def _init_script() -> str:
    return INIT_SCRIPT.replace("@MSIZE@", str(VIRTIO_MSIZE))


def build_initramfs(kernel: GuestKernel, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The initramfs for ``kernel`` (built once; cached by release and content hash).

    Cached in ``cache_dir`` (default: the kernel's own directory, so a new
    kernel release drops the old ones with it)."""
    if not os.path.exists(BUSYBOX):
        raise GuestUnavailable(f"{BUSYBOX} not found; install the Debian package busybox-static")
    if not _is_static_elf(BUSYBOX):
        raise GuestUnavailable(f"{BUSYBOX} is not statically linked; install the Debian "
                               "package busybox-static")
    modules = module_closure(kernel.modules_dir, INIT_MODULES)
    busybox = Path(BUSYBOX).read_bytes()
    init, stage2 = _init_script(), STAGE2_SCRIPT
    h = hashlib.sha256()
    for part in (kernel.release, init, stage2, "\n".join(modules)):
        h.update(part.encode() + b"\0")
    h.update(busybox)
    target_dir = Path(cache_dir) if cache_dir is not None else kernel.dir
    if cache_dir is None and not os.access(target_dir, os.W_OK):  # not root: QEMU needs none
        target_dir = Path(tempfile.gettempdir()) / f"metac-guest-initramfs-{os.getuid()}"
    target = target_dir / f"initramfs-{kernel.release}-{h.hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target

    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)  # the kernel opens it for /init before devtmpfs
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", init.encode(), 0o755)
    cpio.file("stage2.sh", stage2.encode(), 0o755)
    for rel in modules:
        cpio.file(f"modules/{os.path.basename(rel)}", (kernel.modules_dir / rel).read_bytes())
    cpio.file("modules/load-order",
              "".join(os.path.basename(rel) + "\n" for rel in modules).encode())
    data = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)

    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    for old in target_dir.glob("initramfs-*.cpio.gz"):  # stale init scripts
        if old != target:
            with contextlib.suppress(OSError):
                old.unlink()
    return target


# --------------------------------------------------------------------------- running


def job_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The job as a shell script (the io share carries it into the guest)."""
    bad = [k for k in env if not k.isidentifier()]
    if bad:
        raise ValueError(f"not environment variable names: {bad}")
    lines = ["#!/bin/sh", f"cd {shlex.quote(cwd)} || exit 127"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def qemu_argv(qemu: str, kernel: GuestKernel, initramfs: Path, io_dir: str, *,
              memory_mib: int, cpus: int, cwd: str = "/") -> list[str]:
    if any(c.isspace() for c in cwd):  # the kernel command line splits at white space
        raise GuestError(f"the guest job's directory may not contain white space: {cwd!r}")
    append = " ".join([
        "console=ttyS0", "panic=-1", "quiet", "loglevel=4", "rdinit=/init",
        "random.trust_cpu=on", "8250.nr_uarts=1", f"metac.kdir={kernel.dir}",
        f"metac.cwd={os.path.abspath(cwd)}",
    ])
    return [
        qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus),
        "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs), "-append", append,
        # The host root, read-only: the guest's lower layer.
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        # The io share: the job in, its output, status and files out.
        "-virtfs", f"local,path={io_dir},mount_tag=metacio,security_model=none,"
                   "multidevs=remap",
    ]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the QEMU process (by its PID) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def run_in_guest(argv: Sequence[str], *, cwd: str = "/", env: Mapping[str, str] | None = None,
                 timeout: float = 600.0, memory_mib: int = 3072, cpus: int = 2,
                 echo: TextIO | None = None) -> GuestResult:
    """Boot the guest, run ``argv`` there as root in ``cwd``, power off; the job's result.

    ``env`` adds to a small default environment (PATH, HOME=/root, LANG,
    PYTHONDONTWRITEBYTECODE=1, METAC_GUEST_OUT). Files the job writes into
    ``$METAC_GUEST_OUT`` come back in ``GuestResult.files``. ``echo`` gets the
    console and the job's output as they arrive (for runs by hand).
    Raises GuestUnavailable if QEMU or the kernel is missing, GuestError if the
    job did not run to its end within ``timeout`` seconds (QEMU is killed)."""
    qemu = find_qemu()
    kernel = ensure_kernel()
    initramfs = build_initramfs(kernel)
    full_env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
                "PYTHONDONTWRITEBYTECODE": "1", "METAC_GUEST_OUT": GUEST_OUT, **(env or {})}
    io_dir = tempfile.mkdtemp(prefix="metac-guest-io-")
    try:
        os.chmod(io_dir, 0o755)
        with open(os.path.join(io_dir, "job.sh"), "w") as f:
            f.write(job_script(argv, cwd, full_env))
        return _boot(qemu_argv(qemu, kernel, initramfs, io_dir, memory_mib=memory_mib,
                               cpus=cpus, cwd=cwd), io_dir, timeout, echo)
    finally:
        shutil.rmtree(io_dir, ignore_errors=True)


def _boot(argv: list[str], io_dir: str, timeout: float, echo: TextIO | None) -> GuestResult:
    console: list[str] = []
    started: list[float] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)  # a killed test run takes QEMU along

    def read_console() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "")
            console.append(line)
            if START_MARKER in line and not started:
                started.append(time.monotonic())
            if echo is not None:
                echo.write(line)
                echo.flush()

    reader = threading.Thread(target=read_console, name="guest-console", daemon=True)
    reader.start()
    output_path = os.path.join(io_dir, "output.log")
    echoed = 0
    try:
        deadline = t0 + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                _kill(proc)
                reader.join(5)
                raise GuestError(f"the guest did not finish within {timeout:g} s (killed)",
                                 "".join(console), _read_text(output_path))
            if echo is not None:  # the job's output as it grows
                text = _read_text(output_path)
                if len(text) > echoed:
                    echo.write(text[echoed:])
                    echo.flush()
                    echoed = len(text)
            time.sleep(0.5)
        reader.join(10)
    finally:
        _kill(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    t_end = time.monotonic()
    text = "".join(console)
    output = _read_text(output_path)
    if echo is not None and len(output) > echoed:
        echo.write(output[echoed:])
    status = _read_text(os.path.join(io_dir, "status")).strip()
    if not status.lstrip("-").isdigit():
        raise GuestError(f"the guest stopped (QEMU exit {proc.returncode}) without the job's "
                         "exit status", text, output)
    files: dict[str, bytes] = {}
    out_dir = os.path.join(io_dir, "out")
    for dirpath, _, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            # O_NOFOLLOW: a symlink the guest left must not read a host file.
            with contextlib.suppress(OSError), open(
                    os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                files[os.path.relpath(path, out_dir)] = f.read()
    boot = (started[0] if started else t_end) - t0
    return GuestResult(int(status), output, text, files, boot_seconds=boot,
                       run_seconds=t_end - (started[0] if started else t0))


def main(args: Sequence[str] | None = None) -> int:
    """``python -m metac.testing.guest [--cwd DIR] [--timeout S] -- CMD...`` (as root)."""
    parser = argparse.ArgumentParser(prog="python -m metac.testing.guest",
                                     description="Run CMD in a QEMU guest booting the "
                                                 "Debian kernel over this host's root.")
    parser.add_argument("--cwd", default=os.getcwd())
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--memory", type=int, default=3072, help="MiB")
    parser.add_argument("--quiet", action="store_true", help="do not echo the console")
    parser.add_argument("command", nargs="+")
    ns = parser.parse_args(args)
    try:
        result = run_in_guest(ns.command, cwd=ns.cwd, timeout=ns.timeout, memory_mib=ns.memory,
                              echo=None if ns.quiet else sys.stdout)
    except (GuestUnavailable, GuestError) as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 125
    if ns.quiet:
        sys.stdout.write(result.output)
    print(f"guest: exit {result.returncode}; boot {result.boot_seconds:.1f} s, "
          f"job {result.run_seconds:.1f} s", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
