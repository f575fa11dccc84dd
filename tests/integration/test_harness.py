"""Self-tests of metac.testing (netns topologies, NodeHost) that need no real metac node.

Root only. Traffic goes only to addresses inside the namespaces made here.
A tiny fake ``metac`` script stands in for the node and CLI, so the NodeHost
lifecycle (ready line, SIGTERM, kill -9, orphans, mounts, teardown) is tested
before the real node exists.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metac.testing import netns, nodes
from metac.testing.fixtures import assert_no_leaks, snapshot
from metac.testing.netns import Host, Topology, list_netns, root_links, topology
from metac.testing.nodes import NodeHost, NodeStartError

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


def _ping(src: Host, addr: str) -> None:
    proc = src.run(["ping", "-c1", "-W2", addr], check=False)
    assert proc.returncode == 0, f"ping {src.name} -> {addr} failed:\n{proc.stdout}{proc.stderr}"


def test_three_hosts_ping_each_other(topology_factory) -> None:
    if shutil.which("ping") is None:
        pytest.skip("needs ping (Debian package iputils-ping)")
    topo = topology_factory(3)
    assert len(topo.hosts) == 3
    assert len({h.ipv4 for h in topo.hosts}) == 3
    for host in topo.hosts:
        assert netns.links(host) == {"lo", host.ifname}
        addrs = host.run(["ip", "-o", "addr", "show", "dev", host.ifname]).stdout
        assert f"{host.ipv4}/24" in addrs
        (line6,) = [line for line in addrs.splitlines() if f"{host.ipv6}/64" in line]
        assert "tentative" not in line6  # nodad: usable at once
    for src, dst in itertools.permutations(topo.hosts, 2):
        _ping(src, dst.ipv4)
        _ping(src, dst.ipv6)


SERVER = textwrap.dedent("""
    import socket, sys
    addr, family = sys.argv[1], socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    srv = socket.create_server((addr, 901), family=family)
    print("listening", flush=True)
    conn, peer = srv.accept()
    conn.sendall(conn.recv(100).upper() + b" " + peer[0].encode())
    conn.close()
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], 901), timeout=5) as c:
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        print(c.recv(200).decode())
""")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_between_two_hosts(topology_factory, family: str) -> None:
    a, b = topology_factory(2).hosts
    server_addr, client_addr = getattr(a, family), getattr(b, family)
    server = a.popen(
        [sys.executable, "-c", SERVER, server_addr],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening", server.stderr.read()  # type: ignore[union-attr]
        out = b.run([sys.executable, "-c", CLIENT, server_addr], timeout=10).stdout.strip()
        assert out == f"HELLO {client_addr}"
        assert server.wait(5) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()


def test_teardown_removes_namespaces_and_links() -> None:
    netns_before, links_before = list_netns(), root_links()
    with topology(3) as topo:
        names = topo.netns_names()
        assert names == {f"{topo.prefix}-{x}" for x in ("sw", "a", "b", "c")}
        assert netns.netns_links(topo.switch_netns) == {
            "lo",
            topo.bridge,
            *(topo.port(h) for h in topo.hosts),
        }
        assert root_links() - links_before == set(), "the harness touched the root namespace"
        # A process left behind in a host must not keep its namespace alive.
        straggler = topo.hosts[0].popen(["sleep", "60"])
    assert straggler.wait(5) != 0
    assert not names & list_netns()
    assert not {n for n in list_netns() - netns_before if n.startswith(topo.prefix)}
    assert root_links() - links_before == set()


def test_teardown_when_body_raises() -> None:
    links_before = root_links()
    with pytest.raises(RuntimeError, match="boom"), topology(2) as topo:
        names = topo.netns_names()
        assert len(names) == 3
        raise RuntimeError("boom")
    assert not names & list_netns()
    assert root_links() - links_before == set()


def test_teardown_after_setup_fails_half_way(monkeypatch: pytest.MonkeyPatch) -> None:
    real_ip = netns.ip
    created: list[str] = []

    def flaky_ip(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        if args[:2] == ("netns", "add"):
            created.append(args[2])
        if "nodad" in args and str(kw.get("netns", "")).endswith("-b"):
            raise netns.CommandError("injected failure")
        return real_ip(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(netns, "ip", flaky_ip)
    with pytest.raises(netns.CommandError, match="injected"):
        Topology.create(3)
    assert len(created) == 3  # switch, a, b
    assert not set(created) & list_netns()


# --------------------------------------------------------------------------- NodeHost

FAKE_METAC = textwrap.dedent("""
    # Stand-in for `python -m metac`: `node run ...` and a few CLI verbs.
    import argparse, os, signal, socket, subprocess, sys, time
    import metac.testing  # proves PYTHONPATH reaches the child

    args = sys.argv[1:]
    if args[:2] == ["node", "run"]:
        p = argparse.ArgumentParser()
        for opt in ("--address", "--port", "--state-dir", "--runtime-dir"):
            p.add_argument(opt, required=True)
        p.add_argument("--extra-service", action="append", default=[])
        p.add_argument("--mode", default="ok")
        opts = p.parse_args(args[2:])
        if os.environ.get("FAKE_MODE") == "crash":
            print("fake node: cannot start", file=sys.stderr)
            sys.exit(3)
        srv = socket.create_server((opts.address, int(opts.port)))
        child = subprocess.Popen(["sleep", "300"])
        def on_term(*_):
            child.terminate()
            child.wait()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("services:", ",".join(opts.extra_service), file=sys.stderr)
        if os.environ.get("FAKE_MODE") != "hang":
            print("INFO metac node ready", file=sys.stderr)
        while True:
            conn, _ = srv.accept()
            conn.sendall(b"fake-node")
            conn.close()
    elif args[:1] == ["echo"]:
        print(os.environ["METAC_RUNTIME_DIR"], *args[1:])
    elif args[:1] == ["fail"]:
        print("metac: NotFound: no such thing", file=sys.stderr)
        sys.exit(4)
    elif args[:1] == ["cat"]:
        sys.stdout.write(sys.stdin.read().upper())
    elif args[:1] == ["sleep"]:
        time.sleep(300)
""")


@pytest.fixture
def fake_metac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_metac.py"
    script.write_text(FAKE_METAC)
    monkeypatch.setattr(nodes, "metac_argv", lambda: [sys.executable, str(script)])
    return script


@pytest.fixture
def node_pair(topology_factory, fake_metac: Path):
    topo = topology_factory(2)
    made = [NodeHost(h) for h in topo.hosts]
    try:
        yield made
    finally:
        for node in made:
            node.close()


def test_node_lifecycle_and_cli(node_pair: list[NodeHost]) -> None:
    a, b = node_pair
    before = snapshot(a, b)
    a.start({"echo": "metac.testing.echo"}, timeout=10)
    b.start(timeout=10)
    assert "services: echo=metac.testing.echo" in a.log_text()
    tree = a.pids()
    assert len(tree) == 2 and a.proc is not None and a.proc.pid in tree
    assert tree <= a.netns_pids()
    # The node listens on its address inside the topology, reachable from the other host.
    out = b.host.run([sys.executable, "-c", (
        "import socket,sys; s=socket.create_connection((sys.argv[1], 901), timeout=5);"
        "print(s.recv(100).decode())"), a.address]).stdout  # fmt: skip
    assert out.strip() == "fake-node"
    # CLI runner: env, stdin, failures.
    assert a.metac("echo", "x").stdout.split() == [str(a.runtime_dir), "x"]
    assert a.metac("cat", input="abc").stdout == "ABC"
    failed = a.metac("fail", check=False)
    assert failed.returncode == 4 and failed.stderr.startswith("metac: NotFound")
    with pytest.raises(AssertionError, match="(?s)exited 4.*metac: NotFound"):
        a.metac("fail")
    with pytest.raises(AssertionError, match="timed out"):
        a.metac("sleep", timeout=0.5)
    assert a.stop() == 0
    assert not a.orphans()
    assert b.stop() == 0
    assert_no_leaks(before, snapshot(a, b))


def test_kill9_orphans_are_killed_at_close(node_pair: list[NodeHost]) -> None:
    a, _ = node_pair
    a.start(timeout=10)
    cli = a.popen("sleep")
    assert a.kill9() == -9
    orphans = a.orphans()
    assert len(orphans) == 1, "the node's child outlives kill -9"
    with pytest.raises(AssertionError, match="leaked pids"):
        assert_no_leaks({"pids": set()}, {"pids": orphans})
    a.close()
    assert not a.orphans()
    assert cli.poll() is not None
    assert not a.root.exists()


def test_start_failures_raise_with_log_tail(node_pair: list[NodeHost]) -> None:
    a, b = node_pair
    a.env["FAKE_MODE"] = "crash"
    with pytest.raises(NodeStartError, match="(?s)exited with 3.*cannot start"):
        a.start(timeout=10)
    b.env["FAKE_MODE"] = "hang"
    with pytest.raises(NodeStartError, match="(?s)not ready after 0.5s.*services:"):
        b.start(timeout=0.5)
    assert b.running  # left for close()


def test_close_unmounts_and_removes(node_pair: list[NodeHost], tmp_path: Path) -> None:
    a, _ = node_pair
    tracked = tmp_path / "mnt"
    (tracked / "inner").mkdir(parents=True)
    inner = a.state_dir / "m"
    inner.mkdir()
    netns.run_cmd(["mount", "-t", "tmpfs", "harness-test", str(inner)])
    netns.run_cmd(["mount", "-t", "tmpfs", "harness-test", str(tracked / "inner")])
    (inner / "file").write_text("x")
    a.track_mount_root(tracked)
    assert set(a.mounts()) == {str(inner), str(tracked / "inner")}
    a.close()
    assert not nodes.mountpoints([a.root, tracked])
    assert not a.root.exists()
    assert tracked.is_dir()  # registered roots are unmounted, not removed
