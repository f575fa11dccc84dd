"""The compute service's server classes in-process (no root, no containers).

A fake state stands in for the runtime: these tests cover what the RPC layer
does (description parsing and validation, errors on the wire, leases that tear
an environment down when its last capability goes).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import capnp
import pytest

from metac import errors
from metac.compute import service
from metac.compute.descriptions import LaunchRequest
from metac.compute.ended import EndedProcesses
from metac.schema.load import compute, core, fs
from metac.testing.inproc import run


class FakeProcess:
    def __init__(self, env: FakeEnv, args: list[str]) -> None:
        self.env = env
        self.number = len(env.processes) + 1
        self.id = f"{env.id}.{self.number}"
        self.pid = 4242
        self.started = 1.0
        self.spec = type("Spec", (), {"args": tuple(args)})()
        self.returncode: int | None = None
        self.killed: list[int] = []
        self.done = asyncio.Event()
        self.stdio = self

    @property
    def running(self) -> bool:
        return self.returncode is None

    def stream(self, index: int) -> Any:
        raise errors.NotFound(f"the process has no file {index} (it has 0)")

    def kill(self, sig: int) -> None:
        self.killed.append(sig)
        self.returncode = -sig
        self.done.set()

    async def wait(self) -> int:
        await self.done.wait()
        return self.returncode or 0


class FakeEnv:
    def __init__(self) -> None:
        self.id = "0123456789ab"
        self.processes: list[FakeProcess] = []
        self.networks: list[Any] = []
        self.leases = 0
        self.destroyed: list[str] = []

    async def launch(self, spec: Any, files: Any) -> FakeProcess:
        process = FakeProcess(self, list(spec.args))
        self.processes.append(process)
        return process

    def schedule_destroy(self, why: str) -> None:
        self.destroyed.append(why)

    async def destroy(self) -> None:
        self.destroyed.append("destroy()")


class FakeState:
    def __init__(self) -> None:
        self.requests: list[LaunchRequest] = []
        self.env = FakeEnv()
        self.host = type("Host", (), {"envs": {self.env.id: self.env}})()
        self.ended = EndedProcesses()

    async def launch(self, request: LaunchRequest) -> tuple[FakeEnv, FakeProcess]:
        self.requests.append(request)
        return self.env, await self.env.launch(request.process, request.files)


class FsStub(fs.Filesystem.Server):
    """Never called: the fake state does not mount anything."""


def describe(args: list[str], files: int = 0, pty: list[bool] | None = None) -> Any:
    pd = compute.ProcessDescription.new_message()
    pd.args = args
    fds = pd.init("files", files)
    for fd, flag in zip(fds, pty or [], strict=False):
        fd.isPty = flag
    return pd


def environment(paths: list[str], networks: list[tuple[str, list[str]]] = ()) -> Any:
    ed = compute.ProcessEnvironmentDescription.new_message()
    fss = ed.init("filesystems", len(paths))
    for item, path in zip(fss, paths, strict=True):
        item.path = path
        item.fs = FsStub()
    nets = ed.init("networks", len(networks))
    for item, (name, addresses) in zip(nets, networks, strict=True):
        item.name = name
        item.addresses = addresses
    ed.memory = 32
    return ed


async def connected(bootstrap: Any) -> tuple[Any, list[Any]]:
    a, b = socket.socketpair()
    server_stream = await capnp.AsyncIoStream.create_connection(sock=a)
    client_stream = await capnp.AsyncIoStream.create_connection(sock=b)
    server = capnp.TwoPartyServer(server_stream, bootstrap=bootstrap)
    client = capnp.TwoPartyClient(client_stream)
    return client.bootstrap().cast_as(compute.ComputeLauncher), [server, client, a, b]


@pytest.mark.parametrize("pd, ed, message", [
    (lambda: describe([]), lambda: environment(["/"]), "InvalidArgument: a process needs"),
    (lambda: describe(["true"]), lambda: environment([]), "needs a root filesystem"),
    (lambda: describe(["true"]), lambda: environment(["/", "/a", "/a/"]), "two filesystems"),
    (lambda: describe(["true"]), lambda: environment(["/", "rel"]), "absolute path"),
    (lambda: describe(["true"], 2, [True, False]), lambda: environment(["/"]),
     "InvalidArgument: a terminal is fds 0, 1 and 2"),
    (lambda: describe(["true"], 4), lambda: environment(["/"]), "Unsupported: at most 3"),
    (lambda: describe(["true"]), lambda: environment(["/"], [("eth0", ["10.0.0.1"])]),
     "need a prefix length"),
    (lambda: describe(["true"]), lambda: environment(["/"], [("a/b", [])]),
     "InvalidArgument: network names"),
    (lambda: describe(["true"]), lambda: environment(["/"], [("lo", [])]), "is used twice"),
])
def test_launch_rejects_bad_descriptions(pd: Any, ed: Any, message: str) -> None:
    async def main() -> None:
        state = FakeState()
        launcher, keep = await connected(service.LauncherServer(None, state))  # type: ignore[arg-type]
        with pytest.raises(capnp.KjException) as info:
            await launcher.launch(processDescription=pd(), envDescription=ed())
        assert message in str(info.value)
        assert "Traceback" not in str(info.value)
        assert state.requests == []

    run(main())


def test_launch_then_process_and_environment_calls() -> None:
    async def main() -> None:
        state = FakeState()
        launcher, keep = await connected(service.LauncherServer(None, state))  # type: ignore[arg-type]
        res = await launcher.launch(processDescription=describe(["sleep", "9"], 1, [True]),
                                    envDescription=environment(["/", "/data"],
                                                               [("eth0", ["10.0.0.2/24"])]))
        (request,) = state.requests
        assert request.process.args == ("sleep", "9") and request.process.terminal
        assert request.process.console_size == (24, 80)
        assert [m.path for m in request.mounts] == ["/data"] and request.memory_mib == 32
        assert request.networks[0].addresses == ("10.0.0.2/24",)
        env, process = res.env, res.process
        with pytest.raises(capnp.KjException, match="FailedPrecondition: the process is still"):
            await process.returnCode()
        with pytest.raises(capnp.KjException, match="NotFound: the process has no file 0"):
            await process.file(0)
        with pytest.raises(capnp.KjException, match="NotFound: the environment has no network"):
            await env.network(0)
        await process.kill(15)
        await process.wait()
        assert (await process.returnCode()).code == -15
        second = (await env.launchProcess(describe(["true"]))).process
        await second.kill(9)
        assert (await second.returnCode()).code == -9
        await env.destroy()
        assert state.env.destroyed == ["destroy()"]
        admin = service.ComputeAdminServer(None, state)  # type: ignore[arg-type]
        cadmin, keep2 = await connected(admin)
        listed = (await cadmin.cast_as(compute.ComputeServiceAdmin).listProcesses()).processes
        assert [(p.id, p.running, p.returnCode, list(p.args)) for p in listed] == [
            ("0123456789ab.1", False, -15, ["sleep", "9"]),
            ("0123456789ab.2", False, -9, ["true"])]
        del listed, keep2, cadmin

    run(main())


def test_last_capability_dropped_destroys_environment() -> None:
    async def main() -> None:
        state = FakeState()
        launcher, keep = await connected(service.LauncherServer(None, state))  # type: ignore[arg-type]
        res = await launcher.launch(processDescription=describe(["true"]),
                                    envDescription=environment(["/"]))
        env, process = res.env, res.process
        assert state.env.leases == 2
        del res, env
        await asyncio.sleep(0.1)
        assert state.env.destroyed == []  # the process still holds it
        del process
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while not state.env.destroyed and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert state.env.destroyed == ["its last capability was dropped"]
        assert state.env.leases == 0

    run(main())


def test_launcher_is_persistable_with_a_description() -> None:
    server = service.LauncherServer(None, FakeState())  # type: ignore[arg-type]
    desc = server._describe()
    assert desc.category == "launcher" and desc.caps == [] and not desc.active
    assert issubclass(service.LauncherServer, compute.ComputeLauncher.Server)
    assert core.Persistable is not None
