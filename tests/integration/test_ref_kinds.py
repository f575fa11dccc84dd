"""Refs say what they are (issue 18 item 4): `ref ls` has a DESCRIPTION column, `ref show`
prints the kind and the description, a ref of the wrong kind fails with one line naming
its kind and the command that takes it, and export commands print the ref alone on
stdout and its short id on stderr."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


def one_line(proc: subprocess.CompletedProcess[str], category: str, code: int,
             secrets: list[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"metac: {category}: "), proc.stderr
    assert "Traceback" not in proc.stderr and "requestedTypeId" not in proc.stderr
    assert not [s for s in secrets if s[4:] in proc.stdout + proc.stderr]
    return lines[0]


def export(node: NodeHost, *argv: str) -> tuple[str, str]:
    """(ref, short id) printed by an export command: the ref alone on stdout."""
    proc = node.metac(*argv)
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("ref://"), proc.stdout
    ref = proc.stdout.strip()
    assert proc.stderr.startswith("id "), proc.stderr
    assert ref.rsplit("/", 1)[1][4:] not in proc.stderr
    return ref, proc.stderr.split()[1]


def test_refs_say_what_they_are(nodes_factory: Callable[..., list[NodeHost]],
                                tmp_path: Path) -> None:
    a, b = nodes_factory(2)
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / "mnt").mkdir()
    fs_ref, fs_id = export(a, "fs", "export", f"local:{share}")
    stream_ref, stream_id = export(a, "stream", "export", "tcp:127.0.0.1:9")
    file_ref, file_id = export(a, "file", "export", "--read-only", f"local:{share}/f")
    # made through fs_ref (as a ref holder would): derived from it
    view_ref, view_id = export(a, "fs", "export", "--read-only", fs_ref)
    secrets = [r.rsplit("/", 1)[1] for r in (fs_ref, stream_ref, file_ref, view_ref)]

    rows = {r["id"]: r for r in json.loads(a.metac("ref", "ls", "--json").stdout)}
    assert rows[fs_id]["description"] == f"directory {share}", rows[fs_id]
    assert rows[stream_id]["description"] == "tcp:127.0.0.1:9", rows[stream_id]
    assert rows[file_id]["description"] == f"file {share}/f (read-only)", rows[file_id]
    assert rows[view_id]["description"] == \
        f"directory {share} (read-only), derived from {fs_id}", rows[view_id]
    table = a.metac("ref", "ls").stdout
    assert table.splitlines()[0].split()[-1] == "DESCRIPTION"
    assert "tcp:127.0.0.1:9" in table and not [s for s in secrets if s[4:] in table]

    # ref show: the kind (also of another node's ref) and, on the ref's node, the description
    shown = a.metac("ref", "show", fs_ref).stdout
    assert "kind: Filesystem" in shown and f"description: directory {share}" in shown, shown
    shown = json.loads(b.metac("ref", "show", "--json", stream_ref).stdout)
    assert shown["kind"] == "Stream", shown
    shown = json.loads(b.metac("ref", "show", "--json", file_ref).stdout)
    assert shown["kind"] == "File", shown

    # the wrong kind: one line naming the kind and the command that takes it
    mnt = str(tmp_path / "mnt")
    for node in (a, b):
        line = one_line(node.metac("fs", "mount", stream_ref, mnt, check=False),
                        "InvalidArgument", 2, secrets)
        assert line == "metac: InvalidArgument: this ref is a Stream; use metac stream " \
                       "cat|forward|bind", line
        line = one_line(node.metac("stream", "cat", fs_ref, check=False),
                        "InvalidArgument", 2, secrets)
        assert line == "metac: InvalidArgument: this ref is a Filesystem; use metac fs mount", \
            line
        line = one_line(node.metac("block", "attach", file_ref, check=False),
                        "InvalidArgument", 2, secrets)
        assert line == "metac: InvalidArgument: this ref is a File; use metac file cat|put", line
    assert json.loads(a.metac("fs", "ls", "--json").stdout) == []
