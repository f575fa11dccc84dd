"""Long or blocking commands say so (issue 18 item 7).

Waits and progress go to stderr when it is a terminal; METAC_PROGRESS=always shows them
anywhere (here: a pipe), METAC_PROGRESS=never never. Errors stay one line."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from metac.testing.nodes import NodeHost, metac_argv

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

ALWAYS = {"METAC_PROGRESS": "always"}


def test_a_slow_connection_says_connecting(nodes_factory: Callable[..., list[NodeHost]]) -> None:
    (a,) = nodes_factory(1)
    ref = a.metac("stream", "export", "tcp:127.0.0.1:9").stdout.strip()
    secret = ref.rsplit("/", 1)[1]
    # An address of the test's own subnet where no host answers: connecting takes seconds.
    subnet = ipaddress.ip_network(f"{a.address}/{a.host.prefixlen4}", strict=False)
    nobody = str(subnet[200])
    dead = ref.replace(f"ref://{a.address}/", f"ref://{nobody}/")

    proc = a.metac("stream", "cat", dead, check=False, env=ALWAYS, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 7, proc.stderr
    assert lines[0] == f"connecting to node {nobody}:901 …", proc.stderr
    assert len(lines) == 2 and lines[1].startswith("metac: Unavailable: "), proc.stderr
    assert secret not in proc.stderr and "Traceback" not in proc.stderr

    # Not a terminal and not asked for: only the error line.
    proc = a.metac("stream", "cat", dead, check=False, timeout=120)
    assert proc.returncode == 7 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_file_copies_show_progress(nodes_factory: Callable[..., list[NodeHost]],
                                   tmp_path: Path) -> None:
    (a,) = nodes_factory(1)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (20 << 20))
    target = tmp_path / "copy"
    target.touch()
    ref = a.metac("file", "export", f"local:{target}").stdout.strip()
    with open(big, "rb") as f:
        put = subprocess.run(a.host.argv([*metac_argv(), "file", "put", ref]), stdin=f,
                             capture_output=True, text=True, env=a.cli_env(ALWAYS),
                             timeout=120, check=False)
    assert put.returncode == 0, put.stderr
    assert "100.0%  20 / 20 MiB" in put.stderr, put.stderr
    assert target.stat().st_size == 20 << 20
    cat = a.metac("file", "cat", ref, env=ALWAYS)
    assert "100.0%  20 / 20 MiB" in cat.stderr and len(cat.stdout) == 20 << 20
    quiet = a.metac("file", "cat", ref, env={"METAC_PROGRESS": "never"})
    assert quiet.stderr == ""
