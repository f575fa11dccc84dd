"""Tests for metac.core.paths: the node's directory locks and the private state dir."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from metac import errors
from metac.core.paths import lock_node_dir, lock_node_dirs, secure_private_dir


def test_second_lock_is_refused_with_the_holders_pid(tmp_path) -> None:
    fd = lock_node_dir(str(tmp_path))
    try:
        # Another process (flock is per open file: another open() behaves the same).
        code = ("import sys\nfrom metac import errors\nfrom metac.core.paths import lock_node_dir\n"
                "try:\n    lock_node_dir(sys.argv[1])\nexcept errors.FailedPrecondition as e:\n"
                "    print(e)\n")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, check=True, env=dict(os.environ)).stdout.strip()
        assert out == f"{tmp_path}: a node is already running here (pid {os.getpid()})"
        with pytest.raises(errors.FailedPrecondition):
            lock_node_dir(str(tmp_path))
        assert stat.S_IMODE(os.stat(tmp_path / "node.lock").st_mode) == 0o600
    finally:
        os.close(fd)
    os.close(lock_node_dir(str(tmp_path)))  # released with its fd


def test_one_dir_given_twice_is_locked_once(tmp_path) -> None:
    fds = lock_node_dirs(str(tmp_path / "a"), str(tmp_path / "a"))
    assert len(fds) == 1
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    for fd in fds:
        os.close(fd)


def test_lock_of_the_second_dir_failing_releases_the_first(tmp_path) -> None:
    held = lock_node_dir(str(tmp_path))
    try:
        with pytest.raises(errors.FailedPrecondition):
            lock_node_dirs(str(tmp_path / "free"), str(tmp_path))
        os.close(lock_node_dir(str(tmp_path / "free")))
    finally:
        os.close(held)


def test_secure_private_dir(tmp_path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    assert "changed to 0700" in (secure_private_dir(str(d)) or "")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert secure_private_dir(str(d)) is None
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)
        with pytest.raises(errors.FailedPrecondition, match="belongs to uid 65534"):
            secure_private_dir(str(d))
