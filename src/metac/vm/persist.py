"""Sturdy refs of VMs, and launching a persistent VM again after a restart.

A non-persistent ref only names a live VM (``{"id": ...}``): after the service
restarts it is gone (NotFound).

A persistent ref describes how to launch the VM again: memory, vCPUs, command
line, the drivers and options of every drive, NIC and serial port, and as
capabilities the kernel and initrd files, the drives' block devices, the
networks and serial streams the caller gave (the persistence service keeps
persistent refs of those, on their own nodes). It is *active*: the persistence
service restores it when the vm service starts, which launches the VM again
with the same id (new serial ports and new networks are new streams and taps).
Destroying the VM (or its guest powering off) revokes its refs, so it does not
come back; stopping the service or the node does not.
"""

from __future__ import annotations

from typing import Any

from metac import errors
from metac.schema.load import fs as fs_schema
from metac.schema.load import network as net_schema
from metac.schema.load import stream as stream_schema
from metac.vm.machine import DrivePlan, LaunchPlan, NicPlan, SerialPlan, VirtualMachine


def describe(vm: VirtualMachine) -> tuple[dict[str, Any], list[Any]]:
    """(data, caps) of a persistent ref to ``vm``."""
    plan = vm.plan
    caps: list[Any] = []
    if plan.kernel is not None:
        caps.append(plan.kernel)
        if plan.initrd is not None:
            caps.append(plan.initrd)
    caps += [d.device for d in plan.drives]
    caps += [n.network for n in plan.nics if n.network is not None]
    caps += [s.stream for s in plan.serials if s.stream is not None]
    data = {
        "id": vm.id, "persistent": True, "memory": plan.memory_mib, "vcpus": plan.vcpus,
        "kernel": plan.kernel is not None, "initrd": plan.initrd is not None,
        "cmdline": plan.cmdline, "bootDisk": plan.boot_disk,
        "drives": [{"ide": d.ide} for d in plan.drives],
        "nics": [{"e1000": n.e1000, "given": n.network is not None} for n in plan.nics],
        "serials": [{"virtio": s.virtio, "name": s.name, "nowait": s.nowait,
                     "given": s.stream is not None} for s in plan.serials],
    }
    return data, caps


def plan_from(data: dict[str, Any], caps: list[Any]) -> LaunchPlan:
    """The LaunchPlan of a persistent description (restored capabilities arrive as
    Persistable: cast to what they are)."""
    rest = list(caps)

    def take(interface: Any) -> Any:
        if not rest:
            raise errors.InvalidArgument("corrupt VM description: capabilities missing")
        return rest.pop(0).cast_as(interface)

    try:
        plan = LaunchPlan(memory_mib=int(data["memory"]), vcpus=int(data["vcpus"]),
                          cmdline=str(data.get("cmdline", "")))
        if data.get("kernel"):
            plan.kernel = take(fs_schema.File)
            if data.get("initrd"):
                plan.initrd = take(fs_schema.File)
        else:
            plan.boot_disk = int(data["bootDisk"])
        plan.drives = [DrivePlan(None, ide=bool(d.get("ide"))) for d in data.get("drives", [])]
        for drive in plan.drives:
            drive.device = take(fs_schema.BlockDevice)
        for n in data.get("nics", []):
            plan.nics.append(NicPlan(take(net_schema.L2Interface) if n.get("given") else None,
                                     e1000=bool(n.get("e1000"))))
        for s in data.get("serials", []):
            plan.serials.append(SerialPlan(
                virtio=bool(s.get("virtio")), name=str(s.get("name", "")),
                nowait=bool(s.get("nowait")),
                stream=take(stream_schema.Stream) if s.get("given") else None))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise errors.InvalidArgument(f"corrupt VM description: {exc}") from None
    return plan
