#!/usr/bin/env python3
"""VM benchmark: what metac adds to a QEMU boot and to a guest's disk, next to plain QEMU.

A benchmark, not a test (needs root, QEMU, a static busybox and a kernel with its
modules). It starts one node on loopback (127.0.0.1, a free high port, temporary
state and runtime dirs), builds a small initrd (busybox, virtio/ext4 modules) and
times, in the same run:

  (a) boot: ``metac vm launch --wait-for MARKER`` (kernel and initrd as ``local:``
      files read through the fs service, serial port 0 a new stream) from the
      command's start until the guest's first line arrived, vs
  (b) the same ``qemu-system-x86_64`` command run directly (kernel and initrd as
      paths, serial on stdout), from its start until the same line;
  (c) disk: inside the guest, ``dd`` reads and then writes SIZE MiB of ``/dev/vda``
      ROUNDS times, with O_DIRECT in 4 MiB blocks (timed by the guest's clock): through
      metac (``--drive local:IMAGE``: QEMU's NBD client on the block device's NBD
      stream, served by nbdkit) vs the same image as a plain local file drive of QEMU, in
      its default cache mode (writeback: like nbdkit, it reads through the host's page
      cache) and with ``cache=none`` (O_DIRECT on the host: a guest's reads that miss the
      page cache, the case of an image not recently read). The three are interleaved,
      SAMPLES runs each; medians with min-max.

The figures are the ratios (metac / direct); under TCG the absolute numbers are
slow. Goals: boot <= 1.1x, disk throughput >= 0.8x (against the writeback row). It prints a table and writes
JSON to ``bench/results/vm.json``. Every process it starts is stopped by PID, and
the temporary directory is removed, also when a measurement fails.

Usage: python bench/bench_vm.py [--quick] [--samples N] [--size MiB]
                                [--kernel VMLINUZ --modules-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("metac") is None:  # a checkout without the package installed
    sys.path.insert(0, str(REPO / "src"))

from _support import (  # noqa: E402
    child_env,
    die_with_parent,
    free_port,
    percentile,
    stop_pid,
    wait_ready_line,
    write_json,
)

from metac.vm.accel import find_qemu  # noqa: E402
from metac.vm.initrd import build_initrd, module_closure, read_module  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "vm.json"
MARKER = "BENCH-BOOTED"
CMDLINE = "console=ttyS0 panic=-1 quiet rdinit=/init"
MODULES = ("virtio_pci", "virtio_blk")
MEMORY = 256
ROUNDS = 8  # the disk is read and written this many times (the guest's clock has 10 ms)

# First line as early as possible; then, with a disk, dd read and write timed by the
# guest's clock (/proc/uptime, 10 ms), then power off.
GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
echo BENCH-BOOTED >/dev/ttyS0
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /modules/load-order); do insmod "/modules/$m"; done
size=$(sed -n 's/.*bench.size=\([0-9]*\).*/\1/p' /proc/cmdline)
rounds=$(sed -n 's/.*bench.rounds=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$size" ]; then
    for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
    t0=$(cut -d' ' -f1 /proc/uptime)
    for r in $(seq "$rounds"); do
        dd if=/dev/vda of=/dev/null bs=4M count="$((size / 4))" iflag=direct 2>/dev/null
    done
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "BENCH-READ $t0 $t1" >/dev/ttyS0
    t0=$(cut -d' ' -f1 /proc/uptime)
    for r in $(seq "$rounds"); do
        dd if=/dev/zero of=/dev/vda bs=4M count="$((size / 4))" oflag=direct conv=fsync \
            2>/dev/null
    done
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "BENCH-WRITE $t0 $t1" >/dev/ttyS0
fi
echo BENCH-DONE >/dev/ttyS0
poweroff -f
"""


class Node:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.state = root / "state"
        self.run_dir = root / "run"
        self.log = root / "node.log"
        self.env = child_env({"METAC_RUNTIME_DIR": str(self.run_dir)})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "metac", "node", "run", "--address", "127.0.0.1",
                "--port", str(self.port), "--state-dir", str(self.state),
                "--runtime-dir", str(self.run_dir)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env, preexec_fn=die_with_parent)
        wait_ready_line(self.log, self.proc)

    def metac(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run([sys.executable, "-m", "metac", *args], env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"metac {args[0]} {args[1]} failed: {proc.stderr[-500:]}")
        return proc.stdout

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


def direct_argv(qemu: str, accel: str, kernel: Path, initrd: Path, cmdline: str,
                drive: Path | None = None, cache: str | None = None) -> list[str]:
    """The command the vm service runs, with paths for the kernel, initrd and disk."""
    argv = [qemu, "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
            "-cpu", "host" if accel == "kvm" else "max", "-smp", "1", "-m", str(MEMORY),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-monitor", "none", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", cmdline, "-serial", "stdio"]
    if drive is not None:
        argv += ["-drive", f"file={drive},format=raw,if=virtio"
                           + (f",cache={cache}" if cache else "")]
    return argv


def run_direct(argv: list[str], until: str, timeout: float = 600) -> tuple[float, str]:
    """Start QEMU, read its serial output until ``until``; (seconds, output). Killed after."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    out = b""
    try:
        assert proc.stdout is not None
        deadline = t0 + timeout
        while until.encode() not in out:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not print {until}: {out[-500:]!r}")
            out += chunk
        return time.monotonic() - t0, out.decode(errors="replace")
    finally:
        stop_pid(proc, 5)
        if proc.stdout is not None:
            proc.stdout.close()


def boot_metac(node: Node, kernel: Path, initrd: Path) -> float:
    t0 = time.monotonic()
    ref = node.metac("vm", "launch", "-m", str(MEMORY), "--kernel", f"local:{kernel}",
                     "--initrd", f"local:{initrd}", "--cmdline", CMDLINE,
                     "--wait-for", MARKER).strip()
    took = time.monotonic() - t0
    with contextlib.suppress(RuntimeError):
        node.metac("vm", "destroy", ref)
    return took


def disk_metac(node: Node, kernel: Path, initrd: Path, image: Path, size: int) -> str:
    """The guest's serial output, disk through metac (launch --console until power-off)."""
    return node.metac("vm", "launch", "-m", str(MEMORY), "--kernel", f"local:{kernel}",
                      "--initrd", f"local:{initrd}", "--cmdline",
                      f"{CMDLINE} bench.size={size} bench.rounds={ROUNDS}",
                      "--drive", f"local:{image}",
                      "--console")


def throughput(output: str, what: str, size: int) -> float:
    """MiB/s from the guest's ``BENCH-<what> t0 t1`` line."""
    m = re.search(rf"BENCH-{what} ([0-9.]+) ([0-9.]+)", output)
    if m is None:
        raise RuntimeError(f"no BENCH-{what} line in the guest's output: {output[-500:]}")
    seconds = max(0.01, float(m.group(2)) - float(m.group(1)))
    return size * ROUNDS / seconds


def summary(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    return {"n": len(s), "p50": round(percentile(s, 50), 3), "min": round(s[0], 3),
            "max": round(s[-1], 3), "mean": round(sum(s) / len(s), 3)}


def find_kernel_files(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.kernel:
        return Path(args.kernel), Path(args.modules_dir)
    release = os.uname().release
    for kernel, modules in (
            (Path(f"/boot/vmlinuz-{release}"), Path(f"/lib/modules/{release}")),
            (Path("/var/cache/metac/guest-kernel/current/vmlinuz"), None)):
        if modules is None and kernel.exists():
            kdir = kernel.resolve().parent
            modules = kdir / "lib" / "modules" / kdir.name
        if kernel.exists() and modules is not None and (modules / "modules.dep").exists():
            return kernel, modules
    raise SystemExit("no kernel with modules found: give --kernel and --modules-dir")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one sample each, 32 MiB")
    parser.add_argument("--samples", type=int, default=3, help="boots per side (default 3)")
    parser.add_argument("--size", type=int, default=128,
                        help="MiB read and written (a multiple of 4)")
    parser.add_argument("--kernel", help="a vmlinuz (default: this host's, else the guest "
                                         "harness cache)")
    parser.add_argument("--modules-dir", help="its lib/modules/RELEASE")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    samples = 1 if args.quick else args.samples
    size = 32 if args.quick else args.size
    qemu = find_qemu()
    if qemu is None:
        raise SystemExit("qemu-system-x86_64 not found (Debian package qemu-system-x86)")
    kernel, modules_dir = find_kernel_files(args)

    tmp = Path(tempfile.mkdtemp(prefix="metac-bench-vm-"))
    os.chmod(tmp, 0o755)
    node = Node(tmp)
    try:
        initrd = tmp / "initrd.gz"
        modules = [read_module(modules_dir / rel)
                   for rel in module_closure(modules_dir, MODULES)]
        initrd.write_bytes(build_initrd(Path("/bin/busybox").read_bytes(), GUEST_INIT,
                                        modules))
        image = tmp / "disk.img"
        with open(image, "wb") as f:  # data, not holes: both sides read real blocks
            block = os.urandom(1 << 20)
            for _ in range(size + 16):
                f.write(block)
        node.start()
        accel = json.loads(node.metac("vm", "ls", "--json"))["accelerator"]

        boot_m = [boot_metac(node, kernel, initrd) for _ in range(samples)]
        boot_d = [run_direct(direct_argv(qemu, accel, kernel, initrd, CMDLINE), MARKER)[0]
                  for _ in range(samples)]
        disk_cmdline = f"{CMDLINE} bench.size={size} bench.rounds={ROUNDS}"
        disk: dict[str, dict[str, list[float]]] = {
            side: {"read": [], "write": []} for side in ("metac", "file", "file_direct")}
        for _ in range(samples):  # interleaved: a busy spell of the host hits all three
            outputs = {
                "metac": disk_metac(node, kernel, initrd, image, size),
                "file": run_direct(direct_argv(qemu, accel, kernel, initrd, disk_cmdline,
                                               image), "BENCH-DONE")[1],
                "file_direct": run_direct(direct_argv(qemu, accel, kernel, initrd,
                                                      disk_cmdline, image, "none"),
                                          "BENCH-DONE")[1]}
            for side, out in outputs.items():
                disk[side]["read"].append(throughput(out, "READ", size))
                disk[side]["write"].append(throughput(out, "WRITE", size))
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    bm, bd = summary(boot_m), summary(boot_d)
    ds = {side: {op: summary(v) for op, v in ops.items()} for side, ops in disk.items()}

    def ratio(side: str, op: str) -> float:
        return round(ds["metac"][op]["p50"] / ds[side][op]["p50"], 3)
    report = {
        "host": platform.node(), "accelerator": accel, "kernel": str(kernel),
        "memory_mib": MEMORY, "disk_mib": size,
        "boot_seconds": {"metac": bm, "direct_qemu": bd,
                         "ratio_p50": round(bm["p50"] / bd["p50"], 3)},
        "disk_mib_per_s": {"metac_nbd": ds["metac"], "local_file": ds["file"],
                           "local_file_cache_none": ds["file_direct"],
                           "ratio_read": ratio("file", "read"),
                           "ratio_write": ratio("file", "write"),
                           "ratio_read_cache_none": ratio("file_direct", "read"),
                           "ratio_write_cache_none": ratio("file_direct", "write")},
        "goals": {"boot_ratio_max": 1.1, "disk_ratio_min": 0.8},
    }
    print(f"VM benchmark ({accel}, {MEMORY} MiB guest, {samples} boots per side, "
          f"{size} MiB disk)")
    print(f"{'':34}{'metac':>12}{'direct':>12}{'ratio':>8}")
    print(f"{'boot to first serial line, p50 s':34}{bm['p50']:>12.2f}{bd['p50']:>12.2f}"
          f"{report['boot_seconds']['ratio_p50']:>8.2f}")
    for op in ("read", "write"):
        for side, label in (("file", "direct = local file (writeback)"),
                            ("file_direct", "direct = local file, cache=none")):
            m, d = ds["metac"][op], ds[side][op]
            print(f"{'guest disk ' + op + ', p50 MiB/s':34}{m['p50']:>12.1f}{d['p50']:>12.1f}"
                  f"{ratio(side, op):>8.2f}  {label}; min-max {m['min']:.0f}-{m['max']:.0f}"
                  f" vs {d['min']:.0f}-{d['max']:.0f}")
    write_json(args.out, report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
