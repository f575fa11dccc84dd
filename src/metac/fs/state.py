"""What the fs service's server objects share, and the key that seals its targets.

``FsState`` is the context every server object of the service gets: the service
context (supervisor, persistence, node pool), the ``StreamHost`` that owns the
data connections, the service's directories, and the live mount and
attachment holders by id (weakly: dropping a holder nobody keeps undoes it),
and the holders the service keeps alive itself.

``TargetSeal``: a persistent mount or attachment keeps a persistent ref to the
filesystem or device it uses, so it can reconnect after the other node
restarts and be re-established at start even while that node is down. The ref
is a secret, and it must live exactly as long as the mount's own refs do (a
mount forgotten with ``umount`` or revoked with ``metac ref rm`` must leave
nothing behind). So it goes into the mount's persistence description, sealed
with a key of this service: the root-only file ``<state_dir>/fs/persistent.key``
(0600). The persistence database on its own grants nothing.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import weakref
from typing import Any

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core import sealing
from metac.core.service import ServiceContext
from metac.core.streams import StreamHost


class TargetSeal:
    """Seals and unseals a ref for a description, with a key kept in a 0600 file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._key: bytes | None = None

    def _get_key(self) -> bytes:
        if self._key is None:
            try:
                self._key = sealing.load_or_create_key(self.path)
            except sealing.SealError as exc:
                raise errors.FailedPrecondition(str(exc)) from None
        return self._key

    def seal(self, ref: SturdyRef) -> str:
        return base64.b64encode(sealing.seal(self._get_key(), ref.format().encode())).decode()

    def unseal(self, text: str) -> SturdyRef:
        try:
            plain = sealing.unseal(self._get_key(), base64.b64decode(text, validate=True))
            return SturdyRef.parse(plain.decode())
        except (ValueError, TypeError, binascii.Error) as exc:
            raise errors.InvalidArgument(f"corrupt description: its target ref: {exc}") from None


class FsState:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.supervisor = ctx.supervisor
        self.streams = StreamHost(ctx.env.node_address, ctx=ctx)
        self.run_dir = os.path.join(ctx.env.runtime_dir, "fs")
        self.state_dir = os.path.join(ctx.env.state_dir, "fs")
        for d in (self.run_dir, self.state_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.identity_dir = os.path.join(self.run_dir, "sandbox")
        self.records_dir = os.path.join(self.state_dir, "records")
        os.makedirs(self.records_dir, mode=0o700, exist_ok=True)
        self.seal = TargetSeal(os.path.join(self.state_dir, "persistent.key"))
        #: Live holders by id (weak: a holder nobody keeps is dropped, which undoes it).
        self.mounts: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.attachments: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        #: Holders the service keeps alive itself (options.keep, restored persistent ones).
        self.kept: dict[str, Any] = {}
        #: Refs just minted to this service's exports (``exports.local_object``).
        self.minted: dict[bytes, weakref.ref[Any]] = {}

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(6)

    async def aclose(self) -> None:
        await self.streams.aclose()
