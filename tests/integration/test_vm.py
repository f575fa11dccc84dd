"""`metac vm` end to end: three namespaced nodes, one QEMU guest (TCG) on node C.

The kernel (Debian's, unpacked by scripts/guest-kernel.sh) and a small busybox
initrd are `file export` refs of node A; serial port 0 is a stream held by node B
(a TCP endpoint of B's, behind `stream export`); serial port 1 is a new stream
that `metac vm console` reaches. Boots are slow under TCG and the machine is
shared: one boot serves every check of a test, and the timeouts are generous.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metac.testing.guest import GuestUnavailable, ensure_kernel, find_kernel
from metac.testing.nodes import NodeHost, assert_no_leaks, metac_argv, snapshot
from metac.vm import qemu
from metac.vm.initrd import build_initrd, module_closure

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

BOOT_TIMEOUT = 300.0
CMDLINE = "console=ttyS0 panic=-1 quiet rdinit=/init"
SERIAL_PORT = 7777

# Modules the guest loads (with their dependencies) for its virtio disks and ext4.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "virtio_net")

# The guest: marker A on ttyS0 (B's stream); drive 0 (read-write, an image of A's) mounted,
# its marker printed, a file written; drive 1 (read-only) checked; marker B on ttyS1 (the
# new stream) until a line arrives on ttyS0, then that line back on ttyS0; it then idles
# until destroyed.
GUEST_INIT = textwrap.dedent(r"""
    #!/bin/busybox sh
    /bin/busybox --install -s /bin
    export PATH=/bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    for m in $(cat /modules/load-order); do insmod "/modules/$m"; done
    exec 3<>/dev/ttyS0
    echo "METAC-MARKER-A $(uname -r)" >&3
    mkdir -p /mnt/rw /mnt/ro
    if mount -t ext4 /dev/vda /mnt/rw; then
        echo "DISK0:$(cat /mnt/rw/marker.txt)" >&3
        echo written-by-the-guest >/mnt/rw/from-guest.txt
        sync
        umount /mnt/rw && echo "DISK0-DONE" >&3
    else
        echo "DISK0-MOUNT-FAILED" >&3
    fi
    ip link set lo up
    ip link set eth0 up && ip address add 10.77.0.2/24 dev eth0
    ping -c 2 -W 10 10.77.0.1 >/dev/null 2>&1 || ping -c 3 -W 10 10.77.0.1 >/dev/null 2>&1
    if [ $? = 0 ]; then echo "PING-OK" >&3; else echo "PING-FAILED" >&3; fi
    echo "DISK1-RO:$(cat /sys/block/vdb/ro)" >&3
    mount -t ext4 -o ro /dev/vdb /mnt/ro && echo "DISK1:$(cat /mnt/ro/marker.txt)" >&3
    if dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct 2>/dev/null; then
        echo "DISK1-WRITE-WORKED" >&3
    else
        echo "DISK1-WRITE-REFUSED" >&3
    fi
    while :; do
        echo METAC-MARKER-B >/dev/ttyS1
        if read -t 1 line <&3; then break; fi
    done
    echo "GOT:$line" >&3
    while :; do sleep 60; done
""").lstrip()

# Runs on B: accepts one connection on SERIAL_PORT (B's loopback), prints what arrives
# (flushed) and sends each line of its stdin.
SERIAL_PEER = textwrap.dedent("""
    import socket, sys, threading
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("listening", flush=True)
    conn, _ = srv.accept()
    print("connected", flush=True)
    def send():
        for line in sys.stdin:
            conn.sendall(line.encode())
    threading.Thread(target=send, daemon=True).start()
    while data := conn.recv(65536):
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    print("\\nEOF-FROM-VM", flush=True)
""")


class LineReader:
    """Lines of a process's stdout, collected by a thread; ``wait_for`` a substring."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} did not arrive within {timeout:g} s; got:\n"
                                     f"{self.seen[-3000:]}")
            try:
                self.seen += self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                pass
        return self.seen


@pytest.fixture(scope="module")
def boot_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    try:
        kernel = ensure_kernel()  # fetched on first use, as the guest tests do
    except GuestUnavailable as exc:
        pytest.fail(f"the guest kernel is missing: {exc}")
    directory = tmp_path_factory.mktemp("vmboot")
    os.chmod(directory, 0o755)
    initrd = directory / "initrd.gz"
    initrd.write_bytes(build_initrd(Path("/bin/busybox").read_bytes(), GUEST_INIT,
                                    _guest_modules()))
    return kernel.vmlinuz, initrd


def _guest_modules() -> list[tuple[str, bytes]]:
    kernel = find_kernel()
    return [(os.path.basename(rel), (kernel.modules_dir / rel).read_bytes())
            for rel in module_closure(kernel.modules_dir, GUEST_MODULES)]


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ext4_image(path: Path, marker: str) -> None:
    content = path.parent / f"{path.name}.d"
    content.mkdir()
    (content / "marker.txt").write_text(marker + "\n")
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path)], check=True,
                   timeout=120)


def _debugfs_cat(image: Path, name: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True,
                         text=True, timeout=60)
    return out.stdout


@pytest.fixture
def serial_peer(nodes_factory: Any) -> Iterator[tuple[list[NodeHost], subprocess.Popen[str],
                                                      LineReader]]:
    nodes = nodes_factory(3)
    b = nodes[1]
    peer = b.host.popen([sys.executable, "-c", SERIAL_PEER, str(SERIAL_PORT)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                        start_new_session=True)
    try:
        reader = LineReader(peer)
        reader.wait_for("listening", 30)
        yield nodes, peer, reader
    finally:
        peer.kill()
        peer.wait(10)


def _vm_logs(node: NodeHost) -> str:
    """The vm service's and QEMU's logs of ``node`` (for failure messages)."""
    parts = [node.metac("vm", "ls", "--json", check=False).stdout]
    for path in sorted((node.state_dir / "logs").glob("vm.*")) + sorted(
            (node.state_dir / "logs").glob("node.service-vm*")):
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def _vm_rows(node: NodeHost) -> dict[str, Any]:
    return json.loads(node.metac("vm", "ls", "--json").stdout)


@pytest.mark.timeout(900)
def test_vm_remote_kernel_drives_and_serial_ports(boot_files, serial_peer,
                                                 tmp_path: Path) -> None:
    kernel, initrd = boot_files
    (a, b, c), peer, peer_out = serial_peer
    kernel_ref = a.metac("file", "export", "--read-only", f"local:{kernel}").stdout.strip()
    initrd_ref = a.metac("file", "export", f"local:{initrd}").stdout.strip()
    disk, ro_disk = tmp_path / "disk.img", tmp_path / "ro.img"
    _ext4_image(disk, "marker-of-a-writable-disk")
    _ext4_image(ro_disk, "marker-of-a-read-only-disk")
    disk_ref = a.metac("block", "export", f"local:{disk}").stdout.strip()
    ro_ref = a.metac("block", "export", "--read-only", f"local:{ro_disk}").stdout.strip()
    net_ref = b.metac("net", "export", "newlocal:vmnet0").stdout.strip()
    b.host.run(["ip", "address", "add", "10.77.0.1/24", "dev", "vmnet0"])
    stream_ref = b.metac("stream", "export", f"tcp:127.0.0.1:{SERIAL_PORT}").stdout.strip()
    before = snapshot(a, b, c)
    vm_dir = c.runtime_dir / "vm"

    vm_ref = c.metac("vm", "launch", "-m", "256", "--kernel", kernel_ref, "--initrd", initrd_ref,
                     "--cmdline", CMDLINE, "--serial", stream_ref, "--serial", "new",
                     "--drive", disk_ref, "--drive", f"{ro_ref},driver=virtio",
                     "--net", net_ref, "--net", "new,driver=e1000",
                     timeout=120).stdout.strip()
    assert vm_ref.startswith("ref://")

    # ttyS0 is B's stream: the guest's first line arrives on B.
    try:
        peer_out.wait_for("METAC-MARKER-A", BOOT_TIMEOUT)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_vm_logs(c)}") from None
    listing = _vm_rows(c)
    assert listing["accelerator"] in ("kvm", "tcg") and listing["detail"]
    (row,) = listing["vms"]
    assert row["state"] == "running" and row["memory"] == 256 and row["vcpus"] == 1
    assert row["pid"] > 0 and row["accel"] == listing["accelerator"]
    # The QEMU process runs as the node's child, and its sockets live in a 0700 directory.
    assert row["pid"] in c.pids()
    # QEMU runs under its seccomp filter (Seccomp: 2 is filter mode).
    status = Path(f"/proc/{row['pid']}/status").read_text()
    assert "\nSeccomp:\t2" in status, status
    (private,) = list(vm_dir.iterdir())
    assert (private.stat().st_mode & 0o777) == 0o700

    # ttyS1 is a new stream: `metac vm console --port 1` (from node A) shows its output.
    console = a.popen("vm", "console", "--port", "1", vm_ref)
    try:
        LineReader(console).wait_for("METAC-MARKER-B", 120)
    finally:
        console.terminate()
        console.wait(30)

    # Input from B reaches the guest, which answers on B's stream.
    assert peer.stdin is not None
    peer.stdin.write("hello-from-b\n")
    peer.stdin.flush()
    peer_out.wait_for("GOT:hello-from-b", 120)

    # Drive 0 is A's image through QEMU's NBD client: mounted, read, written. Drive 1 is
    # read-only in the guest (and its writes refused).
    seen = peer_out.wait_for("DISK1-WRITE-", 60)
    assert "DISK0:marker-of-a-writable-disk" in seen and "DISK0-DONE" in seen
    assert "DISK1-RO:1" in seen and "DISK1:marker-of-a-read-only-disk" in seen
    assert "DISK1-WRITE-REFUSED" in seen
    # NIC 0 is bound to B's interface: the guest pinged B's address across the nodes.
    assert "PING-OK" in seen
    # NIC 1 is a new network: its L2Interface can be passed on.
    assert c.metac("vm", "net", vm_ref, "1").stdout.strip().startswith("ref://")
    taps = {name for name in c.links() if name.startswith("mcq")}
    assert len(taps) == 2

    # The serial port's stream can be passed on as a ref.
    port_ref = c.metac("vm", "serial", "--port", "1", vm_ref).stdout.strip()
    assert port_ref.startswith("ref://")

    c.metac("vm", "destroy", vm_ref, timeout=60)
    assert _vm_rows(c)["vms"] == []
    peer_out.wait_for("EOF-FROM-VM", 30)  # the serial port's connection to B closed
    assert list(vm_dir.iterdir()) == []
    gone = c.metac("vm", "destroy", vm_ref, check=False)
    assert gone.returncode != 0 and "metac: " in gone.stderr
    assert_no_leaks(before, snapshot(a, b, c))
    # What the guest wrote is in A's image.
    assert _debugfs_cat(disk, "from-guest.txt") == "written-by-the-guest\n"
    assert _debugfs_cat(ro_disk, "from-guest.txt") == ""


@pytest.mark.timeout(900)
def test_vm_errors_are_one_line(boot_files, nodes_factory) -> None:
    kernel, initrd = boot_files
    (c,) = nodes_factory(1)
    before = snapshot(c)
    status = json.loads(c.metac("node", "status", "--json").stdout)
    assert status["vmAccelerator"].split()[0] in ("kvm", "tcg")
    assert "VMs run with" in c.metac("node", "status").stdout
    small = c.metac("vm", "launch", "-m", "8", "--kernel", f"local:{kernel}", check=False)
    assert small.returncode != 0
    assert small.stderr.strip().count("\n") == 0
    assert "too little" in small.stderr and "Traceback" not in small.stderr
    bad = c.metac("vm", "launch", "--kernel", "ref://nonsense", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("metac: InvalidArgument")
    missing = c.metac("vm", "launch", "--kernel", "local:/nonexistent/vmlinuz", check=False)
    assert missing.returncode != 0 and missing.stderr.strip().count("\n") == 0
    nokernel = c.metac("vm", "launch", check=False)
    assert nokernel.returncode != 0 and "--kernel" in nokernel.stderr
    # Not a kernel: QEMU's own reason, in one line.
    not_kernel = initrd.parent / "not-a-kernel"
    not_kernel.write_text("not a kernel\n")
    garbage = c.metac("vm", "launch", "--kernel", f"local:{not_kernel}", check=False,
                      timeout=120)
    assert garbage.returncode != 0 and garbage.stderr.strip().count("\n") == 0
    assert "QEMU did not start" in garbage.stderr, garbage.stderr
    # A kernel that does not get to the expected output: the last serial lines.
    panic = c.metac("vm", "launch", "-m", "128", "--kernel", f"local:{kernel}",
                    "--cmdline", "console=ttyS0 panic=-1 rdinit=/nonexistent root=/dev/none",
                    "--wait-for", "NEVER-PRINTED", "--timeout", "240", check=False,
                    timeout=300)
    assert panic.returncode != 0 and panic.stderr.strip().count("\n") == 0, panic.stderr
    assert "did not print 'NEVER-PRINTED'" in panic.stderr and "panic" in panic.stderr.lower()
    assert _vm_rows(c)["vms"] == []
    assert list((c.runtime_dir / "vm").iterdir()) == []
    assert_no_leaks(before, snapshot(c))
    # BIOS boot from drive 0 (a boot sector that writes to COM1), the drive through NBD.
    sector = initrd.parent / "boot-sector.img"
    sector.write_bytes(qemu.probe_boot_sector(b"BIOSOK") + bytes(1 << 20))
    bios = ["vm", "launch", "-m", "32", "--boot-disk", "0", "--drive",
            f"local:{sector},driver=ide", "--wait-for", "BIOSOK", "--timeout", "120"]
    c.stop()
    c.env["METAC_VM_MAX"] = "1"  # one VM at a time on this node
    c.start(timeout=60)
    booted = c.metac(*bios, timeout=180).stdout.strip()
    second = c.metac(*bios, check=False, timeout=180)
    assert second.returncode != 0 and second.stderr.strip().count("\n") == 0
    assert "runs 1 VMs already" in second.stderr, second.stderr
    c.metac("vm", "destroy", booted)
    # No QEMU on the node: the package to install.
    c.stop()
    c.env["METAC_VM_QEMU"] = "/nonexistent/qemu-system-x86_64"
    c.start(timeout=60)
    noqemu = c.metac("vm", "launch", "--kernel", f"local:{kernel}", check=False)
    assert noqemu.returncode != 0 and noqemu.stderr.strip().count("\n") == 0
    assert "qemu-system-x86" in noqemu.stderr and "install" in noqemu.stderr


# Two roles (metac.role= on the command line; the kernel console is ttyS1):
# 1 writes numbered lines on ttyS0 and the marker of its drive on ttyS1;
# 2 reads lines on ttyS0 and repeats them on ttyS1.
CABLE_INIT = textwrap.dedent(r"""
    #!/bin/busybox sh
    /bin/busybox --install -s /bin
    export PATH=/bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    for m in $(cat /modules/load-order); do insmod "/modules/$m"; done
    stty -F /dev/ttyS0 -echo
    case "$(cat /proc/cmdline)" in
    *metac.role=1*)
        mkdir -p /mnt/rw
        mount -t ext4 -o ro /dev/vda /mnt/rw && m="$(cat /mnt/rw/marker.txt)"
        i=0
        while :; do
            i=$((i + 1))
            echo "CABLE-LINE-$i" >/dev/ttyS0
            echo "VM1-DISK:$m" >/dev/ttyS1
            sleep 1
        done ;;
    *)
        exec 3<>/dev/ttyS0
        while read -r line <&3; do echo "VM2-GOT:$line" >/dev/ttyS1; done ;;
    esac
    while :; do sleep 60; done
""").lstrip()


def _console_shows(node: NodeHost, vm_ref: str, port: int, text: str,
                   timeout: float = BOOT_TIMEOUT) -> str:
    console = node.popen("vm", "console", "--port", str(port), vm_ref)
    try:
        return LineReader(console).wait_for(text, timeout)
    finally:
        console.terminate()
        console.wait(30)


@pytest.mark.timeout(1200)
def test_vm_virtual_cable_and_persistence(boot_files, nodes_factory, tmp_path: Path) -> None:
    kernel, _ = boot_files
    a, c = nodes_factory(2)
    initrd = tmp_path / "cable-initrd.gz"
    initrd.write_bytes(build_initrd(Path("/bin/busybox").read_bytes(), CABLE_INIT,
                                    _guest_modules()))
    os.chmod(tmp_path, 0o755)
    kernel_ref = a.metac("file", "export", "--persistent", f"local:{kernel}").stdout.strip()
    initrd_ref = a.metac("file", "export", "--persistent", f"local:{initrd}").stdout.strip()
    disk = tmp_path / "disk.img"
    _ext4_image(disk, "disk-after-restart")
    disk_ref = a.metac("block", "export", "--persistent", f"local:{disk}").stdout.strip()
    before = snapshot(a, c)
    common = ["-m", "128", "--kernel", kernel_ref, "--initrd", initrd_ref]

    vm1 = c.metac("vm", "launch", "--persistent", *common, "--cmdline",
                  f"{CMDLINE.replace('ttyS0', 'ttyS1')} metac.role=1", "--drive", disk_ref,
                  "--net", "new", "--serial", "new", "--serial", "new",
                  timeout=120).stdout.strip()
    # VM2's serial port 0 is VM1's: a virtual cable.
    port0 = c.metac("vm", "serial", "--port", "0", vm1).stdout.strip()
    vm2 = c.metac("vm", "launch", *common, "--cmdline",
                  f"{CMDLINE.replace('ttyS0', 'ttyS1')} metac.role=2",
                  "--serial", port0, "--serial", "new", timeout=120).stdout.strip()
    _console_shows(c, vm2, 1, "VM2-GOT:CABLE-LINE-")
    _console_shows(c, vm1, 1, "VM1-DISK:disk-after-restart")
    assert len(_vm_rows(c)["vms"]) == 2
    first_pids = {row["pid"] for row in _vm_rows(c)["vms"]}

    # kill -9 of the node: its VMs die with it (no orphan); after the restart only the
    # persistent one runs again, with its remote drive.
    c.kill9()
    deadline = time.monotonic() + 60
    while c.orphans() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not c.orphans()
    c.start(timeout=60)
    deadline = time.monotonic() + 120
    while not (rows := _vm_rows(c)["vms"]) and time.monotonic() < deadline:
        time.sleep(1)
    (row,) = rows
    assert row["state"] == "running" and row["pid"] not in first_pids
    # The tap of the killed run was swept; the relaunched VM has a new one.
    assert len([n for n in c.links() if n.startswith("mcq")]) == 1
    _console_shows(c, vm1, 1, "VM1-DISK:disk-after-restart")
    gone = c.metac("vm", "destroy", vm2, check=False)
    assert gone.returncode != 0 and gone.stderr.count("\n") == 1

    c.metac("vm", "destroy", vm1, timeout=60)
    assert _vm_rows(c)["vms"] == []
    assert list((c.runtime_dir / "vm").iterdir()) == []
    after = snapshot(a, c)
    assert_no_leaks({"links": before.links, "mounts": before.mounts},
                    {"links": after.links, "mounts": after.mounts})
    assert not any("qemu" in _proc_cmdline(pid) for pid in after.pids)
    # Destroyed, it stays destroyed across a restart.
    c.stop()
    c.start(timeout=60)
    time.sleep(5)
    assert _vm_rows(c)["vms"] == []


@pytest.mark.timeout(900)
def test_vm_helpers_boot_a_root_disk_made_from_a_directory(nodes_factory,
                                                           tmp_path: Path) -> None:
    kernel = find_kernel()
    (c,) = nodes_factory(1)
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "sbin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    (root / "sbin" / "init").write_text(
        "#!/bin/sh\n/bin/busybox echo \"ROOT-BOOTED $(/bin/busybox cat /etc/marker)\" "
        ">/dev/console\n/bin/busybox sleep 600\n")
    (root / "sbin" / "init").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "marker").write_text("from-the-image\n")
    initrd, image = tmp_path / "initrd.gz", tmp_path / "root.img"
    out = c.metac("vm", "initrd", "--modules-dir", str(kernel.modules_dir), str(initrd))
    assert out.stdout.strip() == str(initrd) and initrd.stat().st_size > 0
    out = c.metac("vm", "disk", "--from", str(root), str(image), timeout=120)
    assert out.stdout.strip() == str(image)
    again = c.metac("vm", "disk", "--from", str(root), str(image), check=False)
    assert again.returncode != 0 and "exists" in again.stderr
    before = snapshot(c)

    vm = c.metac("vm", "launch", "-m", "256", "--kernel", f"local:{kernel.vmlinuz}",
                 "--initrd", f"local:{initrd}", "--drive", f"local:{image}",
                 "--cmdline", "console=ttyS0 quiet root=/dev/vda",
                 "--wait-for", "ROOT-BOOTED from-the-image", "--timeout", "300",
                 timeout=400).stdout.strip()
    # On a terminal, `metac vm console` shows the console until Ctrl-] detaches it.
    command = " ".join(shlex.quote(a) for a in [*metac_argv(), "vm", "console", vm])
    term = subprocess.Popen(c.host.argv(["script", "-qec", command, "/dev/null"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=c.cli_env(), start_new_session=True)
    try:
        screen = LineReader(term)
        screen.wait_for("console attached", 60)
        assert term.stdin is not None
        term.stdin.write("\x1d")
        term.stdin.flush()
        screen.wait_for("detached; the VM keeps running", 60)
        assert term.wait(30) == 0
    finally:
        if term.poll() is None:
            term.kill()
            term.wait()
    assert _vm_rows(c)["vms"][0]["state"] == "running"
    # Its ref is the only capability to it: revoking the ref drops the VM, which stops.
    assert len(_vm_rows(c)["vms"]) == 1
    c.metac("ref", "rm", vm)
    deadline = time.monotonic() + 60
    while _vm_rows(c)["vms"] and time.monotonic() < deadline:
        time.sleep(1)
    assert _vm_rows(c)["vms"] == []
    assert_no_leaks(before, snapshot(c))


# Reads a block of /dev/vda (uncached) every second and says how it went on ttyS0.
READER_INIT = textwrap.dedent(r"""
    #!/bin/busybox sh
    /bin/busybox --install -s /bin
    export PATH=/bin
    mount -t devtmpfs devtmpfs /dev
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    for m in $(cat /modules/load-order); do insmod "/modules/$m"; done
    i=0
    while :; do
        i=$((i + 1))
        if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$((i % 1000)) iflag=direct \
                2>/dev/null; then
            echo "READ-OK $i" >/dev/ttyS0
        else
            echo "READ-ERROR $i" >/dev/ttyS0
        fi
        sleep 1
    done
""").lstrip()


@pytest.mark.timeout(900)
def test_vm_remote_disk_going_away_is_an_io_error(nodes_factory, tmp_path: Path) -> None:
    kernel = find_kernel()
    a, c = nodes_factory(2)
    os.chmod(tmp_path, 0o755)
    initrd = tmp_path / "reader-initrd.gz"
    initrd.write_bytes(build_initrd(Path("/bin/busybox").read_bytes(), READER_INIT,
                                    _guest_modules()))
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20) * 8)
    disk_ref = a.metac("block", "export", f"local:{disk}").stdout.strip()
    vm = c.metac("vm", "launch", "-m", "128", "--kernel", f"local:{kernel.vmlinuz}",
                 "--initrd", f"local:{initrd}", "--cmdline", CMDLINE, "--drive", disk_ref,
                 "--serial", "new", timeout=120).stdout.strip()
    console = c.popen("vm", "console", vm)
    try:
        out = LineReader(console)
        out.wait_for("READ-OK", BOOT_TIMEOUT)
        a.stop()  # the disk's node goes away
        out.wait_for("READ-ERROR", 120)
        (row,) = _vm_rows(c)["vms"]
        assert row["state"] == "running"
        time.sleep(2)
        assert len(_vm_rows(c)["vms"]) == 1  # the VM keeps running
    finally:
        console.terminate()
        console.wait(30)
    c.metac("vm", "destroy", vm, timeout=60)
    assert _vm_rows(c)["vms"] == []
