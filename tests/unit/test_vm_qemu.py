"""The QEMU command line builder of the vm service (metac.vm.qemu), and the initrd writer."""

from __future__ import annotations

import gzip

import pytest

from metac.vm import qemu
from metac.vm.initrd import build_initrd


def _spec(**kw: object) -> qemu.MachineSpec:
    base: dict[str, object] = {"accel": "tcg", "memory_mib": 256, "vcpus": 2,
                               "qmp_socket": "/run/x/qmp.sock",
                               "kernel": qemu.KernelBoot(5, 6, "console=ttyS0")}
    base.update(kw)
    return qemu.MachineSpec(**base)  # type: ignore[arg-type]


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_kernel_boot_reads_fds_and_has_no_defaults() -> None:
    argv = qemu.qemu_argv("/usr/bin/qemu-system-x86_64", _spec())
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert _option(argv, "-accel") == ["tcg,thread=multi"]
    assert _option(argv, "-m") == ["256"] and _option(argv, "-smp") == ["2"]
    assert _option(argv, "-kernel") == ["/dev/fd/5"]
    assert _option(argv, "-initrd") == ["/dev/fd/6"]
    assert _option(argv, "-append") == ["console=ttyS0"]
    assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    assert _option(argv, "-display") == ["none"]
    assert "socket,id=qmp,path=/run/x/qmp.sock,server=on,wait=off" in _option(argv, "-chardev")
    assert qemu.fds_of(_spec()) == [5, 6]


def test_kvm_uses_host_cpu() -> None:
    argv = qemu.qemu_argv("qemu", _spec(accel="kvm"))
    assert _option(argv, "-accel") == ["kvm"] and _option(argv, "-cpu") == ["host"]


def test_serial_ports_given_fd_and_listening() -> None:
    spec = _spec(serials=[qemu.SerialSpec(fd=9),
                          qemu.SerialSpec(listen_path="/run/x/serial1.sock", nowait=True),
                          qemu.SerialSpec(listen_path="/run/x/serial2.sock"),
                          qemu.SerialSpec(fd=10, virtio=True, name="org.metac.0")])
    argv = qemu.qemu_argv("qemu", spec)
    chardevs = _option(argv, "-chardev")
    assert "socket,id=serial0,fd=9" in chardevs
    assert "socket,id=serial1,path=/run/x/serial1.sock,server=on,wait=off" in chardevs
    assert "socket,id=serial2,path=/run/x/serial2.sock,server=on,wait=on" in chardevs
    assert _option(argv, "-serial") == ["chardev:serial0", "chardev:serial1", "chardev:serial2"]
    devices = _option(argv, "-device")
    assert devices == ["virtio-serial-pci,id=vserial",
                       "virtserialport,bus=vserial.0,chardev=serial3,name=org.metac.0"]
    assert qemu.fds_of(spec) == [5, 6, 9, 10]


def test_commas_in_paths_are_escaped_or_refused() -> None:
    argv = qemu.qemu_argv("qemu", _spec(qmp_socket="/run/a,b/qmp.sock"))
    assert "socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off" in _option(argv, "-chardev")
    with pytest.raises(qemu.SpecError):
        qemu.check(_spec(serials=[qemu.SerialSpec(fd=3, name="a,b")]))


@pytest.mark.parametrize("change, words", [
    ({"memory_mib": 8}, "too little"),
    ({"vcpus": 0}, "vcpu"),
    ({"accel": "xen"}, "accelerator"),
    ({"kernel": None}, "exactly one"),
    ({"kernel": qemu.KernelBoot(5, None, "a\nb")}, "newline"),
    ({"serials": [qemu.SerialSpec()]}, "serial port"),
    ({"serials": [qemu.SerialSpec(fd=3)] * 5}, "at most 4"),
])
def test_bad_specs_say_why_in_one_line(change: dict[str, object], words: str) -> None:
    with pytest.raises(qemu.SpecError) as info:
        qemu.check(_spec(**change))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_probe_boot_sector_is_a_boot_sector_writing_the_marker() -> None:
    sector = qemu.probe_boot_sector()
    assert len(sector) == 512 and sector[-2:] == b"\x55\xaa"
    # Every marker byte is loaded into AL (0xB0) and written to the port (0xEE).
    for ch in qemu.PROBE_MARKER:
        assert bytes([0xB0, ch, 0xEE]) in sector
    argv = qemu.probe_argv("qemu", 7)
    assert "kvm" in argv and any(a.startswith("file=/dev/fd/7,") for a in argv)


def test_initrd_is_a_gzipped_newc_cpio() -> None:
    data = gzip.decompress(build_initrd(b"\x7fELF-busybox", "#!/bin/sh\necho hi\n",
                                        [("a.ko", b"module")]))
    assert data.startswith(b"070701")
    for name in (b"bin/busybox\0", b"init\0", b"modules/a.ko\0", b"modules/load-order\0",
                 b"dev/console\0", b"TRAILER!!!\0"):
        assert name in data
    assert b"#!/bin/sh\necho hi\n" in data and b"a.ko\n" in data


def test_drives_are_qemu_nbd_clients_on_given_sockets() -> None:
    spec = _spec(drives=[qemu.DriveSpec(nbd_fd=11), qemu.DriveSpec(nbd_fd=12, ide=True,
                                                                   read_only=True)])
    argv = qemu.qemu_argv("qemu", spec)
    nodes = _option(argv, "-blockdev")
    assert nodes[0] == ("driver=raw,node-name=disk0,read-only=off,file.driver=nbd,"
                        "file.read-only=off,file.server.type=fd,file.server.str=11")
    assert "read-only=on" in nodes[1] and "file.read-only=on" in nodes[1]
    devices = _option(argv, "-device")
    assert devices[0].startswith("virtio-blk-pci,drive=disk0")
    assert devices[1].startswith("ide-hd,drive=disk1")
    assert all("werror=report,rerror=report" in d for d in devices)
    assert qemu.fds_of(spec) == [5, 6, 11, 12]


def test_boot_disk_gets_the_first_boot_index() -> None:
    spec = _spec(kernel=None, boot_disk=1,
                 drives=[qemu.DriveSpec(nbd_fd=11), qemu.DriveSpec(nbd_fd=12)])
    devices = _option(qemu.qemu_argv("qemu", spec), "-device")
    assert "bootindex" not in devices[0] and ",bootindex=0" in devices[1]
    with pytest.raises(qemu.SpecError):
        qemu.check(_spec(kernel=None, boot_disk=2, drives=[qemu.DriveSpec(nbd_fd=11)]))


def test_nics_attach_to_named_taps() -> None:
    spec = _spec(nics=[qemu.NicSpec(tap="mcq0123456789", mac="52:54:00:aa:bb:cc", mtu=1450),
                       qemu.NicSpec(tap="mcqabc", e1000=True)])
    argv = qemu.qemu_argv("qemu", spec)
    assert _option(argv, "-netdev") == [
        "tap,id=net0,ifname=mcq0123456789,script=no,downscript=no",
        "tap,id=net1,ifname=mcqabc,script=no,downscript=no"]
    assert _option(argv, "-device") == [
        "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,host_mtu=1450", "e1000,netdev=net1"]
    for bad in (qemu.NicSpec(tap="a,b"), qemu.NicSpec(tap="x" * 16),
                qemu.NicSpec(tap="ok", mac="52:54:00:aa:bb:cc,x=y")):
        with pytest.raises(qemu.SpecError):
            qemu.check(_spec(nics=[bad]))


def test_qemu_is_sandboxed_and_drops_root_when_told() -> None:
    argv = qemu.qemu_argv("qemu", _spec())
    assert _option(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "-runas" not in argv
    argv = qemu.qemu_argv("qemu", _spec(run_as=(1834156032, 1834156032)))
    assert _option(argv, "-runas") == ["1834156032:1834156032"]
    assert _option(argv, "-sandbox") == ["on,obsolete=deny,spawn=deny,resourcecontrol=deny"]
    with pytest.raises(qemu.SpecError):
        qemu.check(_spec(run_as=(0, 0)))
