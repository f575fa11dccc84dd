#!/usr/bin/env python3
"""Network benchmarks: a `metac net` bind next to a plain veth between the same namespaces.

A benchmark, not a test. Needs root: it builds a throw-away topology of network
namespaces (``metac.testing.netns``: hosts A and B on one bridge, no route out),
runs a metac node in each, and adds an endpoint namespace X whose eth0 is the
peer of device ``port0`` on A. All traffic stays inside those namespaces.

Paths between X and B's namespace, measured in the same run:

* **bind**: X -> port0 on A -> bridge -> VXLAN -> (A's eth0, the topology
  bridge, B's eth0) -> VXLAN -> bridge -> remote0 on B, made with
  ``metac net bind ref://A/... newlocal:remote0`` on B;
* **plain veth**: a veth pair straight from X to B (the fast path the bind
  is compared with; target: bind >= 0.7x);
* **underlay** (for reference): A to B over their eth0, the path the VXLAN
  packets take.

For each: iperf3 TCP throughput (one stream, each direction; the median of
``--rounds`` runs, the paths interleaved) and ping round trip (``ping -i 0.01``). Then the time to set up a bind: ``bindTo`` alone over
RPC (from a client in B's namespace), and the whole ``metac net bind
--persistent`` command (Python start-up included).

Prints a table and writes JSON to ``bench/results/net.json``. Every process it
starts is stopped by PID, and the namespaces are deleted, also on failure or
Ctrl-C/SIGTERM.

Usage: python bench/bench_net.py [--quick] [--seconds S] [--rounds N] [--pings N] [--binds N]
                                 [--out FILE]
Needs iperf3, iproute2, iputils-ping, nftables (Debian packages of the same names).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import metac  # noqa: E402
from metac.testing.netns import Host, Topology  # noqa: E402
from metac.testing.nodes import NodeHost  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "net.json"
IPERF_PORT = 5201

# Runs in B's namespace: times bindTo alone (an interface and the remote ref
# are ready before the clock starts), releases, repeats. Prints JSON seconds.
SETUP_PROBE = """
import asyncio, json, sys, time
import capnp
from metac import api
from metac.schema.load import network

async def main(ref_text, n):
    times = []
    async with api.NodePool() as pool, api.connect_admin() as admin:
        net = await api.service_admin(admin, "net", network.NetworkServiceAdmin)
        ns = net.rootNamespace().ns
        other = await pool.restore(api.SturdyRef.parse(ref_text), network.L2Interface)
        for i in range(n):
            iface = (await ns.createInterface(f"probe{i}")).iface
            start = time.perf_counter()
            holder = (await iface.bindTo(other)).holder
            times.append(time.perf_counter() - start)
            await holder.release()
            await iface.destroy()
    print(json.dumps(times))

asyncio.run(capnp.run(main(sys.argv[1], int(sys.argv[2]))))
"""


def sh(host: Host, *argv: str, timeout: float = 60.0) -> str:
    return host.run(list(argv), timeout=timeout).stdout


def make_endpoint(topo: Topology, node: NodeHost, tag: str, dev: str, addr: str) -> Host:
    netns = f"{topo.prefix}-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    node.host.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0",
                   "netns", netns])
    host = Host(name=tag, netns=netns, ipv4=addr, ipv6="")
    sh(host, "ip", "link", "set", "lo", "up")
    sh(host, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
    sh(host, "ip", "link", "set", "eth0", "up")
    return host


def veth_between(x: Host, y: Host, addr_x: str, addr_y: str) -> None:
    """A plain veth pair pv0 (in x) <-> pv0 (in y)."""
    sh(x, "ip", "link", "add", "pv0", "type", "veth", "peer", "name", "pv0", "netns", y.netns)
    for host, addr in ((x, addr_x), (y, addr_y)):
        sh(host, "ip", "addr", "add", f"{addr}/24", "dev", "pv0")
        sh(host, "ip", "link", "set", "pv0", "up")


def wait_ping(host: Host, addr: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while host.run(["ping", "-c", "1", "-W", "1", addr], check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{addr} unreachable from {host.netns}")


def iperf(client: Host, server: Host, addr: str, seconds: float, reverse: bool) -> float:
    """Gbit/s received, one TCP stream (``reverse``: server sends)."""
    srv = server.popen(["iperf3", "-s", "-1", "-B", addr, "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        argv = ["iperf3", "-c", addr, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
        if reverse:
            argv.append("-R")
        out = client.run(argv, timeout=seconds + 30).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def ping_rtt(client: Host, addr: str, count: int) -> dict[str, float]:
    out = sh(client, "ping", "-q", "-c", str(count), "-i", "0.01", addr, timeout=count + 30)
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    if m is None:
        raise RuntimeError(f"cannot parse ping output: {out}")
    lo, avg, hi, mdev = map(float, m.groups())
    return {"min_us": lo * 1000, "avg_us": avg * 1000, "max_us": hi * 1000,
            "mdev_us": mdev * 1000}


def mtu(host: Host, dev: str) -> int:
    return json.loads(sh(host, "ip", "-j", "link", "show", dev))[0]["mtu"]


def cli_bind_times(a: NodeHost, b: NodeHost, ref: str, n: int) -> list[float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        bind_ref = b.metac("net", "bind", "--persistent", ref, f"newlocal:cli{i}").stdout.strip()
        times.append(time.perf_counter() - start)
        b.metac("net", "unbind", bind_ref)
    return times


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1000, "min_ms": xs[0] * 1000,
            "max_ms": xs[-1] * 1000}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Topology.create(2) as topo:
        nodes = [NodeHost(h) for h in topo.hosts]
        try:
            for node in nodes:
                node.start(wait=False)
            for node in nodes:
                node.wait_ready(60)
            a, b = nodes
            x = make_endpoint(topo, a, "x", "port0", "192.168.90.1")
            veth_between(x, b.host, "192.168.91.1", "192.168.91.2")

            ref = a.metac("net", "export", "local:port0").stdout.strip()
            bind = b.popen("net", "bind", ref, "newlocal:remote0")
            assert bind.stdout is not None
            line = bind.stdout.readline()
            if not line.startswith("bound "):
                raise RuntimeError(f"net bind failed: {line}{bind.stderr.read() if bind.stderr else ''}")
            sh(b.host, "ip", "addr", "add", "192.168.90.2/24", "dev", "remote0")
            wait_ping(x, "192.168.90.2")
            wait_ping(x, "192.168.91.2")
            wait_ping(a.host, b.host.ipv4)

            paths = [
                ("bind (VXLAN)", x, b.host, "192.168.90.2"),
                ("plain veth", x, b.host, "192.168.91.2"),
                ("underlay A->B", a.host, b.host, b.host.ipv4),
            ]
            results["mtu"] = {"bind": mtu(b.host, "remote0"), "plain veth": mtu(x, "pv0"),
                              "underlay": mtu(a.host, "eth0")}
            # Rounds interleave the paths, so a slow moment of the machine hits all of them.
            samples: dict[str, dict[str, list[float]]] = {
                name: {"up": [], "down": [], "rtt": []} for name, *_ in paths}
            for _ in range(args.rounds):
                for name, client, server, addr in paths:
                    samples[name]["up"].append(iperf(client, server, addr, args.seconds, False))
                    samples[name]["down"].append(iperf(client, server, addr, args.seconds, True))
            rows = []
            for name, client, _server, addr in paths:
                rtt = ping_rtt(client, addr, args.pings)
                rows.append({"path": name,
                             "gbit_s_up": statistics.median(samples[name]["up"]),
                             "gbit_s_down": statistics.median(samples[name]["down"]),
                             "gbit_s_up_runs": samples[name]["up"],
                             "gbit_s_down_runs": samples[name]["down"], **rtt})
            results["paths"] = rows
            by = {r["path"]: r for r in rows}
            bind_row, plain = by["bind (VXLAN)"], by["plain veth"]
            results["ratio_bind_to_plain_veth"] = {
                "throughput_up": bind_row["gbit_s_up"] / plain["gbit_s_up"],
                "throughput_down": bind_row["gbit_s_down"] / plain["gbit_s_down"],
                "rtt_avg": bind_row["avg_us"] / plain["avg_us"],
            }
            bind.send_signal(signal.SIGTERM)
            bind.communicate(timeout=30)

            probe = b.host.run([sys.executable, "-c", SETUP_PROBE, ref, str(args.binds)],
                               env=b.cli_env(), timeout=300)
            results["setup"] = {
                "bindTo_rpc": summary(json.loads(probe.stdout.strip().splitlines()[-1])),
                "cli_bind_persistent": summary(cli_bind_times(a, b, ref, max(3, args.binds // 4))),
            }
        finally:
            for node in nodes:
                try:
                    node.close()
                except Exception as exc:
                    print(f"warning: {exc}", file=sys.stderr)
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{'path':<16} {'up Gbit/s':>10} {'down Gbit/s':>12} {'rtt avg us':>11} "
          f"{'rtt mdev us':>12}   (throughput: median of runs)")
    for r in results["paths"]:
        print(f"{r['path']:<16} {r['gbit_s_up']:>10.2f} {r['gbit_s_down']:>12.2f} "
              f"{r['avg_us']:>11.1f} {r['mdev_us']:>12.1f}")
    ratio = results["ratio_bind_to_plain_veth"]
    print(f"bind / plain veth: throughput up {ratio['throughput_up']:.2f}x, "
          f"down {ratio['throughput_down']:.2f}x, rtt {ratio['rtt_avg']:.2f}x "
          f"(MTU bind {results['mtu']['bind']}, veth {results['mtu']['plain veth']})")
    s = results["setup"]
    print(f"bind setup: bindTo RPC median {s['bindTo_rpc']['median_ms']:.1f} ms "
          f"(n={s['bindTo_rpc']['n']}, min {s['bindTo_rpc']['min_ms']:.1f}, "
          f"max {s['bindTo_rpc']['max_ms']:.1f}); `metac net bind --persistent` command "
          f"median {s['cli_bind_persistent']['median_ms']:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 s per iperf3 run, fewer samples")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--pings", type=int, default=None)
    p.add_argument("--binds", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="iperf3 runs per path and direction")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.pings = args.pings or (100 if args.quick else 500)
    args.binds = args.binds or (8 if args.quick else 20)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if os.geteuid() != 0:
        sys.exit("bench_net.py needs root (it creates network namespaces)")
    for tool, pkg in (("iperf3", "iperf3"), ("ip", "iproute2"), ("ping", "iputils-ping"),
                      ("nft", "nftables")):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            sys.exit(f"{tool} not found: apt-get install {pkg}")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    results = run(args)
    report = {
        "benchmark": "net",
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.monotonic() - started, 1),
        "host": {"python": platform.python_version(), "metac": metac.__version__,
                 "kernel": platform.release(), "cpus": os.cpu_count()},
        "sizes": {"iperf_seconds": args.seconds, "iperf_rounds": args.rounds,
                  "pings": args.pings, "binds": args.binds},
        "results": results,
    }
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
