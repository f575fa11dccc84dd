#!/usr/bin/env python3
"""Compute benchmark: the cost of running `true` in a fresh container, next to the baselines.

A benchmark, not a test (needs root). It starts one node on loopback
(127.0.0.1, a free high port, temporary state and runtime dirs), builds a
busybox root filesystem in a temporary directory, and times, in the same run:

  (a) ``metac run --mount /=local:ROOT -- true``: the CLI end to end (Python
      start-up, connecting, mounting the root through the fs service, a new
      container with its namespaces, the process, its stdio streams, the exit
      code, tearing everything down);
  (b) the same through the Python API in one process: launch, wait, destroy
      (what a long-lived client pays; no interpreter start-up);
  (c) ``runc run`` and (d) ``crun run`` of an OCI bundle with the same root
      filesystem and the same config.json generator (metac.compute.oci), the
      process being ``true`` itself (crun with the unified cgroup hierarchy
      hidden when the host needs it, as the service does);
  (e) ``ssh 127.0.0.1 true`` against a throwaway sshd on a free loopback port
      (host and client keys made for the run, no PAM).

It prints a table and writes JSON to ``bench/results/compute.json``. Every
process it starts is stopped by PID at the end, and the temporary directory
is removed, also when a measurement fails.

Usage: python bench/bench_compute.py [--quick] [--samples N] [--runtime auto|runc|crun]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import capnp

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

from metac import api  # noqa: E402
from metac.compute import oci, rootfs, runtime  # noqa: E402
from metac.schema.load import compute, fs  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "compute.json"


# --- helpers ---------------------------------------------------------------------------


def summary_ms(samples_s: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1000 for s in samples_s)
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1),
            "p90_ms": round(percentile(ms, 90), 1), "mean_ms": round(sum(ms) / len(ms), 1),
            "min_ms": round(ms[0], 1), "max_ms": round(ms[-1], 1)}


def timed(fn: Callable[[], None], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def check(argv: list[str], **kw: Any) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                          check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}...: exit {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-800:]}")


# --- the node ---------------------------------------------------------------------------


class Node:
    def __init__(self, root: Path, runtime_pref: str) -> None:
        self.port = free_port()
        self.state = root / "state"
        self.run_dir = root / "run"
        self.log = root / "node.log"
        self.env = child_env({"METAC_RUNTIME_DIR": str(self.run_dir),
                              "METAC_COMPUTE_RUNTIME": runtime_pref},
                             drop_notify_socket=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "metac", "node", "run", "--address", "127.0.0.1",
                "--port", str(self.port), "--state-dir", str(self.state),
                "--runtime-dir", str(self.run_dir)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env, preexec_fn=die_with_parent)
        wait_ready_line(self.log, self.proc)

    def metac(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "metac", *args], env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                              check=False)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


# --- (a) and (b) ------------------------------------------------------------------------


def bench_cli(node: Node, root: Path, n: int, warmup: int) -> list[float]:
    def once() -> None:
        proc = node.metac("run", "--mount", f"/=local:{root}", "--", "true")
        if proc.returncode != 0:
            raise RuntimeError(f"metac run failed: {proc.stderr.decode()[-500:]}")

    return timed(once, n, warmup)


def bench_api(node: Node, root: Path, n: int, warmup: int) -> list[float]:
    async def main() -> list[float]:
        async with api.connect_admin(str(node.run_dir)) as admin:
            cadmin = await api.service_admin(admin, "compute", compute.ComputeServiceAdmin)
            fs_admin = await api.service_admin(admin, "fs", fs.FilesystemServiceAdmin)
            launcher = (await cadmin.getLauncher()).launcher
            root_fs = (await fs_admin.rootNamespace().ns.filesystemPreservingOwners().fs
                       .getSubtree(str(root)[1:])).fs

            async def once() -> None:
                pd = compute.ProcessDescription.new_message()
                pd.args = ["true"]
                ed = compute.ProcessEnvironmentDescription.new_message()
                mounts = ed.init("filesystems", 1)
                mounts[0].path = "/"
                mounts[0].fs = root_fs
                res = await launcher.launch(processDescription=pd, envDescription=ed)
                await res.process.wait()
                code = (await res.process.returnCode()).code
                await res.env.destroy()
                if code != 0:
                    raise RuntimeError(f"true exited {code}")

            for _ in range(warmup):
                await once()
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                await once()
                samples.append(time.perf_counter() - t0)
            return samples

    return asyncio.run(capnp.run(main()))


# --- (c) and (d) ------------------------------------------------------------------------


def make_bundle(tmp: Path, root: Path) -> Path:
    bundle = tmp / "bundle"
    bundle.mkdir()
    spec = oci.ContainerSpec(rootfs=str(root), init_binary=shutil.which("catatonit") or
                             "/usr/bin/catatonit", hostname="bench")
    config = oci.container_config(spec, init=oci.ProcessSpec(("true",)))
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def bench_oci(name: str, tmp: Path, bundle: Path, n: int, warmup: int) -> dict[str, Any]:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        return {"skipped": f"{name} is not installed"}
    layout, controllers = runtime.host_cgroup_layout()
    prefix: list[str] = []
    if runtime.needs_hidden_unified(name, layout, controllers):
        prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                  runtime.HIDE_UNIFIED_SCRIPT]
    state = tmp / f"state-{name}"
    count = 0

    def once() -> None:
        nonlocal count
        count += 1
        check([*prefix, path, "--root", str(state), "run", "--bundle", str(bundle),
               f"bench-{os.getpid()}-{count}"])

    samples = timed(once, n, warmup)
    return {**summary_ms(samples), "hidden_unified": bool(prefix)}


# --- (e) ---------------------------------------------------------------------------------


def bench_ssh(tmp: Path, n: int, warmup: int) -> dict[str, Any]:
    sshd, ssh, keygen = (shutil.which(p) or shutil.which(p, path="/usr/sbin:/sbin")
                         for p in ("sshd", "ssh", "ssh-keygen"))
    if not (sshd and ssh and keygen):
        return {"skipped": "needs openssh-server and openssh-client"}
    d = tmp / "ssh"
    d.mkdir(mode=0o700)
    for key in ("host_key", "client_key"):
        check([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)])
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PrintMotd no\nPrintLastLog no\nUseDNS no\n")
    made_run_dir = not os.path.isdir("/run/sshd")
    if made_run_dir:
        os.makedirs("/run/sshd", mode=0o755)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "wb"),  # noqa: SIM115
                            preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sshd did not start: " + (d / "sshd.log").read_text())
            time.sleep(0.05)
        argv = [ssh, "-i", str(d / "client_key"), "-p", str(port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "root@127.0.0.1", "true"]
        return summary_ms(timed(lambda: check(argv), n, warmup))
    finally:
        stop_pid(proc)
        if made_run_dir:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


# --- main --------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rows = [("metac run ... true (CLI)", results["metac_run_cli"]),
            ("metac API launch+wait+destroy", results["metac_api"]),
            ("runc run (same bundle)", results["runc_run"]),
            ("crun run (same bundle)", results["crun_run"]),
            ("ssh 127.0.0.1 true", results["ssh_true"])]
    lines = [f"{'what':34} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8} {'n':>4}"]
    for name, r in rows:
        if "skipped" in r:
            lines.append(f"{name:34} skipped: {r['skipped']}")
        else:
            lines.append(f"{name:34} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} "
                         f"{r['mean_ms']:8.1f} {r['n']:4d}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--runtime", default="auto", help="the node's OCI runtime")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_compute needs root (containers, sshd)", file=sys.stderr)
        return 2
    n = args.samples or (5 if args.quick else 20)
    warmup = 1 if args.quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="metac-bench-compute-"))
    node = Node(tmp / "node", args.runtime)
    (tmp / "node").mkdir()
    results: dict[str, Any] = {}
    try:
        root = tmp / "rootfs"
        rootfs.build_busybox(str(root))
        node.start()
        results["metac_run_cli"] = summary_ms(bench_cli(node, root, n, warmup))
        results["metac_api"] = summary_ms(bench_api(node, root, n, warmup))
        bundle = make_bundle(tmp, root)
        results["runc_run"] = bench_oci("runc", tmp, bundle, n, warmup)
        results["crun_run"] = bench_oci("crun", tmp, bundle, n, warmup)
        results["ssh_true"] = bench_ssh(tmp, n, warmup)
        used = "unknown"
        for line in (node.state / "logs" / "node.service-compute.log").read_text().splitlines():
            if "containers run with" in line:
                used = line.split("containers run with", 1)[1].strip()
        results["metac_runtime"] = used
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"benchmark": "compute", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": {"kernel": platform.release(), "python": platform.python_version(),
                       "cpus": os.cpu_count()},
              "samples": n, "results": results}
    print(table(results))
    print(f"metac's runtime: {results.get('metac_runtime')}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
