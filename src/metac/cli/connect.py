"""The connections of one CLI command, opened when first needed.

``Connection`` is what every command group resolves its arguments through: the
local node's admin socket (root), the admin interface of a service of this node,
the pool of node connections that restores ``ref://`` URIs, and the address to
open a node's streams from. Everything it opens is closed with the command's
``AsyncExitStack``. Streams are opened and piped through ``metac.api``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from metac import api
from metac.codec.refs import SturdyRef, secret_hash, short_id_of


class Connection:
    """Lazily opened: the local NodeAdmin, service admins, the node pool."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self._admin: Any = None
        self._pool: api.NodePool | None = None
        self._services: dict[str, Any] = {}
        self._address: str | None = None

    async def admin(self) -> Any:
        """NodeAdmin of the local node (root only)."""
        if self._admin is None:
            self._admin = await self._stack.enter_async_context(api.connect_admin())
        return self._admin

    async def service_admin(self, name: str, interface: Any) -> Any:
        """The admin interface of this node's service ``name``."""
        if name not in self._services:
            self._services[name] = await api.service_admin(await self.admin(), name, interface)
        return self._services[name]

    async def pool(self) -> api.NodePool:
        if self._pool is None:
            self._pool = await self._stack.enter_async_context(api.NodePool())
        return self._pool

    async def restore(self, ref: SturdyRef, interface: Any) -> Any:
        """The object of ``ref``, from the node it names."""
        return await (await self.pool()).restore(ref, interface)

    def forget(self, ref: SturdyRef) -> None:
        """The connection to ``ref``'s node broke: reconnect on the next restore."""
        if self._pool is not None:
            self._pool.forget(ref.node, ref.port)

    async def node_address(self) -> str:
        """The local node's address (to open its streams from)."""
        if self._address is None:
            node = (await self.admin()).getUnprivilegedNode().node
            self._address = str((await node.address()).address.ip)
        return self._address

    async def group(self, name: str) -> Any:
        """The resource group ``name`` of this node (NotFound if there is none)."""
        padmin = await self.service_admin("persistence", api.schema.persistence.PersistenceAdmin)
        async with api.rpc_errors():
            return (await padmin.getGroup(name)).group

    async def export(self, cap: Any, args: Any) -> None:
        """Make a sturdy ref to ``cap`` as an export command's ``--persistent`` and
        ``--group`` say, and print it."""
        params: dict[str, Any] = {"persistent": bool(args.persistent)}
        if getattr(args, "ref_group", None):  # (`args.group` is the top-level command)
            params["rgroup"] = await self.group(args.ref_group)
        async with api.rpc_errors():
            ref = api.ref_from_struct((await cap.createSturdyRef(**params)).id)
        # The ref alone on stdout (scripts capture it); its short id, as `metac ref ls`
        # shows it and `metac ref rm` takes it, on stderr.
        print(ref.format(), flush=True)
        print(f"id {short_id_of(secret_hash(ref.secret_bytes))}", file=sys.stderr)

    @staticmethod
    def address_toward(ref: SturdyRef) -> str:
        """Our address toward ``ref``'s node (to open its streams from)."""
        return api.local_address_for(ref.node)


def add_group_flag(parser: Any) -> None:
    """``--group NAME`` of every export command."""
    parser.add_argument("--group", metavar="NAME", dest="ref_group",
                        help="file the ref under this resource group (`metac ref group create`); "
                             "`metac ref group rm NAME` revokes it with the group")


@contextlib.asynccontextmanager
async def connection() -> Any:
    """A ``Connection`` whose connections close when the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        yield Connection(stack)
