"""The ``qemu-system-x86_64`` command line of one VM, from a plain description. No I/O.

Everything QEMU reads that came from a capability reaches it as an inherited
file descriptor (``/dev/fd/N`` for the kernel and initrd, ``fd=N`` for a
serial port bound to a given stream and for a drive's NBD connection), so
nothing is copied into a path other users could read. Serial ports the service
serves itself are unix sockets QEMU listens on, in the VM's private directory;
NICs are tap devices the service created, named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Smallest memory a VM may have (MiB): less does not boot a Linux kernel.
MIN_MEMORY_MIB = 32
MAX_VCPUS = 64


class SpecError(ValueError):
    """The description cannot be a QEMU command line (the message says why)."""


@dataclass(frozen=True)
class KernelBoot:
    kernel_fd: int
    initrd_fd: int | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class SerialSpec:
    """One serial port: a connected socket QEMU gets as ``fd`` or a unix socket it listens on."""

    fd: int | None = None
    listen_path: str | None = None
    virtio: bool = False
    name: str = ""  # virtio port name
    nowait: bool = False  # with listen_path: start without waiting for a connection


@dataclass(frozen=True)
class DriveSpec:
    """One drive: QEMU's own NBD client on a connected socket it gets as ``fd`` (the
    block device's authorized NBD stream, handshake not done yet)."""

    nbd_fd: int
    ide: bool = False
    read_only: bool = False


@dataclass(frozen=True)
class NicSpec:
    """One NIC: a tap device of the node, QEMU attaches to it by name."""

    tap: str
    e1000: bool = False
    mac: str = ""
    mtu: int | None = None  # told to a virtio guest (host_mtu)


@dataclass(frozen=True)
class MachineSpec:
    accel: str  # "kvm" or "tcg"
    memory_mib: int
    vcpus: int
    qmp_socket: str
    kernel: KernelBoot | None = None
    boot_disk: int | None = None
    serials: Sequence[SerialSpec] = field(default_factory=tuple)
    drives: Sequence[DriveSpec] = field(default_factory=tuple)
    nics: Sequence[NicSpec] = field(default_factory=tuple)
    #: (uid, gid) QEMU switches to once the machine is set up (None: stays as it is).
    run_as: tuple[int, int] | None = None


def check(spec: MachineSpec) -> None:
    """SpecError if ``spec`` cannot run (one line each)."""
    if spec.accel not in ("kvm", "tcg"):
        raise SpecError(f"unknown accelerator {spec.accel!r}")
    if spec.memory_mib < MIN_MEMORY_MIB:
        raise SpecError(f"memory {spec.memory_mib} MiB is too little: a VM needs at least "
                        f"{MIN_MEMORY_MIB} MiB")
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        raise SpecError(f"vcpu must be in 1..{MAX_VCPUS}, not {spec.vcpus}")
    if (spec.kernel is None) == (spec.boot_disk is None):
        raise SpecError("boot from a kernel or from a disk, exactly one")
    if spec.boot_disk is not None and not 0 <= spec.boot_disk < len(spec.drives):
        raise SpecError(f"boot disk {spec.boot_disk} is not one of the {len(spec.drives)} "
                        "drives")
    if spec.kernel is not None and any(c in spec.kernel.cmdline for c in "\0\n"):
        raise SpecError("the kernel command line may not contain NUL or newline")
    for s in spec.serials:
        if (s.fd is None) == (s.listen_path is None):
            raise SpecError("a serial port is a given socket or a listening one")
        if any(c in s.name for c in ",=\0\n") or len(s.name) > 64:
            raise SpecError(f"bad serial port name {s.name!r}")
        if s.listen_path is not None and "," in s.listen_path:
            raise SpecError("socket paths may not contain a comma")
    for n in spec.nics:
        if not n.tap or not all(c.isalnum() or c in "-_." for c in n.tap) or len(n.tap) > 15:
            raise SpecError(f"bad tap device name {n.tap!r}")
        if n.mac and (len(n.mac) != 17 or any(c not in "0123456789abcdef:" for c in n.mac)):
            raise SpecError(f"bad MAC address {n.mac!r}")
    if spec.run_as is not None and min(spec.run_as) <= 0:
        raise SpecError("QEMU must not run as root or with a negative id")
    if len([s for s in spec.serials if not s.virtio]) > 4:
        raise SpecError("at most 4 default (ISA) serial ports; use the virtio driver for more")


def _escape(text: str) -> str:
    """A value inside a QEMU option list (commas are doubled)."""
    return text.replace(",", ",,")


def qemu_argv(qemu: str, spec: MachineSpec) -> list[str]:
    """The argv (after ``check``): no defaults, no display, no network, QMP on a socket."""
    check(spec)
    accel = "kvm" if spec.accel == "kvm" else "tcg,thread=multi"
    argv = [
        qemu, "-accel", accel, "-cpu", "host" if spec.accel == "kvm" else "max",
        "-smp", str(spec.vcpus), "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-chardev", f"socket,id=qmp,path={_escape(spec.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-no-reboot",
    ]
    if spec.run_as is not None:
        # -runas changes credentials, which needs set*id and clears the parent-death
        # signal (QEMU then outlives a killed service until the next start reaps it).
        argv += ["-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
                 "-runas", f"{spec.run_as[0]}:{spec.run_as[1]}"]
    else:
        # seccomp: no obsolete system calls, no set*id, no new processes, no scheduler
        # changes.
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
                             "resourcecontrol=deny"]
    if spec.kernel is not None:
        argv += ["-kernel", f"/dev/fd/{spec.kernel.kernel_fd}"]
        if spec.kernel.initrd_fd is not None:
            argv += ["-initrd", f"/dev/fd/{spec.kernel.initrd_fd}"]
        if spec.kernel.cmdline:
            argv += ["-append", spec.kernel.cmdline]
    virtio_serial = False
    for i, s in enumerate(spec.serials):
        if s.fd is not None:
            chardev = f"socket,id=serial{i},fd={s.fd}"
        else:
            assert s.listen_path is not None
            chardev = (f"socket,id=serial{i},path={_escape(s.listen_path)},server=on,"
                       f"wait={'off' if s.nowait else 'on'}")
        argv += ["-chardev", chardev]
        if s.virtio:
            if not virtio_serial:
                argv += ["-device", "virtio-serial-pci,id=vserial"]
                virtio_serial = True
            name = f",name={s.name}" if s.name else ""
            argv += ["-device", f"virtserialport,bus=vserial.0,chardev=serial{i}{name}"]
        else:
            argv += ["-serial", f"chardev:serial{i}"]
    for i, d in enumerate(spec.drives):
        ro = "on" if d.read_only else "off"
        # Both nodes read-only for a read-only device: QEMU refuses guest writes
        # itself, before the NBD server (which refuses them too).
        node = (f"driver=raw,node-name=disk{i},read-only={ro},file.driver=nbd,"
                f"file.read-only={ro},file.server.type=fd,file.server.str={d.nbd_fd}")
        argv += ["-blockdev", node]
        boot = ",bootindex=0" if spec.boot_disk == i else ""
        # A lost connection is an I/O error in the guest, never a paused or killed VM.
        errors_to_guest = ",werror=report,rerror=report"
        if d.ide:
            argv += ["-device", f"ide-hd,drive=disk{i}{boot}{errors_to_guest}"]
        else:
            argv += ["-device", f"virtio-blk-pci,drive=disk{i}{boot}{errors_to_guest}"]
    for i, n in enumerate(spec.nics):
        argv += ["-netdev", f"tap,id=net{i},ifname={n.tap},script=no,downscript=no"]
        mac = f",mac={n.mac}" if n.mac else ""
        if n.e1000:
            argv += ["-device", f"e1000,netdev=net{i}{mac}"]
        else:
            mtu = f",host_mtu={n.mtu}" if n.mtu else ""
            argv += ["-device", f"virtio-net-pci,netdev=net{i}{mac}{mtu}"]
    return argv


def fds_of(spec: MachineSpec) -> list[int]:
    """The file descriptors QEMU must inherit for ``spec``."""
    fds: list[int] = []
    if spec.kernel is not None:
        fds.append(spec.kernel.kernel_fd)
        if spec.kernel.initrd_fd is not None:
            fds.append(spec.kernel.initrd_fd)
    fds += [s.fd for s in spec.serials if s.fd is not None]
    fds += [d.nbd_fd for d in spec.drives]
    return fds


# A 512-byte boot sector that writes "KVM-OK\n" to COM1 and halts: the accelerator probe
# boots it, so "KVM works" means a guest actually ran, not only that /dev/kvm opened.
PROBE_MARKER = b"KVM-OK"


def probe_boot_sector(marker: bytes = PROBE_MARKER) -> bytes:
    """A boot sector writing ``marker`` and a newline to COM1, then halting."""
    if len(marker) > 150:
        raise ValueError("the marker does not fit into a boot sector")
    code = bytearray([0xFA, 0xBA, 0xF8, 0x03])  # cli; mov dx, 0x3f8
    for ch in marker + b"\n":
        code += bytes([0xB0, ch, 0xEE])  # mov al, ch; out dx, al
    code += bytes([0xF4, 0xEB, 0xFD])  # hlt; jmp back to hlt
    return bytes(code) + b"\0" * (510 - len(code)) + b"\x55\xaa"


def probe_argv(qemu: str, disk_fd: int) -> list[str]:
    """QEMU booting the probe sector (given as an fd) with KVM, serial on stdout."""
    return [qemu, "-accel", "kvm", "-m", "16", "-nodefaults", "-no-user-config",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-drive", f"file=/dev/fd/{disk_fd},format=raw,if=ide,readonly=on"]
