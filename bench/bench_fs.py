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
      `metac block attach` (sequential dd with O_DIRECT on the device), next to
      nbdcopy straight against nbdkit (unix socket, same image) reading to
      null: and writing from a file in /dev/shm (the image is in /dev/shm too, so
      the numbers are the transport's, not the disk's; nbdcopy --flush, dd conv=fsync).

Each number is the median of --repeat runs. Prints a table and writes JSON to
``bench/results/fs.json``. Every process it starts is stopped by PID, every
mount and loop device it made is removed, also on failure or Ctrl-C. Dropping
the page cache (``/proc/sys/vm/drop_caches``) affects the whole machine.

Usage: python bench/bench_fs.py [--quick] [--size MIB] [--files N] [--repeat K] [--out FILE]
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


def nbdcopy_suite(procs: Procs, root: Path, image: Path, size_mib: int,
                  repeat: int) -> dict[str, float]:
    sock = root / "nbdkit.sock"
    server = procs.start(["nbdkit", "-f", "-U", str(sock), "file", str(image)])
    deadline = time.monotonic() + 10
    while not sock.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("nbdkit did not start")
        time.sleep(0.05)
    uri = f"nbd+unix:///?socket={sock}"
    src = Path("/dev/shm") / f"metac-bench-{os.getpid()}"
    try:
        subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={size_mib}",
                        "status=none"], check=True)

        def timed(argv: list[str]) -> float:
            t0 = time.monotonic()
            subprocess.run(argv, check=True, timeout=600)
            return size_mib / (time.monotonic() - t0)

        def read() -> float:
            drop_caches()
            return timed(["nbdcopy", uri, "null:"])

        return {"write_mib_s": median_of(repeat, lambda: timed(["nbdcopy", "--flush", str(src),
                                                                uri])),
                "read_mib_s": median_of(repeat, read)}
    finally:
        src.unlink(missing_ok=True)
        procs.stop(server)


def attach_suite(device: str, size_mib: int, repeat: int) -> dict[str, float]:
    src = Path("/dev/shm") / f"metac-bench-{os.getpid()}"
    try:
        subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={size_mib}",
                        "status=none"], check=True)

        def write() -> float:
            return size_mib / dd(f"if={src}", f"of={device}", "oflag=direct", "conv=fsync")

        def read() -> float:
            drop_caches()
            return size_mib / dd(f"if={device}", "of=/dev/null", "iflag=direct")

        return {"write_mib_s": median_of(repeat, write), "read_mib_s": median_of(repeat, read)}
    finally:
        src.unlink(missing_ok=True)


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="metac-bench-fs-"))
    shm = Path(tempfile.mkdtemp(prefix="metac-bench-fs-", dir="/dev/shm"))
    procs = Procs()
    results: dict[str, Any] = {"files": {}, "block": {}}

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        local = root / "local"
        export = root / "export"
        mnt = root / "mnt"
        for d in (local, export, mnt):
            d.mkdir()
        print("files: local disk ...", flush=True)
        results["files"]["local disk"] = file_suite(local, args.size, args.files, args.repeat)
        print("files: sshfs over ssh to localhost ...", flush=True)
        with sshd_sshfs(procs, root, export, mnt):
            results["files"]["sshfs over ssh"] = file_suite(mnt, args.size, args.files,
                                                            args.repeat)
        a = Node(procs, root, "127.0.0.1")
        b = Node(procs, root, "127.0.0.2")
        ref = a.metac("fs", "export", f"local:{export}")
        out = b.metac("fs", "mount", ref, str(mnt))
        method = out.rsplit("(", 1)[-1].rstrip(")")
        print(f"files: metac fs mount ({method}) ...", flush=True)
        results["files"][f"metac fs mount ({method})"] = file_suite(mnt, args.size, args.files,
                                                                  args.repeat)
        b.metac("fs", "umount", str(mnt))

        # The image lives in /dev/shm for both block paths: the numbers are the transport's,
        # not the disk's (and written through once, so no run pays for allocating it).
        image = shm / "disk.img"
        subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", f"count={args.size}",
                        "status=none"], check=True)
        print("block: nbdcopy against nbdkit ...", flush=True)
        results["block"]["nbdcopy <-> nbdkit"] = nbdcopy_suite(procs, root, image, args.size,
                                                               args.repeat)
        bref = a.metac("block", "export", f"local:{image}")
        device = b.metac("block", "attach", bref)
        listed = json.loads(b.metac("block", "ls", "--json"))
        print(f"block: metac block attach ({listed[0]['method']}, {device}) ...", flush=True)
        results["block"][f"metac block attach ({listed[0]['method']})"] = attach_suite(
            device, args.size, args.repeat)
        b.metac("block", "detach", device)
    finally:
        procs.close()
        cleanup_mounts(root)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return results


def ratios(results: dict[str, Any]) -> dict[str, float]:
    files, block = results["files"], results["block"]
    ours = next(v for k, v in files.items() if k.startswith("metac"))
    ssh = files["sshfs over ssh"]
    theirs = block["nbdcopy <-> nbdkit"]
    attached = next(v for k, v in block.items() if k.startswith("metac"))
    return {
        "fs_write_vs_sshfs": ours["write_mib_s"] / ssh["write_mib_s"],
        "fs_read_vs_sshfs": ours["read_mib_s"] / ssh["read_mib_s"],
        "fs_metadata_vs_sshfs": ours["metadata_ops_s"] / ssh["metadata_ops_s"],
        "block_write_vs_nbdcopy": attached["write_mib_s"] / theirs["write_mib_s"],
        "block_read_vs_nbdcopy": attached["read_mib_s"] / theirs["read_mib_s"],
    }


def print_table(results: dict[str, Any], ratio: dict[str, float]) -> None:
    print()
    print(f"{'files':34} {'write MiB/s':>12} {'read MiB/s':>12} {'metadata ops/s':>15}")
    for name, r in results["files"].items():
        print(f"{name:34} {r['write_mib_s']:12.0f} {r['read_mib_s']:12.0f} "
              f"{r['metadata_ops_s']:15.0f}")
    print(f"\n{'block':34} {'write MiB/s':>12} {'read MiB/s':>12}")
    for name, r in results["block"].items():
        print(f"{name:34} {r['write_mib_s']:12.0f} {r['read_mib_s']:12.0f}")
    print("\nratios (target: fs >= 1.5x sshfs over ssh, block >= 0.8x nbdcopy)")
    for name, value in ratio.items():
        print(f"  {name:28} {value:5.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 500 files, 1 run each")
    parser.add_argument("--size", type=int, default=1024, help="MiB per sequential run")
    parser.add_argument("--files", type=int, default=2000, help="files for the metadata run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per number (median)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
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
