"""Client side of the protocol: connect to nodes, restore sturdy refs.

``NodePool`` keeps one TCP connection per remote node for as long as the
capabilities restored through it are in use, and closes them all in ``aclose``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from metac import errors
from metac.codec.refs import DEFAULT_PORT, SturdyRef
from metac.core.rpc import Connection, connect_tcp, rpc_errors
from metac.schema.load import core


def ref_from_struct(msg: Any) -> SturdyRef:
    """A MetacSturdyRef message as a SturdyRef value."""
    port = msg.node.port or None
    return SturdyRef.from_parts(msg.node.ip, port, msg.service, bytes(msg.objectInfo))


def ref_to_struct(ref: SturdyRef) -> Any:
    msg = core.MetacSturdyRef.new_message()
    msg.node.ip = ref.node
    msg.node.port = ref.port or 0
    msg.service = ref.service
    msg.objectInfo = ref.secret_bytes
    return msg


class NodePool:
    """Open connections to nodes (by address), reused and closed together."""

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._nodes: dict[tuple[str, int], tuple[Connection, Any]] = {}
        self._timeout = connect_timeout

    async def node(self, ip: str, port: int | None = None) -> Any:
        key = (ip, port or DEFAULT_PORT)
        entry = self._nodes.get(key)
        if entry is None:
            conn = await self._stack.enter_async_context(
                connect_tcp(key[0], key[1], timeout=self._timeout))
            entry = self._nodes[key] = (conn, conn.bootstrap(core.Node))
        return entry[1]

    def forget(self, ip: str, port: int | None = None) -> None:
        """Drop a broken connection so the next call reconnects."""
        entry = self._nodes.pop((ip, port or DEFAULT_PORT), None)
        if entry is not None:
            entry[0].close()

    async def restore(self, ref: SturdyRef, interface: Any = None) -> Any:
        """Restore ``ref`` from its node; the capability, cast to ``interface``."""
        node = await self.node(ref.node, ref.port)
        try:
            async with rpc_errors():
                service = node.getService(ref.service).service
                res = await service.restore(ref.secret_bytes)
        except errors.Unavailable:
            self.forget(ref.node, ref.port)
            raise
        obj = res.obj.as_interface(interface or core.Persistable)
        return obj

    async def drop_alias(self, ref: SturdyRef) -> None:
        """Revoke an alias ``ref`` (see Persistable.createSturdyRef) on its node."""
        node = await self.node(ref.node, ref.port)
        async with rpc_errors():
            service = node.getService(ref.service).service
            await service.dropAlias(ref.secret_bytes)

    async def aclose(self) -> None:
        self._nodes.clear()
        await self._stack.aclose()

    async def __aenter__(self) -> NodePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
