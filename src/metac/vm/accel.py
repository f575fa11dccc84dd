"""Which accelerator VMs get: KVM only if a guest really ran on it here, else TCG.

``METAC_VM_ACCEL`` = ``auto`` (default: probe), ``kvm`` or ``tcg`` (no probe).
The probe boots a 512-byte boot sector (``qemu.probe_boot_sector``) that writes a
marker to the first serial port: some hosts have a ``/dev/kvm`` that opens but
cannot run a guest (nested or restricted virtualisation), and only a real boot
tells.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass

from metac.core.supervisor import die_with_parent
from metac.vm.qemu import PROBE_MARKER, probe_argv, probe_boot_sector

log = logging.getLogger(__name__)

ACCEL_ENV = "METAC_VM_ACCEL"
QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
QEMU_ENV = "METAC_VM_QEMU"  # the QEMU binary to use (default: qemu-system-x86_64 on PATH)
PROBE_TIMEOUT = 15.0


def find_qemu() -> str | None:
    """The QEMU binary (``METAC_VM_QEMU`` or qemu-system-x86_64 on the PATH), if any."""
    explicit = os.environ.get(QEMU_ENV, "")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which(QEMU) or shutil.which(QEMU, path="/usr/bin:/bin")


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" or "tcg"
    detail: str  # why


async def _kvm_boots(qemu: str, timeout: float) -> tuple[bool, str]:
    disk = os.memfd_create("metac-vm-probe", os.MFD_CLOEXEC)
    try:
        os.write(disk, probe_boot_sector())
        proc = await asyncio.create_subprocess_exec(
            *probe_argv(qemu, disk), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            pass_fds=(disk,), start_new_session=True, preexec_fn=die_with_parent)
    finally:
        os.close(disk)
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(timeout):
            while PROBE_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = (seen + chunk)[-4096:]
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
    if PROBE_MARKER in seen:
        return True, "a test guest ran with KVM"
    last = seen.decode(errors="replace").strip().splitlines()
    why = last[-1][:200] if last else "no output"
    return False, f"a test guest did not run with KVM ({why})"


async def choose(preference: str | None = None) -> Accelerator:
    """The accelerator for this service's VMs (see the module docstring)."""
    pref = (preference if preference is not None else os.environ.get(ACCEL_ENV, "auto")).lower()
    if pref == "tcg":
        return Accelerator("tcg", f"{ACCEL_ENV}=tcg")
    if pref == "kvm":
        return Accelerator("kvm", f"{ACCEL_ENV}=kvm")
    if pref not in ("", "auto"):
        log.warning("%s=%s is not kvm, tcg or auto; probing", ACCEL_ENV, pref[:20])
    qemu = find_qemu()
    if qemu is None:
        return Accelerator("tcg", f"{QEMU} is not installed (Debian package {QEMU_PACKAGE})")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Accelerator("tcg", f"/dev/kvm cannot be opened ({exc.strerror})")
    ok, why = await _kvm_boots(qemu, PROBE_TIMEOUT)
    return Accelerator("kvm" if ok else "tcg", why)
