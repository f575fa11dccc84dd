"""Network service server classes (paper sections 4 and 8.2) and the service definition.

Server classes are thin: they validate input, call ``devices``/``tunnels``/
``binds``, and return capabilities. Holders and interfaces are handed out
through ``as_cap()`` so that they keep their full interface type when they
travel in an ``AnyPointer`` (persistence, restorers) or a field of a base type.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

from metac import errors
from metac.core.holder import HolderServer
from metac.core.rpc import Servant
from metac.core.service import (
    Description,
    PersistableMixin,
    ServiceContext,
    ServiceDefinition,
    run_service,
)
from metac.net import links
from metac.net.binds import Bind, open_bind, restore_bind
from metac.net.devices import Device, KeepList, valid_ifname
from metac.net.firewall import Firewall, find_nft
from metac.net.links import Netlink
from metac.net.ports import PortPool, check_peer_ip, check_port, check_vni, port_range_from_env
from metac.net.state import Net, sweep_unclaimed
from metac.net.tunnels import TunnelEnd, open_tunnel_end
from metac.schema.load import network

log = logging.getLogger("metac.net")

#: How long kept devices wait for their restorer after a start before they are swept.
KEEP_GRACE = 120.0


class _NetPersistable(PersistableMixin):
    """Persisted as its fully typed capability (``as_cap``)."""

    _ctx: ServiceContext
    _net: Net
    #: The fully typed capability of this server (each server class defines it).
    as_cap: Callable[[], Any]

    def ref_cap(self) -> Any:
        return self.as_cap()


class _DeviceMethods(_NetPersistable):
    """L2Interface methods, shared by L2Interface and KernelInterface servers."""

    #: Its persistence category (``NetService.restore_<category>``).
    category: str

    def __init__(self, ctx: ServiceContext, net: Net, dev: Device) -> None:
        self._ctx, self._net, self._dev = ctx, net, dev

    async def describe(self, persistent: bool) -> Description:
        await self._net.devices.refresh(self._dev)
        if persistent and self._dev.owned:
            self._net.keep.add_device(self._dev.id)
        return Description(self.category, {"dev": self._dev.describe()}, active=self._dev.owned)

    async def setupVxlan(self, remote: Any, dstPort: int, vniNum: int, _context: Any,
                         **kwargs: Any) -> None:
        peer_ip = check_peer_ip(remote.ip, family=self._net.family)
        tunnel = await open_tunnel_end(self._net, self._dev, peer_ip=peer_ip,
                                       peer_port=check_port(dstPort, "dstPort"),
                                       vni=check_vni(vniNum))
        local = _context.results.init("local")
        addr = self._ctx.node_address()
        local.ip, local.port = addr.ip, addr.port
        _context.results.srcPort = tunnel.end.port
        _context.results.holder = TunnelHolderServer(tunnel).as_cap()

    async def bindTo(self, other: Any, _context: Any, **kwargs: Any) -> None:
        if other is None:
            raise errors.InvalidArgument("bindTo needs another interface")
        bind = await open_bind(self._net, self._dev, other)
        _context.results.holder = BindHolderServer(self._ctx, self._net, bind).as_cap()

    async def localToken(self, **kwargs: Any) -> bytes:
        return self._dev.token


class L2InterfaceServer(_DeviceMethods, network.L2Interface.Server):
    """An L2 port: can only be tunnelled or bound (what `metac net export` hands out)."""

    category = "l2iface"

    def as_cap(self) -> Any:
        return network.L2Interface._new_client(self)


class KernelInterfaceServer(_DeviceMethods, network.KernelInterface.Server):
    category = "kiface"

    def as_cap(self) -> Any:
        return network.KernelInterface._new_client(self)

    async def getName(self, **kwargs: Any) -> str:
        return (await self._net.devices.refresh(self._dev)).name

    async def rename(self, newname: str, **kwargs: Any) -> None:
        newname = valid_ifname(newname)
        await self._net.devices.refresh(self._dev)
        if await self._net.netlink.get(name=newname) is not None:
            raise errors.AlreadyExists(f"an interface named {newname} already exists")
        await self._net.netlink.run(links.rename_sync, self._dev.index, newname,
                                    what=f"rename {self._dev.name}")
        log.info("renamed %s to %s", self._dev.name, newname)
        self._dev.name = newname

    async def destroy(self, **kwargs: Any) -> None:
        await self._net.devices.destroy(self._dev)

    async def l2Interface(self, _context: Any, **kwargs: Any) -> None:
        link = await self._net.devices.refresh(self._dev)
        if link.kind != "bridge" and self._dev.index == await self._net.underlay_index():
            raise errors.FailedPrecondition(
                f"{self._dev.name} carries the node address {self._net.node_ip}; exporting "
                "it would let the ref's holder cut the node off")
        _context.results.iface = L2InterfaceServer(self._ctx, self._net, self._dev).as_cap()


class KernelNetworkNamespaceServer(_NetPersistable, network.KernelNetworkNamespace.Server):
    """The service's network namespace (the node's)."""

    def __init__(self, ctx: ServiceContext, net: Net) -> None:
        self._ctx, self._net = ctx, net

    def as_cap(self) -> Any:
        return network.KernelNetworkNamespace._new_client(self)

    async def describe(self, persistent: bool) -> Description:
        return Description("namespace", {})

    def _iface(self, dev: Device) -> Any:
        return KernelInterfaceServer(self._ctx, self._net, dev)

    async def listInterfaces(self, _context: Any, **kwargs: Any) -> None:
        shown = [lk for lk in await self._net.netlink.links()
                 if lk.marker is None or lk.marker.role not in links.INFRASTRUCTURE]
        out = _context.results.init("interfaces", len(shown))
        for i, link in enumerate(shown):
            out[i] = self._iface(await self._net.devices.from_link(link))

    async def createInterface(self, name: str, _context: Any, **kwargs: Any) -> None:
        _context.results.iface = self._iface(await self._net.devices.create(name))

    async def getInterface(self, name: str, _context: Any, **kwargs: Any) -> None:
        _context.results.iface = self._iface(await self._net.devices.open(name))


class _WaitableHolder(HolderServer, network.WaitableHolder.Server):
    """A holder whose ``wait()`` returns when the action is undone."""

    def as_cap(self) -> Any:
        return network.WaitableHolder._new_client(self)

    async def wait(self, **kwargs: Any) -> None:
        await self.released.wait()


class TunnelHolderServer(_WaitableHolder):
    """Holder of a tunnel end made by setupVxlan (held by the node that called it)."""

    def __init__(self, tunnel: TunnelEnd) -> None:
        tunnel.holder = weakref.ref(self)
        super().__init__(tunnel.aclose, f"tunnel end {tunnel.id}")


class BindHolderServer(_NetPersistable, _WaitableHolder):
    """Holder of a bind; persistent binds are re-established when the service starts.
    Undoing the bind (not a shutdown) revokes the holder's refs."""

    def __init__(self, ctx: ServiceContext, net: Net, bind: Bind) -> None:
        self._ctx, self._net, self._bind = ctx, net, bind
        self._runtime_id = bind.runtime_id
        bind.holder = weakref.ref(self)
        _WaitableHolder.__init__(self, bind.aclose, f"bind {bind.id}")

    async def describe(self, persistent: bool) -> Description:
        if not self.active:
            raise errors.FailedPrecondition("the bind was released")
        if persistent:
            await self._bind.make_persistent()
        self._bind.has_refs = True
        return Description("bind", self._bind.describe(), active=True)


class NetworkAdminServer(Servant, network.NetworkServiceAdmin.Server):
    def __init__(self, ctx: ServiceContext, net: Net) -> None:
        self._ctx, self._net = ctx, net

    async def rootNamespace(self, _context: Any, **kwargs: Any) -> None:
        _context.results.ns = KernelNetworkNamespaceServer(self._ctx, self._net)

    async def listBinds(self, _context: Any, **kwargs: Any) -> None:
        rows = []
        for action in list(self._net.actions.values()):
            holder = action.holder_cap()
            if holder is not None:
                rows.append((action.info(), holder))
        out = _context.results.init("binds", len(rows))
        for i, (info, holder) in enumerate(rows):
            for key in ("kind", "ifname", "peer", "device", "state", "persistent"):
                setattr(out[i], key, info[key])
            out[i].holder = holder


class NetService(ServiceDefinition):
    name = "net"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.state: Net | None = None

    def _state(self) -> Net:
        if self.state is None:
            raise errors.Unavailable("the network service is starting")
        return self.state

    async def start(self) -> None:
        env = self.ctx.env
        low, high = port_range_from_env()
        keep = KeepList(os.path.join(env.state_dir, "net", "keep.json"))
        net = Net(ctx=self.ctx, netlink=Netlink(), firewall=Firewall(find_nft()),
                  ports=PortPool(low, high), keep=keep, node_ip=env.node_address)
        self.state = net
        try:
            removed = await net.netlink.run(links.sweep_sync, keep.devices, what="sweep links")
            if removed:
                log.warning("removed stale links of an earlier run: %s", ", ".join(removed))
        except errors.MetacError as exc:
            log.error("sweeping stale links failed: %s", exc)
        try:
            index = await net.underlay_index()
            link = await net.netlink.get(index=index) if index is not None else None
            if link is not None and link.name != "lo":
                net.firewall.egress_device = link.name
        except errors.MetacError as exc:
            log.warning("cannot find the interface of the node address: %s", exc)
        try:
            await net.firewall.reset()
        except errors.MetacError as exc:
            log.error("resetting the packet filter failed: %s", exc)
        if keep.devices or keep.peers:
            net.spawn(sweep_unclaimed(net, KEEP_GRACE), "sweep unclaimed interfaces")

    def admin(self) -> Any:
        return NetworkAdminServer(self.ctx, self._state())

    async def aclose(self) -> None:
        if self.state is not None:
            await self.state.aclose()

    # --- restoring (category -> object) ---

    async def restore_namespace(self, data: dict[str, Any], caps: list[Any]) -> Any:
        return KernelNetworkNamespaceServer(self.ctx, self._state()).as_cap()

    async def restore_kiface(self, data: dict[str, Any], caps: list[Any]) -> Any:
        return await self._restore_device(KernelInterfaceServer, data)

    async def restore_l2iface(self, data: dict[str, Any], caps: list[Any]) -> Any:
        return await self._restore_device(L2InterfaceServer, data)

    async def _restore_device(self, server: type[_DeviceMethods], data: dict[str, Any]) -> Any:
        net = self._state()
        return server(self.ctx, net, await net.devices.resolve(data.get("dev", {}))).as_cap()

    async def restore_bind(self, data: dict[str, Any], caps: list[Any]) -> Any:
        net = self._state()
        return BindHolderServer(self.ctx, net, await restore_bind(net, data)).as_cap()


def main() -> None:
    run_service(NetService)
