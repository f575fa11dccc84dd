"""What the fs service's server objects share, and its small private state file.

``FsState`` is the context every server object of the service gets: the service
context (supervisor, persistence, node pool), the ``StreamHost`` that owns the
data connections, the service's directories, and the live mount and
attachment holders by id (weakly: dropping a holder nobody keeps undoes it),
and the holders the service keeps alive itself.

``Secrets`` is a root-only JSON file (``<state_dir>/fs/persistent.json``, 0600)
for what a persistent mount or attachment must keep but must not put into its
persistence description: the secrets of its own sturdy refs (so ``umount``
can revoke them) and a persistent ref to the filesystem or device it uses (so
it can reconnect after the other node restarts, and be re-established at
start even while that node is down).
"""

from __future__ import annotations

import json
import os
import secrets
import weakref
from typing import Any

from metac.core.service import ServiceContext
from metac.core.streams import StreamHost


class Secrets:
    """``{kind: {id: {"refs": [hex secrets], "target": "ref://..."}}}`` in a 0600 file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, data: dict[str, Any]) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, self.path)

    def get(self, kind: str, key: str) -> dict[str, Any]:
        return dict(self.load().get(kind, {}).get(key, {}))

    def update(self, kind: str, key: str, **values: Any) -> None:
        data = self.load()
        entry = data.setdefault(kind, {}).setdefault(key, {})
        for name, value in values.items():
            if name == "refs":
                entry.setdefault("refs", [])
                entry["refs"] = [*entry["refs"], *value]
            else:
                entry[name] = value
        self._save(data)

    def pop(self, kind: str, key: str) -> dict[str, Any]:
        data = self.load()
        entry = data.get(kind, {}).pop(key, None)
        if entry is not None:
            self._save(data)
        return entry or {}


class FsState:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.supervisor = ctx.supervisor
        self.streams = StreamHost(ctx.env.node_address)
        self.run_dir = os.path.join(ctx.env.runtime_dir, "fs")
        self.state_dir = os.path.join(ctx.env.state_dir, "fs")
        for d in (self.run_dir, self.state_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.identity_dir = os.path.join(self.run_dir, "sandbox")
        self.records_dir = os.path.join(self.state_dir, "records")
        os.makedirs(self.records_dir, mode=0o700, exist_ok=True)
        self.secrets = Secrets(os.path.join(self.state_dir, "persistent.json"))
        #: Live holders by id (weak: a holder nobody keeps is dropped, which undoes it).
        self.mounts: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.attachments: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        #: Holders the service keeps alive itself (options.keep, restored persistent ones).
        self.kept: dict[str, Any] = {}

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(6)

    async def aclose(self) -> None:
        await self.streams.aclose()
