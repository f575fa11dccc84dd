"""A writable fs ref is not root on the serving node (issue 10, item 5), and `local:` exports
refuse a symlink they were not told to follow (item 10), through the CLI on two nodes.

Node A exports a directory; node B mounts it (sftp here: this kernel has no 9p) and
tries what a hostile holder would: a setuid-root copy of ``id``, a device node, a chown
to another user. By default the server acts as the export directory's owner with no
capability; ``--preserve-owners`` keeps the root behaviour and survives a restart.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fs_support import forward, node_pair, stop

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

NOBODY = 65534
NINEP_CLIENT = Path(__file__).with_name("ninep_client.py")


@pytest.fixture
def pair(nodes_factory, tmp_path: Path):
    with node_pair(nodes_factory, tmp_path) as (a, b, export):
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        yield a, b, export, mnt


def run_as_nobody(path: Path) -> str:
    """What `id` at ``path`` prints when nobody runs it on node A (euid=0 if setuid root)."""
    proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", str(path)], capture_output=True, text=True,
                          timeout=30, check=False)
    return proc.stdout + proc.stderr


def plant_setuid_id(mnt: Path) -> subprocess.CompletedProcess[str]:
    """The repro: copy `id` into the mount and make it setuid (and setgid) root."""
    id_prog = shutil.which("id")
    assert id_prog
    return subprocess.run(["sh", "-c", f'cp "{id_prog}" "{mnt}/x" && chmod 4755 "{mnt}/x"; '
                                       f'chmod 6755 "{mnt}/x"; cp "{id_prog}" "{mnt}/y"; '
                                       f'chmod g+s "{mnt}/y"'],
                          capture_output=True, text=True, timeout=60, check=False)


def test_squashed_export_plants_no_setuid_file_device_or_foreign_owner(pair) -> None:
    a, b, export, mnt = pair
    os.chmod(export, 0o755)  # the directory must be reachable for nobody running x
    os.chmod(export.parent, 0o755)
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    b.metac("fs", "mount", ref, str(mnt))
    try:
        proc = plant_setuid_id(mnt)
        # refused (EPERM on A; SFTP reports it as "permission denied")
        assert proc.stderr.count("changing permissions") == 3, proc.stderr
        for name in ("x", "y"):
            st = os.stat(export / name)
            assert stat.S_IMODE(st.st_mode) & 0o6000 == 0, oct(st.st_mode)
        out = run_as_nobody(export / "x")
        assert f"uid={NOBODY}" in out and "euid=0" not in out, out

        with pytest.raises(OSError):  # a device node: refused (no CAP_MKNOD)
            os.mknod(mnt / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
        assert not (export / "mem").exists()

        (mnt / "mine").write_text("x")
        with pytest.raises(PermissionError):  # chown to another user: refused
            os.chown(mnt / "mine", 1234, -1)
        st = os.stat(export / "mine")
        assert (st.st_uid, st.st_gid) == (0, 0)  # the export's owner (root here)

        # sftp-server runs with umask 0: the modes B asks for (already masked by B's
        # umask) arrive exactly, at create and at chmod.
        old = os.umask(0)
        try:
            os.close(os.open(mnt / "m666", os.O_CREAT | os.O_WRONLY, 0o666))
            os.close(os.open(mnt / "m777", os.O_CREAT | os.O_WRONLY, 0o777))
            os.mkdir(mnt / "d777", 0o777)
        finally:
            os.umask(old)
        os.chmod(mnt / "mine", 0o1757)
        modes = {n: stat.S_IMODE(os.stat(export / n).st_mode)
                 for n in ("m666", "m777", "d777", "mine")}
        assert modes == {"m666": 0o666, "m777": 0o777, "d777": 0o777, "mine": 0o1757}
    finally:
        b.metac("fs", "umount", str(mnt))


def test_squashed_export_acts_as_a_non_root_owner(pair) -> None:
    a, b, export, mnt = pair
    (export / "roots").write_text("root's file\n")
    os.chmod(export / "roots", 0o644)
    os.chown(export, NOBODY, NOBODY)
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    b.metac("fs", "mount", ref, str(mnt))
    try:
        (mnt / "new").write_text("made through the mount\n")
        st = os.stat(export / "new")
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
        with pytest.raises(PermissionError):  # root's file: not the owner's to write
            (mnt / "roots").write_text("overwritten")
        assert (export / "roots").read_text() == "root's file\n"
        with pytest.raises(PermissionError):
            os.chmod(mnt / "new", 0o4755)  # setuid to its own owner: still refused
        with pytest.raises(PermissionError):
            os.chown(mnt / "new", 0, 0)
    finally:
        b.metac("fs", "umount", str(mnt))


def test_preserve_owners_is_root_equivalent_and_survives_a_restart(pair) -> None:
    a, b, export, mnt = pair
    ref = a.metac("fs", "export", "--persistent", "--preserve-owners",
                  f"local:{export}").stdout.strip()
    refused = a.metac("fs", "export", "--preserve-owners", ref, check=False)
    assert refused.returncode == 2 and "--preserve-owners needs a local:" in refused.stderr
    a.stop()
    a.start()
    b.metac("fs", "mount", ref, str(mnt))
    try:
        plant_setuid_id(mnt)
        assert stat.S_IMODE(os.stat(export / "x").st_mode) == 0o6755
        (mnt / "f").write_text("x")
        os.chown(mnt / "f", 1234, 4321)
        st = os.stat(export / "f")
        assert (st.st_uid, st.st_gid) == (1234, 4321)
    finally:
        b.metac("fs", "umount", str(mnt))


def test_a_squashed_export_of_this_node_is_not_bind_mounted(pair) -> None:
    """What a container on the exporting node gets: the squashing server, not a bind."""
    a, _, export, mnt = pair
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    bind = a.metac("fs", "mount", "--method", "bind", ref, str(mnt), check=False)
    assert bind.returncode == 5 and "--preserve-owners" in bind.stderr, bind.stderr
    out = a.metac("fs", "mount", ref, str(mnt)).stdout
    assert "(bind" not in out, out
    try:
        (mnt / "f").write_text("x")
        with pytest.raises(PermissionError):
            os.chown(mnt / "f", 1234, -1)
    finally:
        a.metac("fs", "umount", str(mnt))
    preserved = a.metac("fs", "export", "--preserve-owners", f"local:{export}").stdout.strip()
    assert "(bind" in a.metac("fs", "mount", preserved, str(mnt)).stdout
    a.metac("fs", "umount", str(mnt))


def test_local_exports_refuse_a_symlink_unless_follow(pair) -> None:
    a, b, export, _ = pair
    (export / "real").mkdir()
    (export / "real" / "f.txt").write_text("target\n")
    (export / "dirlink").symlink_to("real")
    (export / "filelink").symlink_to("real/f.txt")
    for kind, link in (("fs", "dirlink"), ("file", "filelink")):
        proc = a.metac(kind, "export", f"local:{export}/{link}", check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (f"metac: InvalidArgument: {export}/{link} is a symlink; "
                                       "use --follow")
    stream = a.metac("fs", "stream", f"local:{export}/dirlink", check=False)
    assert stream.returncode == 2 and "use --follow" in stream.stderr
    file_ref = a.metac("file", "export", "--follow", f"local:{export}/filelink").stdout.strip()
    assert b.metac("file", "cat", file_ref).stdout == "target\n"
    assert a.metac("fs", "export", "--follow", f"local:{export}/dirlink").returncode == 0
    # a symlink earlier in the path is the admin's own choice, resolved as before
    assert a.metac("file", "export", f"local:{export}/dirlink/f.txt").returncode == 0


def ninep_attack(b, ref: str) -> dict[str, int]:
    """The raw 9P client's errnos against diod, through `fs stream` + `stream forward` on B."""
    stream_ref = b.metac("fs", "stream", "--protocol", "9p", ref).stdout.strip()
    fwd, port = forward(b, stream_ref)
    try:
        proc = b.host.run([sys.executable, str(NINEP_CLIENT), str(port)], timeout=60,
                          check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    finally:
        stop(fwd)


@pytest.mark.parametrize("owner", [0, NOBODY])
def test_diod_squashes_a_raw_9p_client(pair, owner: int) -> None:
    """diod (what kernel 9p mounts use) under the same rule, driven by a hostile client."""
    if shutil.which("diod") is None and not os.path.exists("/usr/sbin/diod"):
        pytest.skip("needs diod")
    a, b, export, _ = pair
    os.chown(export, owner, owner)
    got = ninep_attack(b, a.metac("fs", "export", f"local:{export}").stdout.strip())
    assert got == {"create": 0, "chmod_setuid": errno.EPERM, "chmod_setgid": errno.EPERM,
                   "chown": errno.EPERM, "create_setuid": errno.EPERM,
                   "mknod_device": errno.EPERM, "mknod_setuid_file": errno.EPERM}, got
    st = os.stat(export / "plain")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner, owner, 0o755)
    assert sorted(os.listdir(export)) == ["plain"]


def test_diod_preserving_owners_does_what_root_does(pair) -> None:
    if shutil.which("diod") is None and not os.path.exists("/usr/sbin/diod"):
        pytest.skip("needs diod")
    a, b, export, _ = pair
    ref = a.metac("fs", "export", "--preserve-owners", f"local:{export}").stdout.strip()
    got = ninep_attack(b, ref)
    assert got["create"] == got["chmod_setuid"] == got["chown"] == 0, got
    assert os.stat(export / "plain").st_uid == 1234
