"""`metac net` across restarts: persistent binds and exports come back, stale links are swept."""

from __future__ import annotations

import json
import time

import pytest
from test_net_bind import (
    assert_clean_logs,
    bind_new,
    container,
    export,
    net_log,
    net_ls,
    nft,
    ping_ok,
    pings,
    start_bind,
    vxlans,
    wait_until,
)

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


def service(node: NodeHost, name: str) -> dict:
    status = json.loads(node.metac("node", "status", "--json").stdout)
    (svc,) = [s for s in status["services"] if s["name"] == name]
    return svc


def refs(node: NodeHost, category: str, *, persistent: bool = True) -> list[dict]:
    """The node's refs of net objects of ``category`` (``metac ref ls``)."""
    rows = json.loads(node.metac("ref", "ls", "--json").stdout)
    return [r for r in rows if (r["service"], r["category"], r["persistent"])
            == ("net", category, persistent)]


def addresses(node: NodeHost, dev: str) -> list[str]:
    out = json.loads(node.host.run(["ip", "-j", "addr", "show", "dev", dev]).stdout)
    return [a["local"] for a in out[0]["addr_info"] if a["family"] == "inet"]


def test_persistent_bind_survives_restarts_of_both_nodes(nodes_factory) -> None:
    a, b = nodes_factory(2)
    ca = container(a, "ca", dev="port0", addr="192.168.81.1")
    before = {a.name: a.links(), b.name: b.links()}
    # A persistent bind needs a persistent export: a holder of a non-persistent ref cannot
    # make refs that outlive it (test_revocation).
    exported = a.metac("net", "export", "--persistent", "local:port0").stdout.strip()
    proc = b.metac("net", "bind", "--persistent", exported, "newlocal:remote0")
    bind_ref = proc.stdout.strip()
    assert bind_ref.startswith(f"ref://{b.address}/net/") and "persistent" in proc.stderr
    b.host.run(["ip", "addr", "add", "192.168.81.2/24", "dev", "remote0"])
    ping_ok(ca, "192.168.81.2")  # the CLI is gone; the node keeps the bind
    (row,) = net_ls(b)["binds"]
    assert row["persistent"] is True and row["state"] == "up"
    (export_ref,) = [r for r in refs(a, "l2iface") if not r["parent"]]
    # B asked A for one persistent ref of port0, through the export: its child.
    (peer_ref,) = [r for r in refs(a, "l2iface") if r["parent"]]
    assert peer_ref["parent"] == export_ref["id"]
    assert len(refs(b, "bind")) == 1

    # B restarts: the bind comes back, on the same remote0 (its address kept).
    b.stop()
    b.start()
    ping_ok(ca, "192.168.81.2", timeout=30)
    assert addresses(b, "remote0") == ["192.168.81.2"]
    assert len(vxlans(a)) == 1 and len(vxlans(b)) == 1  # old ends were removed

    # A restarts: B notices its peer went away and re-establishes the tunnel.
    a.stop()
    a.start()
    ping_ok(ca, "192.168.81.2", timeout=60)
    assert len(vxlans(a)) == 1 and len(vxlans(b)) == 1
    wait_until(lambda: net_ls(b)["binds"][0]["state"] == "up", what="bind up again")

    # B starts while A is down: the bind is restored at once and waits for its peer.
    a.stop()
    b.stop()
    b.start()
    wait_until(lambda: [r["state"].split(":")[0] for r in net_ls(b)["binds"]]
               in (["connecting"], ["broken"]), what="bind listed, waiting for A")
    a.start()
    ping_ok(ca, "192.168.81.2", timeout=60)
    # Re-establishing it never asked A for another persistent ref.
    assert refs(a, "l2iface") == [export_ref, peer_ref]

    # Unbinding by its ref releases it on both nodes and revokes its refs.
    out = b.metac("net", "unbind", bind_ref).stdout
    assert "released the bind and revoked its refs" in out
    assert refs(b, "bind") == [] and refs(b, "bind", persistent=False) == []
    wait_until(lambda: a.links() == before[a.name] and b.links() == before[b.name],
               what="links back to what they were")
    assert_clean_logs(a, b)
    assert "metac_net" not in nft(a) and "metac_net" not in nft(b)
    b.stop()
    b.start()
    time.sleep(1)
    assert b.links() == before[b.name] and net_ls(b)["binds"] == []
    assert_clean_logs(a, b)


def test_unbind_by_name_revokes_a_persistent_bind(nodes_factory) -> None:
    (a,) = nodes_factory(1)
    container(a, "c1", dev="p1", addr="192.168.82.1")
    c2 = container(a, "c2", dev="p2", addr="192.168.82.2")
    before = a.links()
    bind_ref = a.metac("net", "bind", "--persistent", "local:p1", "local:p2").stdout.strip()
    ping_ok(c2, "192.168.82.1")
    a.stop()
    a.start()
    ping_ok(c2, "192.168.82.1", timeout=30)
    wait_until(lambda: [b["state"] for b in net_ls(a)["binds"]] == ["up"], what="bind listed")
    assert len(refs(a, "bind")) == 1
    proc = a.metac("net", "unbind", "1")
    assert proc.stdout.startswith("released bind p1 <-> p2 and revoked its refs"), \
        (proc.stdout, proc.stderr, net_log(a)[-3000:])
    assert a.links() == before, net_log(a)[-3000:]
    # Its ref is gone: not listed, and restoring it fails.
    assert refs(a, "bind") == []
    gone = a.metac("ref", "show", bind_ref, check=False)
    assert gone.returncode == 3 and "NotFound" in gone.stderr, gone.stderr
    gone = a.metac("net", "unbind", bind_ref, check=False)
    assert gone.returncode == 3 and "NotFound" in gone.stderr, gone.stderr
    a.stop()
    a.start()
    time.sleep(1)
    assert a.links() == before and not pings(c2, "192.168.82.1"), net_log(a)[-3000:]
    assert_clean_logs(a)


def test_killed_service_leaves_nothing_after_its_restart(nodes_factory) -> None:
    a, b = nodes_factory(2)
    container(a, "ca", dev="port0", addr="192.168.83.1")
    before = {a.name: a.links(), b.name: b.links()}
    bind = start_bind(b, export(a, "port0"), "newlocal:remote0")
    # A leftover of some earlier crash, and a link that is not ours.
    b.host.run(["ip", "link", "add", "mcbdeadbeef0001", "type", "bridge"])
    b.host.run(["ip", "link", "set", "mcbdeadbeef0001", "alias",
                "managed by metac net/deadbeef0001/bridge"])
    b.host.run(["ip", "link", "add", "keepme0", "type", "veth", "peer", "name", "keepme1"])

    svc = service(b, "net")
    b.host.run(["kill", "-KILL", str(svc["pid"])])
    # The foreground bind learns that its holder is gone.
    _, err = bind.communicate(timeout=30)
    assert bind.returncode == 7 and err.startswith("metac: Unavailable:"), err
    wait_until(lambda: service(b, "net")["state"] == "registered"
               and service(b, "net")["restarts"] >= 1, what="net service back")
    wait_until(lambda: b.links() == before[b.name] | {"keepme0", "keepme1"}, what="B swept")
    wait_until(lambda: a.links() == before[a.name], what="A's tunnel end dropped")
    assert "metac_net" not in nft(b) and "metac_net" not in nft(a)


def test_exported_new_interfaces_persist_only_when_asked(nodes_factory) -> None:
    (a,) = nodes_factory(1)
    before = a.links()
    kept = a.metac("net", "export", "--persistent", "newlocal:ex0").stdout.strip()
    a.metac("net", "export", "newlocal:tmp0")
    assert {"ex0", "tmp0"} <= a.links()
    a.host.run(["ip", "addr", "add", "192.168.84.1/24", "dev", "ex0"])
    a.stop()
    a.start()
    wait_until(lambda: "tmp0" not in a.links(), what="the non-persistent export swept")
    assert "ex0" in a.links() and addresses(a, "ex0") == ["192.168.84.1"]
    a.metac("ref", "rm", kept)
    wait_until(lambda: a.links() == before, what="ex0 removed with its ref")


def test_foreground_bind_follows_its_peer(nodes_factory) -> None:
    a, b = nodes_factory(2)
    ca = container(a, "ca", dev="port0", addr="192.168.85.1")
    before = {a.name: a.links(), b.name: b.links()}
    bind = bind_new(b, export(a, "port0"), "remote0", "192.168.85.2")
    ping_ok(ca, "192.168.85.2")

    # A's net service dies: B re-establishes the tunnel (A's refs are still valid).
    a.host.run(["kill", "-KILL", str(service(a, "net")["pid"])])
    wait_until(lambda: service(a, "net")["restarts"] >= 1, what="A's net service restarted")
    ping_ok(ca, "192.168.85.2", timeout=60)
    assert len(vxlans(a)) == 1 and len(vxlans(b)) == 1
    assert bind.poll() is None

    # A's node restarts: its non-persistent refs are gone, so the bind ends.
    a.stop()
    a.start()
    out, err = bind.communicate(timeout=60)
    assert bind.returncode == 0 and "the bind was released" in out, err
    wait_until(lambda: a.links() == before[a.name] and b.links() == before[b.name],
               what="links back to what they were")
    assert_clean_logs(a, b)
