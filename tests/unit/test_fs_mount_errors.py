"""A refused kernel 9p mount reaches the client as Unavailable, not as an incident."""

from __future__ import annotations

import errno
import socket

import pytest

from metac import errors
from metac.core.holder import Revert
from metac.fs import kernel, mount


def test_refused_9p_mount_is_unavailable_naming_sftp(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(source: str, target: str, fstype: str | None, flags: int = 0,
               data: str | None = None) -> None:
        assert fstype == "9p" and data is not None and data.startswith("trans=fd,")
        raise OSError(errno.EPERM, "mount 9p: Operation not permitted")

    monkeypatch.setattr(kernel, "remove_top", lambda path, sources: None)
    monkeypatch.setattr(kernel, "mount", refuse)
    session = mount.MountSession.__new__(mount.MountSession)
    session.path, session.read_only, session.marker = "/mnt/x", False, "metac:m1"
    session._ninep_fd = None
    session._undo = Revert()
    left, right = socket.socketpair()
    try:
        with pytest.raises(errors.Unavailable, match="9p mount of /mnt/x failed: "
                                                     "Operation not permitted; --method sftp"):
            session._mount_9p(left)
        assert session._ninep_fd is None
    finally:
        left.close()
        right.close()
