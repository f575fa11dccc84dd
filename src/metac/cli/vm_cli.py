"""`metac vm export|launch|ls|console|serial|destroy`: virtual machines.

``metac vm launch`` starts a VM on this node or on the node of ``--on
LAUNCHER-URI``; its kernel and initrd are files (``local:PATH`` of this node or
refs of any node), its serial ports streams of any node (``--serial REF``) or
new ones (``--serial new``), reachable later with ``metac vm console`` or
``metac vm serial``. It prints a ref to the VM; the VM runs while that ref (or
any other capability to it) exists, until ``metac vm destroy`` or the guest
powers off.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Any

from metac import api, errors
from metac.cli import fs_cli
from metac.cli.connect import Connection, add_group_flag
from metac.cli.output import as_json, local_path, table
from metac.codec.locators import Locator, RefLocator

DETACH = b"\x1d"  # Ctrl-]


def register(sub: Any) -> None:
    p = sub.add_parser("vm", help="virtual machines with kernels, disks and serial ports from "
                                  "any node")
    s = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    ex = s.add_parser("export", help="print a ref to this node's VMLauncher")
    ex.add_argument("--persistent", action="store_true", help="the ref survives node restarts")
    add_group_flag(ex)
    ex.set_defaults(func=export)

    la = s.add_parser("launch", help="start a VM; prints a ref to it",
                      description="Start a VM. Example: metac vm launch --kernel "
                                  "local:/boot/vmlinuz --initrd ref://... --cmdline "
                                  "console=ttyS0 --console")
    la.add_argument("--on", metavar="LAUNCHER-URI",
                    help="ref of a VMLauncher (`metac vm export` on its node); default: this "
                         "node")
    la.add_argument("--persistent", action="store_true",
                    help="the printed ref survives node restarts, and the VM is launched "
                         "again (same kernel, drives, networks, serial streams) when its "
                         "node restarts")
    la.add_argument("-m", "--memory", type=int, default=512, metavar="MiB",
                    help="guest memory (default 512)")
    la.add_argument("-c", "--vcpus", type=int, default=1, metavar="N",
                    help="virtual CPUs (default 1)")
    la.add_argument("--kernel", metavar="FILE-URI", help="kernel to boot: local:PATH or ref")
    la.add_argument("--initrd", metavar="FILE-URI", help="initrd: local:PATH or ref")
    la.add_argument("--cmdline", default="", help="kernel command line")
    la.add_argument("--boot-disk", type=int, default=None, metavar="N",
                    help="boot drive N with the BIOS instead of a kernel")
    la.add_argument("--drive", action="append", default=[],
                    metavar="BLOCK-URI[,driver=virtio|ide][,ro]",
                    help="a disk: a block device ref (`metac block export`) or local:PATH of an "
                         "image; ro attaches it read-only; repeatable, drive 0 first")
    la.add_argument("--net", action="append", default=[],
                    metavar="NET-URI|new[,driver=virtio|e1000]",
                    help="a NIC: an L2Interface ref (`metac net export`, any node) or new "
                         "(reach it later with `metac vm net`); repeatable")
    la.add_argument("--serial", action="append", default=[], metavar="STREAM-URI|new",
                    help="a serial port: a stream ref, or new (reach it later with `metac vm "
                         "console`); repeatable, the first is ttyS0")
    la.add_argument("--wait-for", metavar="TEXT", default=None,
                    help="after launching, wait until serial port 0 (a new one) shows TEXT; "
                         "fail with the last serial lines if it does not within --timeout")
    la.add_argument("--timeout", type=float, default=300.0, metavar="S",
                    help="for --wait-for (default 300)")
    la.add_argument("--console", action="store_true",
                    help="then attach this terminal to serial port 0 until the VM stops "
                         "(Ctrl-] detaches and leaves it running)")
    la.set_defaults(func=launch)

    ls = s.add_parser("ls", help="VMs of this node")
    ls.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    ls.set_defaults(func=list_vms)

    co = s.add_parser("console", help="attach this terminal to a VM's serial port "
                                      "(Ctrl-] detaches)")
    co.add_argument("vm", metavar="VM-URI", help="ref printed by `metac vm launch`")
    co.add_argument("--port", type=int, default=0, help="serial port (default 0)")
    co.set_defaults(func=console)

    ne = s.add_parser("net", help="print a ref to a VM's NIC N (its L2Interface)")
    ne.add_argument("vm", metavar="VM-URI", help="ref printed by `metac vm launch`")
    ne.add_argument("index", type=int, metavar="N", help="NIC number (0 is the first --net)")
    ne.add_argument("--persistent", action="store_true", help="the ref survives node restarts")
    ne.set_defaults(func=vm_net)

    se = s.add_parser("serial", help="print a ref to a VM's serial port stream")
    se.add_argument("vm", metavar="VM-URI", help="ref printed by `metac vm launch`")
    se.add_argument("--port", type=int, default=0, help="serial port (default 0)")
    se.add_argument("--persistent", action="store_true", help="the ref survives node restarts")
    se.set_defaults(func=serial)

    ir = s.add_parser("initrd", help="write a small initrd to boot: busybox, virtio and ext4 "
                                      "modules; a shell, or root=DEVICE's /sbin/init")
    ir.add_argument("output", type=local_path, help="where to write it (gzip'd cpio)")
    ir.add_argument("--modules-dir", type=local_path, default=None, metavar="DIR",
                    help="the kernel's module tree (default /lib/modules/$(uname -r))")
    ir.add_argument("--module", action="append", default=None, metavar="NAME",
                    help="a module to load at boot, with its dependencies (repeatable; "
                         "default: virtio_pci virtio_blk virtio_net crc32c_generic ext4)")
    ir.add_argument("--busybox", type=local_path, default="/bin/busybox",
                    help="a static busybox (default /bin/busybox, package busybox-static)")
    ir.set_defaults(func=make_initrd)

    dk = s.add_parser("disk", help="make an ext4 disk image from a directory (e.g. a "
                                    "debootstrap root), for --drive")
    dk.add_argument("output", type=local_path, help="the image file to write")
    dk.add_argument("--from", dest="source", type=local_path, required=True, metavar="DIR",
                    help="directory whose content the image holds")
    dk.add_argument("--size", type=int, default=0, metavar="MiB",
                    help="image size (default: the directory's size plus a margin)")
    dk.set_defaults(func=make_disk)

    de = s.add_parser("destroy", help="stop a VM and release everything it used")
    de.add_argument("vm", metavar="VM-URI", help="ref printed by `metac vm launch`")
    de.set_defaults(func=destroy)


async def _vm_admin(conn: Connection) -> Any:
    return await conn.service_admin("vm", api.schema.vm.VMServiceAdmin)


async def _restore(conn: Connection, text: str, interface: Any) -> tuple[Any, str]:
    loc = Locator.parse(text, allowed=("ref",))
    assert isinstance(loc, RefLocator)
    return await conn.restore(loc.ref, interface), conn.address_toward(loc.ref)


async def export(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        conn = Connection(stack)
        admin = await _vm_admin(conn)
        async with api.rpc_errors():
            launcher = (await admin.getLauncher()).launcher
        await conn.export(launcher, args)
    return 0


def _check_launch(args: argparse.Namespace) -> None:
    if (args.kernel is None) == (args.boot_disk is None):
        raise errors.InvalidArgument("give --kernel FILE-URI or --boot-disk N (one of them)")
    if args.boot_disk is not None and not 0 <= args.boot_disk < len(args.drive):
        raise errors.InvalidArgument(f"--boot-disk {args.boot_disk}: there are "
                                     f"{len(args.drive)} --drive options")
    if args.initrd and not args.kernel:
        raise errors.InvalidArgument("--initrd needs --kernel")
    if args.memory <= 0 or args.vcpus <= 0:
        raise errors.InvalidArgument("memory and vcpus must be positive")


async def launch(args: argparse.Namespace) -> int:
    _check_launch(args)
    serials = list(args.serial)
    watch_port0 = args.console or args.wait_for is not None
    if watch_port0 and not serials:
        serials = ["new"]
    if args.wait_for is not None and serials[0] != "new":
        raise errors.InvalidArgument("--wait-for reads serial port 0: it must be new")
    async with contextlib.AsyncExitStack() as stack:
        conn = Connection(stack)
        if args.on:
            launcher, address = await _restore(conn, args.on, api.schema.vm.VMLauncher)
        else:
            admin = await _vm_admin(conn)
            async with api.rpc_errors():
                launcher = (await admin.getLauncher()).launcher
            address = await conn.node_address()
        config = api.schema.vm.LaunchConfiguration.new_message()
        config.memory = args.memory
        config.vcpu = args.vcpus
        if args.boot_disk is not None:
            config.boot.disk = args.boot_disk
        else:
            kb = config.boot.init("kernel")
            kb.kernel, _ = await fs_cli.resolve(conn, args.kernel, api.schema.fs.File)
            if args.initrd:
                kb.initrd, _ = await fs_cli.resolve(conn, args.initrd, api.schema.fs.File)
            kb.cmdline = args.cmdline
        drives = [parse_drive(text) for text in args.drive]
        drive_list = config.init("drives", len(drives))
        for item, (uri, driver, read_only) in zip(drive_list, drives, strict=True):
            device, _ = await fs_cli.resolve(conn, uri, api.schema.fs.BlockDevice)
            if read_only:
                async with api.rpc_errors():
                    device = (await device.readOnly()).device
            item.device = device
            item.driver = driver
        nets = [parse_net(text) for text in args.net]
        net_list = config.init("networks", len(nets))
        for item, (uri, driver) in zip(net_list, nets, strict=True):
            item.driver = driver
            if uri != "new":
                item.network, _ = await _restore(conn, uri, api.schema.network.L2Interface)
        ports = config.init("serialPorts", len(serials))
        for i, (port, text) in enumerate(zip(ports, serials, strict=True)):
            if text == "new":
                # The console attaches right after launch: port 0 waits for it then.
                port.nowait = not (watch_port0 and i == 0)
            else:
                port.stream, _ = await _restore(conn, text, api.schema.stream.Stream)
        async with api.rpc_errors():
            vm = (await launcher.launch(config)).vm
            ref = (await vm.createSturdyRef(persistent=args.persistent)).id
        print(api.ref_from_struct(ref).format(), flush=True)
        if args.wait_for is not None:
            async with api.rpc_errors():
                stream = (await vm.serialPort(0)).stream
            await wait_for_output(stream, address, args.wait_for, args.timeout)
        if args.console:
            async with api.rpc_errors():
                stream = (await vm.serialPort(0)).stream
            await _attach(stream, address, vm)
    return 0


def parse_net(text: str) -> tuple[str, str]:
    """``URI|new[,driver=virtio|e1000]`` -> (uri, driver)."""
    uri, _, rest = text.partition(",")
    driver = "virtio"
    if rest:
        key, _, value = rest.partition("=")
        if key != "driver" or value not in ("virtio", "e1000"):
            raise errors.InvalidArgument("--net takes NET-URI|new[,driver=virtio|e1000]")
        driver = value
    return uri, driver


def parse_drive(text: str) -> tuple[str, str, bool]:
    """``URI[,driver=virtio|ide][,ro]`` -> (uri, driver, read_only)."""
    parts = text.split(",")
    driver, read_only = "virtio", False
    while len(parts) > 1:
        last = parts[-1]
        if last.startswith("driver="):
            driver = last.partition("=")[2]
            if driver not in ("virtio", "ide"):
                raise errors.InvalidArgument(f"--drive driver must be virtio or ide, not "
                                             f"{driver[:20]!r}")
        elif last in ("ro", "readonly", "read-only"):
            read_only = True
        else:
            break
        parts.pop()
    return ",".join(parts), driver, read_only


async def list_vms(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        admin = await _vm_admin(Connection(stack))
        async with api.rpc_errors():
            vms = (await admin.listVMs()).vms
            accel = await admin.accelerator()
        now = time.time()
        rows = [{"id": v.id, "state": v.state, "accel": v.accel, "memory": v.memory,
                 "vcpus": v.vcpu, "pid": v.pid,
                 "uptime": round(now - v.started, 1) if v.started else 0.0} for v in vms]
    if args.json:
        as_json({"accelerator": accel.name, "detail": accel.detail, "vms": rows})
        return 0
    print(f"accelerator: {accel.name} ({accel.detail})")
    table(rows, ["id", "state", "accel", "memory", "vcpus", "pid", "uptime"])
    return 0


async def console(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        vm, address = await _restore(Connection(stack), args.vm, api.schema.vm.VM)
        async with api.rpc_errors():
            stream = (await vm.serialPort(args.port)).stream
        await _attach(stream, address, vm)
    return 0


async def serial(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        vm, _ = await _restore(Connection(stack), args.vm, api.schema.vm.VM)
        async with api.rpc_errors():
            stream = (await vm.serialPort(args.port)).stream
            ref = (await stream.createSturdyRef(persistent=args.persistent)).id
    print(api.ref_from_struct(ref).format())
    return 0


async def vm_net(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        vm, _ = await _restore(Connection(stack), args.vm, api.schema.vm.VM)
        async with api.rpc_errors():
            l2 = (await vm.network(args.index)).l2interface
            ref = (await l2.createSturdyRef(persistent=args.persistent)).id
    print(api.ref_from_struct(ref).format())
    return 0


async def destroy(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        vm, _ = await _restore(Connection(stack), args.vm, api.schema.vm.VM)
        async with api.rpc_errors():
            await vm.destroy()
    return 0


async def wait_for_output(stream: Any, address: str, text: str, timeout: float) -> None:
    """Read a serial port until ``text``; FailedPrecondition with its last lines if the
    port closes (the VM stopped) or ``timeout`` passes first."""
    import asyncio
    loop = asyncio.get_running_loop()
    wanted = text.encode()
    seen = b""
    ended = "the VM stopped"
    async with await api.open_stream(stream, local_address=address) as opened:
        try:
            async with asyncio.timeout(timeout):
                while wanted not in seen:
                    data = await loop.sock_recv(opened.sock, 65536)
                    if not data:
                        break
                    seen = (seen + data)[-65536:]
        except TimeoutError:
            ended = f"{timeout:g} s passed"
    if wanted in seen:
        return
    lines = [line.strip() for line in seen.decode(errors="replace").splitlines()
             if line.strip()]
    last = lines[-3:]
    # A panic's reason comes before its backtrace: keep that line too.
    last = [line for line in lines if "Kernel panic" in line][-1:] + last
    tail = " | ".join(line[:160] for line in dict.fromkeys(last)) or "no serial output at all"
    raise errors.FailedPrecondition(f"the guest did not print {text!r} ({ended}); last "
                                    f"serial lines: {tail}")


def make_initrd(args: argparse.Namespace) -> int:
    from metac.vm import initrd

    busybox = Path(args.busybox)
    try:
        binary = busybox.read_bytes()
    except OSError as exc:
        raise errors.MissingDependency(str(busybox), "busybox-static") from exc
    if b"/lib64/ld-linux" in binary[:4096] or b"/lib/ld-linux" in binary[:4096]:
        raise errors.FailedPrecondition(f"{busybox} is not statically linked; install the "
                                        "Debian package busybox-static")
    modules_dir = Path(args.modules_dir or f"/lib/modules/{os.uname().release}")
    names = args.module if args.module is not None else list(initrd.DEFAULT_MODULES)
    modules: list[tuple[str, bytes]] = []
    if names:
        if not (modules_dir / "modules.dep").is_file():
            raise errors.NotFound(f"no modules.dep in {modules_dir} (give --modules-dir, or "
                                  "--module '' for none)")
        try:
            paths = initrd.module_closure(modules_dir, [n for n in names if n])
            modules = [initrd.read_module(modules_dir / rel) for rel in paths]
        except KeyError as exc:
            raise errors.NotFound(f"module {exc.args[0]} is not in {modules_dir}") from None
        except (OSError, ValueError) as exc:
            raise errors.FailedPrecondition(str(exc)) from None
    data = initrd.build_initrd(binary, initrd.DEFAULT_INIT, modules)
    output = Path(args.output)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, output)
    print(f"{output}: busybox and {len(modules)} modules ({len(data) >> 10} KiB)",
          file=sys.stderr)
    print(output)
    return 0


def make_disk(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    mkfs = shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if mkfs is None:
        raise errors.MissingDependency("mkfs.ext4", "e2fsprogs")
    source = Path(args.source)
    if not source.is_dir():
        raise errors.NotFound(f"no directory {source}")
    size = args.size
    if size <= 0:
        used = sum(os.lstat(os.path.join(d, f)).st_size
                   for d, _, files in os.walk(source) for f in files)
        size = max(64, int(used * 1.3 / (1 << 20)) + 64)
    output = Path(args.output)
    if output.exists():
        raise errors.AlreadyExists(f"{output} exists")
    with open(output, "wb") as f:
        f.truncate(size << 20)
    proc = subprocess.run([mkfs, "-q", "-F", "-d", str(source), str(output)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output.unlink()
        message = " ".join(proc.stderr.split())[:300]
        raise errors.FailedPrecondition(f"mkfs.ext4 failed: {message}")
    print(f"{output}: ext4, {size} MiB, from {source}", file=sys.stderr)
    print(output)
    return 0


async def _attach(stream: Any, address: str, vm: Any) -> None:
    """This terminal on a serial port until the port closes (VM stopped) or Ctrl-]."""
    import asyncio
    loop = asyncio.get_running_loop()
    opened = await api.open_stream(stream, local_address=address)
    done = loop.create_future()
    saved = None
    stdin_fd = sys.stdin.fileno()
    interactive = os.isatty(stdin_fd)
    if interactive:
        saved = termios.tcgetattr(stdin_fd)
        tty.setraw(stdin_fd)
        sys.stderr.write("(console attached; Ctrl-] detaches)\r\n")
        sys.stderr.flush()

    def keyboard() -> None:
        try:
            data = os.read(stdin_fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin_fd)  # end of input: keep showing the output
            return
        if DETACH in data:
            data = data[:data.index(DETACH)]
            if not done.done():
                done.set_result("detached")
        with contextlib.suppress(OSError):
            opened.sock.send(data)

    async def screen() -> None:
        while True:
            data = await loop.sock_recv(opened.sock, 65536)
            if not data:
                break
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        if not done.done():
            done.set_result("closed")

    with contextlib.suppress(OSError, ValueError):
        loop.add_reader(stdin_fd, keyboard)
    reader = loop.create_task(screen(), name="console output")
    try:
        await done
    finally:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(stdin_fd)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        await opened.aclose(timeout=1.0)
    if done.result() == "detached":
        sys.stderr.write("\r\n(detached; the VM keeps running)\n")
