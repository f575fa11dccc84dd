"""One virtual machine: its QEMU process and everything set up for it, owned by one Revert.

Start-up, in order: a private directory (0700, in the node's runtime dir) for
QEMU's sockets; the kernel and initrd read from their File capabilities into
memfds (never a file on disk); each serial port either bound to the Stream the
caller gave (the connected socket itself is QEMU's chardev: no copy) or a unix
socket QEMU listens on, served as a new Stream; then QEMU, owned by the
service's supervisor, started once its QMP socket exists. Every step adds its
undo to the VM's Revert, run once when the VM stops (guest power-off,
``destroy``, last capability dropped, service exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metac import errors
from metac.core.holder import Revert
from metac.core.service import Description
from metac.core.sources import UnixSource
from metac.core.streams import OpenedStream, StreamHost, StreamServer
from metac.core.supervisor import Child, Supervisor
from metac.core.tasks import TaskSet
from metac.core.untrusted import bounded, env_int
from metac.vm import qemu
from metac.vm.accel import QEMU, QEMU_PACKAGE, find_qemu
from metac.vm.taps import TapNetworks, random_mac

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # QEMU must have created its QMP socket by then
READ_TIMEOUT_ENV = "METAC_VM_READ_TIMEOUT"
BOOT_FILE_MAX_ENV = "METAC_VM_BOOT_FILE_MAX_MIB"
BOOT_FILE_MAX_MIB = 1024
SERIAL_CATEGORY = "serial"  # the largest kernel or initrd read from a File capability


@dataclass
class SerialPlan:
    virtio: bool = False
    name: str = ""
    nowait: bool = False
    stream: Any = None  # a Stream capability, or None: a new one


@dataclass
class DrivePlan:
    device: Any  # a BlockDevice capability
    ide: bool = False


@dataclass
class NicPlan:
    network: Any = None  # an L2Interface capability, or None: a new network
    e1000: bool = False


@dataclass
class LaunchPlan:
    """What to launch, capabilities included (parsed from a LaunchConfiguration)."""

    memory_mib: int
    vcpus: int
    kernel: Any = None  # File
    initrd: Any = None  # File or None
    cmdline: str = ""
    boot_disk: int | None = None
    serials: list[SerialPlan] = field(default_factory=list)
    drives: list[DrivePlan] = field(default_factory=list)
    nics: list[NicPlan] = field(default_factory=list)


async def read_boot_file(host: StreamHost, file: Any, what: str) -> int:
    """A memfd holding the whole content of a File capability (bounded in size and time)."""
    limit = env_int(BOOT_FILE_MAX_ENV, BOOT_FILE_MAX_MIB) << 20
    res = await bounded(file.openAsStream(), f"the {what} file")
    opened = await host.open_remote(res.stream, what=f"the {what} file's stream")
    fd = os.memfd_create(f"metac-vm-{what}", os.MFD_CLOEXEC)
    loop = asyncio.get_running_loop()
    total = 0
    try:
        async with asyncio.timeout(env_int(READ_TIMEOUT_ENV, 300)):
            while True:
                data = await loop.sock_recv(opened.sock, 1 << 20)
                if not data:
                    break
                total += len(data)
                if total > limit:
                    raise errors.InvalidArgument(
                        f"the {what} is larger than {limit >> 20} MiB ({BOOT_FILE_MAX_ENV})")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
    except TimeoutError:
        os.close(fd)
        raise errors.Unavailable(f"reading the {what} took too long") from None
    except BaseException:
        os.close(fd)
        raise
    finally:
        await opened.aclose()
    if total == 0:
        os.close(fd)
        raise errors.InvalidArgument(f"the {what} file is empty")
    return fd


class VirtualMachine:
    """A QEMU process and what it uses; ``stop`` undoes everything once."""

    def __init__(self, vm_id: str, plan: LaunchPlan, accel: str, *, host: StreamHost,
                 supervisor: Supervisor, tasks: TaskSet, base_dir: str,
                 taps: TapNetworks | None = None,
                 run_as: tuple[int, int] | None = None) -> None:
        self.id = vm_id
        self.plan = plan
        self.accel = accel
        self.host = host
        self.supervisor = supervisor
        self.tasks = tasks
        self.taps = taps
        self.run_as = run_as
        self.networks: list[Any] = []  # L2Interface of each NIC
        self.tap_names: set[str] = set()
        self.dir = os.path.join(base_dir, vm_id)
        self.state = "starting"
        self.started = 0.0
        self.child: Child | None = None
        self.serial_streams: list[Any] = []
        self.drive_read_only: list[bool] = []
        self.persistent = False
        self.leases = 0
        self.on_stopped: Callable[[VirtualMachine], None] | None = None
        self._revert = Revert()
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.child.pid if self.child is not None and self.state == "running" else 0

    @property
    def running(self) -> bool:
        return self.state == "running"

    # ---------------------------------------------------------------- start

    async def start(self) -> None:
        """Set everything up and start QEMU; on failure, undo what was done and raise."""
        try:
            await self._start()
        except BaseException:
            self.state = "failed"
            await self._revert.aclose()
            self._stopped.set()
            raise

    async def _start(self) -> None:
        binary = find_qemu()
        if binary is None:
            raise errors.MissingDependency(QEMU, QEMU_PACKAGE)
        plan = self.plan
        os.makedirs(os.path.dirname(self.dir), mode=0o700, exist_ok=True)
        os.mkdir(self.dir, 0o700)
        self._revert.add(lambda: shutil.rmtree(self.dir, ignore_errors=True),
                         f"remove {self.dir}")
        fds: list[int] = []  # ours, closed once QEMU has its copies

        def keep_fd(fd: int) -> int:
            fds.append(fd)
            return fd

        try:
            kernel = None
            if plan.kernel is not None:
                kfd = keep_fd(await read_boot_file(self.host, plan.kernel, "kernel"))
                ifd = None
                if plan.initrd is not None:
                    ifd = keep_fd(await read_boot_file(self.host, plan.initrd, "initrd"))
                kernel = qemu.KernelBoot(kfd, ifd, plan.cmdline)
            serials = [await self._serial(i, s) for i, s in enumerate(plan.serials)]
            drives = [await self._drive(i, d) for i, d in enumerate(plan.drives)]
            nics = [await self._nic(i, n) for i, n in enumerate(plan.nics)]
            spec = qemu.MachineSpec(
                accel=self.accel, memory_mib=plan.memory_mib, vcpus=plan.vcpus,
                qmp_socket=os.path.join(self.dir, "qmp.sock"), kernel=kernel,
                boot_disk=plan.boot_disk, serials=serials, drives=drives, nics=nics,
                run_as=self.run_as)
            try:
                argv = qemu.qemu_argv(binary, spec)
            except qemu.SpecError as exc:
                raise errors.InvalidArgument(str(exc)) from None
            self.child = await self.supervisor.spawn(argv, name=f"vm-{self.id}",
                                                     pass_fds=qemu.fds_of(spec))
        finally:
            for fd in fds:
                os.close(fd)
        child = self.child
        self._revert.add(lambda: self.supervisor.stop(child, grace=5.0), "stop QEMU")
        waiting = any(s.listen_path is not None and not s.nowait for s in spec.serials)
        await self._wait_started(child, spec.qmp_socket, greeting=not waiting)
        self.started = time.time()
        self.state = "running"
        self.tasks.spawn(self._watch(child), f"watch vm {self.id}", log_errors=True)
        log.info("VM %s started (pid %d, %s, %d MiB, %d vcpu)", self.id, child.pid,
                 self.accel, plan.memory_mib, plan.vcpus)

    async def _serial(self, index: int, plan: SerialPlan) -> qemu.SerialSpec:
        if plan.stream is not None:
            opened: OpenedStream = await self.host.open_remote(
                plan.stream, what=f"the stream of serial port {index}")
            self._revert.add(opened.aclose, f"close serial port {index}")
            self.serial_streams.append(opened.cap)
            return qemu.SerialSpec(fd=opened.sock.fileno(), virtio=plan.virtio,
                                   name=plan.name)
        path = os.path.join(self.dir, f"serial{index}.sock")
        # Persistable: a ref names (VM id, port); the vm service's "serial" restorer.
        server = StreamServer(self.host, UnixSource(path),
                              name=f"VM {self.id} serial port {index}", ctx=self.host.ctx,
                              description=Description(SERIAL_CATEGORY,
                                                      {"vm": self.id, "port": index}))
        self.serial_streams.append(server)
        return qemu.SerialSpec(listen_path=path, virtio=plan.virtio, name=plan.name,
                               nowait=plan.nowait)

    async def _drive(self, index: int, plan: DrivePlan) -> qemu.DriveSpec:
        """The device's NBD stream, opened here; QEMU's NBD client gets the socket."""
        what = f"the block device of drive {index}"
        info = (await bounded(plan.device.info(), what)).info
        stream = (await bounded(plan.device.nbdSetup(), what)).stream
        opened = await self.host.open_remote(stream, what=f"the NBD stream of drive {index}")
        self._revert.add(opened.aclose, f"close drive {index}")
        self.drive_read_only.append(bool(info.readOnly))
        return qemu.DriveSpec(nbd_fd=opened.sock.fileno(), ide=plan.ide,
                              read_only=bool(info.readOnly))

    async def _nic(self, index: int, plan: NicPlan) -> qemu.NicSpec:
        if self.taps is None:
            raise errors.Unsupported("networks need the net service")
        name, l2, mtu = await self.taps.attach(self.id, index, plan.network, self._revert)
        self.tap_names.add(name)
        self.networks.append(l2)
        return qemu.NicSpec(tap=name, e1000=plan.e1000, mac=random_mac(), mtu=mtu)

    def network(self, index: int) -> Any:
        if not 0 <= index < len(self.networks):
            raise errors.NotFound(f"the VM has no network {index} "
                                  f"(it has {len(self.networks)})")
        return self.networks[index]

    async def _wait_started(self, child: Child, qmp_socket: str, greeting: bool) -> None:
        """Until QEMU's monitor greets us: the machine is set up then (the kernel and
        initrd loaded, the drives opened). If QEMU exits first, its last words say why.

        Without ``greeting`` only until the monitor's socket exists: a serial port that
        waits for its first connection holds QEMU's start-up until somebody opens it."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not os.path.exists(qmp_socket):
                    if child.returncode is not None:
                        raise EOFError
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(child.wait()), 0.05)
                if not greeting:
                    return
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                with sock:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, qmp_socket)
                    greeting = b""
                    while b"\n" not in greeting:
                        data = await loop.sock_recv(sock, 4096)
                        if not data:
                            raise EOFError
                        greeting += data
        except (EOFError, OSError, TimeoutError):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.wait()), 1.0)
            raise errors.FailedPrecondition(
                f"QEMU did not start: {self._log_tail(child)}") from None

    @staticmethod
    def _log_tail(child: Child) -> str:
        try:
            with open(child.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        lines = [line for line in lines if "qemu-system" in line] or lines
        return lines[-1][:300] if lines else f"exit status {child.returncode}"

    # ---------------------------------------------------------------- running, stopping

    async def _watch(self, child: Child) -> None:
        code = await child.wait()
        if self._stopping is None:
            log.info("VM %s stopped (QEMU exit %s)", self.id, code)
            await self.stop()

    def serial_stream(self, index: int) -> Any:
        if not 0 <= index < len(self.serial_streams):
            raise errors.NotFound(f"the VM has no serial port {index} "
                                  f"(it has {len(self.serial_streams)})")
        return self.serial_streams[index]

    async def stop(self) -> None:
        """Stop QEMU (if running) and undo everything; idempotent, always awaited."""
        if self._stopping is None:
            self._stopping = self.tasks.spawn(self._stop(), f"stop vm {self.id}",
                                              log_errors=True)
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        if self.state in ("running", "starting"):
            self.state = "stopped"
        try:
            await self._revert.aclose()
        finally:
            self._stopped.set()
            if self.on_stopped is not None:
                self.on_stopped(self)

    def schedule_stop(self, why: str) -> None:
        if self._stopping is None and self.state == "running":
            log.info("VM %s: %s; destroying it", self.id, why)
            self.tasks.spawn(self.stop(), f"stop vm {self.id}", log_errors=True)

    async def wait(self) -> None:
        await self._stopped.wait()
