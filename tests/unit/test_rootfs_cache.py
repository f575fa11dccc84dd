"""metac.testing.rootfs_cache: one build per machine, under a lock; copies for tests."""

from __future__ import annotations

import sys
import threading

from metac.testing import rootfs_cache

FAKE_BUILD = """
import os, sys, time
scratch = sys.argv[-1]
with open(os.path.join(os.path.dirname(scratch), "builds"), "a") as f:
    f.write("x")
time.sleep(0.5)
os.makedirs(os.path.join(scratch, "etc"))
with open(os.path.join(scratch, "etc", "debian_version"), "w") as f:
    f.write("12\\n")
"""


def test_concurrent_callers_build_once_and_copies_are_private(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("METAC_ROOTFS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rootfs_cache, "metac_argv", lambda: [sys.executable, "-c", FAKE_BUILD])
    stale = tmp_path / "cache" / "rootfs-bookworm-minbase.building"
    stale.mkdir(parents=True)  # what a build killed half-way leaves
    (stale / "junk").write_text("half")
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(rootfs_cache.cached_debian_root()))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    final = tmp_path / "cache" / "rootfs-bookworm-minbase"
    assert got == [final] * 3
    assert (tmp_path / "cache" / "builds").read_text() == "x"
    assert not stale.exists() and not (final / "junk").exists()
    copy = rootfs_cache.private_debian_root(tmp_path / "mine")
    (copy / "etc" / "debian_version").write_text("changed\n")
    assert (final / "etc" / "debian_version").read_text() == "12\n"
