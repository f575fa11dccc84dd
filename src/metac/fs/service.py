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
revokes its refs, so it does not come back.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
from typing import Any

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.client import ref_from_struct
from metac.core.holder import HolderServer
from metac.core.rpc import Servant
from metac.core.service import Description, PersistableMixin, ServiceContext, ServiceDefinition
from metac.fs import attach, exports, mount
from metac.fs.attach import Attachment
from metac.fs.mount import MountSession
from metac.fs.resolve import Directory
from metac.fs.state import FsState
from metac.schema.load import fs as fs_schema
from metac.schema.load import persistence

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


async def revoke(ctx: ServiceContext, secrets_hex: list[str]) -> None:
    """Delete our own persistent refs (those of a released mount or attachment)."""
    if not secrets_hex:
        return
    padmin = (await ctx.node_admin.getServiceAdmin("persistence")).service
    padmin = padmin.cast_as(persistence.PersistenceAdmin)
    for secret in secrets_hex:
        with contextlib.suppress(Exception):
            await padmin.deleteRef(bytes.fromhex(secret), "")


async def _adopt(ctx: ServiceContext, cap: Any, interface: Any) -> tuple[Any, Any, SturdyRef]:
    """(our own object or None, a capability over our connection, its ref) for ``cap``."""
    res = await cap.cast_as(interface).createSturdyRef(persistent=False)
    ref = ref_from_struct(res.id)
    local = exports.local_object(ref.secret_bytes)
    restored = await ctx.pool.restore(ref, interface)
    return local, restored, ref


class _ActionHolder(PersistableMixin, HolderServer):
    """A holder of a mount or attachment; persisting it (persistent=True) makes it come back."""

    KIND = ""

    def __init__(self, state: FsState, session: Any, undo: Any, what: str) -> None:
        HolderServer.__init__(self, undo, what)
        self._ctx = state.ctx
        self._state = state
        self.session = session

    async def _remember_target(self) -> None:
        raise NotImplementedError

    def forget_undo(self) -> None:
        """The service is stopping and has closed the session itself: when this holder is
        dropped, do not run the undo (which would also revoke a persistent mount's refs)."""
        self._revert = None

    async def createSturdyRef(self, rgroup: Any, persistent: bool, _context: Any,
                              **kwargs: Any) -> None:
        if not self.active:
            raise errors.FailedPrecondition(f"{self._what} was released")
        if persistent:
            await self._remember_target()
        if self._runtime_id is None:
            self._runtime_id = self.session.id
        ref = await self._ctx.create_ref(self, self._describe(), self._runtime_id, rgroup,
                                         persistent)
        if persistent:
            self._state.secrets.update(self.KIND, self.session.id,
                                       refs=[bytes(ref.objectInfo).hex()])
        _context.results.id = ref


class MountHolder(_ActionHolder):
    KIND = "mount"

    def __init__(self, state: FsState, session: MountSession) -> None:
        async def undo() -> None:
            state.mounts.pop(session.id, None)
            state.kept.pop(session.id, None)
            await session.close()
            await revoke(state.ctx, state.secrets.pop("mount", session.id).get("refs", []))

        super().__init__(state, session, undo, f"mount at {session.path}")

    def _describe(self) -> Description:
        s = self.session
        data: dict[str, Any] = {"id": s.id, "path": s.path, "method": s.wanted,
                                "readOnly": s.read_only, "source": s.source}
        if s.local is not None:
            data["local"] = {"path": s.local.directory.path, "readOnly": s.local.read_only}
        return Description("mount", data, active=True)

    async def _remember_target(self) -> None:
        s = self.session
        if s.local is None and s.target is None:
            res = await s.fs_cap.cast_as(fs_schema.Filesystem).createSturdyRef(persistent=True)
            s.target = ref_from_struct(res.id)
            self._state.secrets.update("mount", s.id, target=s.target.format())


class AttachHolder(_ActionHolder):
    KIND = "attachment"

    def __init__(self, state: FsState, session: Attachment) -> None:
        async def undo() -> None:
            state.attachments.pop(session.id, None)
            state.kept.pop(session.id, None)
            await session.close()
            await revoke(state.ctx,
                         state.secrets.pop("attachment", session.id).get("refs", []))

        super().__init__(state, session, undo, "block attachment")

    def _describe(self) -> Description:
        s = self.session
        return Description("attachment", {"id": s.id, "readOnly": s.read_only,
                                          "mountPath": s.mount_path, "source": s.source},
                           active=True)

    async def _remember_target(self) -> None:
        s = self.session
        if s.target is None:
            res = await s.device_cap.cast_as(fs_schema.BlockDevice).createSturdyRef(
                persistent=True)
            s.target = ref_from_struct(res.id)
            self._state.secrets.update("attachment", s.id, target=s.target.format())


class NamespaceServer(PersistableMixin, fs_schema.FilesystemNamespace.Server):
    def __init__(self, state: FsState) -> None:
        self._state = state
        self._ctx = state.ctx

    def _describe(self) -> Description:
        return Description("namespace", {})

    async def filesystem(self, _context: Any, **kwargs: Any) -> None:
        _context.results.fs = exports.FilesystemServer(self._state, Directory.open_root())

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
        session = MountSession(state, mount_id=state.new_id(), path=path, method=method,
                               read_only=read_only, fs_cap=cap, local=local,
                               source="local" if local is not None else shown_node(ref))
        await session.start()
        holder = MountHolder(state, session)
        state.mounts[session.id] = holder
        if keep:
            state.kept[session.id] = holder
        return holder

    async def listMounts(self, _context: Any, **kwargs: Any) -> None:
        holders = sorted(list(self._state.mounts.values()), key=lambda h: h.session.path)
        out = _context.results.init("mounts", len(holders))
        for i, holder in enumerate(holders):
            s = holder.session
            out[i].path = s.path
            out[i].method = s.method or s.wanted or "auto"
            out[i].source = s.source
            out[i].holder = holder
            out[i].state = s.status
            out[i].persistent = s.persistent or (s.local is not None and bool(
                self._state.secrets.get("mount", s.id).get("refs")))
            out[i].readOnly = s.read_only


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
        await session.start()
        holder = AttachHolder(state, session)
        state.attachments[session.id] = holder
        if options.keep:
            state.kept[session.id] = holder
        _context.results.path = session.device
        _context.results.holder = holder

    async def listBlockAttachments(self, _context: Any, **kwargs: Any) -> None:
        holders = sorted(list(self._state.attachments.values()), key=lambda h: h.session.id)
        out = _context.results.init("attachments", len(holders))
        for i, holder in enumerate(holders):
            s = holder.session
            out[i].device = s.device
            out[i].mountPath = s.mount_path
            out[i].method = s.method
            out[i].source = s.source
            out[i].state = s.status
            out[i].readOnly = s.read_only
            out[i].persistent = s.persistent
            out[i].holder = holder


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


def _target(state: FsState, kind: str, key: str) -> SturdyRef:
    text = state.secrets.get(kind, key).get("target")
    if not text:
        raise errors.NotFound(f"persistent {kind} {key}: its target ref is gone")
    return SturdyRef.parse(text)


async def _restore_mount(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    state = state_of(ctx)
    key = str(data["id"])
    if key in state.mounts:
        return state.mounts[key]
    path = str(data["path"])
    local_data = data.get("local")
    if local_data:
        local = exports.restore_filesystem(state, local_data)
        session = MountSession(state, mount_id=key, path=path, method=str(data.get("method", "")),
                               read_only=bool(data.get("readOnly")), local=local)
        await session.start()
    else:
        session = MountSession(state, mount_id=key, path=path, method=str(data.get("method", "")),
                               read_only=bool(data.get("readOnly")),
                               source=str(data.get("source", "")),
                               target=_target(state, "mount", key))
        session.start_in_background()
    holder = MountHolder(state, session)
    holder._runtime_id = key
    state.mounts[key] = holder
    state.kept[key] = holder
    return holder


async def _restore_attachment(ctx: ServiceContext, data: dict[str, Any],
                              caps: list[Any]) -> Any:
    state = state_of(ctx)
    key = str(data["id"])
    if key in state.attachments:
        return state.attachments[key]
    session = Attachment(state, attach_id=key, read_only=bool(data.get("readOnly")),
                         mount_path=str(data.get("mountPath", "")), device_cap=None,
                         source=str(data.get("source", "")),
                         target=_target(state, "attachment", key))
    session.start_in_background()
    holder = AttachHolder(state, session)
    holder._runtime_id = key
    state.attachments[key] = holder
    state.kept[key] = holder
    return holder


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
