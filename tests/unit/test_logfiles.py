"""Tests for metac.core.logfiles and the supervisor's capped logs: sizes, rotation, modes."""

from __future__ import annotations

import asyncio
import os
import stat
import sys

import capnp
import pytest

from metac import errors
from metac.core.logfiles import RotatingLog, log_limits, parse_size
from metac.core.supervisor import Supervisor


def test_parse_size() -> None:
    assert parse_size("8M") == 8 << 20
    assert parse_size("64k") == 64 << 10
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("10000") == 10000
    for bad in ("", "x", "1T", "-5M", "100"):
        with pytest.raises(errors.InvalidArgument):
            parse_size(bad)


def test_log_limits_from_environment(monkeypatch) -> None:
    monkeypatch.delenv("METAC_LOG_SIZE", raising=False)
    monkeypatch.delenv("METAC_LOG_FILES", raising=False)
    assert log_limits() == (8 << 20, 4)
    monkeypatch.setenv("METAC_LOG_SIZE", "1M")
    monkeypatch.setenv("METAC_LOG_FILES", "2")
    assert log_limits() == (1 << 20, 2)
    monkeypatch.setenv("METAC_LOG_FILES", "0")
    with pytest.raises(errors.InvalidArgument):
        log_limits()


def test_rotating_log_caps_every_file(tmp_path) -> None:
    path = str(tmp_path / "x.log")
    sink = RotatingLog(path, 4096, 3)
    for i in range(100):
        sink.write(f"{i:05d}".encode() * 100)  # 500 bytes a write, 50,000 in all
    sink.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["x.log", "x.log.1", "x.log.2"]
    sizes = [os.path.getsize(tmp_path / n) for n in names]
    assert all(s <= 4096 for s in sizes) and sizes[1] == sizes[2] == 4096
    # The newest output is in the current file, the oldest kept in .2.
    assert (tmp_path / "x.log").read_bytes().endswith(b"00099" * 100)
    assert 50000 - sum(sizes) > 0  # older output was dropped
    for n in names:
        assert stat.S_IMODE(os.stat(tmp_path / n).st_mode) == 0o600


def test_one_file_log_is_truncated_in_place(tmp_path) -> None:
    sink = RotatingLog(str(tmp_path / "y.log"), 4096, 1)
    sink.write(b"a" * 10000)
    sink.close()
    assert os.listdir(tmp_path) == ["y.log"]
    assert os.path.getsize(tmp_path / "y.log") <= 4096


def test_existing_loose_log_is_tightened(tmp_path) -> None:
    path = tmp_path / "z.log"
    path.write_bytes(b"old\n")
    os.chmod(path, 0o644)
    RotatingLog(str(path), 4096, 2).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_supervised_child_output_is_capped(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("METAC_LOG_SIZE", "16K")
    monkeypatch.setenv("METAC_LOG_FILES", "2")
    script = "import os\nfor i in range(1000): os.write(2, b'%05d' % i + b'.' * 94 + b'\\n')\n"

    async def main() -> str:
        sup = Supervisor(str(tmp_path / "state"), "tests")
        child = await sup.spawn([sys.executable, "-c", script], name="noisy")
        assert await child.wait() == 0  # the log is complete when wait() returns
        sup.forget(child)
        await sup.aclose()
        return child.log_path

    log_path = asyncio.run(capnp.run(main()))
    assert os.path.getsize(log_path) <= 16 << 10
    assert os.path.getsize(log_path + ".1") == 16 << 10
    assert not os.path.exists(log_path + ".2")
    assert open(log_path, "rb").read().endswith(b"00999" + b"." * 94 + b"\n")
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
