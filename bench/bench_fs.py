#!/usr/bin/env python3
"""Filesystem and block benchmarks: `metac fs mount` and `metac block attach` next to the usual tools.

A benchmark, not a test. Needs root (mounts, loop devices, a throwaway sshd).
Everything runs on loopback: node A (serving) on 127.0.0.1 and node B
(mounting) on 127.0.0.2, free high ports, a temporary directory. In one run:

  (a) files, on each of: the local disk (the temporary directory itself);
      sshfs over ssh to localhost (a throwaway sshd on 127.0.0.1 with a
      temporary host key and key-only auth, started and stopped here); and a
      directory exported by node A, mounted on node B with `metac fs mount`
      (kernel 9p where the kernel has it, else sshfs over an SFTP stream):
      * sequential write: dd bs=1M, conv=fsync;
      * sequential read: dd bs=1M after dropping the page cache (cold);
      * metadata ops/s: create + stat + unlink of N empty files, counted as 3 ops each.
  (b) block: a disk image exported by node A, attached on node B with
      `metac block attach`, next to nbdcopy straight against nbdkit (unix
      socket, same image). The attached device is measured with nbdcopy too
      (the same I/O engine: threads, many requests in flight), which is what the
      target compares, and with dd O_DIRECT bs=1M (one request at a time).
      Writes come from a file in /dev/shm and are flushed (nbdcopy --flush, dd
      conv=fsync); reads go to null: after dropping the page cache. The image
      is in /dev/shm too, so the numbers are the transport's, not the disk's.
  (c) with --guest: (b) again inside a QEMU guest (Debian 12 kernel, TCG), where
      the kernel has an NBD client, so `metac block attach` uses kernel NBD
      instead of nbdfuse + loop. Both rows of that table come from the guest.

Each number is the median of --repeat runs. Prints a table and writes JSON to
``bench/results/fs.json``. Every process it starts is stopped by PID, every
mount and loop device it made is removed, also on failure or Ctrl-C. Dropping
the page cache (``/proc/sys/vm/drop_caches``) affects the whole machine.

Usage: python bench/bench_fs.py [--quick] [--size MIB] [--files N] [--repeat K] [--out FILE]
                                [--block-only] [--guest]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("metac") is None:  # a checkout without the package installed
    sys.path.insert(0, str(REPO / "src"))

from _support import die_with_parent, free_port, stop_pid, wait_ready_line, write_json  # noqa: E402

import metac  # noqa: E402
from metac.fs import kernel  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "fs.json"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


class Procs:
    """Every process we start, stopped by PID (TERM, then KILL) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
        stop_pid(proc, grace)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


class Node:
    def __init__(self, procs: Procs, root: Path, address: str) -> None:
        self.address = address
        self.port = free_port(address)
        self.dir = root / f"node-{address}"
        self.dir.mkdir()
        self.log = self.dir / "node.log"
        self.env = dict(os.environ, METAC_RUNTIME_DIR=str(self.dir / "run"),
                        PYTHONPATH=str(Path(metac.__file__).resolve().parent.parent))
        with open(self.log, "wb") as log:
            self.proc = procs.start(
                [sys.executable, "-m", "metac", "node", "run", "--address", address,
                 "--port", str(self.port), "--state-dir", str(self.dir / "state"),
                 "--runtime-dir", str(self.dir / "run")],
                stdout=log, stderr=log, env=self.env)
        wait_ready_line(self.log, self.proc, f"node {address}")

    def metac(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "metac", *args], env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"metac {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout.strip()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def dd(*args: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["dd", *args, "bs=1M", "status=none"], check=True, timeout=600)
    return time.monotonic() - t0


def median_of(repeat: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeat))


def file_suite(directory: Path, size_mib: int, files: int, repeat: int) -> dict[str, float]:
    target = directory / "bench.dat"

    def write() -> float:
        return size_mib / dd("if=/dev/zero", f"of={target}", f"count={size_mib}", "conv=fsync")

    def read() -> float:
        drop_caches()
        return size_mib / dd(f"if={target}", "of=/dev/null")

    def meta() -> float:
        d = directory / "meta"
        d.mkdir(exist_ok=True)
        t0 = time.monotonic()
        for i in range(files):
            p = d / f"f{i}"
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
            os.stat(p)
            os.unlink(p)
        elapsed = time.monotonic() - t0
        d.rmdir()
        return 3 * files / elapsed

    out = {"write_mib_s": median_of(repeat, write), "read_mib_s": median_of(repeat, read),
           "metadata_ops_s": median_of(repeat, meta)}
    target.unlink()
    return out


@contextlib.contextmanager
def sshd_sshfs(procs: Procs, root: Path, export: Path, mnt: Path) -> Iterator[None]:
    """A throwaway sshd on 127.0.0.1 (temporary keys, key auth only) and sshfs through it."""
    keys = root / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = free_port("127.0.0.1")
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n"
        f"StrictModes no\nPidFile none\nSubsystem sftp {SFTP_SERVER}\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    sshd = procs.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(keys / "sshd_config")],
                       stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            break
        if time.monotonic() > deadline:
            raise RuntimeError("sshd did not start")
        time.sleep(0.05)
    subprocess.run(["sshfs", "-o", f"port={port},IdentityFile={keys / 'user'},"
                    "StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
                    f"root@127.0.0.1:{export}", str(mnt)], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        procs.stop(sshd)


def timed_mib_s(size_mib: int, argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, timeout=600)
    return size_mib / (time.monotonic() - t0)


def nbdcopy_pair(target: str, src: Path, size_mib: int, repeat: int) -> dict[str, float]:
    """nbdcopy from ``src`` to ``target`` (then flushed) and from ``target`` to null:, cold."""
    def read() -> float:
        drop_caches()
        return timed_mib_s(size_mib, ["nbdcopy", target, "null:"])

    return {"write_mib_s": median_of(repeat, lambda: timed_mib_s(
                size_mib, ["nbdcopy", "--flush", str(src), target])),
            "read_mib_s": median_of(repeat, read)}


def nbdcopy_suite(procs: Procs, root: Path, image: Path, src: Path, size_mib: int,
                  repeat: int) -> dict[str, float]:
    sock = root / "nbdkit.sock"
    server = procs.start(["nbdkit", "-f", "-U", str(sock), "file", str(image)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.05)
        return nbdcopy_pair(f"nbd+unix:///?socket={sock}", src, size_mib, repeat)
    finally:
        procs.stop(server)


def dd_suite(device: str, src: Path, size_mib: int, repeat: int) -> dict[str, float]:
    def write() -> float:
        return size_mib / dd(f"if={src}", f"of={device}", "oflag=direct", "conv=fsync")

    def read() -> float:
        drop_caches()
        return size_mib / dd(f"if={device}", "of=/dev/null", "iflag=direct")

    return {"write_mib_s": median_of(repeat, write), "read_mib_s": median_of(repeat, read)}


def cleanup_mounts(root: Path) -> None:
    for _ in range(5):
        left = [e.mountpoint for e in kernel.mountinfo()
                if e.mountpoint.startswith(str(root) + "/")]
        if not left:
            return
        for mp in reversed(left):
            with contextlib.suppress(OSError):
                kernel.unmount(mp)
    for dev, backing in kernel.loop_devices().items():
        if backing.startswith(str(root) + "/"):
            subprocess.run(["losetup", "-d", dev], check=False)


def files_suite(procs: Procs, root: Path, a: Node, b: Node,
                args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    local = root / "local"
    export = root / "export"
    mnt = root / "mnt"
    for d in (local, export, mnt):
        d.mkdir()
    print("files: local disk ...", flush=True)
    results["local disk"] = file_suite(local, args.size, args.files, args.repeat)
    print("files: sshfs over ssh to localhost ...", flush=True)
    with sshd_sshfs(procs, root, export, mnt):
        results["sshfs over ssh"] = file_suite(mnt, args.size, args.files, args.repeat)
    ref = a.metac("fs", "export", f"local:{export}")
    out = b.metac("fs", "mount", ref, str(mnt))
    method = out.rsplit("(", 1)[-1].rstrip(")")
    print(f"files: metac fs mount ({method}) ...", flush=True)
    results[f"metac fs mount ({method})"] = file_suite(mnt, args.size, args.files, args.repeat)
    b.metac("fs", "umount", str(mnt))
    return results


def block_suite(procs: Procs, shm: Path, root: Path, a: Node, b: Node, size_mib: int,
                repeat: int) -> dict[str, dict[str, float]]:
    """nbdcopy against nbdkit, then nbdcopy and dd against the attached device.

    The image lives in /dev/shm for every path: the numbers are the transport's, not
    the disk's (and it is written through once, so no run pays for allocating it).
    nbdcopy is the same I/O engine on both sides (multi-threaded, many requests in
    flight); dd with O_DIRECT is one 1 MiB request at a time (what a simple copy does).
    """
    results: dict[str, dict[str, float]] = {}
    image = shm / "disk.img"
    subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", f"count={size_mib}",
                    "status=none"], check=True)
    src = shm / "source.dat"
    subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={size_mib}",
                    "status=none"], check=True)
    print("block: nbdcopy against nbdkit ...", flush=True)
    results["nbdcopy <-> nbdkit"] = nbdcopy_suite(procs, root, image, src, size_mib, repeat)
    bref = a.metac("block", "export", f"local:{image}")
    device = b.metac("block", "attach", bref)
    method = json.loads(b.metac("block", "ls", "--json"))[0]["method"]
    print(f"block: metac block attach ({method}, {device}) ...", flush=True)
    try:
        results[f"nbdcopy <-> metac block attach ({method})"] = nbdcopy_pair(
            device, src, size_mib, repeat)
        results[f"dd O_DIRECT <-> metac block attach ({method})"] = dd_suite(
            device, src, size_mib, repeat)
    finally:
        b.metac("block", "detach", device)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="metac-bench-fs-"))
    shm = Path(tempfile.mkdtemp(prefix="metac-bench-fs-", dir="/dev/shm"))
    procs = Procs()
    results: dict[str, Any] = {"files": {}, "block": {}}

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        a = Node(procs, root, "127.0.0.1")
        b = Node(procs, root, "127.0.0.2")
        if not args.block_only:
            results["files"] = files_suite(procs, root, a, b, args)
        results["block"] = block_suite(procs, shm, root, a, b, args.size, args.repeat)
    finally:
        procs.close()
        cleanup_mounts(root)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return results


def block_ratios(block: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    theirs = block["nbdcopy <-> nbdkit"]
    out = {}
    for tool, key in (("nbdcopy", "block"), ("dd", "block_dd")):
        ours = next(v for k, v in block.items() if k.startswith(tool) and "metac" in k)
        for way in ("write", "read"):
            out[f"{prefix}{key}_{way}_vs_nbdcopy"] = (ours[f"{way}_mib_s"]
                                                     / theirs[f"{way}_mib_s"])
    return out


def guest_block(size_mib: int, repeat: int) -> dict[str, dict[str, float]]:
    """The block part again in a QEMU guest whose kernel has NBD (see docs/testing-guest.md)."""
    from metac.testing import guest

    print(f"block, in a QEMU guest (kernel NBD, TCG, {size_mib} MiB) ...", flush=True)
    out_name = "fs-guest.json"
    result = guest.run_in_guest(
        [sys.executable, str(Path(__file__).resolve()), "--block-only", "--size", str(size_mib),
         "--repeat", str(repeat), "--out", f"{guest.GUEST_OUT}/{out_name}"],
        cwd=str(REPO), timeout=3600)
    if result.returncode != 0 or out_name not in result.files:
        raise RuntimeError(f"the guest run failed (exit {result.returncode}):\n"
                           + result.output[-3000:])
    block: dict[str, dict[str, float]] = json.loads(result.files[out_name])["results"]["block"]
    if not any("(nbd)" in name for name in block):
        raise RuntimeError(f"the guest did not use kernel NBD: {sorted(block)}")
    print(f"  guest: boot {result.boot_seconds:.1f} s, run {result.run_seconds:.1f} s",
          flush=True)
    return block


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    files = results["files"]
    if files:
        ours = next(v for k, v in files.items() if k.startswith("metac"))
        ssh = files["sshfs over ssh"]
        out.update({
            "fs_write_vs_sshfs": ours["write_mib_s"] / ssh["write_mib_s"],
            "fs_read_vs_sshfs": ours["read_mib_s"] / ssh["read_mib_s"],
            "fs_metadata_vs_sshfs": ours["metadata_ops_s"] / ssh["metadata_ops_s"],
        })
    out.update(block_ratios(results["block"], ""))
    if results.get("guest_block"):
        out.update(block_ratios(results["guest_block"], "guest_"))
    return out


def print_table(results: dict[str, Any], ratio: dict[str, float]) -> None:
    print()
    if results["files"]:
        print(f"{'files':44} {'write MiB/s':>12} {'read MiB/s':>12} {'metadata ops/s':>15}")
        for name, r in results["files"].items():
            print(f"{name:44} {r['write_mib_s']:12.0f} {r['read_mib_s']:12.0f} "
                  f"{r['metadata_ops_s']:15.0f}")
        print()
    for section, title in (("block", "block"),
                           ("guest_block", "block, in a QEMU guest (kernel NBD, TCG)")):
        if not results.get(section):
            continue
        print(f"{title:44} {'write MiB/s':>12} {'read MiB/s':>12}")
        for name, r in results[section].items():
            print(f"{name:44} {r['write_mib_s']:12.0f} {r['read_mib_s']:12.0f}")
        print()
    print("ratios (target: fs >= 1.5x sshfs over ssh; block, nbdcopy through the attached "
          "device, >= 0.8x nbdcopy against nbdkit)")
    for name, value in ratio.items():
        print(f"  {name:34} {value:5.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 500 files, 1 run each")
    parser.add_argument("--size", type=int, default=1024, help="MiB per sequential run")
    parser.add_argument("--files", type=int, default=2000, help="files for the metadata run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per number (median)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--block-only", action="store_true", help="skip the files part")
    parser.add_argument("--guest", action="store_true",
                        help="also run the block part in a QEMU guest with kernel NBD")
    parser.add_argument("--guest-size", type=int, default=256,
                        help="MiB per sequential run in the guest (TCG is slow)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.files, args.repeat = 256, 500, 1
    if os.geteuid() != 0:
        print("bench_fs needs root (mounts, loop devices, sshd)", file=sys.stderr)
        return 2
    for prog in ("sshfs", "sshd", "nbdkit", "nbdcopy", "nbdfuse", "bwrap", "diod"):
        if shutil.which(prog) is None and not os.path.exists(f"/usr/sbin/{prog}"):
            print(f"bench_fs needs {prog}", file=sys.stderr)
            return 2
    results = run(args)
    if args.guest:
        results["guest_block"] = guest_block(args.guest_size, args.repeat)
    ratio = ratios(results)
    print_table(results, ratio)
    report = {
        "host": {"python": platform.python_version(), "kernel": platform.release(),
                 "cpus": os.cpu_count(), "metac": metac.__version__,
                 "kernel_9p": "9p" in kernel.filesystem_types()},
        "sizes": {"sequential_mib": args.size, "metadata_files": args.files,
                  "repeat": args.repeat},
        "results": results,
        "ratios": ratio,
    }
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
