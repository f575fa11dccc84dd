"""Persistence service server classes: admin, per-service handlers, groups.

The live-object cache maps stored object ids to capabilities. It is filled by
createSturdyRef (the live object) and by restoring (the restorer's result), and
emptied per service when that service's restorer goes away, so a restarted
service's objects are restored afresh instead of being handed out broken.

Every revocation (``deleteRef``, ``dropGroup``, ``forget``, a parent's) is told
to the services whose refs went (``Restorer.revoke``), which cut what they
handed out through them (core.membrane). A ref minted through another one is
its child (``adoptChild``); ``METAC_REF_CHILD_QUOTA`` (default 1000) bounds the
children of one ref, and ten times as many aliases (refs services make to adopt
a capability; they are dropped when the adopting action ends). Resource groups
are checked by the secret token of the group object this service issued, never
by the name a caller's object gives.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import sys
from typing import Any

from metac import errors
from metac.codec.refs import SturdyRef, ref_port
from metac.core.client import NodePool, ref_from_struct, ref_to_struct
from metac.core.holder import HolderServer
from metac.core.paths import ServiceEnv, admin_socket
from metac.core.process import FatalError, run_daemon
from metac.core.rpc import Servant, connect_unix
from metac.core.sealing import seal, unseal
from metac.core.tasks import TaskSet
from metac.persistence.store import Revoked, Store, open_state, secret_hash, short_id_of
from metac.persistence.summary import summarize
from metac.schema.load import core, persistence

log = logging.getLogger("metac.persistence")

SECRET_BYTES = 24  # 192 random bits per ref
RESTORER_WAIT = 30.0  # how long a restore waits for a (re)starting service
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
ACTIVE_RETRY_MAX = 60.0  # active objects are retried for as long as their service runs
GROUP_TIMEOUT = 5.0  # a resource group handed in must answer token() within this
NOTIFY_TIMEOUT = 5.0  # a service must take a revocation notice within this
CHILD_QUOTA_DEFAULT = 1000
ALIAS_FACTOR = 10  # aliases a ref may have, per child it may have


def child_quota() -> int:
    """Children one ref may have (``METAC_REF_CHILD_QUOTA``)."""
    try:
        value = int(os.environ.get("METAC_REF_CHILD_QUOTA", ""))
    except ValueError:
        return CHILD_QUOTA_DEFAULT
    return value if value >= 0 else CHILD_QUOTA_DEFAULT


class Persistence:
    """State of the persistence service, shared by its server objects."""

    def __init__(self, env: ServiceEnv, store: Store, key: bytes) -> None:
        self.env = env
        self.store = store
        self.key = key
        self.live: dict[int, Any] = {}
        self.live_service: dict[int, str] = {}
        self.restorers: dict[str, Any] = {}
        self.restorer_changed: dict[str, asyncio.Event] = {}
        self.handlers: dict[str, HandlerServer] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        self.pool = NodePool()
        self.tasks = TaskSet()
        self.groups: dict[str, GroupServer] = {}  # the group objects we issued, by name
        self.child_quota = child_quota()

    # --- ownership of background work ---

    def spawn(self, coro: Any, name: str) -> None:
        self.tasks.spawn(coro, name, log_errors=True)

    async def aclose(self) -> None:
        await self.tasks.aclose()
        self.live.clear()
        await self.pool.aclose()
        self.store.close()

    # --- refs ---

    def make_ref_struct(self, service: str, secret: bytes) -> Any:
        ref = SturdyRef.from_parts(self.env.node_address,
                                   ref_port(self.env.node_port),
                                   service, secret)
        return ref_to_struct(ref)

    def is_local(self, ref: SturdyRef) -> bool:
        port = ref_port(self.env.node_port)
        return ref.node == SturdyRef.from_parts(
            self.env.node_address, port, "x", b"\0" * 16).node and ref.port == port

    def drop_live(self, object_ids: list[int]) -> None:
        for oid in object_ids:
            self.live.pop(oid, None)
            self.live_service.pop(oid, None)

    def drop_live_of(self, service: str) -> None:
        self.drop_live([oid for oid, svc in self.live_service.items() if svc == service])

    def revoked(self, revoked: Revoked, dropped: list[int]) -> None:
        """Forget the dropped objects; tell each service which of its refs went."""
        self.drop_live(dropped)
        by_service: dict[str, list[bytes]] = {}
        for digest, service in revoked:
            by_service.setdefault(service, []).append(digest)
        for service, digests in by_service.items():
            restorer = self.restorers.get(service)
            if restorer is not None:
                self.spawn(_notify(service, restorer, digests), f"revoke refs of {service}")

    # --- groups ---

    def issue_group(self, name: str) -> GroupServer:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = GroupServer(name)
        return group

    async def group_id_of(self, group: Any) -> int:
        """The stored id of a group we issued; PermissionDenied for anything else."""
        try:
            token = bytes((await asyncio.wait_for(group.token(), GROUP_TIMEOUT)).token)
        except TimeoutError:
            raise errors.PermissionDenied(
                f"the resource group did not answer within {GROUP_TIMEOUT:g} s") from None
        except Exception:
            raise errors.PermissionDenied("not a resource group of this node") from None
        for name, issued in self.groups.items():
            if hmac.compare_digest(token, issued.secret):
                group_id = self.store.group_id(name)
                if group_id is not None:
                    return group_id
        raise errors.PermissionDenied("not a resource group of this node")

    # --- restorers ---

    def set_restorer(self, service: str, restorer: Any | None) -> None:
        self.drop_live_of(service)
        if restorer is None:
            self.restorers.pop(service, None)
        else:
            self.restorers[service] = restorer
        event = self.restorer_changed.pop(service, None)
        if event is not None:
            event.set()

    async def wait_restorer(self, service: str, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while service not in self.restorers:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise errors.Unavailable(f"service {service!r} is not running; try again")
            event = self.restorer_changed.setdefault(service, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass
        return self.restorers[service]

    # --- restoring ---

    async def restore_secret(self, service: str | None, secret: bytes) -> Any:
        return (await self.restore_row(service, secret))[1]

    async def restore_row(self, service: str | None, secret: bytes) -> tuple[Any, Any]:
        """(the ref's row, its live object)."""
        row = self.store.lookup(secret_hash(secret))
        if row is None or (service is not None and row.service != service):
            # Same answer for unknown, revoked and wrong-service refs.
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        return row, await self.live_object(row.object_id)

    def adopt_child(self, service: str, parent: bytes, child: Any, alias: bool) -> None:
        ref = ref_from_struct(child)
        if ref.service != service or not self.is_local(ref):
            return  # minted elsewhere: that node's own membranes govern it
        digest = secret_hash(ref.secret_bytes)
        grant = self.store.grant_of(parent)  # through an alias: its grant
        if grant is None:
            self.revoked(*self.store.delete_ref(digest)[1:])
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        parent = grant
        quota = self.child_quota * (ALIAS_FACTOR if alias else 1)
        if self.store.count_children(parent, alias=alias) >= quota:
            self.revoked(*self.store.delete_ref(digest)[1:])
            raise errors.PermissionDenied(
                f"this ref already has {quota} {'aliases' if alias else 'refs'} made through "
                "it (the node's METAC_REF_CHILD_QUOTA)")
        if not self.store.set_parent(digest, parent, alias=alias):
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")

    async def live_object(self, object_id: int, timeout: float = RESTORER_WAIT) -> Any:
        cap = self.live.get(object_id)
        if cap is not None:
            return cap
        lock = self.locks.setdefault(object_id, asyncio.Lock())
        async with lock:
            cap = self.live.get(object_id)
            if cap is not None:
                return cap
            obj = self.store.get_object(object_id)
            if obj is None:
                raise errors.NotFound("no such sturdy ref (unknown or revoked)")
            cap = await self._restore_with_backoff(obj, timeout)
            if self.store.object_exists(object_id):
                self.live[object_id] = cap
                self.live_service[object_id] = obj.service
        self.locks.pop(object_id, None)
        return cap

    async def _restore_with_backoff(self, obj: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = BACKOFF_FIRST
        while True:
            try:
                restorer = await self.wait_restorer(obj.service, max(deadline - loop.time(), 0))
                nested = await self._restore_nested(obj.sealed_caps)
                msg = persistence.CapDescription.new_message()
                msg.runtimeId = obj.runtime_id
                msg.category = obj.category
                msg.description = obj.description
                msg.active = obj.active
                caps = msg.init("caps", len(nested))
                for i, cap in enumerate(nested):
                    caps[i] = cap
                res = await restorer.restoreFromDescription(msg)
                return res.cap.as_interface(core.Persistable)
            except Exception as exc:
                err = errors.from_kj(exc)
                if isinstance(err, errors.NotFound | errors.InvalidArgument | errors.Unsupported):
                    raise err from None
                if loop.time() + backoff > deadline:
                    raise errors.Unavailable(
                        f"cannot restore {obj.category} of service {obj.service}: {err}") from None
                log.info("restoring object %d of %s failed (%s); retrying in %.1f s",
                         obj.id, obj.service, err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _restore_nested(self, sealed: bytes | None) -> list[Any]:
        if not sealed:
            return []
        texts = json.loads(unseal(self.key, sealed))
        out = []
        for text in texts:
            ref = SturdyRef.parse(text)
            if self.is_local(ref):
                out.append(await self.restore_secret(ref.service, ref.secret_bytes))
            else:
                try:
                    out.append(await self.pool.restore(ref))
                except errors.Unavailable:
                    self.pool.forget(ref.node, ref.port)
                    raise
        return out

    async def restore_active(self, service: str, restorer: Any) -> None:
        """Re-establish the service's active objects; keep retrying the ones whose
        dependencies are unavailable (a peer node down) until this restorer is replaced."""
        pending = self.store.objects_of(service, active_only=True)
        if pending:
            log.info("re-establishing %d active object(s) of %s", len(pending), service)
        backoff = 1.0
        while pending:
            failed = []
            for oid in pending:
                if self.restorers.get(service) is not restorer:
                    return  # the service re-registered; its new restorer takes over
                if not self.store.object_exists(oid):
                    continue
                try:
                    await self.live_object(oid)
                except errors.Unavailable as exc:
                    failed.append(oid)
                    log.info("active object %d of %s not restored yet: %s", oid, service, exc)
                except errors.MetacError as exc:
                    log.warning("cannot restore active object %d of %s: %s", oid, service, exc)
            pending = failed
            if pending:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, ACTIVE_RETRY_MAX)

    # --- creating ---

    async def create_ref(self, service: str, group: Any, description: Any, persistent: bool,
                         cap: Any) -> Any:
        group_id = None
        if group is not None:
            group_id = await self.group_id_of(group)
        nested = []
        for sub in description.caps:
            res = await sub.createSturdyRef(persistent=True)
            nested.append(ref_from_struct(res.id))
        sealed = seal(self.key, json.dumps([r.format() for r in nested]).encode()) \
            if nested else None
        runtime_id = description.runtimeId or secrets.token_hex(16)
        object_id = self.store.upsert_object(
            service, description.category, runtime_id, bytes(description.description), sealed,
            description.active)
        # This node's nested refs go when the object goes (they exist only for it).
        local_nested = [secret_hash(r.secret_bytes) for r in nested if self.is_local(r)]
        if local_nested:
            self.store.add_nested(object_id, local_nested)
        secret = secrets.token_bytes(SECRET_BYTES)
        self.store.add_ref(secret_hash(secret), object_id, persistent, group_id)
        self.live[object_id] = cap.as_interface(core.Persistable)
        self.live_service[object_id] = service
        return self.make_ref_struct(service, secret)


class HandlerServer(Servant, persistence.ServicePersistenceHandler.Server):
    def __init__(self, state: Persistence, service: str) -> None:
        self._state = state
        self._service = service

    async def registerRestorer(self, restorer: Any, _context: Any, **kwargs: Any) -> None:
        state, service = self._state, self._service
        state.set_restorer(service, restorer)
        log.info("restorer of %s registered", service)

        async def watch() -> None:
            try:
                await restorer.wait()
            except Exception:
                pass
            if state.restorers.get(service) is restorer:
                log.info("restorer of %s went away", service)
                state.set_restorer(service, None)

        state.spawn(watch(), f"watch restorer {service}")
        state.spawn(state.restore_active(service, restorer), f"restore active {service}")

        def unregister() -> None:
            if state.restorers.get(service) is restorer:
                state.set_restorer(service, None)

        _context.results.holder = HolderServer(unregister, f"restorer of {service}")

    async def createSturdyRef(self, group: Any, description: Any, persistent: bool, cap: Any,
                              _context: Any, **kwargs: Any) -> None:
        if not _context.params._has("group"):
            group = None  # pycapnp hands an unset capability in as a null client
        _context.results.ref = await self._state.create_ref(
            self._service, group, description, persistent, cap)

    async def restore(self, objectInfo: bytes, _context: Any, **kwargs: Any) -> None:
        secret = bytes(objectInfo)
        row, obj = await self._state.restore_row(self._service, secret)
        results = _context.results
        results.obj = obj
        results.refKey = secret_hash(secret)
        results.persistent = row.ceiling
        results.runtimeId = row.runtime_id

    async def dropAlias(self, objectInfo: bytes, **kwargs: Any) -> None:
        state = self._state
        digest = secret_hash(bytes(objectInfo))
        row = state.store.lookup(digest)
        if row is None or row.service != self._service or not row.alias:
            raise errors.NotFound("no such alias (unknown or revoked)")
        state.revoked(*state.store.delete_ref(digest)[1:])

    async def adoptChild(self, parent: bytes, child: Any, alias: bool, **kwargs: Any) -> None:
        self._state.adopt_child(self._service, bytes(parent), child, bool(alias))

    async def forget(self, runtimeId: str, **kwargs: Any) -> int:
        revoked, dropped = self._state.store.delete_object(self._service, runtimeId)
        self._state.revoked(revoked, dropped)
        n = len(revoked)
        if n:
            log.info("revoked %d ref(s) of a %s object at its service's request", n, self._service)
        return n

    async def watch(self, **kwargs: Any) -> None:
        await asyncio.Event().wait()


async def _notify(service: str, restorer: Any, digests: list[bytes]) -> None:
    try:
        await asyncio.wait_for(restorer.revoke(digests), NOTIFY_TIMEOUT)
    except Exception as exc:
        # Gone or stuck: if it is gone its proxies went with it.
        log.warning("could not tell %s about %d revoked ref(s): %s", service, len(digests),
                    errors.from_kj(exc) if not isinstance(exc, TimeoutError) else "timeout")


class GroupServer(Servant, core.ResourceGroup.Server):
    """A group this service issued; its token is how create_ref recognizes it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.secret = secrets.token_bytes(32)

    async def name(self, **kwargs: Any) -> str:
        return self._name

    async def token(self, **kwargs: Any) -> bytes:
        return self.secret


def _fill_info(out: Any, row: Any) -> None:
    out.shortId = row.short_id
    out.service = row.service
    out.category = row.category
    out.persistent = row.persistent
    out.created = row.created
    out.group = row.group
    out.parent = row.parent
    out.description = summarize(row.service, row.category, row.description, row.parent)


class AdminServer(Servant, persistence.PersistenceAdmin.Server):
    def __init__(self, state: Persistence) -> None:
        self._state = state

    async def getHandlerFor(self, serviceName: str, _context: Any, **kwargs: Any) -> None:
        handler = self._state.handlers.get(serviceName)
        if handler is None:
            handler = self._state.handlers[serviceName] = HandlerServer(self._state, serviceName)
        _context.results.handler = handler

    async def listRefs(self, _context: Any, **kwargs: Any) -> None:
        rows = self._state.store.list_refs()
        out = _context.results.init("refs", len(rows))
        for i, row in enumerate(rows):
            _fill_info(out[i], row)
            out[i].live = row.object_id in self._state.live

    async def getRefInfo(self, objectInfo: bytes, _context: Any, **kwargs: Any) -> None:
        row = self._state.store.lookup(secret_hash(bytes(objectInfo)))
        if row is None:
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        _fill_info(_context.results.init("info"), row)
        _context.results.info.live = row.object_id in self._state.live

    async def deleteRef(self, objectInfo: bytes, shortId: str, _context: Any, **kwargs: Any) -> None:
        store = self._state.store
        if objectInfo:
            digest = secret_hash(bytes(objectInfo))
        else:
            if len(shortId) < 6 or any(c not in "0123456789abcdefABCDEF" for c in shortId):
                raise errors.InvalidArgument("a short id is at least 6 hex digits")
            matches = store.find_by_short_id(shortId.lower())
            if not matches:
                raise errors.NotFound(f"no ref with short id {shortId!r}")
            if len(matches) > 1:
                raise errors.InvalidArgument(f"short id {shortId!r} is ambiguous")
            digest = matches[0]
        info, revoked, dropped = store.delete_ref(digest)
        if info is None:
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        self._state.revoked(revoked, dropped)
        log.info("revoked ref %s (%s/%s)%s", short_id_of(digest), info.service, info.category,
                 f" and {len(revoked) - 1} ref(s) made through it" if len(revoked) > 1 else "")
        _fill_info(_context.results.init("info"), info)

    async def createGroup(self, name: str, _context: Any, **kwargs: Any) -> None:
        if self._state.store.group_id(_check_group(name)) is not None:
            raise errors.AlreadyExists(f"resource group {name!r} already exists")
        self._state.store.create_group(name)
        _context.results.group = self._state.issue_group(name)

    async def getGroup(self, name: str, _context: Any, **kwargs: Any) -> None:
        if self._state.store.group_id(_check_group(name)) is None:
            raise errors.NotFound(f"no resource group {name!r}")
        _context.results.group = self._state.issue_group(name)

    async def dropGroup(self, name: str, _context: Any, **kwargs: Any) -> None:
        revoked, dropped = self._state.store.drop_group(_check_group(name))
        if revoked is None:
            raise errors.NotFound(f"no resource group {name!r}")
        self._state.groups.pop(name, None)  # a group object handed out before is void
        self._state.revoked(revoked, dropped)
        _context.results.revoked = len(revoked)


    async def listGroups(self, _context: Any, **kwargs: Any) -> None:
        groups = self._state.store.list_groups()
        out = _context.results.init("groups", len(groups))
        for i, (name, created, refs) in enumerate(groups):
            out[i].name, out[i].created, out[i].refs = name, created, refs


def _check_group(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise errors.InvalidArgument("group names are 1-64 letters, digits, '-', '_' or '.'")
    return name


class BootstrapServer(Servant, core.Service.Server):
    """Service 'persistence' for everybody: restores refs whose service is 'persistence'."""

    def __init__(self, state: Persistence) -> None:
        self._state = state

    async def restore(self, objectInfo: bytes, _context: Any, **kwargs: Any) -> None:
        _context.results.obj = await self._state.restore_secret("persistence", bytes(objectInfo))


async def serve() -> int:
    env = ServiceEnv.from_environ("persistence")
    os.umask(0o077)  # everything this service writes is for root only
    os.makedirs(env.state_dir, mode=0o700, exist_ok=True)
    try:
        store, key = open_state(env.state_dir, env.node_instance)
    except errors.FailedPrecondition as exc:
        raise FatalError(exc) from None  # restarting cannot help: stop the node, say why
    purged = store.purge_stale()
    if purged:
        log.info("dropped %d non-persistent ref(s) of an earlier node run", purged)
    state = Persistence(env, store, key)
    try:
        async with connect_unix(admin_socket(env.runtime_dir)) as conn:
            node_admin = conn.bootstrap(core.NodeAdmin)
            registration = (await node_admin.registerNamedService(
                "persistence", BootstrapServer(state), AdminServer(state))).holder
            log.info("service persistence registered")
            # Lives until the node stops us (or dies: PDEATHSIG).
            await asyncio.Event().wait()
            del registration
    finally:
        await state.aclose()
    return 0


def main() -> None:
    sys.exit(run_daemon("persistence", serve))
