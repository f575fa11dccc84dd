"""Holders of persistent mounts and attachments, in one process (no node; no root needed).

The target ref a persistent mount reconnects through is kept sealed in the
mount's own description, so revoking the mount's refs in any way leaves
nothing behind; releasing the holder revokes them through
``ServiceContext.forget``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.paths import ServiceEnv
from metac.core.service import ServiceContext
from metac.core.supervisor import Supervisor
from metac.fs import service
from metac.fs.state import FsState, TargetSeal
from metac.schema.load import fs
from metac.testing.inproc import run

TARGET = SturdyRef.from_parts("10.0.0.1", None, "fs", b"\x07" * 24)


class FakeHandler:
    """The persistence handler's ``forget``, counting calls."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []

    async def forget(self, runtime_id: str) -> Any:
        self.forgotten.append(runtime_id)
        return SimpleNamespace(revoked=1)


class FakeSession:
    INTERFACE = fs.Filesystem

    def __init__(self, session_id: str, target: SturdyRef | None) -> None:
        self.id = session_id
        self.target = target
        self.path = "/mnt/x"
        self.wanted = ""
        self.method = "sftp"
        self.read_only = False
        self.source = "10.0.0.1"
        self.status = "mounted"
        self.local = None
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def make_state(tmp_path: Path) -> tuple[FsState, FakeHandler]:
    env = ServiceEnv(name="fs", runtime_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "st"),
                     node_address="127.0.0.1", node_port=901, node_instance="test")
    handler = FakeHandler()
    ctx = ServiceContext(env, None, handler, Supervisor(env.state_dir, "fs"))
    state = FsState(ctx)
    return state, handler


def test_the_target_is_sealed_in_the_description_and_restored_from_it(tmp_path: Path) -> None:
    async def main() -> None:
        state, _ = make_state(tmp_path)
        holder = service.MountHolder(state, FakeSession("m1", TARGET), keep=True,
                                     persistent=True)
        desc = await holder.describe(False)
        assert desc.active and desc.category == "mount"
        text = json.dumps(desc.data)
        assert TARGET.format() not in text and TARGET.secret_bytes.hex() not in text
        assert state.seal.unseal(desc.data["target"]) == TARGET
        key = tmp_path / "st" / "fs" / "persistent.key"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert sorted(os.listdir(tmp_path / "st" / "fs")) == ["persistent.key", "records"]

        # The restorer gets the same data back; it needs nothing else.
        assert service._target(state, desc.data) == TARGET
        # Without a target (never made persistent) a remote mount is not restored.
        data = dict(desc.data)
        del data["target"]
        with pytest.raises(errors.NotFound):
            await service.restore_mount(state, {**data, "id": "m2"})
        # A description sealed with another key (a lost key file) is refused, not guessed.
        other = TargetSeal(str(tmp_path / "other.key")).seal(TARGET)
        with pytest.raises(errors.InvalidArgument):
            service._target(state, {"target": other})
        with pytest.raises(errors.InvalidArgument):
            service._target(state, {"target": "not base64!"})
        await holder.close()

    run(main())


def test_releasing_the_holder_forgets_its_refs(tmp_path: Path) -> None:
    async def main() -> None:
        state, handler = make_state(tmp_path)
        session = FakeSession("m1", TARGET)
        holder = service.MountHolder(state, session, keep=True, persistent=True)
        assert state.mounts["m1"] is holder and state.kept["m1"] is holder
        await holder.close()
        assert session.closed and handler.forgotten == ["m1"]
        assert "m1" not in state.mounts and "m1" not in state.kept

        # A stopping service closes its sessions but must not revoke anything.
        session = FakeSession("m2", TARGET)
        holder = service.MountHolder(state, session, keep=True)
        holder.forget_undo()
        await holder.close()
        assert handler.forgotten == ["m1"]

    run(main())


def test_a_failing_forget_still_closes_the_session(tmp_path: Path) -> None:
    async def main() -> None:
        state, handler = make_state(tmp_path)

        async def broken(runtime_id: str) -> Any:
            raise errors.Unavailable("persistence is restarting")

        handler.forget = broken  # type: ignore[method-assign]
        session = FakeSession("a1", TARGET)
        holder = service.AttachHolder(state, session, keep=False)  # type: ignore[arg-type]
        await holder.close()  # the failure is logged by the holder's revert stack
        assert session.closed and "a1" not in state.attachments

    run(main())
