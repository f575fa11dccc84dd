"""metac.fs.sandbox (bwrap command lines) and the pure parts of metac.fs.kernel / mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metac import errors
from metac.fs import kernel, mount
from metac.fs import sandbox as sb

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3f)
\tlibgone.so.1 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f40)
"""


def test_parse_ldd() -> None:
    assert sb.parse_ldd(LDD) == ["/lib/x86_64-linux-gnu/libc.so.6",
                                 "/lib64/ld-linux-x86-64.so.2"]


def test_symlink_chain(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "libx.so.1.2").write_text("")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "usr" / "lib" / "libx.so.1").symlink_to("libx.so.1.2")
    links, real = sb.symlink_chain(str(tmp_path / "lib" / "libx.so.1"))
    assert real == str(tmp_path / "usr" / "lib" / "libx.so.1.2")
    assert links == [(str(tmp_path / "lib"), "usr/lib"),
                     (str(tmp_path / "usr" / "lib" / "libx.so.1"), "libx.so.1.2")]


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "x").symlink_to("y")
    (tmp_path / "y").symlink_to("x")
    with pytest.raises(OSError):
        sb.symlink_chain(str(tmp_path / "x"))


def test_sandbox_binds_only_the_program_and_the_export(tmp_path: Path) -> None:
    prog = tmp_path / "prog"
    prog.write_text("")
    box = sb.Sandbox(["/x/prog", "-v"], [str(prog)], sb.CAPS_DIOD,
                     binds=[(7, sb.EXPORT_DIR, True)], chdir=sb.EXPORT_DIR)
    argv = box.argv("bwrap")
    assert argv[0] == "bwrap" and argv[-2:] == ["/x/prog", "-v"]
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--ro-bind"]
    assert binds == [str(prog)]
    assert ["--ro-bind-fd", "7", "/export"] == argv[argv.index("--ro-bind-fd"):][:3]
    for flag in ("--die-with-parent", "--unshare-net", "--unshare-pid", "--new-session"):
        assert flag in argv
    caps = {argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"}
    assert caps and not caps & {"CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH", "CAP_MKNOD",
                                "CAP_SYS_CHROOT", "CAP_NET_ADMIN"}
    assert argv.index("--cap-drop") < argv.index("--cap-add")
    assert "--remount-ro" in argv and box.pass_fds == [7]
    rw = sb.Sandbox(["p"], [], (), binds=[(3, "/export", False)]).argv("bwrap")
    assert "--bind-fd" in rw and "--ro-bind-fd" not in rw


def test_identity_files(tmp_path: Path) -> None:
    files = sb.identity_files(str(tmp_path / "id"))
    assert [dest for _, dest in files] == ["/etc/passwd", "/etc/group"]
    assert open(files[0][0]).read().startswith("root:x:0:0:")
    assert oct(os.stat(files[0][0]).st_mode & 0o777) == "0o644"


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
43 22 0:39 / /tmp/with\040space rw,nosuid - fuse.metac metac:abc rw,user_id=0
44 43 0:40 / /tmp/with\040space ro - tmpfs metac-unavailable ro
bogus line
"""


def test_parse_mountinfo() -> None:
    entries = kernel.parse_mountinfo(MOUNTINFO)
    assert [e.mountpoint for e in entries] == ["/", "/tmp/with space", "/tmp/with space"]
    assert entries[1].fstype == "fuse.metac" and entries[1].source == "metac:abc"
    assert kernel.mounts_at("/tmp/with space", entries)[-1].source == kernel.PLACEHOLDER_SOURCE


def test_choose_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount, "kernel_has_9p", lambda: False)
    assert mount.choose_method("", local=False) == "sftp"
    assert mount.choose_method("auto", local=True) == "bind"
    with pytest.raises(errors.Unsupported):
        mount.choose_method("9p", local=False)
    with pytest.raises(errors.InvalidArgument):
        mount.choose_method("bind", local=False)
    with pytest.raises(errors.InvalidArgument):
        mount.choose_method("nfs", local=False)
    monkeypatch.setattr(mount, "kernel_has_9p", lambda: True)
    assert mount.choose_method("", local=False) == "9p"


def test_mount_command_lines() -> None:
    assert mount.ninep_options(5).startswith("trans=fd,rfdno=5,wfdno=5,version=9p2000.L")
    argv = mount.sshfs_argv("/usr/bin/sshfs", "/mnt", "metac:1", read_only=True)
    assert argv[:2] == ["/usr/bin/sshfs", "-f"] and argv[-2:] == [":/export", "/mnt"]
    opts = argv[3].split(",")
    assert {"passive", "fsname=metac:1", "ro"} <= set(opts)
    assert "follow_symlinks" not in opts


def test_sshfs_passes_symlink_texts_through(tmp_path) -> None:
    """Debian's sshfs rejects absolute and ``..`` link targets unless told
    ``no_contain_symlinks``; builds without that option refuse it as unknown."""
    argv = mount.sshfs_argv("/usr/bin/sshfs", "/mnt", "metac:1", read_only=False,
                            contain_symlinks_option=True)
    opts = argv[3].split(",")
    assert "no_contain_symlinks" in opts
    assert not {"follow_symlinks", "transform_symlinks", "contain_symlinks"} & set(opts)
    plain = mount.sshfs_argv("/usr/bin/sshfs", "/mnt", "metac:1", read_only=False)
    assert "no_contain_symlinks" not in plain[3].split(",")
    for name, help_text in (("patched", "-o contain_symlinks ...\n-o no_contain_symlinks\n"),
                            ("older", "-o transform_symlinks\n-o follow_symlinks\n")):
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\ncat >&2 <<'X'\n{help_text}X\nexit 1\n")
        fake.chmod(0o755)
        assert mount.sshfs_contains_symlinks(str(fake)) is (name == "patched")
    assert mount.sshfs_contains_symlinks(str(tmp_path / "missing")) is False
