"""Data-plane building blocks: a protected VXLAN end, a bridge joining ports, a tunnel end.

Each builder takes a ``Revert`` and registers the undo of every step right
after the step, so a failure half way leaves nothing behind and a finished
plane is undone by closing the stack (``rv.pop_all()`` hands it to a holder).

``TunnelEnd`` is the result of ``L2Interface.setupVxlan`` on the node owning
the interface: port reserved and protected, VXLAN device pointing at the
caller, bridged with the interface.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metac import errors
from metac.codec.refs import show_endpoint
from metac.core.holder import Revert
from metac.net import links
from metac.net.devices import Device, new_id
from metac.net.firewall import PortRule
from metac.net.links import Marker, PortInUse
from metac.net.ports import tunnel_mtu

if TYPE_CHECKING:
    from metac.net.state import Net

log = logging.getLogger(__name__)

PORT_ATTEMPTS = 8


@dataclass
class VxlanEnd:
    owner: str
    port: int
    index: int
    name: str


async def check_bindable(net: Net, dev: Device) -> links.Link:
    """The device's link, if it may be bridged now (else a clear error)."""
    link = await net.devices.refresh(dev)
    port = link if dev.port_index == dev.index else await net.netlink.get(index=dev.port_index)
    if port is None:
        raise errors.NotFound(f"{dev.name} lost its veth peer")
    if port.master:
        master = await net.netlink.get(index=port.master)
        raise errors.FailedPrecondition(
            f"{dev.name} is already bound (part of {master.name if master else 'a bridge'})")
    if link.name == "lo":
        raise errors.InvalidArgument(f"{dev.name} cannot be bridged")
    if link.kind == "bridge":
        # An existing bridge gets our end as one more port (see join_bridge); its own
        # address, if it carries the node's, stays where it is.
        return link
    if dev.index == await net.underlay_index():
        raise errors.FailedPrecondition(
            f"{dev.name} carries the node address; bridging it would cut the node off")
    return link


async def plan_mtu(net: Net, dev: Device, rv: Revert) -> int:
    """MTU for the VXLAN device; an owned device is set to the tunnel MTU."""
    tmtu = tunnel_mtu(await net.underlay_mtu(), net.family)
    link = await net.devices.refresh(dev)
    if not dev.owned:
        # Not ours to change: frames up to its MTU must pass, so the outer
        # packets may be fragmented (set the device's MTU to tmtu to avoid it).
        return max(tmtu, link.mtu)
    if link.mtu != tmtu:
        old = link.mtu
        for index in (dev.index, dev.port_index):
            await net.netlink.run(links.set_mtu_sync, index, tmtu, what="set MTU")

        async def restore() -> None:
            for index in (dev.port_index, dev.index):
                try:
                    await net.netlink.run(links.set_mtu_sync, index, old, what="restore MTU")
                except errors.NotFound:
                    pass

        rv.add(restore, f"restore MTU of {dev.name}")
    return tmtu


async def open_vxlan_end(net: Net, rv: Revert, *, owner: str, vni: int, mtu: int,
                         peer: tuple[str, int] | None = None) -> VxlanEnd:
    """Reserve a unique UDP port, protect it, create a VXLAN device on it.

    The packet filter is in place before the device binds the port. A port
    some other socket holds (EADDRINUSE) is skipped.
    """
    name = f"mcv{owner}"
    skip: set[int] = set()
    for _ in range(PORT_ATTEMPTS):
        busy = {lk.vxlan_port for lk in await net.netlink.links() if lk.kind == "vxlan"}
        port = net.ports.reserve(busy | skip)
        rule = PortRule(port, *(peer or (None, None)))
        try:
            await net.firewall.put(owner, rule)
        except BaseException:
            net.ports.release(port)
            raise
        try:
            index = await net.netlink.run(
                links.create_vxlan_sync, name, vni=vni, local=net.node_ip, port=port, mtu=mtu,
                marker=Marker(owner, "vxlan"), what=f"create VXLAN device {name}")
        except PortInUse:
            log.info("UDP port %d is in use; trying another", port)
            await net.firewall.drop(owner)
            net.ports.release(port)
            skip.add(port)
            continue
        except BaseException:
            await net.firewall.drop(owner)
            net.ports.release(port)
            raise

        async def undo(index: int = index, port: int = port) -> None:
            try:
                await net.netlink.delete(index)
            finally:
                await net.firewall.drop(owner)
                net.ports.release(port)

        rv.add(undo, f"remove VXLAN device {name}")
        if peer is not None:
            await net.netlink.run(links.set_vxlan_peer_sync, index, ip=peer[0], port=peer[1],
                                  what="set VXLAN remote")
        return VxlanEnd(owner, port, index, name)
    raise errors.Unavailable("no free UDP port for the tunnel")


async def connect_vxlan_end(net: Net, end: VxlanEnd, *, ip: str, port: int) -> None:
    """Point a VXLAN end at its peer and accept the peer's packets (only those)."""
    await net.netlink.run(links.set_vxlan_peer_sync, end.index, ip=ip, port=port,
                          what="set VXLAN remote")
    await net.firewall.put(end.owner, PortRule(end.port, ip, port))


async def join_bridge(net: Net, rv: Revert, *, owner: str, ports: list[int]) -> str:
    """Join ``ports`` (link indexes) on one bridge; returns the bridge's name.

    If one of them is a bridge already (``local:br0`` exported), the others become
    its ports (Linux cannot make a bridge a port of another bridge); undoing takes
    out only what was added. Otherwise a new bridge ``mcb<owner>`` joins them.
    """
    existing = []
    for index in ports:
        link = await net.netlink.get(index=index)
        if link is not None and link.kind == "bridge":
            existing.append(link)
    if len(existing) > 1:
        raise errors.FailedPrecondition(
            f"cannot bind two bridges ({existing[0].name}, {existing[1].name}) to each other; "
            "export a port of one of them instead")
    if existing:
        bridge, name = existing[0].index, existing[0].name
        ports = [index for index in ports if index != bridge]
    else:
        name = f"mcb{owner}"
        bridge = await net.netlink.run(links.create_bridge_sync, name,
                                       marker=Marker(owner, "bridge"),
                                       what=f"create bridge {name}")

        async def delete_bridge() -> None:
            await net.netlink.delete(bridge)

        rv.add(delete_bridge, f"remove bridge {name}")
    for index in ports:
        link = await net.netlink.get(index=index)
        if link is None:
            raise errors.NotFound("an interface to bind disappeared")
        if link.master:
            raise errors.FailedPrecondition(f"{link.name} is already part of a bridge")
        await net.netlink.run(links.set_master_sync, index, bridge, what=f"bridge {link.name}")

        async def release(index: int = index) -> None:
            try:
                await net.netlink.run(links.set_master_sync, index, 0, what="unbridge")
            except errors.NotFound:
                pass

        rv.add(release, f"take {link.name} out of {name}")
        if not link.up:
            await net.netlink.run(links.set_up_sync, index, True, what=f"set {link.name} up")

            async def down(index: int = index) -> None:
                try:
                    await net.netlink.run(links.set_up_sync, index, False, what="set down")
                except errors.NotFound:
                    pass

            rv.add(down, f"set {link.name} down again")
    if not existing:
        await net.netlink.run(links.set_up_sync, bridge, True, what=f"set {name} up")
    elif not existing[0].up:
        await net.netlink.run(links.set_up_sync, bridge, True, what=f"set {name} up")

        async def bridge_down() -> None:
            try:
                await net.netlink.run(links.set_up_sync, bridge, False, what="set down")
            except errors.NotFound:
                pass

        rv.add(bridge_down, f"set {name} down again")
    return name


class TunnelEnd:
    """This node's end of a tunnel made by setupVxlan (listed as kind "vxlan")."""

    kind = "vxlan"

    def __init__(self, net: Net, *, end_id: str, device: Device, end: VxlanEnd, peer: str,
                 plane: Revert) -> None:
        self.id = end_id
        self._net = net
        self.device = device
        self.end = end
        self.peer = peer
        self._plane: Revert | None = plane
        self.holder: weakref.ref[Any] | None = None

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "ifname": self.end.name, "peer": self.peer,
                "device": self.device.name, "state": "up" if self._plane else "released",
                "persistent": False}

    def holder_cap(self) -> Any | None:
        holder = self.holder() if self.holder else None
        return holder.as_cap() if holder is not None and holder.active else None

    async def aclose(self, *, shutdown: bool = False) -> None:
        plane, self._plane = self._plane, None
        self._net.actions.pop(self.id, None)
        if plane is not None:
            log.info("removing tunnel end %s (peer %s)", self.end.name, self.peer)
            await plane.aclose()


async def open_tunnel_end(net: Net, device: Device, *, peer_ip: str, peer_port: int,
                          vni: int) -> TunnelEnd:
    """setupVxlan: a protected VXLAN end towards ``peer_ip``:``peer_port``, bridged with ``device``."""
    await check_bindable(net, device)
    end_id = new_id()
    async with Revert() as rv:
        mtu = await plan_mtu(net, device, rv)
        end = await open_vxlan_end(net, rv, owner=end_id, vni=vni, mtu=mtu,
                                   peer=(peer_ip, peer_port))
        await join_bridge(net, rv, owner=end_id, ports=[end.index, device.port_index])
        plane = rv.pop_all()
    tunnel = TunnelEnd(net, end_id=end_id, device=device, end=end,
                       peer=show_endpoint(peer_ip, peer_port), plane=plane)
    net.actions[end_id] = tunnel
    log.info("tunnel end %s: %s <-> %s (local port %d)", end.name, device.name, tunnel.peer,
             end.port)
    return tunnel
