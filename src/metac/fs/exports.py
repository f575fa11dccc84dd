"""Server classes for what the fs service exports: Filesystem, File, BlockDevice.

Each object holds a confined handle (``resolve.Directory`` or ``resolve.Entry``)
and a read-only bit; everything derived from a read-only object is read-only.
Their persistence descriptions are the absolute path and the bit; restoring
walks the path again from ``/`` without following symlinks.

Data connections are ``HandoffStreamServer`` streams whose callback runs one
sandboxed server program per connection (``servers``). Such streams are
persistable too (their description names the object and the protocol), so a
9P, SFTP or NBD endpoint can be shared as a plain Stream ref, e.g. for
``metac stream forward`` and an external client.

``local_object(secret)`` tells whether a sturdy ref this process just minted
belongs to one of its own objects: ``mount`` uses it to bind-mount a local
filesystem instead of going through the network.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import stat
import weakref
from typing import Any

from metac import errors
from metac.core.service import Description, PersistableMixin
from metac.core.streams import HandoffStreamServer
from metac.core.supervisor import require_program
from metac.fs import servers, squash
from metac.fs.resolve import Directory, Entry, parse_name
from metac.fs.state import FsState
from metac.schema.load import fs as fs_schema

log = logging.getLogger(__name__)

_MINTED: dict[bytes, weakref.ref[Any]] = {}
_MINTED_MAX = 256


def local_object(secret: bytes) -> Any:
    """The object of this process a just-minted ref points to, or None."""
    ref = _MINTED.pop(secret, None)
    return ref() if ref is not None else None


class Exported(PersistableMixin):
    """An exported object: its path, a read-only bit, and a createSturdyRef that also
    remembers which local object a new ref points to."""

    CATEGORY = ""

    def __init__(self, state: FsState, read_only: bool) -> None:
        self._state = state
        self._ctx = state.ctx
        self.read_only = read_only

    @property
    def path(self) -> str:
        raise NotImplementedError

    def _describe(self) -> Description:
        return Description(self.CATEGORY, {"path": self.path, "readOnly": self.read_only})

    async def createSturdyRef(self, rgroup: Any, persistent: bool, _context: Any,
                              **kwargs: Any) -> None:
        await super().createSturdyRef(rgroup, persistent, _context, **kwargs)
        while len(_MINTED) >= _MINTED_MAX:
            _MINTED.pop(next(iter(_MINTED)))
        _MINTED[bytes(_context.results.id.objectInfo)] = weakref.ref(self)


def describe_owner(desc: Description, who: squash.Identity | None) -> Description:
    """``desc`` with whom the object acts as (see ``squash``)."""
    if who is None:
        desc.data["preserveOwners"] = True
    else:
        desc.data["owner"] = who.to_json()
    return desc


def described_owner(data: dict[str, Any], directory: Directory) -> squash.Identity | None:
    if data.get("preserveOwners"):
        return None
    if "owner" in data:
        return squash.Identity.from_json(data["owner"])
    # described before owners were squashed: its directory's owner, from now on
    return squash.Identity.of_fd(directory.fd)


class _EntryExport(Exported):
    """A File or BlockDevice: one name in a directory, used as ``owner`` (None: as root)."""

    def __init__(self, state: FsState, entry: Entry, read_only: bool = False,
                 owner: squash.Identity | None = None) -> None:
        super().__init__(state, read_only)
        self.entry = entry
        self.owner = owner

    def _describe(self) -> Description:
        return describe_owner(super()._describe(), self.owner)

    @property
    def path(self) -> str:
        return self.entry.path

    def _view(self, cls: type[_EntryExport], read_only: bool) -> Any:
        """The same entry as a ``cls`` (with a handle of its own)."""
        return cls(self._state, Entry(self.entry.parent.dup(), self.entry.name), read_only,
                   self.owner)


def logged(serve: Any, what: str) -> Any:
    """``serve`` whose failure is logged here (it runs in a task nobody awaits)."""

    async def run(endpoint: Any) -> None:
        try:
            await serve(endpoint)
        except errors.MetacError as exc:
            log.warning("%s connection failed: %s", what, exc.wire())
        except Exception:
            log.exception("%s connection failed", what)

    return run


def protocol_stream(state: FsState, owner: Any, protocol: str, serve: Any) -> HandoffStreamServer:
    return HandoffStreamServer(
        state.streams, logged(serve, protocol), name=protocol, ctx=state.ctx,
        description=Description("stream", {"protocol": protocol}, caps=[owner]))


#: ``FilesystemServer.owner`` of the admin's root filesystem (``FilesystemNamespace.filesystem``):
#: it acts as the owner of its own directory, and each subtree taken from it as the
#: owner of that subtree's directory (what `metac fs export local:/PATH` makes).
OWN_DIRECTORY = "own-directory"


class FilesystemServer(Exported, fs_schema.Filesystem.Server):
    """A directory. ``owner`` is whom its data-plane servers act as (``squash``):
    an ``Identity`` fixed when it was exported and inherited by everything derived
    from it, ``OWN_DIRECTORY``, or None to preserve owners (root-equivalent)."""

    CATEGORY = "filesystem"

    def __init__(self, state: FsState, directory: Directory, read_only: bool = False,
                 owner: squash.Identity | str | None = OWN_DIRECTORY) -> None:
        super().__init__(state, read_only)
        self.directory = directory
        self.owner = owner

    @property
    def path(self) -> str:
        return self.directory.path

    @property
    def preserve_owners(self) -> bool:
        return self.owner is None

    def acting_as(self) -> squash.Identity | None:
        """The identity its servers run as (None: root, preserving owners)."""
        if self.owner == OWN_DIRECTORY:
            return squash.Identity.of_fd(self.directory.fd)
        assert self.owner is None or isinstance(self.owner, squash.Identity)
        return self.owner

    def _serving_as(self) -> squash.Identity | None:
        """``acting_as``, failing now (not after tcpListen) if this host cannot squash."""
        who = self.acting_as()
        if who is not None:
            require_program("setpriv", "util-linux")
            squash.seccomp_program()  # Unsupported on a machine without a filter
        return who

    def _derived(self, directory: Directory, read_only: bool) -> FilesystemServer:
        """A view of ``directory`` (this one or below it) with this one's owner rule:
        a fixed identity is inherited; the admin's root gives each subtree its owner."""
        owner = (squash.Identity.of_fd(directory.fd) if self.owner == OWN_DIRECTORY
                 else self.owner)
        return FilesystemServer(self._state, directory, read_only, owner)

    def _describe(self) -> Description:
        return describe_owner(super()._describe(), self.acting_as())

    async def getSubtree(self, name: str, _context: Any, **kwargs: Any) -> None:
        sub = self.directory.subdir(parse_name(name))
        _context.results.fs = self._derived(sub, self.read_only)

    async def getFile(self, name: str, _context: Any, **kwargs: Any) -> None:
        entry = Entry.resolve(self.directory, name)
        owner = (squash.Identity.of_fd(entry.parent.fd) if self.owner == OWN_DIRECTORY
                 else self.owner)
        _context.results.file = FileServer(self._state, entry, self.read_only, owner)

    def stream_9p(self) -> HandoffStreamServer:
        require_program("diod", "diod")
        require_program("bwrap", "bubblewrap")
        serve = functools.partial(servers.serve_9p, self._state.supervisor,
                                  self._state.identity_dir, self.directory, self.read_only,
                                  self._serving_as())
        return protocol_stream(self._state, self, "9p", serve)

    def stream_sftp(self) -> HandoffStreamServer:
        if not os.access(servers.SFTP_SERVER, os.X_OK):
            raise errors.MissingDependency(servers.SFTP_SERVER, "openssh-sftp-server")
        require_program("bwrap", "bubblewrap")
        serve = functools.partial(servers.serve_sftp, self._state.supervisor,
                                  self._state.identity_dir, self.directory, self.read_only,
                                  self._serving_as())
        return protocol_stream(self._state, self, "sftp", serve)

    async def v9fsStream(self, _context: Any, **kwargs: Any) -> None:
        _context.results.stream = self.stream_9p()

    async def sftpStream(self, _context: Any, **kwargs: Any) -> None:
        _context.results.stream = self.stream_sftp()

    async def readOnly(self, _context: Any, **kwargs: Any) -> None:
        _context.results.fs = self._derived(self.directory.dup(), True)

    async def info(self, _context: Any, **kwargs: Any) -> None:
        info = _context.results.init("info")
        info.name = posixpath.basename(self.directory.path)
        info.readOnly = self.read_only


class FileServer(_EntryExport, fs_schema.File.Server):
    CATEGORY = "file"

    async def openAsStream(self, _context: Any, **kwargs: Any) -> None:
        # fail now, not after tcpListen
        os.close(self.entry.open_regular(os.O_RDONLY, owner=self.owner))
        _context.results.stream = protocol_stream(
            self._state, self, "read",
            functools.partial(servers.send_file, self.entry, self.owner))

    async def openForWrite(self, append: bool, _context: Any, **kwargs: Any) -> None:
        if self.read_only:
            raise errors.PermissionDenied("this file capability is read-only")
        st = self.entry.lstat()  # fail now, not after tcpListen (the open checks again)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise errors.PermissionDenied(f"{self.entry.name}: is a symlink (not followed)")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise errors.FailedPrecondition(f"{self.entry.name}: not a regular file")
        self.entry.check_access(self.owner, st, write=True)
        serve = functools.partial(servers.receive_file, self.entry, bool(append), self.owner)
        _context.results.stream = HandoffStreamServer(self._state.streams,
                                                      logged(serve, "write"), name="write")

    async def openAsBlock(self, _context: Any, **kwargs: Any) -> None:
        os.close(servers.open_image(self.entry))
        _context.results.device = self._view(BlockDeviceServer, self.read_only)

    async def readOnly(self, _context: Any, **kwargs: Any) -> None:
        _context.results.file = self._view(FileServer, True)

    async def info(self, _context: Any, **kwargs: Any) -> None:
        info = _context.results.init("info")
        st = self.entry.lstat()
        info.readOnly = self.read_only
        if st is not None:
            info.exists = True
            info.size = st.st_size
            info.mode = stat.S_IMODE(st.st_mode)
            info.mtime = st.st_mtime


class BlockDeviceServer(_EntryExport, fs_schema.BlockDevice.Server):
    CATEGORY = "block"

    def stream_nbd(self) -> HandoffStreamServer:
        require_program("nbdkit", "nbdkit")
        require_program("bwrap", "bubblewrap")
        serve = functools.partial(servers.serve_nbd, self._state.supervisor, self.entry,
                                  self.read_only)
        return protocol_stream(self._state, self, "nbd", serve)

    async def nbdSetup(self, _context: Any, **kwargs: Any) -> None:
        _context.results.stream = self.stream_nbd()

    async def readOnly(self, _context: Any, **kwargs: Any) -> None:
        _context.results.device = self._view(BlockDeviceServer, True)

    async def info(self, _context: Any, **kwargs: Any) -> None:
        fd = servers.open_image(self.entry)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        info = _context.results.init("info")
        info.size = size
        info.readOnly = self.read_only


# --- restoring ----------------------------------------------------------------------


def restore_filesystem(state: FsState, data: dict[str, Any]) -> FilesystemServer:
    directory = Directory.open_absolute(str(data["path"]))
    return FilesystemServer(state, directory, bool(data.get("readOnly")),
                            described_owner(data, directory))


def _entry_at(path: str) -> Entry:
    if not path.startswith("/") or path == "/":
        raise errors.InvalidArgument("corrupt description: bad path")
    parent, name = posixpath.split(path)
    return Entry(Directory.open_absolute(parent), name)


def restore_file(state: FsState, data: dict[str, Any]) -> FileServer:
    entry = _entry_at(str(data["path"]))
    return FileServer(state, entry, bool(data.get("readOnly")),
                      described_owner(data, entry.parent))


def restore_block(state: FsState, data: dict[str, Any]) -> BlockDeviceServer:
    entry = _entry_at(str(data["path"]))
    return BlockDeviceServer(state, entry, bool(data.get("readOnly")),
                             described_owner(data, entry.parent))


async def restore_stream(state: FsState, data: dict[str, Any], caps: list[Any]) -> Any:
    """A protocol stream: ask its owner (restored by persistence) for a new one."""
    if len(caps) != 1:
        raise errors.InvalidArgument("corrupt description: a stream has one owner")
    protocol = data.get("protocol")
    if protocol == "9p":
        return (await caps[0].cast_as(fs_schema.Filesystem).v9fsStream()).stream
    if protocol == "sftp":
        return (await caps[0].cast_as(fs_schema.Filesystem).sftpStream()).stream
    if protocol == "nbd":
        return (await caps[0].cast_as(fs_schema.BlockDevice).nbdSetup()).stream
    if protocol == "read":
        return (await caps[0].cast_as(fs_schema.File).openAsStream()).stream
    raise errors.InvalidArgument("corrupt description: unknown protocol")
