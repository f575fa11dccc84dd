"""Schema-facing servers of the compute service: admin, launcher, environment, process.

Lifetime: an environment lives while any ``EnvironmentServer`` or
``ProcessServer`` of it exists (each holds a lease; pycapnp frees a server
when its last client reference goes, also when a client's connection ends),
until ``destroy()``, or, with ``autoDestroy``, until no process runs in it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from metac import errors
from metac.compute import persist
from metac.compute.descriptions import parse_launch, parse_process
from metac.compute.environment import ComputeHost, ContainerProcess, Environment
from metac.compute.launcher import ComputeState
from metac.core.holder import Lease
from metac.core.rpc import Servant
from metac.core.service import (
    Description,
    PersistableMixin,
    ServiceContext,
    ServiceDefinition,
    run_service,
)
from metac.schema.load import compute

log = logging.getLogger(__name__)


class ComputeAdminServer(Servant, compute.ComputeServiceAdmin.Server):
    def __init__(self, ctx: ServiceContext, state: ComputeState) -> None:
        self._ctx = ctx
        self._state = state

    async def getLauncher(self, _context: Any, **kwargs: Any) -> None:
        _context.results.launcher = LauncherServer(self._ctx, self._state)

    def _live(self) -> list[ContainerProcess]:
        host: ComputeHost | None = self._state.host
        return [p for env in (host.envs.values() if host else ()) for p in env.processes]

    async def listProcesses(self, _context: Any, **kwargs: Any) -> None:
        rows = self._live()
        live_ids = {p.id for p in rows}
        ended = [r for r in self._state.ended.list() if r.id not in live_ids]
        out = _context.results.init("processes", len(rows) + len(ended))
        for item, process in zip(out, rows, strict=False):
            item.pid = process.pid
            item.args = list(process.spec.args)
            item.running = process.running
            item.returnCode = process.returncode or 0
            item.started = process.started
            item.id = process.id
            item.process = ProcessServer(self._ctx, process, self._state)
            item.env = EnvironmentServer(self._ctx, self._state, process.env)
        for item, record in zip(list(out)[len(rows):], ended, strict=True):
            item.pid = record.pid
            item.args = list(record.args)
            item.running = False
            item.returnCode = record.returncode
            item.started = record.started
            item.id = record.id
            item.ended = record.ended

    async def removeProcesses(self, target: str, _context: Any, **kwargs: Any) -> None:
        target = str(target)[:64]
        live = [p for p in self._live() if target in (p.id, p.env.id)]
        if any(p.running for p in live):
            raise errors.FailedPrecondition(f"process {target} is still running; stop it "
                                            f"first with `metac kill {target}`")
        removed = self._state.ended.remove(target)
        if not removed:
            if live:
                raise errors.FailedPrecondition(
                    f"process {target} has ended but its environment still runs; it is "
                    "listed until the environment ends")
            raise errors.NotFound(f"no ended background process {target} on this node "
                                  "(`metac ps -a` lists them)")
        _context.results.removed = [r.id for r in removed]


class _Described(PersistableMixin):
    """A server whose description depends on ``persistent`` (see compute.persist)."""

    _ctx: ServiceContext

    def _identity(self) -> str:
        raise NotImplementedError

    def ref_runtime_id(self, persistent: bool) -> str:
        # One stored object per live object and kind of ref; a re-created one keeps its id.
        return f"{self._identity()}:{'persistent' if persistent else _BOOT}"


_BOOT = secrets.token_hex(8)


class LauncherServer(PersistableMixin, compute.ComputeLauncher.Server):
    def __init__(self, ctx: ServiceContext, state: ComputeState) -> None:
        self._ctx = ctx
        self._state = state

    async def describe(self, persistent: bool) -> Description:
        return Description("launcher", {})

    async def launch(self, processDescription: Any, envDescription: Any, _context: Any,
                     **kwargs: Any) -> None:
        request = parse_launch(processDescription, envDescription)
        env, process = await self._state.launch(request)
        _context.results.env = EnvironmentServer(self._ctx, self._state, env)
        _context.results.process = ProcessServer(self._ctx, process, self._state)


class EnvironmentServer(_Described, compute.ProcessEnvironment.Server):
    def __init__(self, ctx: ServiceContext, state: ComputeState, env: Environment) -> None:
        self._ctx = ctx
        self._state = state
        self._env = env
        self._lease = Lease(env, env.schedule_destroy)

    def _identity(self) -> str:
        return f"env:{self._env.id}"

    async def describe(self, persistent: bool) -> Description:
        if not persistent:
            return Description("env", {"id": self._env.id})
        data, caps = persist.env_description(self._env)
        self._env.persistent = True
        return Description("env", data, caps)

    async def launchProcess(self, processDescription: Any, _context: Any, **kwargs: Any) -> None:
        spec, files = parse_process(processDescription)
        process = await self._env.launch(spec, files)
        _context.results.process = ProcessServer(self._ctx, process, self._state)

    async def network(self, index: int, _context: Any, **kwargs: Any) -> None:
        if not 0 <= index < len(self._env.networks):
            raise errors.NotFound(f"the environment has no network {index}")
        _context.results.l2interface = self._env.networks[index]

    async def destroy(self, **kwargs: Any) -> None:
        await self._env.destroy()


class ProcessServer(_Described, compute.Process.Server):
    def __init__(self, ctx: ServiceContext, process: ContainerProcess,
                 state: ComputeState) -> None:
        self._ctx = ctx
        self._process = process
        self._state = state
        self._lease = Lease(process.env, process.env.schedule_destroy)

    def _identity(self) -> str:
        return f"process:{self._process.id}"

    async def describe(self, persistent: bool) -> Description:
        if not persistent:
            return Description("process", {"id": self._process.id})
        env = EnvironmentServer(self._ctx, self._state, self._process.env)
        return Description("process", persist.process_description(self._process), [env],
                           active=True)

    async def file(self, index: int, _context: Any, **kwargs: Any) -> None:
        _context.results.stream = self._process.stdio.stream(index)

    async def kill(self, signal: int, **kwargs: Any) -> None:
        self._process.kill(signal)

    async def returnCode(self, **kwargs: Any) -> int:
        code = self._process.returncode
        if code is None:
            raise errors.FailedPrecondition("the process is still running")
        return code

    async def wait(self, **kwargs: Any) -> None:
        await self._process.wait()


def _live_env(state: ComputeState, env_id: str) -> Environment:
    env = state.host.envs.get(env_id) if state.host is not None else None
    if env is None:
        raise errors.NotFound("the environment no longer exists")
    return env


class ComputeService(ServiceDefinition):
    """Containers (ComputeLauncher) on this node."""

    name = "compute"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.state = ComputeState(ctx)

    async def restore_launcher(self, data: dict[str, Any], caps: list[Any]) -> Any:
        return LauncherServer(self.ctx, self.state)

    async def restore_env(self, data: dict[str, Any], caps: list[Any]) -> Any:
        state = self.state
        env_id = str(data.get("id", ""))
        host = state.host
        if host is not None and env_id in host.envs:
            return EnvironmentServer(self.ctx, state, host.envs[env_id])
        if not data.get("persistent"):
            raise errors.NotFound("the environment no longer exists")
        env = await state.recreate_env(data, caps)
        return EnvironmentServer(self.ctx, state, env)

    async def restore_process(self, data: dict[str, Any], caps: list[Any]) -> Any:
        state = self.state
        env_id, _, number = str(data.get("id", "")).partition(".")
        env = _live_env(state, env_id)
        for process in env.processes:
            if str(process.number) == number:
                return ProcessServer(self.ctx, process, state)
        if not data.get("persistent") or env.processes:
            raise errors.NotFound("the process no longer exists")
        # The environment was just re-created (a nested capability): launch it again.
        process = await env.launch(persist.process_spec_from(data), [])
        return ProcessServer(self.ctx, process, state)

    def admin(self) -> Any:
        return ComputeAdminServer(self.ctx, self.state)

    async def start(self) -> None:
        await self.state.start()

    async def aclose(self) -> None:
        # Containers must not outlive the service: finish even if cancelled (SIGTERM).
        task = asyncio.get_running_loop().create_task(self.state.aclose(), name="compute aclose")
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise


def main() -> None:
    run_service(ComputeService)
