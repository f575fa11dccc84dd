"""Multi-host topologies made of network namespaces, with guaranteed teardown.

``topology(n)`` builds, for one test run:

* a "switch" namespace ``<prefix>-sw`` holding a bridge ``<prefix>-br``
  (STP and multicast snooping off, so ports forward at once);
* ``n`` host namespaces ``<prefix>-a``, ``<prefix>-b``, ...; each has ``lo`` up
  and ``eth0``, one end of a veth pair whose other end (``<prefix>-a``, ...)
  is a port of the bridge. ``eth0`` has ``10.R.S.N/24`` and a ULA
  ``fdXX:XXXX:XXXX:XXXX::N/64`` (``nodad``, usable at once); R, S and the
  ULA are random per topology, N is 1, 2, ...

``<prefix>`` is ``mc`` plus 6 random hex digits, so concurrent runs never
share a name. Nothing is created in the root namespace: veths are made in the
switch namespace with their peer placed straight into the host namespace.
There is no default route, so traffic cannot leave the topology.

Host commands run through ``nsenter --net=/run/netns/NAME --`` (network
namespace only; the mount namespace is shared with the test), never through
``ip netns exec``, which would hide mounts made by the command.

Teardown kills (by PID) every process left in the topology's namespaces and
deletes every namespace whose name carries the prefix, so it also cleans up
after a setup that failed half way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

IP = "ip"
NSENTER = "nsenter"
NETNS_RUN_DIR = "/run/netns"
HOST_IFNAME = "eth0"
MAX_HOSTS = 250


class CommandError(RuntimeError):
    """A helper command (``ip``, ``umount``, ...) failed."""


def run_cmd(
    argv: Sequence[str], *, check: bool = True, timeout: float = 15.0
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell), capture text output; raise CommandError on failure if ``check``."""
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise CommandError(
            f"{' '.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def ip(
    *args: str, netns: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``ip [-n NETNS] ARGS...``."""
    argv = [IP]
    if netns is not None:
        argv += ["-n", netns]
    return run_cmd([*argv, *args], check=check)


# --------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[int, int] | None:
    """Return ``(ppid, starttime)`` of ``pid`` from /proc/PID/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None


def proc_cmdline(pid: int) -> str:
    """The command line of ``pid`` for messages ("?" if unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def signal_pid(pid: int, sig: int, *, starttime: int | None = None) -> bool:
    """Send ``sig`` to ``pid`` through a pidfd; never to a recycled PID.

    When ``starttime`` is given, the process must still have that start time
    (field 22 of /proc/PID/stat). Returns True if the signal was delivered.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if starttime is not None:
            stat = proc_stat(pid)
            if stat is None or stat[1] != starttime:
                return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except (ProcessLookupError, OSError):
        return False
    finally:
        os.close(pidfd)


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True if ``pid`` exists (and, if given, still has ``starttime``) and is not a zombie."""
    stat = proc_stat(pid)
    if stat is None or (starttime is not None and stat[1] != starttime):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2 :].split()[0] != b"Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- namespaces


def list_netns() -> set[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_pids(netns: str) -> set[int]:
    """PIDs of the processes inside network namespace ``netns`` (``ip netns pids``)."""
    proc = ip("netns", "pids", netns, check=False)
    if proc.returncode != 0:
        return set()
    return {int(tok) for tok in proc.stdout.split() if tok.isdigit()}


def kill_netns_pids(netns: str, *, timeout: float = 5.0) -> set[int]:
    """SIGKILL (by PID) every process in ``netns``; return the PIDs still there at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {p for p in netns_pids(netns) if p != os.getpid()}
        # Zombies stay listed until reaped by their parent; they hold nothing.
        pids = {p for p in pids if pid_alive(p)}
        if not pids:
            return set()
        if time.monotonic() > deadline:
            return pids
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
        time.sleep(0.05)


def parse_link_names(ip_o_link_output: str) -> set[str]:
    """Interface names from ``ip -o link`` output (``@peer`` suffixes removed)."""
    names = set()
    for line in ip_o_link_output.splitlines():
        parts = line.split(": ", 2)
        if len(parts) >= 2:
            names.add(parts[1].split("@", 1)[0].strip())
    return names


def netns_links(netns: str | None) -> set[str]:
    """Interface names in ``netns`` (None: the root namespace)."""
    return parse_link_names(ip("-o", "link", "show", netns=netns).stdout)


def root_links() -> set[str]:
    """Interface names in the root network namespace."""
    return netns_links(None)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Host:
    """One simulated machine: a network namespace plugged into the topology's bridge."""

    name: str
    netns: str
    ipv4: str
    ipv6: str
    ifname: str = HOST_IFNAME
    prefixlen4: int = 24
    prefixlen6: int = 64

    @property
    def netns_path(self) -> str:
        return f"{NETNS_RUN_DIR}/{self.netns}"

    @property
    def nsenter_prefix(self) -> list[str]:
        """argv prefix running a command in this host's network namespace only."""
        return [NSENTER, f"--net={self.netns_path}", "--"]

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this host."""
        return [*self.nsenter_prefix, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host; text output captured unless overridden."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host (the caller owns and must end the process)."""
        return subprocess.Popen(self.argv(argv), **kw)


def links(host: Host) -> set[str]:
    """Snapshot of the interface names inside ``host``."""
    return netns_links(host.netns)


def _host_name(index: int) -> str:
    return chr(ord("a") + index) if index < 26 else f"h{index}"


def _fresh_prefix() -> str:
    existing = list_netns()
    while True:
        prefix = f"mc{secrets.token_hex(3)}"
        if not any(name.startswith(prefix + "-") for name in existing):
            return prefix


@dataclass
class Topology:
    """``n`` hosts on one bridge. Build with :func:`topology` or :meth:`create`."""

    prefix: str
    ipv4_network: ipaddress.IPv4Network
    ipv6_network: ipaddress.IPv6Network
    hosts: list[Host] = field(default_factory=list)
    _made: list[str] = field(default_factory=list, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    def port(self, host: Host) -> str:
        """Name of ``host``'s bridge port inside the switch namespace."""
        return f"{self.prefix}-{host.name}"

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def netns_names(self) -> set[str]:
        """Every namespace of this topology that currently exists."""
        return {name for name in list_netns() if name.startswith(self.prefix + "-")}

    @classmethod
    def create(cls, n: int) -> Topology:
        """Build a topology of ``n`` hosts; on failure everything made so far is removed."""
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"n must be in 1..{MAX_HOSTS}, got {n}")
        rnd = secrets.SystemRandom()
        v4 = ipaddress.IPv4Network(f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.0/24")
        v6 = ipaddress.IPv6Network(
            ((0xFD << 120) | (rnd.getrandbits(40) << 80) | (rnd.getrandbits(16) << 64), 64)
        )
        topo = cls(prefix=_fresh_prefix(), ipv4_network=v4, ipv6_network=v6)
        try:
            topo._build(n)
        except BaseException as exc:
            try:
                topo.close()
            except Exception as cleanup_exc:  # keep the original error on top
                exc.add_note(f"teardown after failed setup also failed: {cleanup_exc}")
            raise
        return topo

    def _add_netns(self, name: str) -> None:
        self._made.append(name)  # record first: teardown tolerates "never created"
        ip("netns", "add", name)

    def _build(self, n: int) -> None:
        sw = self.switch_netns
        self._add_netns(sw)
        ip("link", "set", "lo", "up", netns=sw)
        ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0",
           "mcast_snooping", "0", "forward_delay", "0", netns=sw)  # fmt: skip
        ip("link", "set", self.bridge, "up", netns=sw)
        for i in range(n):
            name = _host_name(i)
            host = Host(
                name=name,
                netns=f"{self.prefix}-{name}",
                ipv4=str(self.ipv4_network[i + 1]),
                ipv6=str(self.ipv6_network[i + 1]),
                prefixlen4=self.ipv4_network.prefixlen,
                prefixlen6=self.ipv6_network.prefixlen,
            )
            self._add_netns(host.netns)
            port = self.port(host)
            ip("link", "add", port, "type", "veth", "peer", "name", host.ifname,
               "netns", host.netns, netns=sw)  # fmt: skip
            ip("link", "set", port, "master", self.bridge, "up", netns=sw)
            ip("link", "set", "lo", "up", netns=host.netns)
            ip("addr", "add", f"{host.ipv4}/{host.prefixlen4}", "dev", host.ifname,
               netns=host.netns)  # fmt: skip
            ip("addr", "add", f"{host.ipv6}/{host.prefixlen6}", "dev", host.ifname, "nodad",
               netns=host.netns)  # fmt: skip
            ip("link", "set", host.ifname, "up", netns=host.netns)
            self.hosts.append(host)
        self._wait_up()

    def _wait_up(self, timeout: float = 10.0) -> None:
        """Wait until every host's eth0 and every bridge port have carrier."""
        deadline = time.monotonic() + timeout
        pending: list[tuple[str, str]] = [(h.netns, h.ifname) for h in self.hosts]
        pending += [(self.switch_netns, self.port(h)) for h in self.hosts]
        while pending:
            pending = [
                (ns, dev)
                for ns, dev in pending
                if "state UP" not in ip("-o", "link", "show", "dev", dev, netns=ns).stdout
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise CommandError(f"links not up after {timeout}s: {pending}")
            time.sleep(0.02)

    def close(self) -> None:
        """Kill processes left in the namespaces, delete every namespace. Idempotent."""
        if self._closed:
            return
        errors: list[str] = []
        names = set(self._made) | self.netns_names()
        # Hosts first, the switch last (deleting it removes the bridge and ports).
        for name in sorted(names, key=lambda s: s == self.switch_netns):
            if not os.path.exists(f"{NETNS_RUN_DIR}/{name}"):
                continue
            survivors = kill_netns_pids(name)
            if survivors:
                errors.append(
                    f"{name}: processes survived SIGKILL: "
                    + ", ".join(f"{p} ({proc_cmdline(p)})" for p in sorted(survivors))
                )
            proc = ip("netns", "del", name, check=False)
            if proc.returncode != 0 and os.path.exists(f"{NETNS_RUN_DIR}/{name}"):
                errors.append(f"ip netns del {name}: {proc.stderr.strip()}")
        self._closed = True
        if errors:
            raise CommandError("topology teardown incomplete: " + "; ".join(errors))

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def topology(n: int) -> Iterator[Topology]:
    """Context manager: a :class:`Topology` of ``n`` hosts, torn down on exit (also on error)."""
    topo = Topology.create(n)
    try:
        yield topo
    finally:
        topo.close()
