"""The compute service's state and the launch flow, with filesystems and networks
reached through other services' capabilities.

``ComputeState`` finds the OCI runtime when first needed (so installing it
needs no restart), sweeps containers left by an earlier run, and launches:
new ``Environment``, its filesystems mounted by this node's fs service
(``FilesystemNamespace.mount``), its networks attached by this node's net
service, then the first process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import capnp

from metac import errors
from metac.compute.descriptions import LaunchRequest, MountRequest
from metac.compute.ended import EndedProcess, EndedProcesses
from metac.compute.environment import (
    ComputeHost,
    ContainerProcess,
    Environment,
    FsSource,
    MountSpec,
    NetAttacher,
    remove_env_dir,
)
from metac.compute.netattach import HOST_IFNAME_PREFIX, CapabilityNet
from metac.compute.persist import Tombstones, env_plan_from
from metac.compute.reaper import become_subreaper
from metac.compute.runtime import OciRuntime, detect_runtime
from metac.core.holder import Revert
from metac.core.rpc import rpc_errors
from metac.core.service import ServiceContext
from metac.core.streams import StreamHost
from metac.core.supervisor import require_program
from metac.schema.load import fs as fs_schema
from metac.schema.load import network as net_schema

log = logging.getLogger(__name__)

RUNTIME_ENV = "METAC_COMPUTE_RUNTIME"  # auto (default), runc or crun


class CapabilityFs(FsSource):
    """A Filesystem capability, mounted on this node by its fs service."""

    def __init__(self, state: ComputeState, fs: Any) -> None:
        self._state = state
        self._fs = fs

    async def attach(self, target: str, revert: Revert) -> str:
        ns = await self._state.fs_namespace()
        async with rpc_errors():
            holder = (await ns.mount(target, self._fs)).holder
        revert.add(holder.release, f"unmount {target}")
        return target


class ComputeState:
    """Everything the compute service's server objects share."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.preference = os.environ.get(RUNTIME_ENV, "auto")
        self.host: ComputeHost | None = None
        self.base_dir = os.path.join(ctx.env.runtime_dir, "compute")
        self._fs_ns: Any = None
        self._tombstones: Tombstones | None = None
        self._sweeper: Any = None
        self.net: NetAttacher = CapabilityNet(ctx)
        #: Ended background processes, for `metac ps -a` (compute.ended).
        self.ended = EndedProcesses()

    async def start(self) -> None:
        become_subreaper()
        try:
            await self.require_host()
        except errors.MissingDependency as exc:
            log.warning("containers unavailable until installed: %s", exc)
        else:
            assert self.host is not None
            self._sweeper = self.host.spawn(self.sweep_leftovers(), "sweep fs and net leftovers")

    async def require_host(self) -> ComputeHost:
        if self.host is None:
            info = detect_runtime(self.preference)
            init = require_program("catatonit", "catatonit")
            runtime = OciRuntime(info, os.path.join(self.ctx.env.runtime_dir, "oci", info.name),
                                 self.ctx.supervisor)
            streams = StreamHost(self.ctx.env.node_address, ctx=self.ctx)
            host = ComputeHost(runtime=runtime, streams=streams,
                               base_dir=self.base_dir, init_binary=init,
                               supervisor=self.ctx.supervisor)
            await host.sweep()
            log.info("containers run with %s (cgroups %s%s)", info.name, info.layout,
                     ", unified hierarchy hidden" if info.hide_unified else "")
            self.host = host
        return self.host

    async def fs_namespace(self) -> Any:
        if self._fs_ns is None:
            async with rpc_errors():
                admin = (await self.ctx.node_admin.getServiceAdmin("fs")).service
                self._fs_ns = admin.cast_as(fs_schema.FilesystemServiceAdmin).rootNamespace().ns
        return self._fs_ns

    async def start_env(self, req: LaunchRequest, env_id: str | None = None) -> Environment:
        """A running environment for ``req`` (its process is not launched here)."""
        host = await self.require_host()
        if self._sweeper is not None and not self._sweeper.done():
            # The sweep removes directories of environments it does not know; one
            # being started now (e.g. a persistent one restored at start) must not
            # be taken for a leftover.
            await asyncio.shield(self._sweeper)
        env = Environment(host, memory_mib=req.memory_mib, auto_destroy=req.auto_destroy,
                          env_id=env_id)
        env.plan = req
        env.on_destroyed = self._buried
        await env.start(root=CapabilityFs(self, req.root),
                        mounts=[MountSpec(m.path, CapabilityFs(self, m.fs)) for m in req.mounts],
                        networks=req.networks, net=self.net)
        return env

    async def launch(self, req: LaunchRequest) -> tuple[Environment, ContainerProcess]:
        env = await self.start_env(req)
        try:
            process = await env.launch(req.process, req.files)
        except BaseException:
            await env.destroy()
            raise
        return env, process

    # ---------------------------------------------------------------- persistence

    @property
    def tombstones(self) -> Tombstones:
        if self._tombstones is None:
            self._tombstones = Tombstones(os.path.join(self.ctx.env.state_dir, "compute",
                                                       "ended"))
        return self._tombstones

    def _buried(self, env: Environment) -> None:
        if env.persistent:
            self.tombstones.bury(env.id)
        if env.auto_destroy:  # a background one: its exit codes stay for `metac ps -a`
            now = time.time()
            self.ended.add(EndedProcess(p.id, p.pid, tuple(p.spec.args), p.returncode, p.started,
                                        now)
                           for p in env.processes if p.returncode is not None)

    async def recreate_env(self, data: dict[str, Any], caps: list[Any]) -> Environment:
        """A persistent environment again, after a restart (same id)."""
        env_id = str(data.get("id", ""))
        if self.tombstones.buried(env_id):
            raise errors.NotFound("the environment ended before the service restarted")
        root, mounts, networks = env_plan_from(data, caps)
        req = LaunchRequest(process=None, files=[], root=root,  # type: ignore[arg-type]
                            mounts=[MountRequest(p, fs) for p, fs in mounts],
                            networks=networks, memory_mib=int(data.get("memory", 0)),
                            auto_destroy=bool(data.get("autoDestroy", False)))
        env = await self.start_env(req, env_id=env_id)
        env.persistent = True
        log.info("re-created persistent environment %s", env_id)
        return env

    async def sweep_leftovers(self) -> None:
        """Release mounts and binds an earlier run of this service left with the fs and
        net services (they keep those when their client goes away)."""
        live = set(self.host.envs) if self.host is not None else set()
        with contextlib.suppress(errors.MetacError, capnp.KjException):
            ns = await self.fs_namespace()
            for m in (await ns.listMounts()).mounts:
                rel = os.path.relpath(m.path, self.base_dir)
                if not rel.startswith("..") and rel.split("/")[0] not in live:
                    log.info("releasing leftover mount %s", m.path)
                    await m.holder.release()
        for entry in sorted(os.listdir(self.base_dir)):
            path = os.path.join(self.base_dir, entry)
            if entry not in live and os.path.isdir(path) and not os.path.islink(path):
                remove_env_dir(path)
        with contextlib.suppress(errors.MetacError, capnp.KjException):
            async with rpc_errors():
                admin = (await self.ctx.node_admin.getServiceAdmin("net")).service
                admin = admin.cast_as(net_schema.NetworkServiceAdmin)
                binds = (await admin.listBinds()).binds
            ours = {n for env in (self.host.envs.values() if self.host else ())
                    for n in env.host_ifnames}
            for b in binds:
                if b.device.startswith(HOST_IFNAME_PREFIX) and b.device not in ours:
                    log.info("releasing leftover bind of %s", b.device)
                    await b.holder.release()

    async def aclose(self) -> None:
        if self.host is not None:
            await self.host.aclose()
            await self.host.streams.aclose()
