"""Base of every service process: register with the node, persist and restore objects.

A service is a ``ServiceDefinition`` subclass. ``run_service`` connects to the
node's admin socket, gets a persistence handler, registers the service's
restorer and its two bootstrap capabilities (``Service`` for everybody,
``ServiceAdmin`` for root), and serves until stopped. If the persistence service
goes away the process exits with ``EXIT_RESTART`` so the node restarts it and it
registers afresh.

Server classes make their objects persistable with ``PersistableMixin``: they
describe themselves (category, JSON data, capabilities they hold) and the
mixin asks persistence for a sturdy ref. After a restart, persistence calls the
service's restorer with the same description; ``ServiceDefinition.restore``
(by default its method ``restore_<category>``) rebuilds the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from metac import errors
from metac.codec.refs import SturdyRef, wire_port
from metac.core.client import NodePool
from metac.core.membrane import Membranes
from metac.core.paths import ServiceEnv, admin_socket
from metac.core.process import run_daemon
from metac.core.rpc import Servant, connect_unix
from metac.core.supervisor import Supervisor
from metac.core.untrusted import OwnNode, adopt
from metac.schema.load import core, persistence

log = logging.getLogger(__name__)

EXIT_RESTART = 75  # EX_TEMPFAIL: "start me again"


@dataclass
class Description:
    """How to rebuild an object: its category, JSON data and the capabilities it holds."""

    category: str
    data: dict[str, Any] = field(default_factory=dict)
    caps: list[Any] = field(default_factory=list)
    active: bool = False


class ServiceContext:
    """What a service's server classes are given: identity, node, persistence, supervisor."""

    def __init__(self, env: ServiceEnv, node_admin: Any, handler: Any, supervisor: Supervisor) -> None:
        self.env = env
        self.name = env.name
        self.node_admin = node_admin
        self.handler = handler
        self.supervisor = supervisor
        self.pool = NodePool()
        #: runtime id -> interface schema of this service's persisted objects, so that
        #: Service.restore can serve each one through a proxy of its interface.
        self.interfaces: dict[str, Any] = {}
        #: runtime id -> the object itself where it is a server of this process (the
        #: membrane then calls it without a second dispatch); weak: refs do not keep it.
        self.objects: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.membranes = Membranes(self._adopt_child)

    async def _adopt_child(self, parent_key: bytes, ref: Any, alias: bool) -> None:
        await self.handler.adoptChild(parent=parent_key, child=ref, alias=alias)

    def own_node(self) -> OwnNode:
        """This node's address and port (what its own refs name)."""
        return OwnNode(self.env.node_address, self.env.node_port)

    async def adopt(self, cap: Any, interface: Any, *, persistent: bool = False,
                    what: str = "the capability") -> tuple[SturdyRef, Any]:
        """(its ref, ``cap`` over our own connection): see ``core.untrusted.adopt``."""
        ref, adopted = await adopt(self.pool, self.own_node(), cap, interface,
                                   persistent=persistent, what=what)
        assert ref is not None  # only None with keep_unpersistable
        return ref, adopted

    def node_address(self) -> Any:
        addr = core.NodeAddress.new_message()
        addr.ip = self.env.node_address
        addr.port = wire_port(self.env.node_port)
        return addr

    def note_object(self, runtime_id: str, obj: Any) -> None:
        """Remember ``obj`` by runtime id if it is a server object of this process."""
        if isinstance(obj, Servant):
            with contextlib.suppress(TypeError):  # not weakly referable: no fast path
                self.objects[runtime_id] = obj

    async def forget(self, runtime_id: str) -> int:
        """Revoke every ref of this service's object with ``runtime_id``; how many."""
        return (await self.handler.forget(runtime_id)).revoked

    async def create_ref(self, obj: Any, desc: Description, runtime_id: str,
                         group: Any, persistent: bool) -> Any:
        """Ask persistence for a sturdy ref to ``obj`` (a server object of this service)."""
        schema = getattr(obj, "schema", None)  # a server class's or a typed client's interface
        if schema is not None:
            self.interfaces[runtime_id] = schema
        self.note_object(runtime_id, obj)
        msg = persistence.CapDescription.new_message()
        msg.runtimeId = runtime_id
        msg.category = desc.category
        msg.description = json.dumps(desc.data, sort_keys=True).encode()
        msg.active = desc.active
        caps = msg.init("caps", len(desc.caps))
        for i, cap in enumerate(desc.caps):
            caps[i] = cap
        if group is None:
            res = await self.handler.createSturdyRef(description=msg, persistent=persistent,
                                                     cap=obj)
        else:
            res = await self.handler.createSturdyRef(group=group, description=msg,
                                                     persistent=persistent, cap=obj)
        return res.ref


class PersistableMixin(Servant):
    """Implements Persistable.createSturdyRef for a server class of a service.

    The class sets ``self._ctx`` and implements ``describe(persistent)``; it may
    override ``ref_runtime_id`` (which stored object a ref names), ``ref_cap``
    (the capability persistence keeps) and ``ref_made`` (after a ref was made).
    """

    LOCAL_METHODS = frozenset({"describe"})

    _ctx: ServiceContext
    _runtime_id: str | None = None

    async def describe(self, persistent: bool) -> Description:
        """How to rebuild this object (raise to refuse a ref, e.g. Unsupported)."""
        raise errors.Unsupported(f"{type(self).__name__} cannot be persisted")

    def ref_runtime_id(self, persistent: bool) -> str:
        """The stored object a new ref names: one per live object by default."""
        if self._runtime_id is None:
            self._runtime_id = secrets.token_hex(16)
        return self._runtime_id

    def ref_cap(self) -> Any:
        """The capability persistence keeps for this object (a typed client if needed)."""
        return self

    def ref_made(self, ref: Any, persistent: bool) -> None:
        """Called after persistence made ``ref`` to this object."""

    async def createSturdyRef(self, rgroup: Any, persistent: bool, _context: Any, **kwargs: Any) -> None:
        persistent = bool(persistent)
        description = await self.describe(persistent)  # first: refuses what cannot persist
        if not _context.params._has("rgroup"):
            rgroup = None  # unset: pycapnp hands a null client in
        ref = await self._ctx.create_ref(self.ref_cap(), description,
                                         self.ref_runtime_id(persistent), rgroup, persistent)
        _context.results.id = ref
        self.ref_made(ref, persistent)


class ServiceDefinition:
    """One service: its name, its state, its admin bootstrap object and its restorer.

    ``state`` is the service's own state object (what its server classes share).
    ``restore`` rebuilds a persisted object from its description; by default it
    calls the method ``restore_<category>(data, caps)``.
    """

    name: ClassVar[str]
    state: Any = None

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def restore(self, category: str, data: dict[str, Any], caps: list[Any]) -> Any:
        """The object described by ``category``/``data``/``caps`` (after a restart)."""
        method = getattr(self, f"restore_{category}", None) if category.isidentifier() \
            else None
        if method is None:
            raise errors.NotFound(f"service {self.name} cannot restore {category!r}")
        return await method(data, caps)

    def admin(self) -> Any:
        """The ServiceAdmin server object (root only)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Called once before registration (reap leftovers, sweep stale kernel objects)."""

    async def aclose(self) -> None:
        """Called once when the service stops."""


class ServiceBootstrap(Servant, core.Service.Server):
    """Service for everybody: only restore, scoped to this service's refs.

    The object is handed out through a proxy bound to the ref (core.membrane),
    so revoking the ref cuts it and everything obtained through it."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    async def restore(self, objectInfo: bytes, _context: Any, **kwargs: Any) -> None:
        ctx = self._ctx
        res = await ctx.handler.restore(objectInfo)
        schema = ctx.interfaces.get(res.runtimeId)
        if schema is None:
            # Every object reaches persistence through createSturdyRef or a restorer,
            # which both note its interface: an unknown one is not served unfenced.
            log.warning("no interface known for a restored %s object", ctx.name)
            raise errors.Unavailable("this object cannot be restored now; try again")
        _context.results.obj = ctx.membranes.wrap(
            bytes(res.refKey), bool(res.persistent), res.obj.as_interface(schema), schema,
            local=ctx.objects.get(res.runtimeId))
        _context.results.interfaceId = schema.node.id

    async def dropAlias(self, objectInfo: bytes, **kwargs: Any) -> None:
        await self._ctx.handler.dropAlias(objectInfo)


class RestorerServer(Servant, persistence.Restorer.Server):
    def __init__(self, service: ServiceDefinition) -> None:
        self._service = service
        self._closed = asyncio.get_running_loop().create_future()

    async def restoreFromDescription(self, description: Any, _context: Any, **kwargs: Any) -> None:
        category = str(description.category)
        try:
            data = json.loads(bytes(description.description) or b"{}")
        except ValueError:
            raise errors.InvalidArgument("corrupt description") from None
        caps = list(description.caps)
        obj = await self._service.restore(category, data, caps)
        if isinstance(obj, PersistableMixin) and description.runtimeId:
            # The same stored object: new refs and forget() find its row again.
            obj._runtime_id = description.runtimeId
        if description.runtimeId:
            schema = getattr(obj, "schema", None)  # a server class's or a client's interface
            if schema is not None:
                self._service.ctx.interfaces[description.runtimeId] = schema
            self._service.ctx.note_object(description.runtimeId, obj)
        _context.results.cap = obj

    async def revoke(self, refs: Any, **kwargs: Any) -> None:
        cut = self._service.ctx.membranes.revoke([bytes(r) for r in refs])
        if cut:
            log.info("revocation cut %d capabilit%s handed out by %s", cut,
                     "y" if cut == 1 else "ies", self._service.name)

    async def wait(self, **kwargs: Any) -> None:
        await asyncio.shield(self._closed)


def run_service(definition: type[ServiceDefinition]) -> None:
    """Entry point of a service process (``python -m metac.<service>``)."""
    sys.exit(run_daemon(definition.name, lambda: _serve(definition)))


async def _serve(definition: type[ServiceDefinition]) -> int:
    env = ServiceEnv.from_environ(definition.name)
    supervisor = Supervisor(env.state_dir, env.name)
    await supervisor.reap_orphans()
    try:
        async with connect_unix(admin_socket(env.runtime_dir)) as conn:
            node_admin = conn.bootstrap(core.NodeAdmin)
            padmin = (await node_admin.getServiceAdmin("persistence")).service
            padmin = padmin.cast_as(persistence.PersistenceAdmin)
            handler = (await padmin.getHandlerFor(env.name)).handler
            ctx = ServiceContext(env, node_admin, handler, supervisor)
            service = definition(ctx)
            await service.start()
            try:
                restorer = RestorerServer(service)
                restorer_holder = (await handler.registerRestorer(restorer)).holder
                registration = (await node_admin.registerNamedService(
                    env.name, ServiceBootstrap(ctx), service.admin())).holder
                log.info("service %s registered", env.name)
                try:
                    # Returns (or fails) only when persistence goes away.
                    await handler.watch()
                except Exception as exc:
                    log.warning("persistence went away (%s); restarting", errors.from_kj(exc))
                del restorer_holder, registration
                return EXIT_RESTART
            finally:
                await service.aclose()
                await ctx.membranes.aclose()
                await ctx.pool.aclose()
    finally:
        await supervisor.aclose()
