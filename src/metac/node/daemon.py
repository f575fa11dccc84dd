"""`metac node run`: serve NodeAdmin and Node, supervise the service processes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metac import errors
from metac.codec.refs import show_endpoint
from metac.core.paths import ServiceEnv, admin_socket, lock_node_dirs, secure_private_dir
from metac.core.process import EXIT_FATAL, FATAL_FILE_ENV, FatalError, read_fatal, sd_notify
from metac.core.rpc import ConnectionLimits, serve_tcp, serve_unix
from metac.core.supervisor import Child, Supervisor
from metac.node.registry import Registry
from metac.node.servers import NodeAdminServer, NodeServer

log = logging.getLogger("metac.node")

#: The services every node runs: name -> module run as ``python -m module``.
#: Services stop in the reverse of this order, so users of a service (compute
#: uses fs and net; everything uses persistence) stop before what they use.
BUILTIN_SERVICES: dict[str, str] = {
    "persistence": "metac.persistence",
    "net": "metac.net",
    "stream": "metac.stream",
    "fs": "metac.fs",
    "compute": "metac.compute",
    "vm": "metac.vm",
}

#: Built-in services that cannot work without root, and what for. A node that does not
#: run as root leaves them out; `metac node status` lists them as unavailable.
NEEDS_ROOT: dict[str, str] = {
    "net": "network devices (VXLAN, bridges, veth)",
    "fs": "mounts, loop and NBD devices, and the sandboxed file servers",
    "compute": "containers (namespaces, cgroups, mounts)",
}

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
HEALTHY_AFTER = 30.0  # a service that ran this long restarts with the first backoff again
#: The soft open-files limit the node raises itself to (never above the hard
#: limit): every TCP connection costs one fd. The systemd unit sets LimitNOFILE.
WANT_NOFILE = 65536


@dataclass
class NodeConfig:
    address: str
    port: int
    state_dir: str
    runtime_dir: str
    services: dict[str, str]
    #: Why this address (the ready line says it): "given with --address", or the
    #: rule of metac.node.address.choose_address that picked it.
    address_reason: str = "given with --address"
    #: Said as a warning at start-up and in the ready line (the loopback fallback).
    address_warning: str | None = None
    #: Services left out and why (a node not running as root): status says so.
    unavailable: dict[str, str] = field(default_factory=dict)


def link_logs(log_dir: str, runtime_dir: str) -> None:
    """``<runtime-dir>/logs`` -> the log dir, so that `metac node logs` finds the logs
    from the runtime dir alone (the one thing a CLI knows about its node)."""
    link = os.path.join(runtime_dir, "logs")
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.path.abspath(log_dir), tmp)
        os.replace(tmp, link)
    except OSError as exc:  # only a convenience: never a reason not to start
        log.warning("cannot link %s to %s: %s (`metac node logs` then needs --state-dir)",
                    link, log_dir, exc.strerror or exc)


class ServiceRunner:
    """Owns one service process: starts it, restarts it with backoff when it dies."""

    def __init__(self, name: str, module: str, supervisor: Supervisor, registry: Registry,
                 env: ServiceEnv, on_fatal: Callable[[errors.MetacError], None]) -> None:
        self.name = name
        self.on_fatal = on_fatal
        self.fatal_file = os.path.join(env.runtime_dir, f"fatal.{name}")
        self.module = module
        self.supervisor = supervisor
        self.registry = registry
        self.env = env
        self.child: Child | None = None
        self.restarts = 0
        self.state = "starting"
        self.stopping = False

    async def stop(self) -> None:
        """Stop the service for good (no restart); returns once it has exited."""
        self.stopping = True
        self.state = "stopped"
        child = self.child
        if child is not None and child.returncode is None:
            await self.supervisor.stop(child)

    def status(self) -> dict[str, Any]:
        running = self.child is not None and self.child.returncode is None
        state = self.state
        if running and self.registry.is_registered(self.name):
            state = "registered"
        return {"name": self.name, "state": state,
                "pid": self.child.pid if running and self.child else 0,
                "restarts": self.restarts}

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        environ = dict(os.environ)
        environ.update(self.env.to_environ())
        # Keep a src/ checkout importable in the child.
        environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        environ[FATAL_FILE_ENV] = self.fatal_file
        loop = asyncio.get_running_loop()
        while True:
            self.state = "starting"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.fatal_file)
            self.child = await self.supervisor.spawn(
                [sys.executable, "-m", self.module], name=f"service-{self.name}", env=environ)
            started = loop.time()
            try:
                code = await self.child.wait()
            finally:
                if self.child.returncode is None:
                    await self.supervisor.stop(self.child)
                else:
                    self.supervisor.forget(self.child)
                self.registry.unregister_name(self.name)
            if self.stopping:
                return
            if code == EXIT_FATAL:
                # Restarting would fail the same way (a damaged database...): stop the node.
                self.state = "failed"
                error = read_fatal(self.fatal_file) or errors.FailedPrecondition(
                    f"service {self.name} cannot run (exit {code}); see {self.child.log_path}")
                log.error("service %s failed for good; stopping the node", self.name)
                self.on_fatal(error)
                return
            if loop.time() - started > HEALTHY_AFTER:
                backoff = BACKOFF_FIRST
            self.state = "restarting"
            self.restarts += 1
            log.warning("service %s exited with %s; restarting in %.1f s (log: %s)",
                        self.name, code, backoff, self.child.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


def raise_fd_limit(want: int = WANT_NOFILE) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (up to the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
    return soft


def lock_dirs(config: NodeConfig) -> list[int]:
    """Lock the state and runtime dirs before anything in them is touched: a second node
    there would reap this one's services and take over its admin socket. The fds hold the
    locks for the life of the process."""
    return lock_node_dirs(config.state_dir, config.runtime_dir)


async def run_node(config: NodeConfig) -> int:
    """Run the node until SIGTERM; the caller holds ``lock_dirs(config)``."""
    limits = ConnectionLimits.from_env()  # a bad METAC_RPC_* value stops the node here
    nofile = raise_fd_limit()
    if nofile != resource.RLIM_INFINITY and nofile < limits.max_total + 64:
        log.warning("open files limit %d is below METAC_RPC_MAX_CONNECTIONS (%d): connections "
                    "beyond it wait until fds are free", nofile, limits.max_total)
    for d in (config.state_dir, config.runtime_dir):
        os.makedirs(d, mode=0o700, exist_ok=True)
    fixed = secure_private_dir(config.state_dir)
    if fixed:
        log.warning("%s", fixed)
    try:
        ipaddress.ip_address(config.address)
    except ValueError:
        raise errors.InvalidArgument(f"--address must be an IP address, not {config.address!r}") from None

    if config.address_warning:
        log.warning("WARNING: %s", config.address_warning)
    loop = asyncio.get_running_loop()
    fatal: asyncio.Future[errors.MetacError] = loop.create_future()

    def on_fatal(error: errors.MetacError) -> None:
        if not fatal.done():
            fatal.set_result(error)

    supervisor = Supervisor(config.state_dir, "node")
    link_logs(supervisor.log_dir, config.runtime_dir)
    await supervisor.reap_orphans()
    registry = Registry(list(config.services), config.unavailable)
    instance = secrets.token_hex(8)
    runners = [
        ServiceRunner(name, module, supervisor, registry, ServiceEnv(
            name=name, runtime_dir=config.runtime_dir, state_dir=config.state_dir,
            node_address=config.address, node_port=config.port, node_instance=instance),
            on_fatal)
        for name, module in config.services.items()
    ]
    address = (config.address, config.port)
    public = NodeServer(registry, address)

    def status() -> list[dict[str, Any]]:
        return [r.status() for r in runners] + [
            {"name": name, "state": f"unavailable: {why}", "pid": 0, "restarts": 0}
            for name, why in config.unavailable.items()]

    socket_path = admin_socket(config.runtime_dir)
    unix_server = await serve_unix(
        socket_path, lambda peer: NodeAdminServer(registry, public, status))
    try:
        tcp_server = await serve_tcp(config.address, config.port,
                                     lambda peer: NodeServer(registry, address, peer), limits)
    except OSError as exc:
        unix_server.close()
        raise errors.FailedPrecondition(
            f"cannot listen on {config.address} port {config.port}: {exc.strerror}") from None
    shown = show_endpoint(config.address, config.port)
    try:
        async with asyncio.TaskGroup() as tg:
            for runner in runners:
                tg.create_task(runner.run(), name=f"service {runner.name}")
            ready = tg.create_task(registry.wait_all(), name="wait for services")
            try:
                await asyncio.wait({ready, fatal}, return_when=asyncio.FIRST_COMPLETED)
                if not fatal.done():
                    log.info("metac node ready on %s (address %s: %s; admin socket %s; "
                             "services: %s)", shown, config.address, config.address_reason,
                             socket_path, ", ".join(config.services))
                    if config.address_warning:
                        log.warning("WARNING: %s", config.address_warning)
                    if config.unavailable:
                        log.warning("WARNING: not running as root: services %s do not run "
                                    "(metac node status says why)", ", ".join(config.unavailable))
                    sd_notify("READY=1")
                # Until SIGTERM (cancelled), or until a service fails for good.
                await fatal
            finally:
                ready.cancel()
                sd_notify("STOPPING=1")
                log.info("stopping services")
                for runner in reversed(runners):
                    await asyncio.shield(runner.stop())
    finally:
        await supervisor.aclose()
        await tcp_server.aclose()
        unix_server.close()
        with contextlib.suppress(Exception):
            await unix_server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        log.info("node stopped")
    raise FatalError(fatal.result())
