"""ProcessDescription and ProcessEnvironmentDescription messages as validated values.

Parsing happens once, at the RPC edge: every later step takes these values.
A description that cannot be run raises ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from metac import errors
from metac.codec.locators import NewLocal
from metac.compute import oci
from metac.compute.environment import NetworkSpec
from metac.compute.stdio import FdSpec, check_fd_specs

DEFAULT_ROWS, DEFAULT_COLS = 24, 80


@dataclass
class MountRequest:
    path: str
    fs: Any  # Filesystem capability


@dataclass
class LaunchRequest:
    process: oci.ProcessSpec
    files: list[FdSpec]
    root: Any  # Filesystem capability mounted at "/"
    mounts: list[MountRequest] = field(default_factory=list)
    networks: list[NetworkSpec] = field(default_factory=list)
    memory_mib: int = 0
    auto_destroy: bool = False


def _cap(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg._has(name) else None


def parse_process(msg: Any) -> tuple[oci.ProcessSpec, list[FdSpec]]:
    files = [FdSpec(bool(fd.isPty), _cap(fd, "stream")) for fd in msg.files]
    terminal = check_fd_specs(files)
    size = None
    if terminal:
        first = msg.files[0]
        size = (first.rows or DEFAULT_ROWS, first.cols or DEFAULT_COLS)
    try:
        spec = oci.ProcessSpec(
            args=tuple(msg.args), env=tuple(msg.env), cwd=msg.cwd or "/", uid=msg.uid,
            gid=msg.gid, terminal=terminal, console_size=size)
    except oci.SpecError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    return spec, files


def _interface_name(name: str) -> str:
    try:
        return NewLocal(name).name
    except ValueError:
        raise errors.InvalidArgument(
            "network names must be 1..15 printable characters without '/', ':' or spaces"
        ) from None


def _address(text: str) -> str:
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise errors.InvalidArgument(
            "network addresses must be ADDRESS/PREFIX, e.g. 10.0.0.2/24") from None
    if "/" not in text:
        raise errors.InvalidArgument("network addresses need a prefix length, e.g. 10.0.0.2/24")
    return str(iface)


def _network(text: str) -> str:
    if text in ("default", ""):
        raise errors.InvalidArgument("a route needs a network (0.0.0.0/0 for a default route)")
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise errors.InvalidArgument("route networks must be NETWORK/PREFIX") from None


def _gateway(text: str) -> str:
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise errors.InvalidArgument("route gateways must be IP addresses") from None


def parse_networks(msgs: Any) -> list[NetworkSpec]:
    out: list[NetworkSpec] = []
    names = set()
    for msg in msgs:
        name = _interface_name(msg.name)
        if name in names or name == "lo":
            raise errors.InvalidArgument(f"network name {name} is used twice (or is 'lo')")
        names.add(name)
        routes = tuple((_network(r.network), _gateway(r.via)) for r in msg.routes)
        out.append(NetworkSpec(name, _cap(msg, "l2interface"),
                               tuple(_address(a) for a in msg.addresses), routes))
    return out


def parse_launch(process_msg: Any, env_msg: Any) -> LaunchRequest:
    spec, files = parse_process(process_msg)
    root = None
    mounts = []
    seen = set()
    for m in env_msg.filesystems:
        try:
            path = oci.container_path(m.path, "mount path")
        except oci.SpecError as exc:
            raise errors.InvalidArgument(str(exc)) from None
        if path in seen:
            raise errors.InvalidArgument(f"two filesystems are mounted at {path}")
        seen.add(path)
        fs = _cap(m, "fs")
        if fs is None:
            raise errors.InvalidArgument(f"no filesystem given for {path}")
        if path == "/":
            root = fs
        else:
            mounts.append(MountRequest(path, fs))
    if root is None:
        raise errors.InvalidArgument("an environment needs a root filesystem (a mount at /)")
    return LaunchRequest(spec, files, root, mounts, parse_networks(env_msg.networks),
                         int(env_msg.memory), bool(env_msg.autoDestroy))
