"""Size-capped, rotated log files for the output of supervised processes.

A child's stdout/stderr go into a pipe that the supervisor reads
(:class:`LogPump`) and writes to a :class:`RotatingLog`: when the file would
grow past ``max_bytes`` it is renamed ``<file>.1`` (``.1`` to ``.2``, ... the
oldest dropped) and a new file is started. So a chatty or attacked service
fills at most ``files * max_bytes`` of disk. Tuned with the environment
variables ``METAC_LOG_SIZE`` (bytes, or with a K/M/G suffix; default 8M) and
``METAC_LOG_FILES`` (files per log, the current one included; default 4),
which the node passes on to its services. Log files are 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable

from metac import errors

log = logging.getLogger(__name__)

DEFAULT_LOG_SIZE = 8 << 20
DEFAULT_LOG_FILES = 4
MIN_LOG_SIZE = 4096
READ_CHUNK = 64 << 10
DROP_WARNING_INTERVAL = 60.0
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"8M"`` -> 8 MiB; plain digits are bytes. InvalidArgument otherwise."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise errors.InvalidArgument(
            f"log size {text!r} (--log-size, METAC_LOG_SIZE): want bytes or a K/M/G size") from None
    if size < MIN_LOG_SIZE:
        raise errors.InvalidArgument(
            f"log size {text!r} (--log-size, METAC_LOG_SIZE) is below {MIN_LOG_SIZE} bytes")
    return size


def log_limits() -> tuple[int, int]:
    """(max bytes per file, files per log) from the environment."""
    size = parse_size(os.environ.get("METAC_LOG_SIZE") or str(DEFAULT_LOG_SIZE))
    files_text = os.environ.get("METAC_LOG_FILES") or str(DEFAULT_LOG_FILES)
    if not files_text.isdigit() or int(files_text) < 1:
        raise errors.InvalidArgument(
            f"log files {files_text!r} (--log-files, METAC_LOG_FILES): want a count >= 1")
    return size, int(files_text)


def open_private(path: str, flags: int) -> int:
    """Open (creating it 0600) a file that must not be readable by others; an
    existing file with a looser mode is tightened."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


class RotatingLog:
    """One log file (and its rotated predecessors), written with ``write``."""

    def __init__(self, path: str, max_bytes: int, files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.files = files
        #: False once another RotatingLog took over the path: then this one only
        #: truncates its own (renamed or unlinked) file instead of rotating the path.
        self.owns_path = True
        self._fd = open_private(path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        self._last_drop_warning = 0.0

    def is_current(self) -> bool:
        """Is our file still the one at ``path`` (not rotated or unlinked by someone else)?"""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                room = self.max_bytes - self._size
                if room <= 0:
                    self._rotate()
                    continue
                n = os.write(self._fd, view[:room])
                self._size += n
                view = view[n:]
        except OSError as exc:  # disk full, ...: drop the output, keep the child running
            now = time.monotonic()
            if now - self._last_drop_warning > DROP_WARNING_INTERVAL:
                self._last_drop_warning = now
                log.warning("dropping output for %s: %s", self.path, exc.strerror)

    def _rotate(self) -> None:
        if not self.owns_path or self.files == 1:
            os.ftruncate(self._fd, 0)
            self._size = 0
            return
        for i in range(self.files - 1, 0, -1):
            older = self.path if i == 1 else f"{self.path}.{i - 1}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(older, f"{self.path}.{i}")
        os.close(self._fd)
        self._fd = -1
        self._fd = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_TRUNC)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LogPump:
    """Copies what a child writes into a pipe to a RotatingLog, on the event loop.

    Ends (``done``) at end of file, when every process holding the pipe's write
    end has exited; ``drain`` reads what is already in the pipe at once (what an
    exited child wrote), so its log is complete when ``wait()`` returns.
    """

    def __init__(self, read_fd: int, sink: RotatingLog, on_close: Callable[[RotatingLog], None]) -> None:
        self._fd = read_fd
        self._sink = sink
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(read_fd, False)
        self._loop.add_reader(read_fd, self._readable)

    def _readable(self) -> None:
        self._read(READ_CHUNK)

    def _read(self, limit: int) -> bool:
        """Read up to ``limit`` bytes; False once nothing more is there right now."""
        if self._fd < 0:
            return False
        try:
            data = os.read(self._fd, limit)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return False
        self._sink.write(data)
        return True

    def drain(self, limit: int = 16 * READ_CHUNK) -> None:
        """Copy what is in the pipe now (up to ``limit`` bytes: a writer may go on)."""
        while limit > 0 and self._read(READ_CHUNK):
            limit -= READ_CHUNK

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._on_close(self._sink)
        if not self.done.done():
            self.done.set_result(None)


class LogFiles:
    """The RotatingLogs of one supervisor, shared by the children writing to one path."""

    def __init__(self) -> None:
        self.max_bytes, self.files = log_limits()
        self._open: dict[str, RotatingLog] = {}
        self._users: dict[RotatingLog, int] = {}
        self._pumps: set[LogPump] = set()

    def pump(self, path: str, read_fd: int) -> LogPump:
        """Start copying ``read_fd`` into the log at ``path``."""
        sink = self._open.get(path)
        if sink is None or not sink.is_current():
            if sink is not None:  # somebody renamed or removed the file: start a new one
                sink.owns_path = False
            sink = self._open[path] = RotatingLog(path, self.max_bytes, self.files)
        self._users[sink] = self._users.get(sink, 0) + 1
        pump = LogPump(read_fd, sink, self._release)
        self._pumps.add(pump)
        pump.done.add_done_callback(lambda _: self._pumps.discard(pump))
        return pump

    def _release(self, sink: RotatingLog) -> None:
        users = self._users.pop(sink, 1) - 1
        if users > 0:
            self._users[sink] = users
            return
        if self._open.get(sink.path) is sink:
            del self._open[sink.path]
        sink.close()

    def close(self) -> None:
        """Stop every pump (their children are gone, or escaped their group)."""
        for pump in list(self._pumps):
            pump.drain()
            pump.close()
