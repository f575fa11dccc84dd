"""What a mount (``mount.MountSession``) and a block attachment (``attach.Attachment``) share.

A ``Session`` owns one action on this node: a connection to the serving node,
the helper and kernel objects built on it, and a record file
(``<state>/fs/records/<prefix><id>.json``) that lets the next start of the
service undo what a crashed run left behind (``records``).

After ``start`` a watcher waits for the connection to break. A persistent
session (one with a ``target``, a persistent ref of what it uses) then restores
the target anew from its node and connects again, with backoff, until it is
closed; a non-persistent one stays disconnected until it is closed.

Either way, if the serving node answers that the grant was revoked (NotFound
from the capability, or from restoring the target), the session releases its
holder (``on_revoked``): the mount or attachment goes away for good instead of
waiting as a placeholder for a ref that cannot come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any, ClassVar

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.untrusted import bounded
from metac.fs.state import FsState

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 15.0
PROBE_TIMEOUT = 5.0  # asking the serving node whether the grant still exists


class Session:
    """Subclasses implement ``_connect``, ``_wait_broken``, ``_teardown`` and ``_record``."""

    RECORD_PREFIX: ClassVar[str]
    INTERFACE: ClassVar[Any]  # what ``target`` restores to

    def __init__(self, state: FsState, session_id: str, *, cap: Any, source: str,
                 target: SturdyRef | None) -> None:
        self.state = state
        self.id = session_id
        self.cap = cap
        self.source = source
        self.target = target  # persistent ref of what is used: set when persistent
        # The address of the node serving ``cap`` (its streams must answer it).
        self.node: str | None = target.node if target is not None else None
        #: The alias ref made on the serving node to reach ``cap``; dropped on close.
        self.alias: SturdyRef | None = None
        self.method = ""
        self.status = "connecting"
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        #: Releases the session's holder (set by it, a weak method: no cycle).
        self.on_revoked: weakref.WeakMethod[Any] | None = None

    @property
    def persistent(self) -> bool:
        return self.target is not None

    @property
    def what(self) -> str:
        raise NotImplementedError

    # --- what subclasses do ---

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _wait_broken(self) -> None:
        raise NotImplementedError

    async def _teardown(self) -> None:
        """Undo everything ``_connect`` did (idempotent)."""
        raise NotImplementedError

    def _record(self) -> dict[str, Any]:
        raise NotImplementedError

    def _show_disconnected(self) -> None:
        """Called whenever the session is (or starts) disconnected."""

    async def _lost(self) -> None:
        """The connection broke, or connecting again failed."""
        await self._teardown()
        self._show_disconnected()

    async def _released(self) -> None:
        """Called by ``close`` after the last ``_teardown``."""

    # --- records ---

    @property
    def _record_path(self) -> str:
        return os.path.join(self.state.records_dir, f"{self.RECORD_PREFIX}{self.id}.json")

    def _write_record(self) -> None:
        with open(self._record_path, "w") as f:
            json.dump(self._record(), f)

    def _drop_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path)

    # --- lifetime ---

    async def start(self) -> None:
        """Connect now (errors reach the caller), then watch the connection."""
        self._write_record()
        try:
            await self._connect()
        except BaseException:
            await self._teardown()
            self._drop_record()
            raise
        self._start_watcher(connected=True)

    def start_in_background(self) -> None:
        """Connect as soon as the target is reachable (used when restoring)."""
        self._write_record()
        self.status = "disconnected"
        self._show_disconnected()
        self._start_watcher(connected=False)

    def _start_watcher(self, connected: bool) -> None:
        self._watcher = self.state.streams.spawn(self._watch(connected), f"watch {self.what}")

    async def _watch(self, connected: bool) -> None:
        backoff = BACKOFF_FIRST
        while not self._closed:
            if connected:
                await self._wait_broken()
                if self._closed:
                    return
                log.warning("%s (%s) lost its connection", self.what, self.source)
                self.status = "disconnected"
                await self._lost()
                if await self._grant_revoked():
                    self._release_revoked()
                    return
            if self.target is None:
                return  # stays disconnected until closed
            connected = False
            try:
                try:
                    self.cap = await bounded(
                        self.state.ctx.pool.restore(self.target, self.INTERFACE),
                        f"node {self.target.node}")
                except errors.NotFound:
                    await self._lost()
                    self._release_revoked()
                    return
                self.node = self.target.node
                await self._connect()
                connected = True
                backoff = BACKOFF_FIRST
            except (errors.MetacError, OSError) as exc:
                if isinstance(exc, errors.Unavailable):
                    self.state.ctx.pool.forget(self.target.node, self.target.port)
                log.info("%s (%s): connecting again failed (%s); next try in %.0f s",
                         self.what, self.source, exc, backoff)
                await self._lost()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def drop_alias(self) -> None:
        alias, self.alias = self.alias, None
        if alias is None:
            return
        try:
            await asyncio.wait_for(self.state.ctx.pool.drop_alias(alias), PROBE_TIMEOUT)
        except Exception as exc:  # gone already (revoked, node restarted) or unreachable
            log.info("%s: the alias ref on %s was not dropped (%s)", self.what, self.source,
                     errors.from_kj(exc) if not isinstance(exc, TimeoutError) else "timeout")

    async def _grant_revoked(self) -> bool:
        """Did the serving node revoke what we use (rather than go away)?"""
        if self.cap is None:
            return False
        try:
            await asyncio.wait_for(self.cap.cast_as(self.INTERFACE).info(), PROBE_TIMEOUT)
        except errors.NotFound:
            return True
        except Exception as exc:
            return isinstance(errors.from_kj(exc), errors.NotFound)
        return False

    def _release_revoked(self) -> None:
        log.warning("%s (%s): its ref was revoked; releasing it", self.what, self.source)
        release = self.on_revoked() if self.on_revoked is not None else None
        if release is not None:
            # Not awaited here: releasing closes this session, which cancels this watcher.
            self.state.streams.spawn(release(), f"release revoked {self.what}")

    async def close(self) -> None:
        """Undo it for good and forget the record."""
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await self._teardown()
        await self._released()
        await self.drop_alias()
        self.status = "released"
        self._drop_record()
        log.info("released %s (%s)", self.what, self.source)


def records(records_dir: str, prefix: str) -> Iterator[dict[str, Any]]:
    """The records an earlier run left (``prefix*``); each file is removed once handled."""
    for entry in sorted(os.listdir(records_dir)):
        if not entry.startswith(prefix):
            continue
        path = os.path.join(records_dir, entry)
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = None
        try:
            if isinstance(record, dict):
                yield record
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
