"""metac.fs.squash: the seccomp filter (interpreted here, then loaded by bwrap), the
identity switch, and the squashed command lines of sftp-server and diod (issue 10, item 5)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from metac import errors
from metac.fs import sandbox as sb
from metac.fs import servers, squash
from metac.fs.resolve import Directory

X86_64 = 0xC000003E
AARCH64 = 0xC00000B7
EPERM = 0x00050000 | errno.EPERM
ENOSYS = 0x00050000 | errno.ENOSYS


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """A classic-BPF interpreter for the few instructions the filter uses."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x35:
            pc += jt if acc >= k else jf
        elif code == 0x45:
            pc += jt if acc & k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


def test_filter_refuses_setuid_and_setgid_modes_on_x86_64() -> None:
    prog = squash.seccomp_program("x86_64")
    chmod, fchmod, openat, fchmodat, mknodat, creat = 90, 91, 257, 268, 259, 85
    assert run_bpf(prog, chmod, X86_64, (0, 0o4755)) == EPERM
    assert run_bpf(prog, chmod, X86_64, (0, 0o2755)) == EPERM
    assert run_bpf(prog, chmod, X86_64, (0, 0o1777)) == squash.RET_ALLOW  # sticky is fine
    assert run_bpf(prog, fchmod, X86_64, (3, 0o6755)) == EPERM
    assert run_bpf(prog, fchmodat, X86_64, (3, 0, 0o4700)) == EPERM
    assert run_bpf(prog, fchmodat, X86_64, (3, 0, 0o755)) == squash.RET_ALLOW
    assert run_bpf(prog, openat, X86_64, (3, 0, os.O_CREAT, 0o104755)) == EPERM
    assert run_bpf(prog, openat, X86_64, (3, 0, os.O_CREAT, 0o777)) == squash.RET_ALLOW
    assert run_bpf(prog, creat, X86_64, (0, 0o2644)) == EPERM
    assert run_bpf(prog, mknodat, X86_64, (3, 0, stat.S_IFREG | 0o4755)) == EPERM
    assert run_bpf(prog, mknodat, X86_64, (3, 0, stat.S_IFIFO | 0o644)) == squash.RET_ALLOW
    assert run_bpf(prog, 437, X86_64) == ENOSYS  # openat2: mode out of the filter's reach
    assert run_bpf(prog, 0, X86_64) == squash.RET_ALLOW  # read
    # another ABI or the x32 numbering: killed, never allowed by accident
    assert run_bpf(prog, chmod, 0x40000003, (0, 0o4755)) == squash.RET_KILL_PROCESS
    assert run_bpf(prog, 0x40000000 | chmod, X86_64) == squash.RET_KILL_PROCESS


def test_filter_on_aarch64_and_unknown_machines() -> None:
    prog = squash.seccomp_program("aarch64")
    assert run_bpf(prog, 53, AARCH64, (3, 0, 0o4755)) == EPERM  # fchmodat
    assert run_bpf(prog, 56, AARCH64, (3, 0, os.O_CREAT, 0o6644)) == EPERM  # openat
    assert run_bpf(prog, 56, AARCH64, (3, 0, os.O_CREAT, 0o644)) == squash.RET_ALLOW
    assert run_bpf(prog, 53, X86_64, (3, 0, 0o755)) == squash.RET_KILL_PROCESS
    with pytest.raises(errors.Unsupported, match="--preserve-owners"):
        squash.seccomp_program("mips")


def test_become_argv_drops_every_capability() -> None:
    argv = squash.become_argv("/usr/bin/setpriv", squash.Identity(1000, 100))
    assert argv == ["/usr/bin/setpriv", "--reuid=1000", "--regid=100", "--clear-groups",
                    "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]
    # diod as uid 0 keeps CAP_SETGID; as any other uid nothing is kept anyway
    assert "--bounding-set=-all,+setgid" in squash.become_argv("s", squash.Identity(0, 0),
                                                               ("setgid",))
    assert "--bounding-set=-all" in squash.become_argv("s", squash.Identity(5, 5), ("setgid",))


def test_identity_round_trip_and_corrupt_descriptions() -> None:
    who = squash.Identity(1000, 50)
    assert squash.Identity.from_json(who.to_json()) == who
    for bad in ([1], [-1, 0], ["0", "0"], "0:0", None, [True, 0.5]):
        with pytest.raises(errors.InvalidArgument):
            squash.Identity.from_json(bad)


@pytest.mark.parametrize("owner", [squash.Identity(0, 0), squash.Identity(1000, 1000), None])
def test_sftp_and_diod_command_lines(tmp_path: Path, owner: squash.Identity | None) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    assert servers.sftp_argv(read_only=False)[-2:] == ["-u", "0"]  # the client's umask holds
    diod = servers.diod_argv("/usr/sbin/diod", 9, False, owner)
    if owner is None:
        assert "-N" in diod and "-S" not in diod
    else:
        assert diod[diod.index("-S"):][:3] == ["-S", "-U", squash.OWNER_NAME]
        assert "-N" not in diod
    export = Directory.open_absolute(str(tmp_path))
    box = servers.file_server_box(diod, (), sb.CAPS_DIOD, export, False, owner,
                                  str(tmp_path / "id"), servers.DIOD_ROOT_KEEPS)
    try:
        argv = box.argv("bwrap")
    finally:
        export.close()
        if box.seccomp_fd >= 0:
            os.close(box.seccomp_fd)
    caps = {argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"}
    if owner is None:  # --preserve-owners: today's root server
        assert caps == set(sb.CAPS_DIOD) and "--seccomp" not in argv
        assert argv[-len(diod):] == diod
        return
    assert caps == set(squash.CAPS_SWITCH)
    assert argv[argv.index("--seccomp") + 1] == str(box.seccomp_fd) in map(str, box.pass_fds)
    setpriv = argv.index("--chdir") + 2
    assert argv[setpriv].endswith("setpriv")
    assert argv[setpriv + 1:setpriv + 4] == [f"--reuid={owner.uid}", f"--regid={owner.gid}",
                                             "--clear-groups"]
    assert argv[argv.index("--", setpriv) + 1:] == diod
    bounding = [a for a in argv if a.startswith("--bounding-set=")]
    assert bounding == ["--bounding-set=-all,+setgid" if owner.uid == 0
                        else "--bounding-set=-all"]
    passwd = Path(argv[argv.index("/etc/passwd") - 1]).read_text()
    assert f"{squash.OWNER_NAME}:x:{owner.uid}:{owner.gid}:" in passwd


SCRIPT = """
set -u
cd /export
umask 0
touch f && chmod 0755 f && echo chmod-ok
chmod 4755 f 2>/dev/null || echo suid-refused
chmod 2755 f 2>/dev/null || echo sgid-refused
mknod dev c 1 3 2>/dev/null || echo mknod-refused
chown 1234 f 2>/dev/null || echo chown-refused
mkfifo fifo && echo fifo-ok
"""


@pytest.mark.root
@pytest.mark.parametrize("uid", [0, 65534])
def test_filter_and_identity_in_a_real_sandbox(tmp_path: Path, uid: int) -> None:
    """bwrap loads the filter and setpriv switches identity as the servers get them."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, bwrap and setpriv")
    export = tmp_path / "export"
    export.mkdir()
    os.chown(export, uid, uid)
    sh = shutil.which("sh")
    assert sh
    tools = [shutil.which(t) for t in ("touch", "chmod", "mknod", "chown", "mkfifo")]
    d = Directory.open_absolute(str(export))
    box = servers.squashed_box([sh, "-c", SCRIPT], sb.program_files(sh, *tools),
                               squash.Identity(uid, uid), [(d.fd, sb.EXPORT_DIR, False)],
                               str(tmp_path / "id"))
    try:
        proc = subprocess.run(box.argv(sb.bwrap()), pass_fds=box.pass_fds, capture_output=True,
                              text=True, timeout=60, check=False)
    finally:
        os.close(box.seccomp_fd)
        d.close()
    assert proc.stdout.split() == ["chmod-ok", "suid-refused", "sgid-refused", "mknod-refused",
                                   "chown-refused", "fifo-ok"], proc.stderr
    st = os.stat(export / "f")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o755)
    assert not (export / "dev").exists()
