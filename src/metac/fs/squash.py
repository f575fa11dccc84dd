"""Owner squashing: a writable fs ref acts as the export directory's owner, never as root.

By default (like NFS ``root_squash``, but towards the directory's owner rather than
``nobody``) the program that serves a directory (sftp-server, diod) runs

* as the uid and gid that own the exported directory, with no supplementary
  groups (``setpriv --reuid U --regid G --clear-groups``, run inside the sandbox);
* with no capability at all: the bounding, inheritable and ambient sets are
  emptied before the server starts, so even when the owner is root (uid 0) the
  server has neither ``CAP_CHOWN`` nor ``CAP_DAC_OVERRIDE``, ``CAP_FOWNER``,
  ``CAP_FSETID`` or ``CAP_MKNOD``: it can chown nothing to another user, create no
  device node and reach only what the owner's mode bits allow;
* under a seccomp filter that refuses, with ``EPERM``, every request that would
  set the setuid or setgid bit (``chmod``, ``fchmod``, ``fchmodat``,
  ``fchmodat2``; ``open``, ``openat``, ``creat``, ``mknod``, ``mknodat`` whose
  mode has them); device nodes fail anyway for want of ``CAP_MKNOD``. ``openat2`` answers ``ENOSYS`` (its mode is in a struct a filter cannot read),
  so callers fall back to ``openat``. The kernel itself clears both bits when a
  file is written or chowned by a process without ``CAP_FSETID``.

A server cannot rewrite a request, so on its own a chmod that asks for the setuid
or setgid bit fails as a whole instead of being applied without them. That is what
diod (kernel 9p, reached by the client directly) does; for sftp-server the fs service
clears both bits from every mode in the client's requests first
(``sftpfilter.Rewrites.strip_setid``), so the request succeeds without them and this
filter stays as a second line.

``preserve`` (``metac fs export --preserve-owners``) keeps the server root with the
capabilities it needs to serve files of every owner: the holder is then
root-equivalent on that directory (what a container root filesystem needs).
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from dataclasses import dataclass

from metac import errors

#: Capabilities setpriv needs in the sandbox to switch identity and empty the
#: bounding set; all of them are gone when the server itself starts.
CAPS_SWITCH = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")

SUID_SGID = 0o6000

# struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6] (little-endian here).
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG0 = 16

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

X32_SYSCALL_BIT = 0x40000000

#: (audit arch, {syscall: index of its mode argument}, openat2). A mode with the
#: setuid or setgid bit is refused with EPERM; openat2 always with ENOSYS.
_TABLES: dict[str, tuple[int, dict[int, int], int]] = {
    # x86_64: open 2, creat 85, chmod 90, fchmod 91, mknod 133, openat 257,
    # mknodat 259, fchmodat 268, fchmodat2 452; openat2 437.
    "x86_64": (0xC000003E, {2: 2, 85: 1, 90: 1, 91: 1, 133: 1, 257: 3, 259: 2, 268: 2,
                            452: 2}, 437),
    # aarch64 (generic table): mknodat 33, fchmod 52, fchmodat 53, openat 56,
    # fchmodat2 452; openat2 437.
    "aarch64": (0xC00000B7, {33: 2, 52: 1, 53: 2, 56: 3, 452: 2}, 437),
}


@dataclass(frozen=True)
class Identity:
    """Whom a squashed server acts as: the export directory's owner."""

    uid: int
    gid: int

    @classmethod
    def of_fd(cls, fd: int) -> Identity:
        st = os.fstat(fd)
        return cls(st.st_uid, st.st_gid)

    def to_json(self) -> list[int]:
        return [self.uid, self.gid]

    @classmethod
    def from_json(cls, value: object) -> Identity:
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int) and 0 <= v < 2**32 - 1 for v in value)):
            raise errors.InvalidArgument("corrupt description: bad owner")
        return cls(value[0], value[1])


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def seccomp_program(machine: str | None = None) -> bytes:
    """The classic BPF filter described in the module docstring, for ``machine``."""
    machine = machine or platform.machine()
    if machine not in _TABLES:
        raise errors.Unsupported(f"squashing owners is not implemented on {machine}; "
                                 "export with --preserve-owners (root-equivalent)")
    arch, rules, openat2 = _TABLES[machine]
    eperm = _RET_ERRNO | errno.EPERM
    prog = [_insn(_LD_W_ABS, 0, 0, _OFF_ARCH),
            _insn(_JEQ_K, 1, 0, arch),
            _insn(_RET_K, 0, 0, RET_KILL_PROCESS),  # another ABI (i386, x32 via arch...)
            _insn(_LD_W_ABS, 0, 0, _OFF_NR)]
    if machine == "x86_64":
        prog += [_insn(_JGE_K, 0, 1, X32_SYSCALL_BIT), _insn(_RET_K, 0, 0, RET_KILL_PROCESS)]
    prog += [_insn(_JEQ_K, 0, 1, openat2), _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)]
    for nr, arg in rules.items():
        # nr matches: load the mode's low word; refuse if it has S_ISUID|S_ISGID.
        prog += [_insn(_JEQ_K, 0, 4, nr),
                 _insn(_LD_W_ABS, 0, 0, _OFF_ARG0 + 8 * arg),
                 _insn(_JSET_K, 0, 1, SUID_SGID),
                 _insn(_RET_K, 0, 0, eperm),
                 _insn(_RET_K, 0, 0, RET_ALLOW)]
    prog.append(_insn(_RET_K, 0, 0, RET_ALLOW))
    return b"".join(prog)


def seccomp_fd() -> int:
    """A readable fd holding the filter (what ``bwrap --seccomp FD`` reads); caller closes."""
    program = seccomp_program()
    r, w = os.pipe()
    try:
        os.write(w, program)  # a few hundred bytes: fits in the pipe buffer
    finally:
        os.close(w)
    return r


def become_argv(setpriv: str, who: Identity, keep: tuple[str, ...] = ()) -> list[str]:
    """The prefix that switches to ``who`` and drops every capability, then execs.

    ``keep`` (names like ``setgid``) stays in the bounding set, which is what a
    process of uid 0 gets at exec; a process of any other uid has no capability."""
    bounding = ",".join(["-all", *(f"+{cap}" for cap in keep)]) if who.uid == 0 else "-all"
    return [setpriv, f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups",
            "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={bounding}", "--"]


#: The user name ``identity_lines`` gives the export's owner (diod ``-U``).
OWNER_NAME = "export-owner"


def identity_lines(who: Identity) -> tuple[str, str]:
    """passwd and group lines naming ``who`` (diod looks its squash user up by name,
    also when it is uid 0 with another group than root's)."""
    return (f"{OWNER_NAME}:x:{who.uid}:{who.gid}:export owner:/:/nonexistent\n",
            f"export-group:x:{who.gid}:\n")
