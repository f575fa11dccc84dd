"""Resource groups from the CLI (issue 18 item 5): `--group NAME` on every export command,
`metac ref group ls`, AlreadyExists for a second `group create`, NotFound for `group rm`
of an unknown group; dropping a group revokes every ref exported into it."""

from __future__ import annotations

import json
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


def test_groups_from_the_cli(nodes_factory: Callable[..., list[NodeHost]],
                             tmp_path: Path) -> None:
    (node,) = nodes_factory(1)
    assert node.metac("ref", "group", "ls").stdout.split() == ["NAME", "REFS", "CREATED"]
    assert json.loads(node.metac("ref", "group", "ls", "--json").stdout) == []

    assert node.metac("ref", "group", "create", "team").stdout.strip() == "team"
    line = one_line(node.metac("ref", "group", "create", "team", check=False),
                    "AlreadyExists", 4)
    assert "team" in line, line
    line = one_line(node.metac("ref", "group", "rm", "nosuch", check=False), "NotFound", 3)
    assert "nosuch" in line, line
    line = one_line(node.metac("stream", "export", "--group", "nosuch", "tcp:127.0.0.1:9",
                               check=False), "NotFound", 3)
    assert "nosuch" in line, line

    (tmp_path / "dir").mkdir()
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    exports = [
        ("stream", "export", "tcp:127.0.0.1:9"),
        ("fs", "export", f"local:{tmp_path / 'dir'}"),
        ("file", "export", f"local:{tmp_path / 'dir' / 'f'}"),
        ("block", "export", f"local:{image}"),
        ("net", "export", "newlocal:grp0"),
        ("compute", "export"),
        ("vm", "export"),
    ]
    refs = []
    for words in exports:
        out = node.metac(*words[:2], "--group", "team", *words[2:]).stdout.strip()
        assert out.startswith("ref://"), (words, out)
        refs.append(out)
    outside = node.metac("stream", "export", "tcp:127.0.0.1:9").stdout.strip()

    listed = json.loads(node.metac("ref", "ls", "--json").stdout)
    assert sorted(r["group"] for r in listed) == [""] + ["team"] * len(exports)
    groups = json.loads(node.metac("ref", "group", "ls", "--json").stdout)
    assert [(g["name"], g["refs"]) for g in groups] == [("team", len(exports))]
    rows = node.metac("ref", "group", "ls").stdout.splitlines()
    assert rows[1].split()[:2] == ["team", str(len(exports))], rows

    out = node.metac("ref", "group", "rm", "team").stdout
    assert f"revoked {len(exports)} ref(s)" in out, out
    for ref in refs:
        one_line(node.metac("ref", "show", ref, check=False), "NotFound", 3)
    assert node.metac("ref", "show", outside).returncode == 0
    assert json.loads(node.metac("ref", "group", "ls", "--json").stdout) == []
