#!/usr/bin/env python3
"""Core benchmarks of metac: RPC latency, cross-node restore, ref creation, start-up.

A benchmark, not a test: it starts its own nodes on loopback (127.0.0.1 and
127.0.0.2, free high ports, temporary state and runtime dirs), measures, prints
a table and writes JSON to ``bench/results/core.json``. Every process it
starts is stopped by PID at the end (SIGTERM, then SIGKILL), and the temporary
directory is removed, also when a measurement fails.

  (a) p50/p99 of one local RPC call: Counter.value through the admin unix
      socket and through TCP Node on a restored ref, Node.address (one hop),
      next to a raw pycapnp echo server (separate process, minimal schema from
      a temporary .capnp file) over a unix socket and over TCP, in the same run.
  (b) connect + restore + first call of a ref on another node (node B on
      127.0.0.2), one fresh TCP connection per sample.
  (c) persistent createSturdyRef per second, one call at a time and with many
      calls in flight.
  (d) node start to ready: with an empty store, and with 10,000 persistent
      refs (10,000 counters) in the store.

Usage: python bench/bench_core.py [--quick] [--out FILE] [--refs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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
from metac import api, errors  # noqa: E402
from metac.codec.refs import SturdyRef  # noqa: E402
from metac.schema.load import core, demo, persistence  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "core.json"

ECHO_SCHEMA = """\
@0x{id:016x};
interface Echo {{
  echo @0 (v :Int64) -> (v :Int64);
}}
"""


@dataclass(frozen=True)
class Sizes:
    calls: int  # samples per latency row
    warmup: int
    connections: int  # samples of (b)
    create_seq: int  # sequential createSturdyRef calls
    create_par: int  # concurrent createSturdyRef calls
    in_flight: int
    refs: int  # refs in the store for (d)
    restarts: int


FULL = Sizes(calls=5000, warmup=300, connections=300, create_seq=2000, create_par=5000,
             in_flight=64, refs=10_000, restarts=3)
QUICK = Sizes(calls=500, warmup=50, connections=30, create_seq=200, create_par=500,
              in_flight=64, refs=1000, restarts=1)


# --- statistics ------------------------------------------------------------------------


def summary_us(samples_ns: list[int]) -> dict[str, Any]:
    values = sorted(s / 1000 for s in samples_ns)
    return {
        "n": len(values),
        "p50_us": round(percentile(values, 50), 1),
        "p90_us": round(percentile(values, 90), 1),
        "p99_us": round(percentile(values, 99), 1),
        "mean_us": round(sum(values) / len(values), 1),
        "min_us": round(values[0], 1),
        "max_us": round(values[-1], 1),
    }


async def time_calls(call: Callable[[], Awaitable[Any]], n: int, warmup: int) -> list[int]:
    for _ in range(warmup):
        await call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await call()
        samples.append(clock() - t0)
    return samples


# --- processes -------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:][:1] != b"Z"


class Node:
    """One ``metac node run`` on loopback with its own state and runtime dirs."""

    def __init__(self, root: Path, name: str, address: str, port: int) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.dir = root / name
        self.state_dir = self.dir / "state"
        self.runtime_dir = self.dir / "run"
        self.log_path = self.dir / "node.log"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._ready_at = 0.0
        self.starts = 0

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "metac", "node", "run",
                "--address", self.address, "--port", str(self.port),
                "--state-dir", str(self.state_dir), "--runtime-dir", str(self.runtime_dir),
                "--extra-service", "demo=metac.testing.demo"]

    def start(self, timeout: float = 60.0) -> float:
        """Start the node; seconds from spawning it to its ready line."""
        assert self.proc is None, "already running"
        self._ready.clear()
        self.starts += 1
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=child_env(), text=True, bufsize=1,
            preexec_fn=die_with_parent)
        self._reader = threading.Thread(target=self._read, args=(self.proc,),
                                        name=f"log {self.name}", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"node {self.name} did not get ready; log:\n{self.tail()}")
        return self._ready_at - t0

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "a") as log:
            log.write(f"--- start {self.starts}\n")
            for line in proc.stdout:
                if not self._ready.is_set() and READY_LINE in line:
                    self._ready_at = time.monotonic()
                    self._ready.set()
                log.write(line)
        self._ready.set()  # exited: wake a waiting start()

    def stop(self) -> None:
        """SIGTERM the node by PID; make sure none of its service processes is left."""
        if self.proc is None:
            return
        services = child_pids(self.proc.pid)
        code = stop_pid(self.proc, warn=True)
        if self._reader is not None:
            self._reader.join(10)
        self.proc = None
        if code != 0:
            print(f"warning: node {self.name} exited with {code}", file=sys.stderr)
        deadline = time.monotonic() + 5
        left = [p for p in services if running(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for p in left if running(p)]
        for pid in left:
            print(f"warning: service pid {pid} of node {self.name} outlived it; SIGKILL",
                  file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class EchoServer:
    """The raw pycapnp baseline: this script with --echo-server, in its own process."""

    def __init__(self, root: Path) -> None:
        self.schema = root / "echo.capnp"
        self.schema.write_text(ECHO_SCHEMA.format(id=secrets.randbits(64) | 1 << 63))
        self.unix_path = str(root / "echo.sock")
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--echo-server", str(self.schema),
             self.unix_path, self.host, str(self.port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=child_env(),
            preexec_fn=die_with_parent)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"echo server did not start: {line!r}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc, grace=5, warn=True)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


def serve_echo(schema_path: str, unix_path: str, host: str, port: int) -> None:
    """--echo-server mode: a minimal pycapnp server, no metac code involved."""
    capnp.remove_import_hook()
    echo = capnp.load(schema_path)

    class Echo(echo.Echo.Server):
        async def echo(self, v: int, **kwargs: Any) -> int:
            return v

    async def handle(stream: Any) -> None:
        server = capnp.TwoPartyServer(stream, bootstrap=Echo())
        await server.on_disconnect()

    async def main() -> None:
        unix = await capnp.AsyncIoStream.create_unix_server(handle, unix_path)
        tcp = await capnp.AsyncIoStream.create_server(handle, host, port)
        async with unix, tcp:
            print("ready", flush=True)
            await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(capnp.run(main()))


# --- measurements ----------------------------------------------------------------------


def run_rpc(coro: Awaitable[Any]) -> Any:
    return asyncio.run(capnp.run(coro))  # type: ignore[arg-type]


async def bench_latency(a: Node, echo: EchoServer, sizes: Sizes) -> list[dict[str, Any]]:
    """(a): one call, many times, on each path."""
    rows: list[dict[str, Any]] = []
    capnp.remove_import_hook()
    echo_schema = capnp.load(str(echo.schema))

    def row(path: str, hops: str, samples: list[int]) -> None:
        rows.append({"path": path, "hops": hops, **summary_us(samples)})

    # raw pycapnp baselines
    stream = await capnp.AsyncIoStream.create_unix_connection(echo.unix_path)
    client = capnp.TwoPartyClient(stream)
    cap = client.bootstrap().cast_as(echo_schema.Echo)
    row("raw pycapnp echo, unix socket", "client -> echo",
        await time_calls(lambda: cap.echo(7), sizes.calls, sizes.warmup))
    client.close()
    stream.close()

    stream = await capnp.AsyncIoStream.create_connection(echo.host, echo.port)
    client = capnp.TwoPartyClient(stream)
    cap = client.bootstrap().cast_as(echo_schema.Echo)
    row("raw pycapnp echo, TCP", "client -> echo",
        await time_calls(lambda: cap.echo(7), sizes.calls, sizes.warmup))
    client.close()
    stream.close()

    # metac: Counter.value through NodeAdmin (unix socket, root)
    async with api.connect_admin(str(a.runtime_dir)) as admin:
        dadmin = await api.service_admin(admin, "demo", demo.DemoAdmin)
        counter = (await dadmin.makeCounter("latency")).counter
        await counter.increment(1)
        ref = api.ref_from_struct((await counter.createSturdyRef(persistent=False)).id)
        row("metac Counter.value, admin unix socket", "client -> node -> demo",
            await time_calls(counter.value, sizes.calls, sizes.warmup))

        async with open_node(a.address, a.port) as node:
            # metac: Node.address over TCP (answered by the node itself)
            row("metac Node.address, TCP", "client -> node",
                await time_calls(node.address, sizes.calls, sizes.warmup))
            # metac: Counter.value on a restored ref over TCP Node
            restored = await restore_from(node, ref, demo.Counter)
            assert (await restored.value()).value == 1
            row("metac Counter.value, restored ref over TCP", "client -> node -> ... -> demo",
                await time_calls(restored.value, sizes.calls, sizes.warmup))
            del restored
    return rows


async def make_ref(node: Node, name: str, persistent: bool = True) -> SturdyRef:
    async with api.connect_admin(str(node.runtime_dir)) as admin:
        dadmin = await api.service_admin(admin, "demo", demo.DemoAdmin)
        counter = (await dadmin.makeCounter(name)).counter
        await counter.increment(41)
        return api.ref_from_struct((await counter.createSturdyRef(persistent=persistent)).id)


@contextlib.asynccontextmanager
async def open_node(host: str, port: int) -> AsyncIterator[Any]:
    """Node over TCP, closed for real on exit.

    Not api.connect_node / api.NodePool: their Connection.close() closes the
    socket under the still-open asyncio transport, so the next connection in
    the same event loop that gets the same fd fails with "RuntimeError: File
    descriptor N is used by transport" (see bench/README.md). This opens the
    same protocol path and closes the client, then the stream.
    """
    stream = await capnp.AsyncIoStream.create_connection(host, port)
    client = capnp.TwoPartyClient(stream)
    try:
        yield client.bootstrap().cast_as(core.Node)
    finally:
        client.close()
        stream.close()


async def restore_from(node: Any, ref: SturdyRef, interface: Any) -> Any:
    """Node.getService(service).restore(secret), pipelined; errors as MetacErrors."""
    try:
        res = await node.getService(ref.service).service.restore(ref.secret_bytes)
    except capnp.KjException as exc:
        raise errors.from_kj(exc) from None
    return res.obj.as_interface(interface)


async def bench_remote_restore(ref: SturdyRef, sizes: Sizes) -> dict[str, Any]:
    """(b): fresh connection, restore, first call; closed after every sample."""
    samples: list[int] = []
    skip = max(3, sizes.connections // 10)
    for i in range(sizes.connections + skip):
        t0 = time.perf_counter_ns()
        async with open_node(ref.node, ref.port or 901) as node:
            counter = await restore_from(node, ref, demo.Counter)
            value = (await counter.value()).value
            elapsed = time.perf_counter_ns() - t0
            del counter
        assert value >= 41
        if i >= skip:
            samples.append(elapsed)
    return summary_us(samples)


async def bench_create_refs(a: Node, sizes: Sizes) -> dict[str, Any]:
    """(c): persistent createSturdyRef per second on one counter."""
    async with api.connect_admin(str(a.runtime_dir)) as admin:
        dadmin = await api.service_admin(admin, "demo", demo.DemoAdmin)
        counter = (await dadmin.makeCounter("refs")).counter
        for _ in range(20):
            await counter.createSturdyRef(persistent=True)

        samples: list[int] = []
        t0 = time.perf_counter()
        for _ in range(sizes.create_seq):
            s0 = time.perf_counter_ns()
            await counter.createSturdyRef(persistent=True)
            samples.append(time.perf_counter_ns() - s0)
        sequential = sizes.create_seq / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        done = 0
        while done < sizes.create_par:
            batch = min(sizes.in_flight, sizes.create_par - done)
            await asyncio.gather(*(counter.createSturdyRef(persistent=True)
                                   for _ in range(batch)))
            done += batch
        concurrent = sizes.create_par / (time.perf_counter() - t0)
    return {
        "sequential_per_s": round(sequential, 1),
        "sequential_latency": summary_us(samples),
        "concurrent_per_s": round(concurrent, 1),
        "in_flight": sizes.in_flight,
        "n_sequential": sizes.create_seq,
        "n_concurrent": sizes.create_par,
    }


async def fill_store(node: Node, n: int, in_flight: int = 100) -> tuple[float, SturdyRef]:
    """n counters with one persistent ref each; returns (seconds, one of the refs)."""
    async with api.connect_admin(str(node.runtime_dir)) as admin:
        dadmin = await api.service_admin(admin, "demo", demo.DemoAdmin)

        async def one(i: int) -> Any:
            # pipelined: makeCounter's result is used before it arrives
            return (await dadmin.makeCounter(f"c{i}").counter.createSturdyRef(
                persistent=True)).id

        t0 = time.perf_counter()
        last = None
        for start in range(0, n, in_flight):
            ids = await asyncio.gather(*(one(i) for i in range(start, min(n, start + in_flight))))
            last = ids[-1]
        elapsed = time.perf_counter() - t0
        assert last is not None
        return elapsed, api.ref_from_struct(last)


async def check_store(node: Node, ref: SturdyRef) -> tuple[int, float]:
    """After a restart: how many refs the store lists, and a cold restore's time (s)."""
    async with api.connect_admin(str(node.runtime_dir)) as admin:
        padmin = await api.service_admin(admin, "persistence", persistence.PersistenceAdmin)
        count = len((await padmin.listRefs()).refs)
    t0 = time.perf_counter()
    async with open_node(ref.node, ref.port or 901) as node:
        counter = await restore_from(node, ref, demo.Counter)
        name = (await counter.name()).name
        cold = time.perf_counter() - t0
        del counter
    assert name.startswith("c"), name
    return count, cold


def bench_start_to_ready(c: Node, sizes: Sizes) -> dict[str, Any]:
    """(d): start to ready, empty store, then with sizes.refs persistent refs."""
    empty = c.start()
    filled, ref = run_rpc(fill_store(c, sizes.refs))
    c.stop()
    times = []
    count = -1
    cold = float("nan")
    for _ in range(sizes.restarts):
        times.append(c.start())
        count, cold = run_rpc(check_store(c, ref))
        c.stop()
    times.sort()
    return {
        "refs": sizes.refs,
        "empty_store_s": round(empty, 3),
        "with_refs_s": [round(t, 3) for t in times],
        "with_refs_median_s": round(times[len(times) // 2], 3),
        "refs_listed_after_restart": count,
        "fill_s": round(filled, 2),
        "fill_refs_per_s": round(sizes.refs / filled, 1),
        "first_restore_after_restart_ms": round(cold * 1000, 1),
    }


# --- output ----------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    out = []
    w = 46

    def line(label: str, *cols: str) -> None:
        out.append(f"{label:<{w}}" + "".join(f"{c:>12}" for c in cols))

    out.append("(a) one local RPC call (sequential, us)")
    line("  path", "p50", "p99", "mean", "n")
    for r in results["rpc_latency"]:
        line("  " + r["path"], f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}",
             f"{r['mean_us']:.1f}", str(r["n"]))
    b = results["connect_restore_first_call"]
    out.append("")
    out.append(f"(b) connect + restore + first call, ref on another node ({b['node']}, ms)")
    line("  ", "p50", "p99", "mean", "n")
    line("  fresh TCP connection per sample", f"{b['p50_us'] / 1000:.2f}",
         f"{b['p99_us'] / 1000:.2f}", f"{b['mean_us'] / 1000:.2f}", str(b["n"]))
    c = results["create_sturdy_ref"]
    out.append("")
    out.append("(c) persistent createSturdyRef")
    line("  ", "refs/s", "p50 us", "p99 us", "n")
    line("  one call at a time", f"{c['sequential_per_s']:.0f}",
         f"{c['sequential_latency']['p50_us']:.0f}", f"{c['sequential_latency']['p99_us']:.0f}",
         str(c["n_sequential"]))
    line(f"  {c['in_flight']} calls in flight", f"{c['concurrent_per_s']:.0f}", "", "",
         str(c["n_concurrent"]))
    d = results["start_to_ready"]
    out.append("")
    out.append("(d) node start to ready (s)")
    line("  empty store", f"{d['empty_store_s']:.3f}")
    line(f"  {d['refs']:,} persistent refs (median of {len(d['with_refs_s'])})",
         f"{d['with_refs_median_s']:.3f}")
    out.append(f"  (store filled at {d['fill_refs_per_s']:.0f} counters+refs/s; "
               f"{d['refs_listed_after_restart']:,} refs listed after restart; first restore "
               f"after restart {d['first_restore_after_restart_ms']:.1f} ms)")
    return "\n".join(out)


def versions() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for text in f:
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version
        pycapnp = version("pycapnp")
    except Exception:
        pycapnp = "unknown"
    return {"python": platform.python_version(), "pycapnp": pycapnp,
            "metac": getattr(metac, "__version__", "unknown"), "kernel": platform.release(),
            "cpu": cpu, "cpus": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smaller samples)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    parser.add_argument("--refs", type=int, help="refs in the store for (d) "
                        f"(default {FULL.refs} or {QUICK.refs} with --quick)")
    parser.add_argument("--echo-server", nargs=4, metavar=("SCHEMA", "UNIX", "HOST", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        schema_path, unix_path, host, port = args.echo_server
        serve_echo(schema_path, unix_path, host, int(port))
        return 0

    sizes = QUICK if args.quick else FULL
    if args.refs is not None:
        sizes = Sizes(**{**sizes.__dict__, "refs": args.refs})
    # SIGTERM ends the run through the finally blocks below (processes, temp dir).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    root = Path(tempfile.mkdtemp(prefix="metac-bench-"))
    nodes: list[Node] = []
    echo = EchoServer(root)
    started = time.monotonic()
    try:
        a = Node(root, "a", "127.0.0.1", free_port("127.0.0.1"))
        b_addr = loopback_b()
        b = Node(root, "b", b_addr, free_port(b_addr))
        c = Node(root, "c", "127.0.0.1", free_port("127.0.0.1"))
        nodes += [a, b, c]
        print(f"metac core bench ({'quick' if args.quick else 'full'}); nodes: "
              f"a {a.address}:{a.port}, b {b.address}:{b.port}, c {c.address}:{c.port}",
              file=sys.stderr)
        echo.start()
        a.start()
        b.start()
        results: dict[str, Any] = {}
        print("(a) RPC latency ...", file=sys.stderr)
        results["rpc_latency"] = run_rpc(bench_latency(a, echo, sizes))
        echo.stop()
        print("(b) connect + restore + first call ...", file=sys.stderr)
        ref_b = run_rpc(make_ref(b, "remote"))
        results["connect_restore_first_call"] = {
            "node": f"{b.address}:{b.port}", **run_rpc(bench_remote_restore(ref_b, sizes))}
        b.stop()
        print("(c) createSturdyRef ...", file=sys.stderr)
        results["create_sturdy_ref"] = run_rpc(bench_create_refs(a, sizes))
        a.stop()
        print(f"(d) start to ready with {sizes.refs:,} refs ...", file=sys.stderr)
        results["start_to_ready"] = bench_start_to_ready(c, sizes)
    finally:
        echo.stop()
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)

    report = {
        "benchmark": "core",
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.monotonic() - started, 1),
        "host": versions(),
        "sizes": sizes.__dict__,
        "results": results,
    }
    print(table(results))
    print(f"\ntotal {report['duration_s']} s", file=sys.stderr)
    write_json(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
