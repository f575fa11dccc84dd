"""Environments (one OCI container each) and the processes running in them.

``ComputeHost`` is what all environments of the service share: the runtime,
the stream host, the state directory, the watched processes and the
background tasks. An ``Environment`` is set up in steps, each registering its
undo on a ``Revert`` right away (attach filesystems, write the bundle, start
the container with its pause init, attach networks); ``destroy`` runs them in
reverse after killing and removing the container. A ``ContainerProcess`` is
one ``exec`` in it: its stdio, its pidfd and its exit status.

Filesystems and networks come in through two small interfaces, ``FsSource``
and ``NetAttacher``: the service gives implementations that call the fs and
net services through capabilities; tests and the benchmark use a local
directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metac import errors
from metac.codec.mountinfo import PATH as MOUNTINFO
from metac.codec.mountinfo import parse_mountinfo
from metac.compute import oci
from metac.compute.reaper import Watched, reap_strays
from metac.compute.runtime import OciRuntime
from metac.compute.stdio import ConsoleReceiver, FdSpec, Stdio
from metac.core.holder import Revert
from metac.core.streams import StreamHost
from metac.core.supervisor import Supervisor
from metac.core.tasks import TaskSet

log = logging.getLogger(__name__)

CONTAINER_PREFIX = "metac-"
EXIT_WAIT = 10.0  # after `delete --force`, how long processes may take to be reaped


class FsSource:
    """A filesystem to show in an environment."""

    async def attach(self, target: str, revert: Revert) -> str:
        """Make it available on the host at or instead of ``target`` (an empty directory
        that exists); return the host path to use. Register undo steps on ``revert``."""
        raise NotImplementedError

    def describe(self) -> str:
        return "filesystem"


@dataclass
class NetworkSpec:
    """One entry of envDescription.networks."""

    name: str
    l2interface: Any = None  # L2Interface capability, or None: a new network
    addresses: tuple[str, ...] = ()
    routes: tuple[tuple[str, str], ...] = ()  # (network, via or "")


class NetAttacher:
    """Puts networks into an environment's network namespace."""

    async def attach(self, netns: str, spec: NetworkSpec, revert: Revert,
                     env: Any = None) -> Any:
        """Create ``spec.name`` in the namespace at ``netns``, bind it, configure it;
        return the L2Interface of the environment's side (ProcessEnvironment.network)."""
        raise errors.Unsupported("networks are not available on this node")


@dataclass
class MountSpec:
    path: str  # inside the environment, normalised
    source: FsSource
    read_only: bool = False


class ComputeHost:
    """Shared by every environment of one compute service."""

    def __init__(self, *, runtime: OciRuntime, streams: StreamHost, base_dir: str,
                 init_binary: str, supervisor: Supervisor) -> None:
        self.runtime = runtime
        self.streams = streams
        self.base_dir = base_dir
        self.init_binary = init_binary
        self.supervisor = supervisor
        self.envs: dict[str, Environment] = {}
        self.watched: dict[int, Watched] = {}
        self._tasks = TaskSet()
        self.closing = False  # the service stops: environments go, persistent ones come back
        os.makedirs(base_dir, mode=0o700, exist_ok=True)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

    def watch(self, pid: int, on_exit: Any) -> Watched:
        def exited(w: Watched) -> None:
            self.watched.pop(w.pid, None)
            on_exit(w)
            self.reap_strays()

        watched = Watched(pid, exited)
        self.watched[pid] = watched
        return watched

    def reap_strays(self) -> None:
        known = set(self.watched) | {c.pid for c in self.supervisor.children.values()}
        reap_strays(known)

    async def sweep(self) -> list[str]:
        """Remove containers and directories left by an earlier run of the service."""
        removed = []
        for cid in self.runtime.container_ids():
            if not cid.startswith(CONTAINER_PREFIX):
                continue
            try:
                await self.runtime.delete(cid, log_path=os.path.join(self.base_dir,
                                                                     "sweep.log"))
                removed.append(cid)
            except errors.MetacError as exc:
                log.warning("cannot remove stale container %s: %s", cid, exc)
        for entry in sorted(os.listdir(self.base_dir)):
            path = os.path.join(self.base_dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                remove_env_dir(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.base_dir, "sweep.log"))
        if removed:
            log.warning("removed stale containers: %s", ", ".join(removed))
        return removed

    async def aclose(self) -> None:
        self.closing = True
        envs = list(self.envs.values())
        await asyncio.gather(*(e.destroy() for e in envs), return_exceptions=True)
        await self._tasks.aclose()
        for w in list(self.watched.values()):
            w.close()


#: Subdirectories of an environment directory that hold only files we wrote.
OWN_DIRS = ("bundle",)


def mount_points() -> set[str]:
    """Every mount point of our mount namespace (from /proc/self/mountinfo)."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return {e.mountpoint for e in parse_mountinfo(f.read())}


def remove_env_dir(path: str) -> bool:
    """Remove an environment directory; False if something is left (a mount).

    Never recursive below a mount target: those (``root``, ``fs<i>``) are only
    ``rmdir``-ed, which fails while anything is mounted there or they are not
    empty, so a filesystem that is still mounted (a bind mount of the user's
    directory shares its device number) is never walked into.
    """
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return True
    mounted = mount_points()
    clean = True
    for entry in entries:
        try:
            if entry.path in mounted:
                log.debug("not removing %s: still mounted", entry.path)
                clean = False
            elif entry.is_dir(follow_symlinks=False):
                if entry.name in OWN_DIRS:
                    for inner in os.scandir(entry.path):
                        if not inner.is_dir(follow_symlinks=False):
                            os.unlink(inner.path)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log.debug("cannot remove %s: %s", entry.path, exc)
            clean = False
    if clean:
        try:
            os.rmdir(path)
        except OSError as exc:
            log.debug("cannot remove %s: %s", path, exc)
            clean = False
    return clean


class ContainerProcess:
    """One process in an environment."""

    def __init__(self, env: Environment, number: int, spec: oci.ProcessSpec, stdio: Stdio,
                 watched: Watched) -> None:
        self.env = env
        self.number = number
        self.id = f"{env.id}.{number}"
        self.spec = spec
        self.stdio = stdio
        self.watched = watched
        self.pid = watched.pid
        self.started = time.time()

    @property
    def returncode(self) -> int | None:
        return self.watched.code

    @property
    def running(self) -> bool:
        return self.watched.running

    async def wait(self) -> int:
        return await self.watched.wait()

    def kill(self, sig: int) -> None:
        if not 0 <= sig <= signal.SIGRTMAX:
            raise errors.InvalidArgument(f"no such signal {sig}")
        self.watched.signal(sig)


class Environment:
    """One container: mounts, networks, the pause init, processes."""

    def __init__(self, host: ComputeHost, *, memory_mib: int = 0, auto_destroy: bool = False,
                 env_id: str | None = None) -> None:
        self.host = host
        self.id = env_id or secrets.token_hex(6)
        self.container_id = CONTAINER_PREFIX + self.id
        self.dir = os.path.join(host.base_dir, self.id)
        self.memory_mib = memory_mib
        self.auto_destroy = auto_destroy
        self.processes: list[ContainerProcess] = []
        self.leases = 0  # server objects keeping it alive (see compute.service.Lease)
        self.plan: Any = None  # what it was made from (a LaunchRequest), for persistence
        self.persistent = False  # a persistent ref describes it: leave a tombstone at the end
        self.on_destroyed: Any = None  # called after a final teardown (see schedule_destroy)
        self.final = False
        self.networks: list[Any] = []  # L2Interface of each entry of networks
        self.host_ifnames: set[str] = set()  # node-side veth ends (see compute.netattach)
        self.init: Watched | None = None
        self.state = "new"  # new -> running -> (stopped) -> destroyed
        self.created = time.time()
        self._revert = Revert()
        self._count = 0
        self._destroying: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- setup

    async def start(self, *, root: FsSource, mounts: Sequence[MountSpec] = (),
                    networks: Sequence[NetworkSpec] = (),
                    net: NetAttacher | None = None) -> None:
        """Set everything up; on failure undo what was done and raise."""
        if self.state != "new":
            raise errors.FailedPrecondition("environment already started")
        self.state = "starting"
        self.host.envs[self.id] = self
        try:
            await self._setup(root, mounts, networks, net or NetAttacher())
        except BaseException:
            await self._teardown()
            raise
        self.state = "running"
        log.info("environment %s started (container %s)", self.id, self.container_id)

    async def _setup(self, root: FsSource, mounts: Sequence[MountSpec],
                     networks: Sequence[NetworkSpec], net: NetAttacher) -> None:
        os.makedirs(self.dir, mode=0o700)
        self._revert.add(self._remove_dir, "remove environment directory")
        rootfs = await root.attach(self._mkdir("root"), self._revert)
        binds = []
        for i, m in enumerate(mounts):
            source = await m.source.attach(self._mkdir(f"fs{i}"), self._revert)
            binds.append(oci.BindMount(source, m.path, m.read_only))
        spec = oci.ContainerSpec(rootfs=rootfs, init_binary=self.host.init_binary,
                                 hostname=self.id, memory_mib=self.memory_mib,
                                 mounts=tuple(binds))
        bundle = self._mkdir("bundle")
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(oci.container_config(spec), f)
        self._revert.add(self._remove_container, "remove container")
        pid = await self.host.runtime.run_detached(
            self.container_id, bundle, os.path.join(self.dir, "init.pid"),
            os.path.join(self.dir, "runtime.log"))
        self.init = self.host.watch(pid, self._init_exited)
        self.host.reap_strays()
        netns = f"/proc/{pid}/ns/net"
        for spec_ in networks:
            self.networks.append(await net.attach(netns, spec_, self._revert, self))

    async def _remove_dir(self) -> None:
        # A mount the fs service could not release now (it is stopping too) goes soon.
        for _ in range(1 if self.host.closing else 25):  # the next start sweeps it
            if remove_env_dir(self.dir):
                return
            await asyncio.sleep(0.2)
        log.warning("%s is still in use (a mount?); left for the next start", self.dir)

    def _mkdir(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        os.mkdir(path, 0o700)
        return path

    async def _remove_container(self) -> None:
        try:
            await self.host.runtime.delete(self.container_id,
                                           log_path=os.path.join(self.dir, "runtime.log"))
        except errors.MetacError as exc:
            log.warning("removing container %s: %s", self.container_id, exc)
        waiting = [w for w in [self.init, *(p.watched for p in self.processes)]
                   if w is not None and w.running]
        if waiting:
            _, pending = await asyncio.wait([w.exited for w in waiting], timeout=EXIT_WAIT)
            if pending:
                log.error("processes of %s still running after delete", self.container_id)

    def _init_exited(self, watched: Watched) -> None:
        if self.state == "running":
            log.warning("environment %s stopped: its init exited (%s)", self.id, watched.code)
            self.state = "stopped"

    # ---------------------------------------------------------------- processes

    async def launch(self, spec: oci.ProcessSpec, files: Sequence[FdSpec]) -> ContainerProcess:
        if self.state != "running":
            raise errors.FailedPrecondition(f"the environment is {self.state}")
        self._count += 1
        n = self._count
        stdio = Stdio(self.host.streams, files, f"process {self.id}.{n}",
                      console_size=spec.console_size)
        spec = oci.ProcessSpec(spec.args, spec.env, spec.cwd, spec.uid, spec.gid,
                               terminal=stdio.terminal, console_size=spec.console_size)
        process_file = os.path.join(self.dir, f"process{n}.json")
        pid_file = os.path.join(self.dir, f"process{n}.pid")
        log_path = os.path.join(self.dir, f"process{n}.log")
        with open(process_file, "w") as f:
            json.dump(oci.process_config(spec), f)
        console = ConsoleReceiver(os.path.join(self.dir, f"console{n}.sock")) \
            if stdio.terminal else None
        receiving = self.host.spawn(console.receive(), f"console {self.id}.{n}") \
            if console is not None else None
        process = None
        try:
            stdio.prepare()
            pid = await self.host.runtime.exec_detached(
                self.container_id, process_file, pid_file, log_path,
                stdio=stdio.child_fds, console_socket=console.path if console else None)
            watched = self.host.watch(pid, lambda w: self._process_exited())
            process = ContainerProcess(self, n, spec, stdio, watched)
            self.processes.append(process)
            if receiving is not None:
                stdio.attach_terminal(await receiving)
            await stdio.bind_given_streams()
        except BaseException:
            if receiving is not None:
                receiving.cancel()
            if process is not None:
                process.kill(signal.SIGKILL)
            await stdio.aclose()
            raise
        finally:
            # The runtime's helpers (and, on failure, the process) end up with us.
            self.host.reap_strays()
            stdio.close_child_fds()
            if console is not None:
                console.close()
            for path in (process_file, pid_file, log_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return process

    def _process_exited(self) -> None:
        if self.auto_destroy and not any(p.running for p in self.processes):
            self.schedule_destroy("its last process exited", final=True)

    # ---------------------------------------------------------------- teardown

    def schedule_destroy(self, why: str, *, final: bool = False) -> None:
        """Tear down in the background. ``final``: it ended for good (its work is done or
        a client destroyed it), so a persistent environment is not made again at the
        next start; otherwise (capabilities dropped, e.g. the persistence service went
        away) it is."""
        self.final = self.final or final
        if self._destroying is None and self.state != "destroyed":
            log.info("destroying environment %s: %s", self.id, why)
            self._destroying = self.host.spawn(self._teardown(), f"destroy env {self.id}")

    async def destroy(self) -> None:
        """Tear down for good (see ``schedule_destroy``) and wait until done."""
        self.final = True
        if self._destroying is None:
            self._destroying = self.host.spawn(self._teardown(), f"destroy env {self.id}")
        await asyncio.shield(self._destroying)

    async def _teardown(self) -> None:
        if self.state == "destroyed":
            return
        self.state = "destroying"
        try:
            # The container goes first (it uses the mounts and networks).
            revert, self._revert = self._revert, Revert()
            await asyncio.shield(self._close(revert))
        finally:
            self.state = "destroyed"
            self.host.envs.pop(self.id, None)
            self.host.reap_strays()
            if self.on_destroyed is not None and self.final and not self.host.closing:
                self.on_destroyed(self)

    async def _close(self, revert: Revert) -> None:
        await revert.aclose()
        await asyncio.gather(*(p.stdio.aclose() for p in self.processes),
                             return_exceptions=True)
