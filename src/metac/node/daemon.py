"""`metac node run`: serve NodeAdmin and Node, supervise the service processes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from metac import errors
from metac.core.paths import ServiceEnv, admin_socket
from metac.core.process import sd_notify
from metac.core.rpc import serve_tcp, serve_unix
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

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
HEALTHY_AFTER = 30.0  # a service that ran this long restarts with the first backoff again


@dataclass
class NodeConfig:
    address: str
    port: int
    state_dir: str
    runtime_dir: str
    services: dict[str, str]


def default_address() -> str:
    """The first global address of this host (IPv6 preferred), else ::1."""
    try:
        from pyroute2 import IPRoute
    except ImportError:
        return "::1"
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if ip.is_global or (ip.is_private and not ip.is_loopback and not ip.is_link_local):
                found.append(ip)
    found.sort(key=lambda ip: (ip.version != 6, not ip.is_global))
    return str(found[0]) if found else "::1"


class ServiceRunner:
    """Owns one service process: starts it, restarts it with backoff when it dies."""

    def __init__(self, name: str, module: str, supervisor: Supervisor, registry: Registry,
                 env: ServiceEnv) -> None:
        self.name = name
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
        loop = asyncio.get_running_loop()
        while True:
            self.state = "starting"
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
            if loop.time() - started > HEALTHY_AFTER:
                backoff = BACKOFF_FIRST
            self.state = "restarting"
            self.restarts += 1
            log.warning("service %s exited with %s; restarting in %.1f s (log: %s)",
                        self.name, code, backoff, self.child.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


async def run_node(config: NodeConfig) -> int:
    for d in (config.state_dir, config.runtime_dir):
        os.makedirs(d, mode=0o700, exist_ok=True)
    try:
        ipaddress.ip_address(config.address)
    except ValueError:
        raise errors.InvalidArgument(f"--address must be an IP address, not {config.address!r}") from None

    supervisor = Supervisor(config.state_dir, "node")
    await supervisor.reap_orphans()
    registry = Registry(list(config.services))
    instance = secrets.token_hex(8)
    runners = [
        ServiceRunner(name, module, supervisor, registry, ServiceEnv(
            name=name, runtime_dir=config.runtime_dir, state_dir=config.state_dir,
            node_address=config.address, node_port=config.port, node_instance=instance))
        for name, module in config.services.items()
    ]
    address = (config.address, config.port)
    public = NodeServer(registry, address)

    def status() -> list[dict[str, Any]]:
        return [r.status() for r in runners]

    socket_path = admin_socket(config.runtime_dir)
    unix_server = await serve_unix(
        socket_path, lambda peer: NodeAdminServer(registry, public, status))
    try:
        tcp_server = await serve_tcp(config.address, config.port,
                                     lambda peer: NodeServer(registry, address, peer))
    except OSError as exc:
        unix_server.close()
        raise errors.FailedPrecondition(
            f"cannot listen on {config.address} port {config.port}: {exc.strerror}") from None
    shown = f"[{config.address}]:{config.port}" if ":" in config.address else \
        f"{config.address}:{config.port}"
    try:
        async with asyncio.TaskGroup() as tg:
            for runner in runners:
                tg.create_task(runner.run(), name=f"service {runner.name}")
            await registry.wait_all()
            log.info("metac node ready on %s (admin socket %s; services: %s)",
                     shown, socket_path, ", ".join(config.services))
            sd_notify("READY=1")
            try:
                await asyncio.Event().wait()
            finally:
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
    return 0
