"""Sturdy refs of environments and processes, and re-creating them after a restart.

A non-persistent ref only names a live object (``{"id": ...}``, no
capabilities): after the service restarts it is gone (NotFound).

A persistent ref describes how to make the object again. An environment's
description holds its memory limit, mount paths and network settings, and as
capabilities its filesystems and the L2Interfaces it was bound to (the
persistence service makes persistent refs of those on their own nodes). A
process's description holds its arguments, user, environment variables and
working directory, and its environment as a capability; it is *active*, so
the persistence service restores it when the service starts: the environment
is created again (same id, same mounts and networks), then the process is
launched in it, with /dev/null as stdio.

An environment that was destroyed (its last process ended, destroy(), or its
last capability dropped) leaves a tombstone file, so a restart does not bring
a finished job back.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from metac import errors
from metac.compute import oci
from metac.compute.environment import ContainerProcess, Environment, NetworkSpec
from metac.schema.load import fs as fs_schema
from metac.schema.load import network as net_schema


def env_description(env: Environment) -> tuple[dict[str, Any], list[Any]]:
    plan = env.plan
    if plan is None:
        raise errors.FailedPrecondition("this environment cannot be persisted")
    caps = [plan.root, *[m.fs for m in plan.mounts]]
    networks = []
    for net in plan.networks:
        networks.append({"name": net.name, "addresses": list(net.addresses),
                         "routes": [list(r) for r in net.routes],
                         "bound": net.l2interface is not None})
        if net.l2interface is not None:
            caps.append(net.l2interface)
    data = {"id": env.id, "persistent": True, "memory": env.memory_mib,
            "autoDestroy": env.auto_destroy, "mounts": [m.path for m in plan.mounts],
            "networks": networks}
    return data, caps


def env_plan_from(data: dict[str, Any], caps: list[Any]) -> tuple[Any, list[Any],
                                                                    list[NetworkSpec]]:
    """(root fs, [(path, fs)], networks) from a persistent description."""
    mounts = [str(p) for p in data.get("mounts", [])]
    if len(caps) < 1 + len(mounts):
        raise errors.InvalidArgument("corrupt environment description")
    # Restored capabilities arrive typed as Persistable.
    root = caps[0].cast_as(fs_schema.Filesystem)
    fss = [c.cast_as(fs_schema.Filesystem) for c in caps[1:1 + len(mounts)]]
    rest = [c.cast_as(net_schema.L2Interface) for c in caps[1 + len(mounts):]]
    networks = []
    for net in data.get("networks", []):
        l2 = None
        if net.get("bound"):
            if not rest:
                raise errors.InvalidArgument("corrupt environment description")
            l2, rest = rest[0], rest[1:]
        networks.append(NetworkSpec(str(net["name"]), l2, tuple(net.get("addresses", [])),
                                    tuple((str(n), str(v)) for n, v in net.get("routes", []))))
    return root, list(zip(mounts, fss, strict=True)), networks


def process_description(process: ContainerProcess) -> dict[str, Any]:
    spec = process.spec
    return {"id": process.id, "persistent": True, "args": list(spec.args),
            "env": list(spec.env), "cwd": spec.cwd, "uid": spec.uid, "gid": spec.gid}


def process_spec_from(data: dict[str, Any]) -> oci.ProcessSpec:
    try:
        return oci.ProcessSpec(tuple(data["args"]), tuple(data.get("env", [])),
                               str(data.get("cwd", "/")), int(data.get("uid", 0)),
                               int(data.get("gid", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"corrupt process description: {exc}") from None


class Tombstones:
    """Ids of persistent environments that ended (files in the state dir)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, env_id: str) -> str:
        if not env_id.isalnum():
            raise errors.InvalidArgument("bad environment id")
        return os.path.join(self.directory, env_id)

    def bury(self, env_id: str) -> None:
        with open(self._path(env_id), "w"):
            pass

    def buried(self, env_id: str) -> bool:
        return os.path.exists(self._path(env_id))

    def forget(self, env_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(env_id))
