"""What can be checked at export time is checked then (issue 18 item 6): an unresolvable
host, a missing unix socket, the node's own underlay interface, a directory given to
`file export`, a file given to `fs export` — each fails at once with one line and the
category's exit code, and prints no ref."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


def one_line(proc: subprocess.CompletedProcess[str], category: str, code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"metac: {category}: "), proc.stderr
    assert "Traceback" not in proc.stderr and "ref://" not in proc.stdout
    return lines[0]


def test_export_time_checks(nodes_factory: Callable[..., list[NodeHost]],
                            tmp_path: Path) -> None:
    (node,) = nodes_factory(1)
    (tmp_path / "dir").mkdir()
    (tmp_path / "a-file").write_text("x")

    line = one_line(node.metac("stream", "export", "tcp:nosuchhost.invalid:80", check=False),
                    "NotFound", 3)
    assert "nosuchhost.invalid" in line and "resolve" in line, line

    sock = tmp_path / "nonexistent.sock"
    line = one_line(node.metac("stream", "export", f"unix:{sock}", check=False), "NotFound", 3)
    assert line == f"metac: NotFound: {sock}: no such socket", line
    line = one_line(node.metac("stream", "export", f"unix:{tmp_path / 'a-file'}",
                               check=False), "InvalidArgument", 2)
    assert "not a socket" in line, line

    line = one_line(node.metac("net", "export", f"local:{node.host.ifname}", check=False),
                    "FailedPrecondition", 6)
    assert node.host.ifname in line and node.address in line, line

    line = one_line(node.metac("file", "export", f"local:{tmp_path / 'dir'}", check=False),
                    "InvalidArgument", 2)
    assert line.endswith("is a directory; use metac fs export"), line
    line = one_line(node.metac("fs", "export", f"local:{tmp_path / 'a-file'}", check=False),
                    "InvalidArgument", 2)
    assert line.endswith("is not a directory; use metac file export"), line

    # what passes the checks still exports
    assert node.metac("stream", "export", "tcp:127.0.0.1:80").stdout.startswith("ref://")
    assert node.metac("stream", "export", "tcp:localhost:80").stdout.startswith("ref://")
