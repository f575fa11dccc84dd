"""`metac net` end to end: real nodes in namespaces, driven through the CLI.

Endpoints are "containers": extra namespaces named with the topology's prefix
(so the topology's teardown removes them), each with an ``eth0`` whose veth
peer is a device of a node. All traffic stays inside the test's namespaces.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from metac.testing.netns import Host, Topology
from metac.testing.nodes import NodeHost, assert_no_leaks, snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


# --------------------------------------------------------------------------- helpers


def container(node: NodeHost, tag: str, *, dev: str, addr: str) -> Host:
    """Namespace ``<prefix>-<tag>``: its eth0 (``addr``, a /24) is the peer of ``dev`` on ``node``."""
    prefix = node.host.netns.rsplit("-", 1)[0]
    netns = f"{prefix}-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    node.host.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0",
                   "netns", netns])
    host = Host(name=tag, netns=netns, ipv4=addr, ipv6="")
    host.run(["ip", "link", "set", "lo", "up"])
    host.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
    host.run(["ip", "link", "set", "eth0", "up"])
    return host


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def start_bind(node: NodeHost, *uris: str, timeout: float = 30.0) -> subprocess.Popen[str]:
    """``metac net bind URI URI`` in the foreground; returns once it says it is bound."""
    proc = node.popen("net", "bind", *uris)
    line = read_line(proc, timeout)
    if not line.startswith("bound "):
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"net bind {uris} failed ({proc.returncode}): {line}{out}\n{err}")
    return proc


def export(node: NodeHost, dev: str) -> str:
    """``metac net export local:DEV`` on ``node``: the ref it prints."""
    return node.metac("net", "export", f"local:{dev}").stdout.strip()


def bind_new(node: NodeHost, ref: str, dev: str, addr: str) -> subprocess.Popen[str]:
    """Bind ``ref`` to a new interface ``dev`` of ``node`` (in the foreground, as
    ``start_bind``) and give ``dev`` the address ``addr``/24."""
    proc = start_bind(node, ref, f"newlocal:{dev}")
    node.host.run(["ip", "addr", "add", f"{addr}/24", "dev", dev])
    return proc


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)


def pings(host: Host, addr: str, count: int = 1) -> bool:
    proc = host.run(["ping", "-c", str(count), "-W", "1", addr], check=False)
    return proc.returncode == 0


def ping_ok(host: Host, addr: str, timeout: float = 15.0) -> None:
    wait_until(lambda: pings(host, addr), timeout, f"ping {addr} from {host.netns}")


def ping_fails(host: Host, addr: str) -> bool:
    return host.run(["ping", "-c", "2", "-W", "1", addr], check=False).returncode != 0


SERVER = """
import hashlib, socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d)
    n += len(d)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = """
import hashlib, random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[3]))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(data)
c.close()
print(len(data), hashlib.sha256(data).hexdigest())
"""


def tcp_transfer(src: Host, dst: Host, addr: str, size: int = 8 << 20, port: int = 5001) -> None:
    """Send ``size`` bytes over TCP from ``src`` to ``addr`` (in ``dst``); check they arrived."""
    server = dst.popen([sys.executable, "-c", SERVER, addr, str(port)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(server, 10).strip() == "listening"
        sent = src.run([sys.executable, "-c", CLIENT, addr, str(port), str(size)],
                       timeout=60).stdout.strip()
        got, _ = server.communicate(timeout=60)
        assert got.strip() == sent and sent.startswith(f"{size} ")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def ip_json(host: Host, *args: str) -> list[dict[str, Any]]:
    return json.loads(host.run(["ip", "-j", "-d", *args]).stdout or "[]")


def vxlans(node: NodeHost) -> list[dict[str, Any]]:
    return [link["linkinfo"]["info_data"] | {"ifname": link["ifname"]}
            for link in ip_json(node.host, "link", "show", "type", "vxlan")]


def nft(node: NodeHost) -> str:
    return node.host.run(["nft", "list", "ruleset"]).stdout


def net_ls(node: NodeHost) -> dict[str, Any]:
    return json.loads(node.metac("net", "ls", "--json").stdout)


def links_of(*nodes: NodeHost) -> dict[str, set[str]]:
    return {n.name: n.links() for n in nodes}


def net_log(node: NodeHost) -> str:
    path = node.state_dir / "logs" / "node.service-net.log"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_clean_logs(*nodes: NodeHost) -> None:
    """No internal error and no abort in the net service's log."""
    for node in nodes:
        text = net_log(node)
        for bad in ("Traceback", "terminate called", "internal error", " ERROR "):
            assert bad not in text, f"{bad!r} in {node.name}'s net log:\n{text[-3000:]}"


# --------------------------------------------------------------------------- tests


def test_bind_between_nodes_carries_traffic_and_leaves_nothing(nodes_factory) -> None:
    a, b = nodes_factory(2)
    ca = container(a, "ca", dev="port0", addr="192.168.77.1")
    before = links_of(a, b)
    state = snapshot(a, b)

    ref = export(a, "port0")
    assert ref.startswith(f"ref://{a.address}/net/")
    bind = bind_new(b, ref, "remote0", "192.168.77.2")

    ping_ok(ca, "192.168.77.2")
    ping_ok(b.host, "192.168.77.1")
    tcp_transfer(ca, b.host, "192.168.77.2")
    tcp_transfer(b.host, ca, "192.168.77.1", port=5002)

    # What it made: a bridge and a VXLAN device each side (same VNI), plus remote0 on B.
    made_a = a.links() - before[a.name]
    made_b = b.links() - before[b.name]
    assert len(made_a) == 2 and {n[:3] for n in made_a} == {"mcb", "mcv"}
    assert "remote0" in made_b and {n[:3] for n in made_b - {"remote0"}} == {"mcb", "mcv", "mcp"}
    (vx_a,), (vx_b,) = vxlans(a), vxlans(b)
    assert vx_a["id"] == vx_b["id"] and vx_a["port"] != 0 and vx_b["port"] != 0
    (end,) = net_ls(a)["binds"]
    assert (end["kind"], end["device"], end["state"]) == ("vxlan", "port0", "up")
    assert end["peer"] == f"{b.address}:{vx_b['port']}"
    (mine,) = net_ls(b)["binds"]
    assert (mine["kind"], mine["device"], mine["persistent"]) == ("bind", "remote0", False)
    assert mine["peer"] == f"{a.address}:{vx_a['port']}"
    assert "remote0" in net_ls(b)["interfaces"]
    assert str(vx_a["id"]) not in a.metac("net", "ls").stdout  # the VNI is a secret

    code, out, err = stop(bind)
    assert code == 0 and "unbound" in out, err
    wait_until(lambda: links_of(a, b) == before, what="links back to what they were")
    assert "metac_net" not in nft(a) and "metac_net" not in nft(b)
    assert net_ls(a)["binds"] == [] and net_ls(b)["binds"] == []
    assert_no_leaks(state, snapshot(a, b))
    assert_clean_logs(a, b)


def test_three_nodes_binds_stay_isolated(nodes_factory) -> None:
    a, b, c = nodes_factory(3)
    # Same subnet everywhere: only the binds decide who reaches whom.
    c1 = container(a, "c1", dev="p1", addr="192.168.50.1")
    c2 = container(a, "c2", dev="p2", addr="192.168.50.1")
    before = links_of(a, b, c)
    bind_b = bind_new(b, export(a, "p1"), "r0", "192.168.50.2")
    bind_c = bind_new(c, export(a, "p2"), "r0", "192.168.50.3")

    ping_ok(c1, "192.168.50.2")
    ping_ok(c2, "192.168.50.3")
    assert ping_fails(c1, "192.168.50.3")
    assert ping_fails(c2, "192.168.50.2")
    assert ping_fails(b.host, "192.168.50.3")
    assert ping_fails(c.host, "192.168.50.2")

    # Distinct VNIs and distinct local ports on A.
    ends = vxlans(a)
    assert len(ends) == 2
    assert ends[0]["id"] != ends[1]["id"] and ends[0]["port"] != ends[1]["port"]

    # Killing B's CLI drops its holder: B's side and A's end of that tunnel go;
    # the A-C bind keeps working.
    bind_b.kill()
    bind_b.wait()
    wait_until(lambda: b.links() == before[b.name], what="B's links gone")
    wait_until(lambda: len(vxlans(a)) == 1, what="A's end of the B tunnel gone")
    assert pings(c2, "192.168.50.3", count=2)

    code, out, _ = stop(bind_c, signal.SIGINT)
    assert code == 0
    wait_until(lambda: links_of(a, b, c) == before, what="all links back")
    assert "metac_net" not in nft(a)
    assert_clean_logs(a, b, c)


def test_bind_on_one_node_and_unbind_from_another_cli(nodes_factory) -> None:
    (a,) = nodes_factory(1)
    c1 = container(a, "c1", dev="p1", addr="192.168.60.1")
    container(a, "c2", dev="p2", addr="192.168.60.2")
    before = a.links()
    bind = start_bind(a, "local:p1", "local:p2")
    ping_ok(c1, "192.168.60.2")
    made = a.links() - before
    assert len(made) == 1 and next(iter(made)).startswith("mcb")
    assert not vxlans(a)
    (row,) = net_ls(a)["binds"]
    assert (row["kind"], row["device"], row["peer"]) == ("bind", "p1", "p2")

    out = a.metac("net", "unbind", "p1").stdout
    assert out.startswith("released bind p1 <-> p2")
    out, err = bind.communicate(timeout=30)  # the foreground bind notices and exits
    assert bind.returncode == 0 and "the bind was released" in out, err
    assert a.links() == before
    assert ping_fails(c1, "192.168.60.2")


def test_ipv6_nodes(nodes_factory) -> None:
    a, b = nodes_factory(2, ipv6=True)
    assert ":" in a.address
    ca = container(a, "ca", dev="port0", addr="192.168.78.1")
    before = links_of(a, b)
    ref = export(a, "port0")
    assert ref.startswith(f"ref://[{a.address}]/net/")
    bind = bind_new(b, ref, "remote0", "192.168.78.2")
    ping_ok(ca, "192.168.78.2")
    tcp_transfer(ca, b.host, "192.168.78.2", size=2 << 20)
    (vx_a,), (vx_b,) = vxlans(a), vxlans(b)
    assert vx_a["local6"] == a.address and vx_b["local6"] == b.address
    assert f"ip6 saddr {a.address} udp sport {vx_a['port']}" in nft(b)
    assert ip_json(b.host, "link", "show", "remote0")[0]["mtu"] == 1430
    assert stop(bind)[0] == 0
    wait_until(lambda: links_of(a, b) == before, what="links back")
    assert_clean_logs(a, b)


def test_ipv4_and_ipv6_nodes_cannot_be_tunnelled(topology_factory: Callable[[int], Topology]) -> None:
    topo = topology_factory(2)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(NodeHost(topo.hosts[0]))
        b = stack.enter_context(NodeHost(topo.hosts[1], ipv6=True))
        a.start(wait=False)
        b.start()
        a.wait_ready()
        a.host.run(["ip", "link", "add", "port0", "type", "veth", "peer", "name", "port0u"])
        before = links_of(a, b)
        proc = b.metac("net", "bind", export(a, "port0"), "newlocal:remote0", check=False)
        assert proc.returncode == 8, proc.stderr
        assert proc.stderr.strip() == ("metac: Unsupported: cannot tunnel between an IPv4 node "
                                       "and an IPv6 node")
        wait_until(lambda: links_of(a, b) == before, what="nothing left behind")


def test_cli_errors(nodes_factory) -> None:
    (a,) = nodes_factory(1)
    a.host.run(["ip", "link", "add", "p1", "type", "veth", "peer", "name", "p1u"])
    a.host.run(["ip", "link", "add", "p2", "type", "veth", "peer", "name", "p2u"])
    before = a.links()
    cases = [
        (("net", "export", "local:nosuch0"), 3, "NotFound: no interface named nosuch0"),
        (("net", "export", "newlocal:eth0"), 4, "AlreadyExists"),
        (("net", "export", "local:/etc"), 2, "device name"),
        (("net", "bind", "local:p1", "tcp:x:1"), 2, "InvalidArgument"),
        (("net", "bind", "local:eth0", "newlocal:x0"), 6, "carries the node address"),
        (("net", "bind", "local:p1", "local:p1"), 2, "to itself"),
        (("net", "unbind", "7"), 3, "NotFound"),
    ]
    for args, code, text in cases:
        proc = a.metac(*args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert text in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert a.links() == before  # the failed bind's newlocal:x0 was removed again

    bind = start_bind(a, "local:p1", "local:p2")
    proc = a.metac("net", "bind", "local:p1", "newlocal:x1", check=False)
    assert proc.returncode == 6 and "p1 is already bound" in proc.stderr
    assert "x1" not in a.links()
    assert stop(bind)[0] == 0
    assert a.links() == before
