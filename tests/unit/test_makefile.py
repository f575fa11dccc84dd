"""`make test` runs what PYTEST_ARGS or TESTS name; `make run` never needs the guest kernel."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def pytest_argv(*make_args: str) -> list[str]:
    """The pytest command line `make test` would run (PY=echo; lint and setup not run)."""
    proc = subprocess.run(["make", "-s", "-o", "lint", "-o", "setup", "test", "PY=echo",
                           *make_args], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=60)
    return proc.stdout.split()[3:]  # after "-m pytest -q"


def test_the_whole_suite_by_default() -> None:
    assert pytest_argv() == ["-rs", "tests"]
    assert pytest_argv("PYTEST_ARGS=-k core") == ["-rs", "-k", "core", "tests"]


def test_a_path_in_pytest_args_narrows_the_run() -> None:
    assert pytest_argv("PYTEST_ARGS=-x tests/unit") == ["-rs", "-x", "tests/unit"]
    assert pytest_argv("PYTEST_ARGS=tests/unit/test_refs.py::test_x") == [
        "-rs", "tests/unit/test_refs.py::test_x"]


def test_tests_variable_picks_the_paths() -> None:
    assert pytest_argv("TESTS=tests/rpc tests/unit", "PYTEST_ARGS=-x") == [
        "-rs", "-x", "tests/rpc", "tests/unit"]


def test_setup_does_not_fetch_the_guest_kernel() -> None:
    script = (REPO / "scripts" / "install-deps.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert "guest-kernel" not in code
    run = subprocess.run(["make", "-n", "-o", "setup", "run"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert "guest-kernel" not in run
