"""Schema-facing servers of the vm service: admin, launcher and VM; the service definition.

Lifetime: a VM runs while any ``VMServer`` of it exists (each holds a lease;
pycapnp frees a server when its last client reference goes, also when a
client's connection ends; a sturdy ref's row in the persistence service holds
one too), until ``destroy()`` or the guest powers off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import zlib
from collections.abc import AsyncIterator
from typing import Any

from metac import errors
from metac.core.holder import Lease
from metac.core.rpc import Servant
from metac.core.service import (
    Description,
    PersistableMixin,
    ServiceContext,
    ServiceDefinition,
    run_service,
)
from metac.core.streams import StreamHost
from metac.core.tasks import TaskSet
from metac.core.untrusted import env_int
from metac.schema.load import vm as vm_schema
from metac.vm import accel as accel_mod
from metac.vm import persist, qemu
from metac.vm.machine import (
    DrivePlan,
    LaunchPlan,
    NicPlan,
    SerialPlan,
    VirtualMachine,
)
from metac.vm.taps import TapNetworks

log = logging.getLogger(__name__)

MAX_SERIAL_PORTS = 16
MAX_DRIVES = 16
MAX_NICS = 8
MAX_VMS_ENV = "METAC_VM_MAX"  # VMs this service runs at once (default 32)
MAX_VMS = 32
#: With METAC_VM_RUNAS=on, QEMU drops root once a VM is set up, to a user and group of
#: its own (one per VM, so one VM's QEMU cannot ptrace or signal another's): RUNAS_BASE
#: + slot. Off by default: the credential change clears QEMU's parent-death signal, so
#: a QEMU would outlive a killed node (until the node's next start reaps it).
RUNAS_ENV = "METAC_VM_RUNAS"
RUNAS_BASE = 0x6D430000
RUNAS_SLOTS = 65536
DEFAULT_MEMORY_MIB = 512


def _cap(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg._has(name) else None


def parse_config(config: Any) -> LaunchPlan:
    """A LaunchConfiguration as a LaunchPlan (InvalidArgument naming the field)."""
    memory = int(config.memory) or DEFAULT_MEMORY_MIB
    vcpus = int(config.vcpu) or 1
    if memory < qemu.MIN_MEMORY_MIB:
        raise errors.InvalidArgument(f"memory {memory} MiB is too little: a VM needs at "
                                     f"least {qemu.MIN_MEMORY_MIB} MiB")
    if not 1 <= vcpus <= qemu.MAX_VCPUS:
        raise errors.InvalidArgument(f"vcpu must be in 1..{qemu.MAX_VCPUS}, not {vcpus}")
    plan = LaunchPlan(memory_mib=memory, vcpus=vcpus)
    boot = config.boot
    if boot.which() == "kernel":
        kb = boot.kernel
        plan.kernel = _cap(kb, "kernel")
        if plan.kernel is None:
            raise errors.InvalidArgument("boot.kernel.kernel is missing")
        plan.initrd = _cap(kb, "initrd")
        plan.cmdline = str(kb.cmdline)
    else:
        plan.boot_disk = int(boot.disk)
    if len(config.networks) > MAX_NICS:
        raise errors.InvalidArgument(f"at most {MAX_NICS} networks")
    for net in config.networks:
        plan.nics.append(NicPlan(_cap(net, "network"), e1000=str(net.driver) == "e1000"))
    if len(config.drives) > MAX_DRIVES:
        raise errors.InvalidArgument(f"at most {MAX_DRIVES} drives")
    for i, drive in enumerate(config.drives):
        device = _cap(drive, "device")
        if device is None:
            raise errors.InvalidArgument(f"drives[{i}].device is missing")
        plan.drives.append(DrivePlan(device, ide=str(drive.driver) == "ide"))
    if plan.boot_disk is not None and not 0 <= plan.boot_disk < len(plan.drives):
        raise errors.InvalidArgument(f"boot disk {plan.boot_disk} is not one of the "
                                     f"{len(plan.drives)} drives")
    if len(config.serialPorts) > MAX_SERIAL_PORTS:
        raise errors.InvalidArgument(f"at most {MAX_SERIAL_PORTS} serial ports")
    for port in config.serialPorts:
        plan.serials.append(SerialPlan(virtio=str(port.driver) == "virtio", name=str(port.name),
                                       nowait=bool(port.nowait), stream=_cap(port, "stream")))
    return plan


class VMHost:
    """The VMs of this service, the accelerator they get, and what they share."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.accel = accel_mod.Accelerator("tcg", "not probed yet")
        self.vms: dict[str, VirtualMachine] = {}
        self.streams = StreamHost(ctx.env.node_address, ctx=ctx)
        self.tasks = TaskSet()
        self.base_dir = os.path.join(ctx.env.runtime_dir, "vm")
        self._probe: asyncio.Task[None] | None = None
        self.taps = TapNetworks(ctx)
        self.closing = False
        self._relaunch_locks: dict[str, asyncio.Lock] = {}
        self._sweep: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # QEMUs of an earlier run were reaped by the supervisor; their directories go too.
        if os.path.isdir(self.base_dir):
            for entry in os.listdir(self.base_dir):
                shutil.rmtree(os.path.join(self.base_dir, entry), ignore_errors=True)
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
        # The probe may boot a test guest: it runs in the background, so the node is
        # ready at once; the first launch waits for it.
        self._probe = self.tasks.spawn(self._choose_accel(), "accelerator probe")
        # Nothing runs yet: every tap and bind of ours is a leftover. Launches wait for it.
        self._sweep = self.tasks.spawn(self.taps.sweep(set()), "sweep leftover taps",
                                       log_errors=True)

    async def _choose_accel(self) -> None:
        self.accel = await accel_mod.choose()
        log.info("VMs run with %s: %s", self.accel.name, self.accel.detail)

    async def accelerator(self) -> accel_mod.Accelerator:
        if self._probe is not None:
            await asyncio.shield(self._probe)
        return self.accel

    @contextlib.asynccontextmanager
    async def relaunching(self, vm_id: str) -> AsyncIterator[None]:
        """One relaunch of a persistent VM at a time (its refs may be restored at once)."""
        lock = self._relaunch_locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            yield

    async def launch(self, plan: LaunchPlan, vm_id: str | None = None) -> VirtualMachine:
        accel = await self.accelerator()
        vm_id = vm_id or secrets.token_hex(8)
        if self._sweep is not None:
            await asyncio.shield(self._sweep)
        vm = VirtualMachine(vm_id, plan, accel.name,
                            host=self.streams, supervisor=self.ctx.supervisor,
                            tasks=self.tasks, base_dir=self.base_dir, taps=self.taps,
                            run_as=self._run_as(vm_id))
        limit = env_int(MAX_VMS_ENV, MAX_VMS)
        if len(self.vms) >= limit:  # checked and taken with no await in between
            raise errors.Unavailable(f"this node runs {limit} VMs already ({MAX_VMS_ENV})")
        self.vms[vm.id] = vm
        vm.on_stopped = self._stopped
        try:
            await vm.start()
        except BaseException:
            self.vms.pop(vm.id, None)
            raise
        return vm

    def _run_as(self, vm_id: str) -> tuple[int, int] | None:
        """A user and group for this VM's QEMU no other running VM has (None: keep root)."""
        if os.geteuid() != 0 or os.environ.get(RUNAS_ENV, "").lower() != "on":
            return None
        taken = {vm.run_as for vm in self.vms.values()}
        slot = zlib.crc32(vm_id.encode()) % RUNAS_SLOTS
        for step in range(RUNAS_SLOTS):
            uid = RUNAS_BASE + (slot + step) % RUNAS_SLOTS
            if (uid, uid) not in taken:
                return uid, uid
        return None

    def _stopped(self, vm: VirtualMachine) -> None:
        if self.vms.get(vm.id) is vm:
            del self.vms[vm.id]
        if self.closing:
            return
        self.tasks.spawn(self._forget(vm), f"forget refs of vm {vm.id}", log_errors=True)

    async def _forget(self, vm: VirtualMachine) -> None:
        # A stopped VM's refs would only answer NotFound, and a persistent one must not
        # come back: revoke them. Not when the service stops (it comes back then).
        for runtime_id in vm_runtime_ids(vm.id):
            await self.ctx.forget(runtime_id)

    async def aclose(self) -> None:
        self.closing = True
        await asyncio.gather(*(vm.stop() for vm in list(self.vms.values())),
                             return_exceptions=True)
        await self.tasks.aclose()
        await self.streams.aclose()


def vm_runtime_ids(vm_id: str) -> tuple[str, str]:
    """The stored objects of a VM: one for live refs, one for persistent ones."""
    return f"vm:{vm_id}", f"vm:{vm_id}:persistent"


class VMServer(PersistableMixin, vm_schema.VM.Server):
    def __init__(self, ctx: ServiceContext, vm: VirtualMachine) -> None:
        self._ctx = ctx
        self._vm = vm
        self._lease = Lease(vm, vm.schedule_stop)

    def ref_runtime_id(self, persistent: bool) -> str:
        live_id, persistent_id = vm_runtime_ids(self._vm.id)
        return persistent_id if persistent else live_id

    async def describe(self, persistent: bool) -> Description:
        vm = self._vm
        if not persistent:
            return Description("vm", {"id": vm.id})
        data, caps = persist.describe(vm)
        vm.persistent = True
        return Description("vm", data, caps, active=True)

    async def serialPort(self, index: int, _context: Any, **kwargs: Any) -> None:
        _context.results.stream = self._vm.serial_stream(index)

    async def network(self, index: int, _context: Any, **kwargs: Any) -> None:
        _context.results.l2interface = self._vm.network(index)

    async def destroy(self, **kwargs: Any) -> None:
        await self._vm.stop()

    async def wait(self, **kwargs: Any) -> None:
        await self._vm.wait()


class LauncherServer(PersistableMixin, vm_schema.VMLauncher.Server):
    def __init__(self, ctx: ServiceContext, host: VMHost) -> None:
        self._ctx = ctx
        self._host = host

    async def describe(self, persistent: bool) -> Description:
        return Description("launcher", {})

    async def launch(self, config: Any, _context: Any, **kwargs: Any) -> None:
        vm = await self._host.launch(parse_config(config))
        _context.results.vm = VMServer(self._ctx, vm)


class VMAdminServer(Servant, vm_schema.VMServiceAdmin.Server):
    def __init__(self, ctx: ServiceContext, host: VMHost) -> None:
        self._ctx = ctx
        self._host = host

    async def getLauncher(self, _context: Any, **kwargs: Any) -> None:
        _context.results.launcher = LauncherServer(self._ctx, self._host)

    async def listVMs(self, _context: Any, **kwargs: Any) -> None:
        vms = list(self._host.vms.values())
        out = _context.results.init("vms", len(vms))
        for item, vm in zip(out, vms, strict=True):
            item.pid = vm.pid
            item.memory = vm.plan.memory_mib
            item.vcpu = vm.plan.vcpus
            item.running = vm.running
            item.vm = VMServer(self._ctx, vm)
            item.id = vm.id
            item.accel = vm.accel
            item.started = vm.started
            item.state = vm.state

    async def accelerator(self, _context: Any, **kwargs: Any) -> None:
        accel = await self._host.accelerator()
        _context.results.name = accel.name
        _context.results.detail = accel.detail


class VMService(ServiceDefinition):
    """Virtual machines (VMLauncher) on this node."""

    name = "vm"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.state = VMHost(ctx)

    def admin(self) -> Any:
        return VMAdminServer(self.ctx, self.state)

    async def start(self) -> None:
        await self.state.start()

    async def restore_launcher(self, data: dict[str, Any], caps: list[Any]) -> Any:
        return LauncherServer(self.ctx, self.state)

    async def restore_vm(self, data: dict[str, Any], caps: list[Any]) -> Any:
        vm_id = str(data.get("id", ""))
        vm = self.state.vms.get(vm_id)
        if vm is None and data.get("persistent") and vm_id.isalnum():
            async with self.state.relaunching(vm_id):
                vm = self.state.vms.get(vm_id)
                if vm is None:
                    vm = await self.state.launch(persist.plan_from(data, caps), vm_id=vm_id)
                    vm.persistent = True
                    log.info("launched persistent VM %s again", vm_id)
        if vm is None:
            raise errors.NotFound("the VM no longer exists")
        return VMServer(self.ctx, vm)

    async def restore_serial(self, data: dict[str, Any], caps: list[Any]) -> Any:
        """Category ``SERIAL_CATEGORY`` (a serial port's stream)."""
        vm = self.state.vms.get(str(data.get("vm", "")))
        if vm is None:
            raise errors.NotFound("the VM no longer exists")
        return vm.serial_stream(int(data.get("port", -1)))

    async def aclose(self) -> None:
        # VMs must not outlive the service: finish even if cancelled (SIGTERM).
        task = asyncio.get_running_loop().create_task(self.state.aclose(), name="vm aclose")
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise


def main() -> None:
    run_service(VMService)
