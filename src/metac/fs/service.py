"""The fs service: bootstrap, namespace, mount and attachment holders, restorers.

``FsService`` (run by the node as ``python -m metac.fs``) serves
``FilesystemServiceAdmin`` (root): ``rootNamespace`` and block attachments. The
namespace mounts filesystems; exported objects live in ``exports``.

Lifetime of a mount (and, the same way, of a block attachment): as the paper
says, releasing or dropping the holder that ``mount`` returned unmounts. With
``MountOptions.keep`` (what `metac fs mount` asks for) the service keeps the
holder itself, so the mount outlives the caller; `metac fs umount PATH` finds
the holder through ``listMounts`` and releases it. A mount is persistent when a
persistent sturdy ref to its holder exists (``metac fs mount --persistent``):
its description is *active*, so persistence restores it when the service
starts, and the service reconnects it when the serving node comes back. A
non-persistent mount does not survive a restart of the service or node. When
the service stops it unmounts everything; releasing a persistent mount also
revokes every ref to its holder (``ServiceContext.forget``), so it does not come
back. The persistent ref it reconnects through is sealed into its own
description (``state.TargetSeal``), so nothing outlives those refs.
"""

from __future__ import annotations

import logging
import posixpath
import weakref
from typing import Any

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.client import ref_from_struct
from metac.core.holder import HolderServer
from metac.core.rpc import Servant
from metac.core.service import Description, PersistableMixin, ServiceContext, ServiceDefinition
from metac.core.untrusted import OwnNode, bounded, check_ref_node
from metac.fs import attach, exports, mount
from metac.fs.attach import Attachment
from metac.fs.mount import MountSession
from metac.fs.resolve import Directory
from metac.fs.state import FsState
from metac.schema.load import fs as fs_schema

log = logging.getLogger("metac.fs")


def state_of(ctx: ServiceContext) -> FsState:
    return ctx.__dict__["fs_state"]  # set by FsService.__init__


def shown_node(ref: SturdyRef) -> str:
    host = f"[{ref.node}]" if ":" in ref.node else ref.node
    return f"{host}:{ref.port}" if ref.port else host


def check_mount_point(path: str) -> str:
    """An absolute, normalized path of an existing directory reached without symlinks."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise errors.InvalidArgument("the mount point must be an absolute path")
    normal = posixpath.normpath(path)
    if normal in ("/", "//"):
        raise errors.InvalidArgument("cannot mount over /")
    Directory.open_absolute(normal).close()
    return normal


async def _adopt(ctx: ServiceContext, cap: Any, interface: Any) -> tuple[Any, Any, SturdyRef]:
    """(our own object or None, a capability over our connection, its ref) for ``cap``.

    The ref is an alias of the grant ``cap`` came through. Every call into ``cap`` is
    bounded, and a ref naming a private address other than this node's is refused
    (``core.untrusted``)."""
    res = await bounded(cap.cast_as(interface).createSturdyRef(persistent=False, alias=True),
                        "the capability")
    try:
        ref = ref_from_struct(res.id)
    except ValueError as exc:
        raise errors.PermissionDenied(f"the capability answered a malformed ref: {exc}") \
            from None
    check_ref_node(ref, OwnNode(ctx.env.node_address, ctx.env.node_port))
    local = exports.local_object(ref.secret_bytes)
    restored = await bounded(ctx.pool.restore(ref, interface), f"node {ref.node}")
    return local, restored, ref


async def _start(session: Any, alias: SturdyRef) -> None:
    """Start a session on an adopted capability; its alias ref goes when it ends."""
    session.alias = alias
    try:
        await session.start()
    except BaseException:
        await session.drop_alias()
        raise


class _ActionHolder(PersistableMixin, HolderServer):
    """The holder of a mount or attachment (a ``Session``).

    Releasing (or dropping) it undoes the session and revokes every sturdy ref
    to it (``ServiceContext.forget`` of its runtime id, the session id), so a
    persistent one does not come back. Its description is active: persistence
    restores it at start. A persistent ref also makes it take a persistent ref
    to what the session uses (its *target*), which the description keeps
    sealed; revoking the holder's refs in any way drops that too.
    """

    KIND = ""

    def __init__(self, state: FsState, session: Any, table: Any, what: str, *,
                 keep: bool, persistent: bool) -> None:
        ctx = state.ctx
        session_id = session.id

        async def undo() -> None:  # holds no reference to the holder (no cycle)
            table.pop(session_id, None)
            state.kept.pop(session_id, None)
            try:
                await ctx.forget(session_id)  # first: whatever fails next, it stays gone
            finally:
                await session.close()

        HolderServer.__init__(self, undo, what)
        self._ctx = ctx
        self._state = state
        self._runtime_id = session_id
        self.session = session
        session.on_revoked = weakref.WeakMethod(self.close)
        #: Made persistent (in this run, or restored); `metac fs ls` shows it.
        self.persistent = persistent
        table[session_id] = self
        if keep:
            state.kept[session_id] = self

    def forget_undo(self) -> None:
        """The service is stopping and has closed the session itself: when this holder is
        dropped, do not run the undo (which would also revoke a persistent mount's refs)."""
        self._revert = None

    def _needs_target(self) -> bool:
        return True

    def fill(self, info: Any) -> None:
        """Fill a MountInfo or BlockAttachmentInfo (what they share)."""
        s = self.session
        info.method = s.method
        info.source = s.source
        info.state = s.status
        info.readOnly = s.read_only
        info.persistent = self.persistent
        info.holder = self

    def _data(self) -> dict[str, Any]:
        raise NotImplementedError

    def _describe(self) -> Description:
        data = self._data()
        if self.session.target is not None:
            data["target"] = self._state.seal.seal(self.session.target)
        return Description(self.KIND, data, active=True)

    async def createSturdyRef(self, rgroup: Any, persistent: bool, _context: Any,
                              **kwargs: Any) -> None:
        if not self.active:
            raise errors.FailedPrecondition(f"{self._what} was released")
        s = self.session
        if persistent and s.target is None and self._needs_target():
            res = await s.cap.cast_as(s.INTERFACE).createSturdyRef(persistent=True)
            s.target = ref_from_struct(res.id)
        await super().createSturdyRef(rgroup, persistent, _context, **kwargs)
        if persistent:
            self.persistent = True


class MountHolder(_ActionHolder):
    KIND = "mount"

    def __init__(self, state: FsState, session: MountSession, *, keep: bool,
                 persistent: bool = False) -> None:
        super().__init__(state, session, state.mounts, f"mount at {session.path}", keep=keep,
                         persistent=persistent)

    def _needs_target(self) -> bool:
        return self.session.local is None  # a bind mount is restored from its path

    def _data(self) -> dict[str, Any]:
        s = self.session
        data: dict[str, Any] = {"id": s.id, "path": s.path, "method": s.wanted,
                                "readOnly": s.read_only, "source": s.source}
        if s.local is not None:
            data["local"] = {"path": s.local.directory.path, "readOnly": s.local.read_only,
                             "preserveOwners": True}  # only those are bind-mounted
        return data

    def fill(self, info: Any) -> None:
        super().fill(info)
        s = self.session
        info.path = s.path
        info.method = s.method or s.wanted or "auto"


class AttachHolder(_ActionHolder):
    KIND = "attachment"

    def __init__(self, state: FsState, session: Attachment, *, keep: bool,
                 persistent: bool = False) -> None:
        super().__init__(state, session, state.attachments, "block attachment", keep=keep,
                         persistent=persistent)

    def _data(self) -> dict[str, Any]:
        s = self.session
        return {"id": s.id, "readOnly": s.read_only, "mountPath": s.mount_path,
                "source": s.source}

    def fill(self, info: Any) -> None:
        super().fill(info)
        info.device = self.session.device
        info.mountPath = self.session.mount_path


def _list(results: Any, field: str, holders: list[_ActionHolder]) -> None:
    out = results.init(field, len(holders))
    for i, holder in enumerate(holders):
        holder.fill(out[i])


class NamespaceServer(PersistableMixin, fs_schema.FilesystemNamespace.Server):
    def __init__(self, state: FsState) -> None:
        self._state = state
        self._ctx = state.ctx

    def _describe(self) -> Description:
        return Description("namespace", {})

    async def filesystem(self, _context: Any, **kwargs: Any) -> None:
        _context.results.fs = exports.FilesystemServer(self._state, Directory.open_root())

    async def filesystemPreservingOwners(self, _context: Any, **kwargs: Any) -> None:
        _context.results.fs = exports.FilesystemServer(self._state, Directory.open_root(),
                                                       owner=None)

    async def mount(self, path: str, fs: Any, _context: Any, **kwargs: Any) -> None:
        _context.results.holder = await self._mount(path, fs, "", False, False)

    async def mountWith(self, path: str, fs: Any, options: Any, _context: Any,
                        **kwargs: Any) -> None:
        _context.results.holder = await self._mount(path, fs, options.method,
                                                    bool(options.readOnly), bool(options.keep))

    async def _mount(self, path: str, fs: Any, method: str, read_only: bool,
                     keep: bool) -> MountHolder:
        state = self._state
        path = check_mount_point(path)
        if any(h.session.path == path for h in state.mounts.values()):
            raise errors.AlreadyExists(f"{path} is already a metac mount point")
        mount.choose_method(method, local=True)  # reject unknown names before any work
        local, cap, ref = await _adopt(state.ctx, fs, fs_schema.Filesystem)
        if not isinstance(local, exports.FilesystemServer):
            local = None
        elif not local.preserve_owners:
            # A bind mount would let whoever uses the mount (a container's root) act as
            # root on the directory: a squashed one of ours is served like a remote one.
            if method == "bind":
                raise errors.PermissionDenied(
                    "a bind mount is root on the directory; only a filesystem exported "
                    "with --preserve-owners (or a local: path) can be bind-mounted")
            local = None
        session = MountSession(state, mount_id=state.new_id(), path=path, method=method,
                               read_only=read_only, fs_cap=cap, local=local,
                               source="local" if local is not None else shown_node(ref))
        session.node = ref.node
        await _start(session, ref)
        return MountHolder(state, session, keep=keep)

    async def listMounts(self, _context: Any, **kwargs: Any) -> None:
        _list(_context.results, "mounts",
              sorted(list(self._state.mounts.values()), key=lambda h: h.session.path))


class AdminServer(Servant, fs_schema.FilesystemServiceAdmin.Server):
    def __init__(self, state: FsState) -> None:
        self._state = state

    async def rootNamespace(self, _context: Any, **kwargs: Any) -> None:
        _context.results.ns = NamespaceServer(self._state)

    async def attachBlock(self, device: Any, options: Any, _context: Any, **kwargs: Any) -> None:
        state = self._state
        mount_path = check_mount_point(options.mountPath) if options.mountPath else ""
        _, cap, ref = await _adopt(state.ctx, device, fs_schema.BlockDevice)
        session = Attachment(state, attach_id=state.new_id(), read_only=bool(options.readOnly),
                             mount_path=mount_path, device_cap=cap, source=shown_node(ref))
        session.node = ref.node
        await _start(session, ref)
        _context.results.path = session.device
        _context.results.holder = AttachHolder(state, session, keep=bool(options.keep))

    async def listBlockAttachments(self, _context: Any, **kwargs: Any) -> None:
        _list(_context.results, "attachments",
              sorted(list(self._state.attachments.values()), key=lambda h: h.session.id))


# --- restorers --------------------------------------------------------------------------


async def _restore_filesystem(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    return exports.restore_filesystem(state_of(ctx), data)


async def _restore_file(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    return exports.restore_file(state_of(ctx), data)


async def _restore_block(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    return exports.restore_block(state_of(ctx), data)


async def _restore_stream(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    return await exports.restore_stream(state_of(ctx), data, caps)


async def _restore_namespace(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    return NamespaceServer(state_of(ctx))


def _target(state: FsState, data: dict[str, Any]) -> SturdyRef | None:
    text = data.get("target")
    return state.seal.unseal(str(text)) if text else None


async def _restore_mount(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    state = state_of(ctx)
    key = str(data["id"])
    if key in state.mounts:
        return state.mounts[key]
    local = exports.restore_filesystem(state, data["local"]) if data.get("local") else None
    target = _target(state, data)
    if local is None and target is None:
        raise errors.NotFound(f"mount {key} was never made persistent")
    session = MountSession(state, mount_id=key, path=str(data["path"]),
                           method=str(data.get("method", "")),
                           read_only=bool(data.get("readOnly")), local=local,
                           source=str(data.get("source", "local")), target=target)
    if local is not None:
        await session.start()
    else:
        session.start_in_background()
    return MountHolder(state, session, keep=True, persistent=True)


async def _restore_attachment(ctx: ServiceContext, data: dict[str, Any],
                              caps: list[Any]) -> Any:
    state = state_of(ctx)
    key = str(data["id"])
    if key in state.attachments:
        return state.attachments[key]
    target = _target(state, data)
    if target is None:
        raise errors.NotFound(f"attachment {key} was never made persistent")
    session = Attachment(state, attach_id=key, read_only=bool(data.get("readOnly")),
                         mount_path=str(data.get("mountPath", "")), device_cap=None,
                         source=str(data.get("source", "")), target=target)
    session.start_in_background()
    return AttachHolder(state, session, keep=True, persistent=True)


class FsService(ServiceDefinition):
    name = "fs"
    restorers = {
        "filesystem": _restore_filesystem,
        "file": _restore_file,
        "block": _restore_block,
        "stream": _restore_stream,
        "namespace": _restore_namespace,
        "mount": _restore_mount,
        "attachment": _restore_attachment,
    }

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.state = FsState(ctx)
        ctx.__dict__["fs_state"] = self.state

    def admin(self) -> Any:
        return AdminServer(self.state)

    async def start(self) -> None:
        swept = mount.sweep(self.state.records_dir) + await attach.sweep(self.state)
        if swept:
            log.warning("cleaned up after an earlier run: %s", ", ".join(swept))

    async def aclose(self) -> None:
        for holder in [*self.state.attachments.values(), *self.state.mounts.values()]:
            holder.forget_undo()
            try:
                await holder.session.close()
            except Exception:
                log.exception("closing %s failed", holder._what)
        self.state.kept.clear()
        await self.state.aclose()
