"""The Python API (the CLI is built on it).

Example::

    import asyncio, capnp
    from metac import api

    async def main():
        async with api.connect_admin() as admin:          # local node, as root
            status = await admin.listServices()
        async with api.NodePool() as pool:                # any node, as anybody
            counter = await pool.restore(api.SturdyRef.parse("ref://[fd00::1]/demo/..."),
                                         api.schema.demo.Counter)
            print((await counter.increment(1)).value)

    asyncio.run(capnp.run(main()))

Streams: ``open_stream(cap, local_address=...)`` opens a Stream capability as a
socket (``OpenedStream``); ``pipe_endpoints`` and ``Pump`` copy bytes between
``Endpoint``s.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from metac.codec.refs import DEFAULT_PORT, RefError, SturdyRef

if TYPE_CHECKING:
    from metac.core.client import NodePool, ref_from_struct, ref_to_struct
    from metac.core.pump import Endpoint, Pump, pipe_endpoints
    from metac.core.rpc import rpc_errors
    from metac.core.streams import OpenedStream, local_address_for, open_stream
    from metac.schema import load as schema

#: Names imported when first used (``metac --help`` loads neither capnp nor the schemas).
_LAZY = {
    "NodePool": "metac.core.client", "ref_from_struct": "metac.core.client",
    "ref_to_struct": "metac.core.client",
    "Endpoint": "metac.core.pump", "Pump": "metac.core.pump",
    "pipe_endpoints": "metac.core.pump",
    "rpc_errors": "metac.core.rpc",
    "OpenedStream": "metac.core.streams", "local_address_for": "metac.core.streams",
    "open_stream": "metac.core.streams",
}


def __getattr__(name: str) -> Any:
    if name == "schema":
        value: Any = importlib.import_module("metac.schema.load")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "Endpoint",
    "NodePool",
    "OpenedStream",
    "Pump",
    "RefError",
    "SturdyRef",
    "connect_admin",
    "connect_node",
    "local_address_for",
    "open_stream",
    "pipe_endpoints",
    "ref_from_struct",
    "ref_to_struct",
    "rpc_errors",
    "schema",
    "service_admin",
]


@contextlib.asynccontextmanager
async def connect_admin(runtime_dir: str | None = None) -> AsyncIterator[Any]:
    """NodeAdmin of the local node (root only), selected by runtime dir."""
    from metac.core import paths
    from metac.core.rpc import connect_unix
    from metac.schema import load as schema
    path = paths.admin_socket(paths.runtime_dir(runtime_dir))
    async with connect_unix(path) as conn:
        yield conn.bootstrap(schema.core.NodeAdmin)


@contextlib.asynccontextmanager
async def connect_node(address: str, port: int = DEFAULT_PORT) -> AsyncIterator[Any]:
    """The unprivileged Node of any node, over TCP."""
    from metac.core.rpc import connect_tcp
    from metac.schema import load as schema
    async with connect_tcp(address, port) as conn:
        yield conn.bootstrap(schema.core.Node)


async def service_admin(admin: Any, name: str, interface: Any) -> Any:
    """A service's admin interface, from NodeAdmin (which waits for a restarting one)."""
    from metac.core.client import telling_if_slow
    from metac.core.rpc import rpc_errors
    with telling_if_slow(f"waiting for the {name} service of this node …"):
        async with rpc_errors():
            res = await admin.getServiceAdmin(name)
    return res.service.cast_as(interface)
