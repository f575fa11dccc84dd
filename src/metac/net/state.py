"""``Net``: what the network service's server objects share (the explicit context).

It holds the kernel access (netlink thread, nft table), the port pool, the
device table, the keep-list, the live actions (binds and tunnel ends, for
``listBinds``) and the background tasks, and owns their shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from metac.core.tasks import TaskSet
from metac.net import links
from metac.net.devices import DeviceTable, KeepList
from metac.net.firewall import Firewall
from metac.net.links import Netlink
from metac.net.ports import PortPool

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 3.0


class Action(Protocol):
    """A bind or a tunnel end, as listed by ``listBinds``."""

    id: str

    def info(self) -> dict[str, Any]: ...

    def holder_cap(self) -> Any | None: ...

    async def aclose(self, *, shutdown: bool = False) -> None: ...


class Net:
    def __init__(self, *, ctx: Any, netlink: Netlink, firewall: Firewall, ports: PortPool,
                 keep: KeepList, node_ip: str) -> None:
        self.ctx = ctx  # metac.core.service.ServiceContext (node address, NodePool)
        self.netlink = netlink
        self.firewall = firewall
        self.ports = ports
        self.keep = keep
        self.node_ip = str(ipaddress.ip_address(node_ip))
        self.family = ipaddress.ip_address(node_ip).version
        self.devices = DeviceTable(self)
        self.actions: dict[str, Action] = {}
        self.closing = False
        self._tasks = TaskSet()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, owned by this object (cancelled by ``aclose``)."""
        return self._tasks.spawn(coro, name, log_errors=True)

    def collect_soon(self) -> None:
        """Collect right after the current step (a released bind's cycles, owned devices)."""
        async def collect() -> None:
            await asyncio.sleep(0)
            gc.collect()

        self.spawn(collect(), "collect garbage now")

    def node_address(self) -> dict[str, Any]:
        """Our NodeAddress (as a dict for pycapnp parameters)."""
        addr = self.ctx.node_address()
        return {"ip": addr.ip, "port": addr.port}

    async def underlay_mtu(self) -> int:
        mtu = await self.netlink.run(links.mtu_of_address_sync, self.node_ip, what="find MTU")
        return mtu or 1500

    async def underlay_index(self) -> int | None:
        return await self.netlink.run(links.index_of_address_sync, self.node_ip,
                                      what="find node interface")

    async def aclose(self) -> None:
        """Tear down every bind and tunnel end (persistent ones come back on restart)."""
        for action in list(self.actions.values()):
            try:
                await asyncio.wait_for(action.aclose(shutdown=True), SHUTDOWN_TIMEOUT)
            except Exception:
                log.exception("tearing down %s failed", action.id)
        self.closing = True
        await self._tasks.aclose()
        with contextlib.suppress(Exception):
            await self.devices.delete_unkept()
        with contextlib.suppress(Exception):
            await self.firewall.reset()
        await self.netlink.aclose()


async def sweep_unclaimed(net: Net, delay: float) -> None:
    """After ``delay``, forget what no restorer claimed (its refs are gone): the peers of
    binds that were not restored, and kept devices (deleted)."""
    await asyncio.sleep(delay)
    for bind_id in set(net.keep.peers) - set(net.actions):
        net.keep.discard_peer(bind_id)
    claimed = net.devices.owned_ids()
    stale = net.keep.devices - claimed
    if not stale:
        return
    for link in await net.netlink.links():
        marker = link.marker
        if marker is not None and marker.owner in stale and marker.role == "dev":
            await net.netlink.delete(link.index)
            log.info("deleted unclaimed interface %s", link.name)
    for dev_id in stale:
        net.keep.discard_device(dev_id)
