"""Runtime selection, cgroup layouts, runtime errors, network batches, rootfs helpers (pure)."""

from __future__ import annotations

import struct

import pytest

from metac import errors
from metac.compute import netattach, rootfs, runtime
from metac.compute.environment import NetworkSpec

V2 = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1 = ("25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
      "26 25 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
HYBRID = V1 + "27 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize("text, layout", [
    (V2, "v2"), (V1, "v1"), (HYBRID, "hybrid"), ("", "v1"),
    # A later mount at the same path hides the earlier one.
    (HYBRID + "40 27 0:50 / /sys/fs/cgroup/unified rw - tmpfs metac-hide rw\n", "v1"),
    ("garbage line\n" + V2, "v2"),
])
def test_cgroup_layout(text: str, layout: str) -> None:
    assert runtime.cgroup_layout(text) == layout


@pytest.mark.parametrize("name, layout, controllers, hide", [
    ("crun", "hybrid", "hugetlb", True),
    ("crun", "hybrid", "", False),
    ("crun", "v2", "memory pids", False),
    ("crun", "v1", "", False),
    ("runc", "hybrid", "hugetlb", False),
])
def test_needs_hidden_unified(name: str, layout: str, controllers: str, hide: bool) -> None:
    assert runtime.needs_hidden_unified(name, layout, controllers) is hide


def test_choose_runtime() -> None:
    assert runtime.choose_runtime("auto", ["runc", "crun"]) == "crun"
    assert runtime.choose_runtime("auto", ["runc"]) == "runc"
    assert runtime.choose_runtime("runc", ["runc", "crun"]) == "runc"
    with pytest.raises(errors.MissingDependency, match="install the Debian package 'crun'"):
        runtime.choose_runtime("crun", ["runc"])
    with pytest.raises(errors.MissingDependency, match="'runc'"):
        runtime.choose_runtime("auto", [])
    with pytest.raises(errors.InvalidArgument):
        runtime.choose_runtime("docker", ["runc"])


def test_last_error_json_and_text() -> None:
    log = ('{"level":"info","msg":"hello"}\n'
           '{"level":"error","msg":"exec failed: boom"}\n'
           '{"level":"warning","msg":"later"}\n')
    assert runtime.last_error(log) == "exec failed: boom"
    assert runtime.last_error("plain failure\n\n") == "plain failure"
    assert runtime.last_error("") == ""


@pytest.mark.parametrize("message, cls, text", [
    ('exec failed: unable to start container process: exec: "nope": executable file not '
     'found in $PATH', errors.NotFound, "nope: command not found in the environment"),
    ("executable file `nope` not found in $PATH: No such file or directory", errors.NotFound,
     "nope: command not found"),
    ('exec: "/bin/x": stat /bin/x: no such file or directory', errors.NotFound, "/bin/x:"),
    ('chdir to cwd ("/nonexistent") set in config.json failed: no such file or directory',
     errors.NotFound, "working directory /nonexistent does not exist"),
    ("open executable: Permission denied", errors.PermissionDenied, "cannot start"),
    ("something odd", errors.FailedPrecondition, "cannot start the process: runc: something"),
    ("", errors.FailedPrecondition, "failed without a message"),
])
def test_classify_error(message: str, cls: type, text: str) -> None:
    err = runtime.classify_error("runc", message, "start the process")
    assert isinstance(err, cls) and text in str(err)
    assert "\n" not in str(err)


def test_runtime_argv_with_and_without_hidden_unified(tmp_path) -> None:
    info = runtime.RuntimeInfo("crun", "/usr/bin/crun", "hybrid", True)
    rt = runtime.OciRuntime(info, str(tmp_path / "oci"), supervisor=None)  # type: ignore[arg-type]
    argv = rt.argv("list", log_path="/l")
    assert argv == ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                    runtime.HIDE_UNIFIED_SCRIPT, "/usr/bin/crun", "--root",
                    str(tmp_path / "oci"), "--log", "/l", "--log-format", "json", "list"]
    plain = runtime.OciRuntime(runtime.RuntimeInfo("runc", "/r", "v2", False), str(tmp_path),
                               supervisor=None)  # type: ignore[arg-type]
    assert plain.argv("delete", "x") == ["/r", "--root", str(tmp_path), "delete", "x"]


def test_network_batches() -> None:
    host = netattach.host_side_batch("mcc0123456789", "eth0", 42, "envid", 1450)
    assert host.splitlines()[0] == ("link add mcc0123456789 mtu 1450 type veth peer name eth0 "
                                    "mtu 1450 netns 42")
    assert 'alias "metac compute envid"' in host
    spec = NetworkSpec("eth0", None, ("10.0.0.2/24", "fd00::2/64"),
                       (("10.1.0.0/16", "10.0.0.1"), ("0.0.0.0/0", ""), ("::/0", "fd00::1")))
    lines = netattach.env_side_batch(spec).splitlines()
    assert lines[:2] == ["link set dev lo up", "link set dev eth0 up"]
    assert "address add 10.0.0.2/24 dev eth0" in lines
    assert "address add fd00::2/64 dev eth0 nodad" in lines
    assert "route add 10.1.0.0/16 via 10.0.0.1 dev eth0" in lines
    assert "route add 0.0.0.0/0 dev eth0" in lines
    assert "-6 route add ::/0 via fd00::1 dev eth0" in lines
    assert netattach.tunnel_mtu(1500, "10.0.0.1") == 1450
    assert netattach.tunnel_mtu(1500, "fd00::1") == 1430
    assert netattach.tunnel_mtu(1300, "fd00::1") == 1280
    assert len(netattach.host_ifname()) <= 15


def _elf(interp: bool) -> bytes:
    header = bytearray(64 + 2 * 56)
    header[:4] = b"\x7fELF"
    header[4], header[5] = 2, 1
    struct.pack_into("<Q", header, 0x20, 64)
    struct.pack_into("<HH", header, 0x36, 56, 2)
    struct.pack_into("<I", header, 64, 1)  # PT_LOAD
    struct.pack_into("<I", header, 64 + 56, 3 if interp else 1)
    return bytes(header)


def test_elf_is_static() -> None:
    assert rootfs.elf_is_static(_elf(False))
    assert not rootfs.elf_is_static(_elf(True))
    with pytest.raises(ValueError):
        rootfs.elf_is_static(b"#!/bin/sh\n" + b"\0" * 64)
    with pytest.raises(ValueError):
        rootfs.elf_is_static(_elf(False)[:80])


def test_applet_paths_are_safe() -> None:
    text = "bin/sh\n/usr/bin/awk\nbin/../../etc/x\n\nsbin//init\n./x\n"
    assert rootfs.applet_paths(text) == ["bin/sh", "usr/bin/awk"]


def test_build_busybox(tmp_path) -> None:
    import shutil
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    target = tmp_path / "root"
    links = rootfs.build_busybox(str(target))
    assert "bin/sh" in links
    assert (target / "bin/sh").stat().st_ino == (target / "bin/busybox").stat().st_ino
    assert (target / "etc/passwd").read_text().startswith("root:x:0:0")
    assert oct((target / "tmp").stat().st_mode & 0o7777) == "0o1777"
    with pytest.raises(errors.AlreadyExists):
        rootfs.build_busybox(str(target))


def test_debootstrap_refusals(tmp_path, monkeypatch) -> None:
    """A non-empty target or a non-root caller is refused before debootstrap runs."""
    monkeypatch.setattr(rootfs, "require_program", lambda name, package: f"/usr/sbin/{name}")
    assert rootfs.debootstrap_argv("/t", "bookworm", "http://m/debian") == [
        "/usr/sbin/debootstrap", "--variant=minbase", "bookworm", "/t", "http://m/debian"]
    ran = []
    monkeypatch.setattr(rootfs.subprocess, "run", lambda *a, **k: ran.append(a))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 0)
    with pytest.raises(errors.AlreadyExists):
        rootfs.build_debootstrap(str(tmp_path / "full"), "bookworm")
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 1000)
    with pytest.raises(errors.PermissionDenied):
        rootfs.build_debootstrap(str(tmp_path / "new"), "bookworm")
    assert ran == []
