"""One short guest boot: what the job sees of the host, and what it may change."""

from __future__ import annotations

from pathlib import Path

from metac.testing.guest import GUEST_OUT, run_in_guest


def test_guest_sees_host_files_under_tmp_and_writes_stay_in_the_guest(tmp_path: Path) -> None:
    """A checkout may live under /tmp (a CI clone): the guest must see it, what the
    job writes there must not reach the host, and a symlink it leaves in the io share
    must not make the host read a file of its own."""
    (tmp_path / "hello").write_text("from the host\n")
    script = (f"cat hello > {GUEST_OUT}/seen && echo guest > written && cat written "
              "&& test \"$(cat /proc/sys/kernel/hostname)\" = metac-guest "
              f"&& ln -s {tmp_path}/hello {GUEST_OUT}/link")
    result = run_in_guest(["/bin/sh", "-c", script], cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.output + result.console[-2000:]
    assert result.files["seen"] == b"from the host\n"
    assert "link" not in result.files  # a symlink out of the io share is not followed
    assert result.output.strip().endswith("guest")
    assert not (tmp_path / "written").exists()
