"""Exporting an existing bridge (issue 10, item 11): `metac net export local:br0` on a host
bridge with a VM/container network behind it. Real nodes in namespaces, the CLI only.

Binding adds the tunnel's end as one more port of that bridge (Linux cannot make a
bridge a port of another bridge); unbinding takes out only what metac added.
"""

from __future__ import annotations

import pytest
from test_net_bind import (
    assert_clean_logs,
    bind_new,
    container,
    export,
    ip_json,
    links_of,
    net_ls,
    ping_fails,
    ping_ok,
    start_bind,
    stop,
    tcp_transfer,
    vxlans,
    wait_until,
)

from metac.testing.netns import Host
from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


def bridge_with_port(node: NodeHost, tag: str, addr: str) -> Host:
    """``br0`` on ``node`` (up) with ``vport0`` as its port; ``vport0``'s peer is the eth0
    of a container namespace holding ``addr``."""
    node.host.run(["ip", "link", "add", "br0", "type", "bridge"])
    node.host.run(["ip", "link", "set", "br0", "up"])
    host = container(node, tag, dev="vport0", addr=addr)
    node.host.run(["ip", "link", "set", "vport0", "master", "br0"])
    node.host.run(["ip", "link", "set", "vport0", "up"])
    return host


def ports_of(node: NodeHost, bridge: str) -> set[str]:
    return {link["ifname"] for link in ip_json(node.host, "link", "show", "master", bridge)}


def test_export_an_existing_bridge_and_bind_it_across(nodes_factory) -> None:
    a, b = nodes_factory(2)
    vm = bridge_with_port(a, "vm", "192.168.88.1")
    before = links_of(a, b)
    assert ports_of(a, "br0") == {"vport0"}

    ref = export(a, "br0")
    bind = bind_new(b, ref, "remote0", "192.168.88.2")
    ping_ok(vm, "192.168.88.2")
    ping_ok(b.host, "192.168.88.1")
    tcp_transfer(vm, b.host, "192.168.88.2", size=2 << 20)

    # On A: no new bridge, the tunnel's end is a port of br0 next to vport0.
    made_a = a.links() - before[a.name]
    (vx_a,) = vxlans(a)
    assert made_a == {vx_a["ifname"]} and vx_a["ifname"].startswith("mcv")
    assert ports_of(a, "br0") == {"vport0", vx_a["ifname"]}
    (end,) = net_ls(a)["binds"]
    assert (end["kind"], end["device"], end["state"]) == ("vxlan", "br0", "up")

    # Unbinding removes only what metac added: br0 and vport0 stay, up, and joined.
    code, out, err = stop(bind)
    assert code == 0 and "unbound" in out, err
    wait_until(lambda: links_of(a, b) == before, what="links back to what they were")
    assert ports_of(a, "br0") == {"vport0"}
    (br0,) = ip_json(a.host, "link", "show", "br0")
    assert "UP" in br0["flags"]
    assert net_ls(a)["binds"] == []
    assert ping_fails(vm, "192.168.88.2")

    # The same bridge can be bound again, and locally to another interface of A.
    bind = bind_new(b, ref, "remote1", "192.168.88.3")
    ping_ok(vm, "192.168.88.3")
    assert stop(bind)[0] == 0
    wait_until(lambda: links_of(a, b) == before, what="links back after the second bind")
    other = container(a, "c2", dev="p2", addr="192.168.88.4")
    local = start_bind(a, "local:p2", "local:br0")
    ping_ok(other, "192.168.88.1")
    assert ports_of(a, "br0") == {"vport0", "p2"}
    (row,) = net_ls(a)["binds"]
    assert row["ifname"] == "br0"
    assert stop(local)[0] == 0
    wait_until(lambda: ports_of(a, "br0") == {"vport0"}, what="p2 taken out of br0")
    assert "br0" in a.links() and "p2" in a.links()
    assert_clean_logs(a, b)


def test_two_bridges_cannot_be_bound_locally(nodes_factory) -> None:
    (a,) = nodes_factory(1)
    a.host.run(["ip", "link", "add", "br0", "type", "bridge"])
    a.host.run(["ip", "link", "add", "br1", "type", "bridge"])
    before = a.links()
    proc = a.metac("net", "bind", "local:br0", "local:br1", check=False)
    assert proc.returncode == 6, proc.stderr
    assert "cannot bind two bridges" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert a.links() == before
