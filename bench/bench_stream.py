#!/usr/bin/env python3
"""Stream benchmarks: `metac stream forward` next to direct TCP and a socat relay; open time.

A benchmark, not a test. On loopback only (a node on 127.0.0.2, helpers on
127.0.0.1, free high ports, a temporary directory), it measures in one run:

  (a) throughput with iperf3 (one TCP stream each way, then 4 in parallel) over
      * direct TCP: iperf3 client -> iperf3 server;
      * a socat relay: client -> socat -> server (one relay process, read/write);
      * a relay made of metac's pump alone (``core.pump.Pump``, splice), the
        like-for-like comparison with socat;
      * two such relays chained, the like-for-like comparison with:
      * metac: client -> `metac stream forward REF` -> the node's stream service
        -> server. That path has two relays (the forward CLI and the stream
        service), as when A's service is forwarded on B; both pump with splice.
      Each row also gives the CPU time per GB of the relays and of the whole path
      (relays, both iperf3 ends, the ksoftirqd threads): on loopback the kernel
      charges a TCP hop's work to whichever process sends or reads, so relay CPU
      alone hides where the cost goes; the whole path does not. With N CPUs no path
      can move more than N / (whole-path CPU s/GB) GB/s, the "CPU bound" column,
      which is what the targets are checked against below the table.
  (b) time to open a stream: ``open_stream`` (tcpListen + connect) plus one byte
      echoed, next to a direct TCP connect plus one byte, and a connection through
      `metac stream forward` plus one byte.

Prints a table and writes JSON to ``bench/results/stream.json``. Every process it
starts is stopped by PID (SIGTERM, then SIGKILL), also on failure or Ctrl-C.

Usage: python bench/bench_stream.py [--quick] [--seconds S] [--rounds N] [--samples N]
                                    [--out FILE]
Needs iperf3 and socat (Debian packages iperf3, socat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import capnp

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("metac") is None:  # a checkout without the package installed
    sys.path.insert(0, str(REPO / "src"))

from _support import (  # noqa: E402
    READY_LINE,
    child_env,
    die_with_parent,
    free_port,
    loopback_b,
    percentile,
    stop_pid,
    write_json,
)

import metac  # noqa: E402
from metac import api  # noqa: E402
from metac.core.streams import local_address_for, open_stream  # noqa: E402
from metac.schema.load import stream  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "stream.json"
LOCAL = "127.0.0.1"

ECHO_SERVER = """
import asyncio, sys
async def handle(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
async def main():
    await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=256)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


PUMP_RELAY = """
import asyncio, socket, sys
from metac.core.pump import Endpoint, Pump
async def main(port, target):
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", port), backlog=64)
    server.setblocking(False)
    print("ready", flush=True)
    async def relay(conn):
        out = socket.socket()
        out.setblocking(False)
        await loop.sock_connect(out, ("127.0.0.1", target))
        await Pump(Endpoint.of_socket(conn), Endpoint.of_socket(out)).run()
    async with asyncio.TaskGroup() as tg:
        while True:
            tg.create_task(relay((await loop.sock_accept(server))[0]))
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


class Processes:
    """Every helper process, stopped by PID at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], name: str, *, ready: str | None = None,
              timeout: float = 60.0) -> subprocess.Popen[str]:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if ready else log, stderr=log,
                                text=True, env=child_env(), preexec_fn=die_with_parent)
        log.close()
        self.procs.append(proc)
        if ready is not None:
            assert proc.stdout is not None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if ready in line:
                    return proc
                if not line and proc.poll() is not None:
                    break
            raise RuntimeError(f"{name} did not start; see {self.root / (name + '.log')}")
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_pid(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((LOCAL, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {LOCAL}:{port}")


def wait_ready(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY_LINE in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"node not ready; see {path}")


def iperf(port: int, seconds: float, *, reverse: bool = False,
          parallel: int = 1) -> tuple[float, int]:
    """(GB/s received, bytes received) of one iperf3 run to 127.0.0.1:port (1 GB = 1e9 B)."""
    argv = ["iperf3", "-c", LOCAL, "-p", str(port), "-t", f"{seconds:g}", "-J",
            "-P", str(parallel)]
    if reverse:
        argv.append("-R")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    data = json.loads(proc.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 to port {port}: {data['error']}")
    total = data["end"]["sum_received"]
    return total["bits_per_second"] / 8e9, int(total["bytes"])


def ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as f:
                if f.read().startswith("ksoftirqd/"):
                    pids.append(int(entry))
    return pids


def children_cpu_seconds() -> float:
    """CPU time of our reaped children (the iperf3 clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (+ reaped children's) of the processes, in seconds."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def service_pid(metac_cli: list[str], name: str) -> int:
    out = subprocess.run([*metac_cli, "node", "status", "--json"], check=True,
                         capture_output=True, text=True, env=child_env()).stdout
    return next(int(s["pid"]) for s in json.loads(out)["services"] if s["name"] == name)


def summary_ms(samples: list[float]) -> dict[str, Any]:
    return {"n": len(samples), "p50_ms": round(percentile(samples, 50) * 1000, 3),
            "p90_ms": round(percentile(samples, 90) * 1000, 3),
            "p99_ms": round(percentile(samples, 99) * 1000, 3)}


async def _one_byte(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"x")
    assert await loop.sock_recv(sock, 1) == b"x"


async def open_times(ref_text: str, echo_port: int, forward_port: int,
                     n: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def tcp(port: int) -> float:
        sock = socket.socket()
        sock.setblocking(False)
        t0 = time.perf_counter()
        await loop.sock_connect(sock, (LOCAL, port))
        await _one_byte(sock)
        took = time.perf_counter() - t0
        sock.close()
        return took

    ref = api.SturdyRef.parse(ref_text)
    async with api.NodePool() as pool:
        cap = await pool.restore(ref, stream.Stream)
        me = local_address_for(ref.node)

        async def metac_open() -> float:
            t0 = time.perf_counter()
            opened = await open_stream(cap, local_address=me)
            await _one_byte(opened.sock)
            took = time.perf_counter() - t0
            await opened.aclose()
            return took

        rows = {}
        for name, measure in (("direct TCP connect + 1 byte", lambda: tcp(echo_port)),
                              ("open_stream (tcpListen + connect) + 1 byte", metac_open),
                              ("connect via metac stream forward + 1 byte",
                               lambda: tcp(forward_port))):
            for _ in range(max(5, n // 10)):
                await measure()
            rows[name] = summary_ms([await measure() for _ in range(n)])
    return rows


def table(results: dict[str, Any]) -> str:
    out = ["", "Throughput (iperf3, GB/s received, median of the rounds; 1 GB = 1e9 bytes)",
           ""]
    direct = {r["test"]: r["gbytes_per_s"] for r in results["throughput"]
              if r["path"] == "direct TCP"}
    socat = {r["test"]: r["gbytes_per_s"] for r in results["throughput"]
             if r["path"] == "socat relay"}
    cpus = results["cpus"]
    out.append(f"{'path':<24}{'relays':>6}  {'test':<20}{'GB/s':>6}{'x direct':>9}"
               f"{'x socat':>8}{'CPU s/GB: relays':>18}{'path':>6}{'CPU bound':>11}")
    for r in results["throughput"]:
        out.append(f"{r['path']:<24}{r['relays']:>6}  {r['test']:<20}{r['gbytes_per_s']:>6.2f}"
                   f"{r['gbytes_per_s'] / direct[r['test']]:>9.2f}"
                   f"{r['gbytes_per_s'] / socat[r['test']]:>8.2f}"
                   f"{r['relay_cpu_s_per_gb']:>18.3f}{r['path_cpu_s_per_gb']:>6.3f}"
                   f"{cpus / r['path_cpu_s_per_gb']:>11.2f}")
    out += ["", "Targets (issue 3): metac stream forward >= 2x socat and >= 0.7x direct. "
            f"With {cpus} CPUs, a path",
            f"moving R GB/s may use at most {cpus}/R CPU s/GB over the whole path:", ""]
    metac = {r["test"]: r for r in results["throughput"] if r["path"] == "metac stream forward"}
    for test, r in metac.items():
        goal = max(2 * socat[test], 0.7 * direct[test])
        out.append(f"  {test:<20} needs {goal:.2f} GB/s -> <= {cpus / goal:.3f} CPU s/GB; "
                   f"has {r['gbytes_per_s']:.2f} GB/s at {r['path_cpu_s_per_gb']:.3f} CPU s/GB: "
                   + ("met" if r["gbytes_per_s"] >= goal else "not met"))
    out += ["", "Time to open a stream (ms)", ""]
    out.append(f"{'what':<46}{'n':>6}{'p50':>9}{'p90':>9}{'p99':>9}")
    for name, s in results["open_time"].items():
        out.append(f"{name:<46}{s['n']:>6}{s['p50_ms']:>9.3f}{s['p90_ms']:>9.3f}"
                   f"{s['p99_ms']:>9.3f}")
    return "\n".join(out)


def host_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), "")
    return {"python": platform.python_version(), "pycapnp": capnp.__version__,
            "metac": metac.__version__, "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count()}


def run(args: argparse.Namespace, root: Path, procs: Processes) -> dict[str, Any]:
    for program, package in (("iperf3", "iperf3"), ("socat", "socat")):
        if shutil.which(program) is None:
            raise SystemExit(f"{program} not found; install the Debian package '{package}'")
    metac_cli = [sys.executable, "-m", "metac", "--runtime-dir", str(root / "run")]
    address, node_port = loopback_b(), free_port()
    procs.start([*metac_cli, "node", "run", "--address", address, "--port", str(node_port),
                 "--state-dir", str(root / "state"), "--runtime-dir", str(root / "run")], "node")
    wait_ready(root / "node.log")

    iperf_port, echo_port = free_port(), free_port()
    iperf_server = procs.start(["iperf3", "-s", "-B", LOCAL, "-p", str(iperf_port)], "iperf3")
    procs.start([sys.executable, "-c", ECHO_SERVER, str(echo_port)], "echo", ready="ready")
    wait_port(iperf_port)

    def export(port: int) -> str:
        return subprocess.run([*metac_cli, "stream", "export", f"tcp:{LOCAL}:{port}"],
                              check=True, capture_output=True, text=True,
                              env=child_env()).stdout.strip()

    iperf_ref, echo_ref = export(iperf_port), export(echo_port)
    socat_port, forward_port, forward_echo_port = free_port(), free_port(), free_port()
    socat = procs.start(["socat", f"TCP-LISTEN:{socat_port},bind={LOCAL},reuseaddr,fork",
                         f"TCP:{LOCAL}:{iperf_port}"], "socat")
    forward = procs.start([*metac_cli, "stream", "forward", iperf_ref,
                           f"{LOCAL}:{forward_port}"], "forward", ready="forwarding")
    procs.start([*metac_cli, "stream", "forward", echo_ref, f"{LOCAL}:{forward_echo_port}"],
                "forward-echo", ready="forwarding")
    pump_port, chain_port, chain_mid_port = free_port(), free_port(), free_port()
    pump = procs.start([sys.executable, "-c", PUMP_RELAY, str(pump_port), str(iperf_port)],
                       "pump-relay", ready="ready")
    chain_b = procs.start([sys.executable, "-c", PUMP_RELAY, str(chain_mid_port),
                           str(iperf_port)], "pump-chain-2", ready="ready")
    chain_a = procs.start([sys.executable, "-c", PUMP_RELAY, str(chain_port),
                           str(chain_mid_port)], "pump-chain-1", ready="ready")
    wait_port(socat_port)
    # CPU of the whole path: the relays plus these, plus the iperf3 client (our child).
    path_pids = [iperf_server.pid, *ksoftirqd_pids()]

    # (path, relays, port, the relay processes whose CPU time is counted)
    paths = [("direct TCP", 0, iperf_port, []),
             ("socat relay", 1, socat_port, [socat.pid]),
             ("metac Pump relay", 1, pump_port, [pump.pid]),
             ("2 metac Pumps chained", 2, chain_port, [chain_a.pid, chain_b.pid]),
             ("metac stream forward", 2, forward_port,
              [forward.pid, service_pid(metac_cli, "stream")])]
    tests = [("1 stream, upload", False, 1), ("1 stream, download", True, 1),
             ("4 streams, upload", False, 4)]
    samples: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    path_cpu: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):  # interleaved, so load changes hit every path alike
        for test, reverse, parallel in tests:
            for path, _, port, pids in paths:
                before = cpu_seconds(pids)
                others = cpu_seconds(path_pids) + children_cpu_seconds()
                rate, moved = iperf(port, args.seconds, reverse=reverse, parallel=parallel)
                time.sleep(0.2)  # socat reaps its per-connection child: count its CPU too
                relays = cpu_seconds(pids) - before
                others = cpu_seconds(path_pids) + children_cpu_seconds() - others
                samples.setdefault((path, test), []).append(round(rate, 3))
                cpu.setdefault((path, test), []).append(relays / moved * 1e9)
                path_cpu.setdefault((path, test), []).append((relays + others) / moved * 1e9)
                print(f"  round {round_ + 1}: {path:<22} {test:<18} {rate:6.2f} GB/s",
                      file=sys.stderr)
    throughput = [{"path": path, "relays": relays, "test": test,
                   "gbytes_per_s": round(statistics.median(samples[path, test]), 3),
                   "relay_cpu_s_per_gb": round(statistics.median(cpu[path, test]), 3),
                   "path_cpu_s_per_gb": round(statistics.median(path_cpu[path, test]), 3),
                   "samples": samples[path, test]}
                  for test, _, _ in tests for path, relays, _, _ in paths]
    opened = asyncio.run(capnp.run(open_times(echo_ref, echo_port, forward_echo_port,
                                              args.samples)))
    return {"cpus": os.cpu_count() or 1, "throughput": throughput, "open_time": opened}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs, 100 samples")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per iperf3 run")
    parser.add_argument("--samples", type=int, default=None, help="open-time samples per row")
    parser.add_argument("--rounds", type=int, default=None,
                        help="iperf3 runs per row (the median is reported)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.samples = args.samples or (100 if args.quick else 500)
    args.rounds = args.rounds or (1 if args.quick else 3)

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="metac-bench-stream-"))
    procs = Processes(root)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = run(args, root, procs)
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "stream",
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.monotonic() - started, 1),
        "host": host_info(),
        "sizes": {"seconds_per_run": args.seconds, "rounds": args.rounds,
                  "open_samples": args.samples},
        "results": results,
    }
    print(table(results))
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
