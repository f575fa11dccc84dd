"""The fs service's kernel data paths (9p ``trans=fd`` mounts, NBD block attach), for real.

This host's kernel has neither client, so the tests in tests/guest/inner run in a
QEMU guest that boots Debian 12's stock kernel over this host's root filesystem
(``metac.testing.guest``, docs/testing-guest.md). The guest boots once for the
module; this test then checks from its JUnit report that every inner test
collected here ran there and passed, with none skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from metac.testing.guest import GUEST_OUT, GuestResult, run_in_guest

REPO = Path(__file__).resolve().parents[2]
INNER = "tests/guest/inner"
GUEST_TIMEOUT = 1200.0  # about 4 minutes on 2 CPUs; TCG is slow, and so is a loaded CI
INNER_ENV = {"METAC_GUEST_INNER": "1"}  # tests/guest/conftest.py: collect inner/ at all

# The module fixture boots the guest and runs everything: more than pytest's
# default per-test timeout (pyproject.toml).
pytestmark = pytest.mark.timeout(GUEST_TIMEOUT + 300)

#: Kernel complaints on the serial console that fail the run even if the tests passed.
KERNEL_TROUBLE = re.compile(r"\bBUG:|\bOops\b|general protection fault|WARNING: CPU:|"
                            r"Call Trace:|hung_task|blocked for more than")


@pytest.fixture(scope="module")
def guest_run() -> GuestResult:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "--basetemp=/tmp/pytest-guest", "-q", "-rA", "--durations=0",
            "-o", "junit_family=xunit2", f"--junitxml={GUEST_OUT}/junit.xml", INNER]
    result = run_in_guest(argv, cwd=str(REPO), env=INNER_ENV, timeout=GUEST_TIMEOUT)
    print(f"guest: boot {result.boot_seconds:.1f} s, inner pytest {result.run_seconds:.1f} s, "
          f"exit {result.returncode}")
    return result


def collected_here() -> set[str]:
    """The inner tests' node ids, as pytest collects them on this host (no run)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--collect-only", "-q", INNER], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, **INNER_ENV})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def junit_results(xml: bytes) -> dict[str, tuple[str, str]]:
    """node id -> (outcome, message) from a pytest JUnit (xunit2) report."""
    results: dict[str, tuple[str, str]] = {}
    for case in ET.fromstring(xml).iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        node_id = f"{module}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = tag
                message = (el.get("message") or "") + "\n" + (el.text or "")
                break
        results[node_id] = (outcome, message)
    return results


def test_every_inner_test_ran_in_the_guest_and_passed(guest_run: GuestResult) -> None:
    assert "junit.xml" in guest_run.files, (
        f"no JUnit report from the guest (exit {guest_run.returncode}); output tail:\n"
        + "\n".join(guest_run.output.splitlines()[-60:]))
    results = junit_results(guest_run.files["junit.xml"])
    expected = collected_here()
    assert {i.split("::")[0] for i in expected} == {
        f"{INNER}/test_guest_9p.py", f"{INNER}/test_guest_nbd.py"}, expected
    assert set(results) == expected, f"ran {sorted(results)}, collected {sorted(expected)}"
    bad = {i: r for i, r in results.items() if r[0] != "passed"}
    assert not bad, "\n\n".join(f"{i}: {o}\n{m[-3000:]}" for i, (o, m) in bad.items()) + \
        "\n--- output tail ---\n" + "\n".join(guest_run.output.splitlines()[-80:])
    assert guest_run.returncode == 0, guest_run.output[-5000:]
    assert re.search(rf"\b{len(expected)} passed(, \d+ warnings?)? in ", guest_run.output), \
        guest_run.output[-2000:]  # and so nothing skipped, deselected or failed


def test_guest_kernel_did_not_complain(guest_run: GuestResult) -> None:
    trouble = [line for line in guest_run.console.splitlines() if KERNEL_TROUBLE.search(line)]
    assert not trouble, "\n".join(trouble[:40])
