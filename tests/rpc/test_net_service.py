"""Network service server classes in-process (``_new_client``), against scratch namespaces.

Two ``Net`` states run in this process, each driving the kernel of one host
namespace of a test topology: netlink through pyroute2's helper child (no setns
in this process), nft through ``nsenter``. There is no node and no persistence,
so a bind across the two "nodes" keeps the capability it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import capnp
import pytest

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.client import ref_to_struct
from metac.core.service import Description
from metac.net.binds import restore_bind
from metac.net.devices import KeepList
from metac.net.firewall import Firewall, find_nft
from metac.net.links import Netlink
from metac.net.ports import PortPool
from metac.net.service import BindHolderServer, NetworkAdminServer
from metac.net.state import Net
from metac.schema.load import core, network
from metac.testing.netns import Host, Topology

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


class FakePersistence:
    """Refs of in-process objects, shared by the fake contexts of a test's "nodes"."""

    def __init__(self) -> None:
        self.refs: dict[bytes, dict[str, Any]] = {}  # secret -> the object and how it was made
        self.forgotten: list[str] = []

    def made(self, category: str, *, persistent: bool = True) -> list[dict[str, Any]]:
        return [r for r in self.refs.values()
                if r["category"] == category and r["persistent"] == persistent]

    async def restore(self, ref: SturdyRef, interface: Any = None) -> Any:
        made = self.refs.get(ref.secret_bytes)
        if made is None:
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        return made["cap"].cast_as(interface) if interface is not None else made["cap"]


class FakeContext:
    """The parts of ServiceContext the network service uses, without a node (and without
    persistence unless given a ``FakePersistence``)."""

    def __init__(self, host: Host, persistence: FakePersistence | None = None) -> None:
        self.env = SimpleNamespace(node_address=host.ipv4, node_port=901)
        self.persistence = persistence
        self.pool = persistence or SimpleNamespace()

    def node_address(self) -> Any:
        addr = core.NodeAddress.new_message()
        addr.ip = self.env.node_address
        addr.port = 0
        return addr

    async def create_ref(self, obj: Any, desc: Description, runtime_id: str, group: Any,
                         persistent: bool) -> Any:
        if self.persistence is None:
            raise errors.Unsupported("no persistence in this test")
        secret = secrets.token_bytes(24)
        self.persistence.refs[secret] = {"cap": obj, "category": desc.category,
                                         "data": desc.data, "runtime_id": runtime_id,
                                         "persistent": bool(persistent)}
        return ref_to_struct(SturdyRef.from_parts(self.env.node_address, None, "net", secret))

    async def forget(self, runtime_id: str) -> int:
        assert self.persistence is not None
        self.persistence.forgotten.append(runtime_id)
        gone = [k for k, r in self.persistence.refs.items() if r["runtime_id"] == runtime_id]
        for secret in gone:
            del self.persistence.refs[secret]
        return len(gone)


def make_net(host: Host, tmp: Path, persistence: FakePersistence | None = None) -> Net:
    return Net(ctx=FakeContext(host, persistence), netlink=Netlink(netns=host.netns),
               firewall=Firewall(find_nft(), prefix=host.nsenter_prefix),
               ports=PortPool(20000, 20999), keep=KeepList(str(tmp / host.name / "keep.json")),
               node_ip=host.ipv4)


@contextlib.asynccontextmanager
async def serving(host: Host, tmp: Path, persistence: FakePersistence | None = None
                  ) -> AsyncIterator[tuple[Net, Any]]:
    """A ``Net`` for ``host`` and its ``NetworkServiceAdmin``; the ``Net`` is closed after."""
    net = make_net(host, tmp, persistence)
    try:
        yield net, network.NetworkServiceAdmin._new_client(NetworkAdminServer(net.ctx, net))
    finally:
        await net.aclose()


def add_port(host: Host) -> None:
    """An existing interface ``port0`` on ``host`` (a veth; its other end is ``port0u``)."""
    host.run(["ip", "link", "add", "port0", "type", "veth", "peer", "name", "port0u"])


def ip_json(host: Host, *args: str) -> list[dict[str, Any]]:
    return json.loads(host.run(["ip", "-j", "-d", *args]).stdout or "[]")


def link_names(host: Host) -> set[str]:
    return {link["ifname"] for link in ip_json(host, "link", "show")}


def nft_text(host: Host) -> str:
    return host.run(["nft", "list", "ruleset"]).stdout


def run(coro: Awaitable[Any]) -> Any:
    """Run ``coro`` in a kj loop, with the cyclic collector only on this thread (as the
    service does: the netlink worker thread must never finalize a capability)."""

    async def body() -> Any:
        try:
            return await coro
        finally:
            gc.collect()

    enabled = gc.isenabled()
    gc.disable()
    try:
        return asyncio.run(capnp.run(body()))
    finally:
        if enabled:
            gc.enable()


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def kj_category(exc: BaseException) -> str:
    return errors.from_kj(exc).category


@pytest.fixture
def two_hosts(topology_factory: Callable[[int], Topology]) -> tuple[Host, Host]:
    topo = topology_factory(2)
    return topo.hosts[0], topo.hosts[1]


def test_interfaces_create_rename_list_destroy(two_hosts, tmp_path: Path) -> None:
    a, _ = two_hosts
    before = link_names(a)

    async def main() -> None:
        async with serving(a, tmp_path) as (_, admin):
            ns = admin.rootNamespace().ns
            iface = (await ns.createInterface("x0")).iface
            assert (await iface.getName()).name == "x0"
            (x0,) = ip_json(a, "link", "show", "x0")
            assert x0["ifalias"].startswith("managed by metac net/")
            assert x0["ifalias"].endswith("/dev")
            with pytest.raises(capnp.KjException) as info:
                await ns.createInterface("x0")
            assert kj_category(info.value) == "AlreadyExists"
            for bad in ("", "a/b", "x" * 16):
                with pytest.raises(capnp.KjException) as info:
                    await ns.createInterface(bad)
                assert kj_category(info.value) == "InvalidArgument"
            with pytest.raises(capnp.KjException) as info:
                await ns.getInterface("nosuch0").iface.getName()
            assert kj_category(info.value) == "NotFound"

            await iface.rename("y0")
            assert (await iface.getName()).name == "y0"
            names = [(await i.getName()).name for i in (await ns.listInterfaces()).interfaces]
            assert "y0" in names and "eth0" in names
            assert not any(n.startswith("mcp") for n in names)  # hidden peers are not listed
            peer = next(n for n in link_names(a) if n.startswith("mcp"))
            with pytest.raises(capnp.KjException) as info:
                await ns.getInterface(peer).iface.getName()
            assert kj_category(info.value) == "FailedPrecondition"

            same = (await ns.getInterface("y0")).iface
            assert (await same.localToken()).token == (await iface.localToken()).token
            await same.destroy()
            assert link_names(a) == before
            with pytest.raises(capnp.KjException) as info:
                await iface.getName()
            assert kj_category(info.value) == "NotFound"

            # An interface nobody refers to any more is deleted.
            kept = (await ns.createInterface("z0")).iface
            await kept.getName()
            assert "z0" in link_names(a)
            del kept
            gc.collect()
            await wait_for(lambda: "z0" not in link_names(a))

    run(main())
    assert link_names(a) == before


def test_local_bind_bridges_two_interfaces(two_hosts, tmp_path: Path) -> None:
    a, _ = two_hosts
    before = link_names(a)

    async def main() -> None:
        async with serving(a, tmp_path) as (_, admin):
            ns = admin.rootNamespace().ns
            one = (await ns.createInterface("one")).iface
            two = (await ns.createInterface("two")).iface
            with pytest.raises(capnp.KjException) as info:
                await one.bindTo(one.l2Interface().iface)
            assert kj_category(info.value) == "InvalidArgument"
            holder = (await one.bindTo(two.l2Interface().iface)).holder
            bridges = [lk for lk in ip_json(a, "link", "show", "type", "bridge")]
            assert len(bridges) == 1 and bridges[0]["ifname"].startswith("mcb")
            ports = {lk["ifname"] for lk in ip_json(a, "link", "show", "master",
                                                   bridges[0]["ifname"])}
            assert len(ports) == 2 and all(p.startswith("mcp") for p in ports)
            assert "vxlan" not in str(ip_json(a, "link", "show"))
            (info_,) = (await admin.listBinds()).binds
            assert (info_.kind, info_.device, info_.peer, info_.state) == ("bind", "one", "two",
                                                                            "up")
            # Already bound: a second bind of the same interface is refused.
            three = (await ns.createInterface("three")).iface
            with pytest.raises(capnp.KjException) as info:
                await three.bindTo(one)
            assert kj_category(info.value) == "FailedPrecondition"

            async def wait_released() -> None:
                await holder.cast_as(network.WaitableHolder).wait()

            waiter = asyncio.get_running_loop().create_task(wait_released())
            await info_.holder.release()
            await asyncio.wait_for(waiter, 5)
            assert not ip_json(a, "link", "show", "type", "bridge")
            assert len((await admin.listBinds()).binds) == 0

    run(main())
    assert link_names(a) == before


def test_bind_across_namespaces_builds_protected_vxlan(two_hosts, tmp_path: Path) -> None:
    a, b = two_hosts
    add_port(a)
    a.run(["ip", "addr", "add", "192.168.66.1/24", "dev", "port0u"])
    a.run(["ip", "link", "set", "port0u", "up"])
    before = {a.name: link_names(a), b.name: link_names(b)}

    async def main() -> None:
        async with (serving(a, tmp_path) as (_, admin_a),
                    serving(b, tmp_path) as (_, admin_b)):
            port0 = (await admin_a.rootNamespace().ns.getInterface("port0").iface.l2Interface()).iface
            remote0 = (await admin_b.rootNamespace().ns.createInterface("remote0")).iface
            holder = (await remote0.bindTo(port0)).holder

            (vx_a,) = ip_json(a, "link", "show", "type", "vxlan")
            (vx_b,) = ip_json(b, "link", "show", "type", "vxlan")
            data_a = vx_a["linkinfo"]["info_data"]
            data_b = vx_b["linkinfo"]["info_data"]
            assert data_a["id"] == data_b["id"]  # the same random VNI
            assert data_a["local"] == a.ipv4 and data_b["local"] == b.ipv4
            assert data_a["port"] != 0 and data_b["port"] != 0
            assert data_a["port_range"] == {"low": data_a["port"], "high": data_a["port"] + 1}
            assert not data_a.get("learning") and not data_b.get("learning")
            fdb_a = a.run(["bridge", "fdb", "show", "dev", vx_a["ifname"]]).stdout
            assert f"dst {b.ipv4} port {data_b['port']}" in fdb_a
            rules_b = nft_text(b)
            assert f"ip saddr {a.ipv4} udp sport {data_a['port']} udp dport {data_b['port']} " \
                   "accept" in rules_b
            assert f"udp sport {data_b['port']} meta skuid >= 0 drop" in rules_b
            assert {lk["ifname"] for lk in ip_json(b, "link", "show", "remote0")} == {"remote0"}
            assert ip_json(b, "link", "show", "remote0")[0]["mtu"] == 1450

            b.run(["ip", "addr", "add", "192.168.66.2/24", "dev", "remote0"])
            ping = a.run(["ping", "-c", "2", "-W", "2", "192.168.66.2"], check=False)
            assert ping.returncode == 0, ping.stdout

            (end,) = (await admin_a.listBinds()).binds
            assert (end.kind, end.device, end.state) == ("vxlan", "port0", "up")
            assert end.peer == f"{b.ipv4}:{data_b['port']}"
            (bind,) = (await admin_b.listBinds()).binds
            assert (bind.kind, bind.device, bind.peer) == ("bind", "remote0",
                                                           f"{a.ipv4}:{data_a['port']}")
            await holder.release()
            await wait_for(lambda: not ip_json(a, "link", "show", "type", "vxlan"))
            assert "metac_net" not in nft_text(a) and "metac_net" not in nft_text(b)

    run(main())
    assert {a.name: link_names(a), b.name: link_names(b)} == before


def test_peer_releasing_its_end_ends_the_bind(two_hosts, tmp_path: Path) -> None:
    a, b = two_hosts
    add_port(a)
    before_b = link_names(b)

    async def main() -> None:
        async with (serving(a, tmp_path) as (_, admin_a),
                    serving(b, tmp_path) as (_, admin_b)):
            port0 = admin_a.rootNamespace().ns.getInterface("port0").iface
            remote0 = (await admin_b.rootNamespace().ns.createInterface("remote0")).iface
            holder = (await remote0.bindTo(port0)).holder
            (end,) = (await admin_a.listBinds()).binds
            await end.holder.release()
            await asyncio.wait_for(holder.cast_as(network.WaitableHolder).wait(), 10)
            await wait_for(lambda: not ip_json(b, "link", "show", "type", "vxlan"))
            assert len((await admin_b.listBinds()).binds) == 0

    run(main())
    assert link_names(b) == before_b


def test_setup_vxlan_and_bind_refuse_bad_input(two_hosts, tmp_path: Path) -> None:
    a, b = two_hosts
    add_port(a)

    async def main() -> None:
        async with serving(a, tmp_path) as (_, admin):
            ns = admin.rootNamespace().ns
            port0 = (await ns.getInterface("port0")).iface
            peer = {"ip": b.ipv4, "port": 0}  # only ever an address of the test's namespaces
            cases = [
                (peer, 4789, 0, "InvalidArgument"),
                (peer, 4789, 1 << 24, "InvalidArgument"),
                (peer, 0, 5, "InvalidArgument"),
                ({"ip": "239.1.1.1", "port": 0}, 4789, 5, "InvalidArgument"),
                ({"ip": "fd00::9", "port": 0}, 4789, 5, "Unsupported"),
                ({"ip": "nonsense", "port": 0}, 4789, 5, "InvalidArgument"),
            ]
            for remote, port, vni, category in cases:
                with pytest.raises(capnp.KjException) as info:
                    await port0.setupVxlan(remote=remote, dstPort=port, vniNum=vni)
                assert kj_category(info.value) == category, (remote, port, vni)
            eth0 = (await ns.getInterface("eth0")).iface
            other = (await ns.createInterface("spare0")).iface
            with pytest.raises(capnp.KjException) as info:
                await eth0.bindTo(other)
            assert kj_category(info.value) == "FailedPrecondition"
            assert "node address" in str(info.value)
            assert not ip_json(a, "link", "show", "type", "vxlan")
            assert not ip_json(a, "link", "show", "type", "bridge")

    run(main())
    assert "metac_net" not in nft_text(a)


HOLD_UDP_PORT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("bound", flush=True)
time.sleep(120)
"""


def test_a_port_some_process_holds_is_skipped(two_hosts, tmp_path: Path) -> None:
    a, b = two_hosts
    add_port(a)
    squatter = a.popen([sys.executable, "-c", HOLD_UDP_PORT, "20000"], stdout=subprocess.PIPE,
                       text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "bound"

        async def main() -> None:
            async with serving(a, tmp_path) as (net, admin):
                net.ports = PortPool(20000, 20001)  # two ports; 20000 is taken
                port0 = admin.rootNamespace().ns.getInterface("port0").iface
                for _ in range(3):  # whichever it tries first, it ends on 20001
                    res = await port0.setupVxlan(remote={"ip": b.ipv4, "port": 0},
                                                 dstPort=20000, vniNum=77)
                    assert res.srcPort == 20001
                    (vx,) = ip_json(a, "link", "show", "type", "vxlan")
                    assert vx["linkinfo"]["info_data"]["port"] == 20001
                    await res.holder.release()
                    assert not ip_json(a, "link", "show", "type", "vxlan")
                assert "udp dport 20000" not in nft_text(a)

        run(main())
    finally:
        squatter.kill()
        squatter.wait()


def test_persistent_bind_reuses_its_peer_ref_and_unbind_revokes_its_refs(
        two_hosts, tmp_path: Path) -> None:
    a, b = two_hosts
    add_port(a)
    before_b = link_names(b)
    refs = FakePersistence()

    async def main() -> None:
        async with serving(a, tmp_path, refs) as (_, admin_a):
            port0 = (await admin_a.rootNamespace().ns.getInterface("port0").iface.l2Interface()
                     ).iface
            async with serving(b, tmp_path, refs) as (net_b, admin_b):
                remote0 = (await admin_b.rootNamespace().ns.createInterface("remote0")).iface
                holder = (await remote0.bindTo(port0)).holder
                await holder.createSturdyRef(persistent=True)
                (bind_ref,) = refs.made("bind")
                (peer_ref,) = refs.made("l2iface")  # the one persistent ref of the peer
                bind_id = bind_ref["data"]["id"]
                assert bind_ref["runtime_id"] == f"bind-{bind_id}"
                assert set(net_b.keep.peers) == {bind_id}  # kept outside the description
                assert "other" not in bind_ref["data"]
                mode = os.stat(net_b.keep.path).st_mode
                assert stat.S_IMODE(mode) == 0o600
            # b's service stopped: the persistent bind is down, its refs stay.
            assert refs.forgotten == [] and len(refs.made("bind")) == 1
            assert not ip_json(b, "link", "show", "type", "vxlan")
            await wait_for(lambda: not ip_json(a, "link", "show", "type", "vxlan"))

            # b's service starts again: the bind comes back with the same peer ref.
            async with serving(b, tmp_path, refs) as (net_b, admin_b):
                bind = await restore_bind(net_b, bind_ref["data"])
                restored = BindHolderServer(net_b.ctx, net_b, bind).as_cap()
                await wait_for(lambda bind=bind: bind.state == "up", timeout=15)
                assert len(ip_json(a, "link", "show", "type", "vxlan")) == 1
                assert refs.made("l2iface") == [peer_ref]  # nothing new asked of the peer
                (row,) = (await admin_b.listBinds()).binds
                assert (row.device, row.state, row.persistent) == ("remote0", "up", True)

                # Unbinding (here by the listed holder) revokes the bind's refs for good.
                await row.holder.release()
                assert refs.forgotten == [f"bind-{bind_id}"] and refs.made("bind") == []
                assert net_b.keep.peers == {}
                await wait_for(lambda: not ip_json(a, "link", "show", "type", "vxlan"))
                # Nothing refers to remote0 any more: it goes, and is no longer kept.
                del restored, holder, bind, row
                gc.collect()
                await wait_for(lambda: "remote0" not in link_names(b))
                assert net_b.keep.devices == set()

    run(main())
    assert link_names(b) == before_b
