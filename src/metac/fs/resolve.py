"""Confined name resolution: a directory fd and names below it, never anything else.

A ``Directory`` is an ``O_PATH`` fd of a directory plus the absolute path it was
reached by (kept for persistence descriptions and messages, never used to open
anything). Every name that reaches it is split by ``codec.paths.split_relative``
(no ``..``, no absolute names, no NUL) and walked one component at a time with
``openat(parent_fd, component, O_PATH | O_NOFOLLOW | O_DIRECTORY)``: a symlink,
or a component swapped for one during the walk, makes the walk fail instead of
leading out. Files are opened the same way (``O_NOFOLLOW`` on the last
component, relative to its parent's fd), so there is no time-of-check to
time-of-use window anywhere: the path string is never re-resolved.

Everything here is blocking but fast (a few syscalls); the service calls it
directly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from metac import errors
from metac.codec.paths import PathError, split_relative, validate_component
from metac.fs.squash import Identity

_DIR_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def _walk_error(exc: OSError, shown: str) -> errors.MetacError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return errors.PermissionDenied(f"{shown}: not a directory (symlinks are not followed)")
    if exc.errno == errno.ENOENT:
        return errors.NotFound(f"{shown}: no such directory")
    if exc.errno == errno.EACCES:
        return errors.PermissionDenied(f"{shown}: permission denied")
    return errors.FailedPrecondition(f"{shown}: {exc.strerror}")


def may(st: os.stat_result, who: Identity, want: int) -> bool:
    """Whether ``who`` (no capability, no other group) has the ``want`` bits (r=4, w=2,
    x=1) on a file with ``st``: the kernel's check for an unprivileged process."""
    if st.st_uid == who.uid:
        granted = st.st_mode >> 6
    elif st.st_gid == who.gid:
        granted = st.st_mode >> 3
    else:
        granted = st.st_mode
    return granted & want == want


def parse_name(name: str) -> tuple[str, ...]:
    """Components of a client-supplied name; InvalidArgument if it is not acceptable."""
    try:
        return split_relative(name)
    except PathError as exc:
        raise errors.InvalidArgument(str(exc)) from None


def join(base: str, parts: tuple[str, ...]) -> str:
    """Absolute path text of ``parts`` below ``base`` (for descriptions only)."""
    if not parts:
        return base
    return (base.rstrip("/") + "/" + "/".join(parts)) if base != "/" else "/" + "/".join(parts)


class Directory:
    """An open directory (``O_PATH`` fd) reached without following any symlink. Owns its fd."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open_root(cls) -> Directory:
        return cls(os.open("/", _DIR_FLAGS), "/")

    @classmethod
    def open_absolute(cls, path: str) -> Directory:
        """Walk an absolute path from ``/`` (used when restoring a description)."""
        if not path.startswith("/"):
            raise errors.InvalidArgument("path must be absolute")
        root = cls.open_root()
        try:
            return root.subdir(parse_name(path[1:]))
        finally:
            root.close()

    def subdir(self, parts: tuple[str, ...]) -> Directory:
        """The directory ``parts`` below this one (a new fd), walked with O_NOFOLLOW."""
        fd = os.dup(self.fd)
        walked: list[str] = []
        try:
            for part in parts:
                walked.append(part)
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    # From / (a path of this host: a mount point) the whole path; below an
                    # export only the client's own name, never where the export lives.
                    shown = join("/", parts) if self.path == "/" else "/".join(walked)
                    raise _walk_error(exc, shown) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return Directory(fd, join(self.path, parts))

    def dup(self) -> Directory:
        return Directory(os.dup(self.fd), self.path)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


@dataclass
class Entry:
    """A name inside an open directory: what a File capability denotes."""

    parent: Directory
    name: str

    @classmethod
    def resolve(cls, base: Directory, name: str) -> Entry:
        parts = parse_name(name)
        if not parts:
            raise errors.InvalidArgument("a file name must not be empty")
        parent = base.subdir(parts[:-1])
        return cls(parent, validate_component(parts[-1]))

    @property
    def path(self) -> str:
        return join(self.parent.path, (self.name,))

    def open(self, flags: int, mode: int = 0o644) -> int:
        """open(2) the entry with O_NOFOLLOW relative to its parent; errors as MetacErrors."""
        try:
            return os.open(self.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                           dir_fd=self.parent.fd)
        except OSError as exc:
            raise self._open_error(exc) from None

    def _open_error(self, exc: OSError) -> errors.MetacError:
        if exc.errno == errno.ELOOP:
            return errors.PermissionDenied(f"{self.name}: is a symlink (not followed)")
        if exc.errno == errno.ENOENT:
            return errors.NotFound(f"{self.name}: no such file")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return errors.PermissionDenied(f"{self.name}: {exc.strerror}")
        if exc.errno == errno.EISDIR:
            return errors.FailedPrecondition(f"{self.name}: is a directory")
        if exc.errno == errno.EEXIST:
            return errors.AlreadyExists(f"{self.name}: exists")
        return errors.FailedPrecondition(f"{self.name}: {exc.strerror}")

    def check_access(self, owner: Identity | None, st: os.stat_result | None, *,
                     write: bool) -> None:
        """PermissionDenied unless ``owner`` may read (or write) the file with ``st``, or,
        if it does not exist (``st`` None), create it in its directory. None is root."""
        if owner is None:
            return
        allowed = (may(os.fstat(self.parent.fd), owner, 0o3) if st is None
                   else may(st, owner, 0o2 if write else 0o4))
        if not allowed:
            raise errors.PermissionDenied(f"{self.name}: permission denied (this capability "
                                          "acts as the owner of its directory)")

    def open_regular(self, flags: int, *, allow_block: bool = False, mode: int = 0o644,
                     owner: Identity | None = None) -> int:
        """Like ``open`` but only a regular file (or, if allowed, a block device).

        The type is checked before the file is opened for real: an ``O_PATH`` handle
        (which opens nothing: no device driver, no FIFO) is checked with fstat, and
        only then reopened through ``/proc/self/fd`` with ``flags``, which reaches the
        very inode that was checked. With ``O_CREAT`` a missing file is created with
        ``O_EXCL`` (a regular file, made by this call).

        With an ``owner`` (a squashed capability), the service acts as that user
        would: ``check_access`` first, a new file is given to it, and writing strips
        the setuid and setgid bits as the kernel does for an unprivileged writer."""
        write = bool(flags & (os.O_WRONLY | os.O_RDWR))
        for _ in range(8):  # a file created or removed between the two opens: try again
            try:
                pfd = os.open(self.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=self.parent.fd)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise errors.NotFound(f"{self.name}: no such file") from None
                self.check_access(owner, None, write=True)
                try:
                    fd = self.open(flags | os.O_EXCL, mode)
                except errors.AlreadyExists:
                    continue
                if owner is not None:
                    os.fchown(fd, owner.uid, owner.gid)
                return fd
            except OSError as exc:
                raise self._open_error(exc) from None
            try:
                st = os.fstat(pfd)
                if stat.S_ISLNK(st.st_mode):
                    raise errors.PermissionDenied(f"{self.name}: is a symlink (not followed)")
                if not (stat.S_ISREG(st.st_mode) or (allow_block and stat.S_ISBLK(st.st_mode))):
                    raise errors.FailedPrecondition(f"{self.name}: not a regular file")
                self.check_access(owner, st, write=write)
                try:
                    fd = os.open(f"/proc/self/fd/{pfd}",
                                 (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC)
                except OSError as exc:
                    raise self._open_error(exc) from None
                if owner is not None and write and st.st_mode & 0o6000:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o6000)
                return fd
            finally:
                os.close(pfd)
        raise errors.Unavailable(f"{self.name}: keeps changing; try again")

    def lstat(self) -> os.stat_result | None:
        try:
            return os.stat(self.name, dir_fd=self.parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
