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


class Lease:
    """Keeps an environment alive while the server object holding it exists."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        env.leases += 1

    def __del__(self) -> None:
        env = self.env
        env.leases -= 1
        if env.leases <= 0:
            try:
                env.schedule_destroy("its last capability was dropped")
            except RuntimeError:
                pass  # event loop already closed (service exit destroys everything)


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
    """createSturdyRef whose description depends on ``persistent`` (see compute.persist)."""

    _ctx: ServiceContext

    def _describe_for(self, persistent: bool) -> Description:
        raise NotImplementedError

    def _identity(self) -> str:
        raise NotImplementedError

    async def createSturdyRef(self, rgroup: Any, persistent: bool, _context: Any,
                              **kwargs: Any) -> None:
        desc = self._describe_for(bool(persistent))
        # One stored object per live object and kind of ref; a re-created one keeps its id.
        runtime_id = f"{self._identity()}:{'persistent' if persistent else _BOOT}"
        _context.results.id = await self._ctx.create_ref(self, desc, runtime_id, rgroup,
                                                         persistent)


_BOOT = secrets.token_hex(8)


class LauncherServer(PersistableMixin, compute.ComputeLauncher.Server):
    def __init__(self, ctx: ServiceContext, state: ComputeState) -> None:
        self._ctx = ctx
        self._state = state

    def _describe(self) -> Description:
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
        self._lease = Lease(env)

    def _identity(self) -> str:
        return f"env:{self._env.id}"

    def _describe_for(self, persistent: bool) -> Description:
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
                 state: ComputeState | None = None) -> None:
        self._ctx = ctx
        self._process = process
        self._state = state or ComputeService.state_of(ctx)
        self._lease = Lease(process.env)

    def _identity(self) -> str:
        return f"process:{self._process.id}"

    def _describe_for(self, persistent: bool) -> Description:
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


async def _restore_launcher(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    return LauncherServer(ctx, ComputeService.state_of(ctx))


def _live_env(state: ComputeState, env_id: str) -> Environment:
    env = state.host.envs.get(env_id) if state.host is not None else None
    if env is None:
        raise errors.NotFound("the environment no longer exists")
    return env


async def _restore_env(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    state = ComputeService.state_of(ctx)
    env_id = str(data.get("id", ""))
    host = state.host
    if host is not None and env_id in host.envs:
        return EnvironmentServer(ctx, state, host.envs[env_id])
    if not data.get("persistent"):
        raise errors.NotFound("the environment no longer exists")
    env = await state.recreate_env(data, caps)
    return EnvironmentServer(ctx, state, env)


async def _restore_process(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    state = ComputeService.state_of(ctx)
    env_id, _, number = str(data.get("id", "")).partition(".")
    env = _live_env(state, env_id)
    for process in env.processes:
        if str(process.number) == number:
            return ProcessServer(ctx, process, state)
    if not data.get("persistent") or env.processes:
        raise errors.NotFound("the process no longer exists")
    # The environment was just re-created (a nested capability): launch it again.
    process = await env.launch(persist.process_spec_from(data), [])
    return ProcessServer(ctx, process, state)


class ComputeService(ServiceDefinition):
    """Containers (ComputeLauncher) on this node."""

    name = "compute"
    restorers = {"launcher": _restore_launcher, "env": _restore_env,
                 "process": _restore_process}
    _states: dict[int, ComputeState] = {}

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.state = ComputeState(ctx)
        ComputeService._states[id(ctx)] = self.state

    @classmethod
    def state_of(cls, ctx: ServiceContext) -> ComputeState:
        return cls._states[id(ctx)]

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
        finally:
            ComputeService._states.pop(id(self.ctx), None)


def main() -> None:
    run_service(ComputeService)
