"""NodeAdmin (root, unix socket) and Node (everybody, TCP) server classes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from metac import errors
from metac.core.holder import HolderServer
from metac.core.rpc import Peer, Servant
from metac.node.registry import Registration, Registry
from metac.schema.load import core

log = logging.getLogger(__name__)

# How long a call for a known service waits while it (re)starts.
SERVICE_WAIT = 30.0


def _check_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_" for c in name):
        raise errors.InvalidArgument("bad service name")
    return name


class NodeServer(Servant, core.Node.Server):
    """Bootstrap for everybody: the node's address and each service's unprivileged face."""

    def __init__(self, registry: Registry, address: tuple[str, int], peer: Peer | None = None) -> None:
        self._registry = registry
        self._address = address
        self._peer = peer
        self._handed_out = False

    def _holds_capabilities(self) -> bool:
        # Until getService, the peer holds nothing but this bootstrap (cheap to
        # get again): an idle connection in that state may be closed.
        return self._handed_out

    async def address(self, _context: Any, **kwargs: Any) -> None:
        addr = _context.results.init("address")
        addr.ip = self._address[0]
        addr.port = 0 if self._address[1] == 901 else self._address[1]

    async def getService(self, name: str, _context: Any, **kwargs: Any) -> None:
        self._handed_out = True
        reg = await self._registry.get(_check_name(name), SERVICE_WAIT)
        _context.results.service = reg.service


class NodeAdminServer(Servant, core.NodeAdmin.Server):
    """Bootstrap for root. One per connection: registrations made over a
    connection are dropped explicitly when it ends."""

    def __init__(self, registry: Registry, node: NodeServer,
                 status: Callable[[], list[dict[str, Any]]]) -> None:
        self._registry = registry
        self._node = node
        self._status = status
        self._registrations: list[Registration] = []

    async def getServiceAdmin(self, name: str, _context: Any, **kwargs: Any) -> None:
        reg = await self._registry.get(_check_name(name), SERVICE_WAIT)
        _context.results.service = reg.admin

    async def registerNamedService(self, name: str, service: Any, adminBootstrap: Any,
                                   _context: Any, **kwargs: Any) -> None:
        reg = self._registry.register(_check_name(name), service, adminBootstrap)
        self._registrations.append(reg)
        log.info("service %s registered", name)

        def unregister() -> None:
            self._registry.unregister(reg)

        _context.results.holder = HolderServer(unregister, f"registration of {name}")

    async def getUnprivilegedNode(self, _context: Any, **kwargs: Any) -> None:
        _context.results.node = self._node

    async def listServices(self, _context: Any, **kwargs: Any) -> None:
        rows = self._status()
        out = _context.results.init("services", len(rows))
        for i, row in enumerate(rows):
            out[i].name = row["name"]
            out[i].state = row["state"]
            out[i].pid = row["pid"]
            out[i].restarts = row["restarts"]

    def _disconnected(self) -> None:
        for reg in self._registrations:
            self._registry.unregister(reg)
        self._registrations.clear()
