"""A missing mount point is NotFound with the whole path, in every command (issue 18 item 9):
one line, exit 3, no secret, no traceback; something that is not a directory is
InvalidArgument (exit 2)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


def one_line(proc: subprocess.CompletedProcess[str], category: str, code: int,
             secret: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"metac: {category}: "), proc.stderr
    assert "Traceback" not in proc.stderr and secret not in proc.stdout + proc.stderr
    return lines[0]


def test_missing_mount_points(nodes_factory: Callable[..., list[NodeHost]],
                              tmp_path: Path) -> None:
    (node,) = nodes_factory(1)
    (tmp_path / "share").mkdir()
    (tmp_path / "a-file").write_text("x")
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    fs_ref = node.metac("fs", "export", f"local:{tmp_path / 'share'}").stdout.strip()
    block_ref = node.metac("block", "export", f"local:{image}").stdout.strip()
    secret = fs_ref.rsplit("/", 1)[1]
    missing = tmp_path / "no" / "such" / "dir"

    for argv in (("fs", "mount", fs_ref, str(missing)),
                 ("fs", "umount", str(missing)),
                 ("block", "attach", block_ref, "--mount", str(missing))):
        line = one_line(node.metac(*argv, check=False), "NotFound", 3, secret)
        assert line == f"metac: NotFound: {missing}: no such directory", (argv, line)

    not_dir = tmp_path / "a-file"
    for argv in (("fs", "mount", fs_ref, str(not_dir)),
                 ("block", "attach", block_ref, "--mount", str(not_dir))):
        line = one_line(node.metac(*argv, check=False), "InvalidArgument", 2, secret)
        assert line == f"metac: InvalidArgument: {not_dir}: not a directory", (argv, line)
    assert node.metac("block", "ls", "--json").stdout.strip() == "[]"
    assert node.metac("fs", "ls", "--json").stdout.strip() == "[]"


def test_missing_local_directories_everywhere(nodes_factory: Callable[..., list[NodeHost]],
                                              tmp_path: Path) -> None:
    (node,) = nodes_factory(1)
    (tmp_path / "mnt").mkdir()
    missing = tmp_path / "no" / "such"
    for argv, shown in (
        (("fs", "export", f"local:{missing}"), missing),
        (("file", "export", f"local:{missing}/file"), missing),
        (("block", "export", f"local:{missing}/disk.img"), missing),
        (("fs", "mount", f"local:{missing}", str(tmp_path / "mnt")), missing),
        (("run", "--mount", f"/=local:{missing}", "--", "true"), missing),
    ):
        line = one_line(node.metac(*argv, check=False), "NotFound", 3, "no-secret-here")
        assert line == f"metac: NotFound: {shown}: no such directory", (argv, line)
