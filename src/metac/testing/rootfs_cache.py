"""A Debian minbase root filesystem built once per machine, and private copies of it for tests.

``cached_debian_root()`` returns ``/var/cache/metac/rootfs-<suite>-minbase``
(``METAC_ROOTFS_CACHE`` overrides the directory), building it the first time with
``metac compute rootfs --debootstrap SUITE`` (the command a user types; it needs a
Debian mirror). Concurrent test runs take an exclusive lock on
``rootfs-<suite>-minbase.lock`` while they check or build, and a build goes to a
scratch directory that is renamed into place only when complete, so a root that
exists is whole. Tests never touch the cache: ``private_debian_root(dest)`` copies
it (``cp -a``, keeping owners, modes, hard links and symlinks).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from metac.testing.nodes import metac_argv, python_env

DEFAULT_SUITE = "bookworm"
BUILD_TIMEOUT = 30 * 60  # debootstrap downloads ~40 MB and unpacks ~200 MB


def cache_dir() -> Path:
    return Path(os.environ.get("METAC_ROOTFS_CACHE", "/var/cache/metac"))


def cached_debian_root(suite: str = DEFAULT_SUITE, mirror: str | None = None) -> Path:
    """The cached minbase root of ``suite``, built (under a lock) if missing."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    final = base / f"rootfs-{suite}-minbase"
    with open(base / f"rootfs-{suite}-minbase.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        scratch = base / f"rootfs-{suite}-minbase.building"
        if scratch.exists():  # a build that died half-way (we hold the lock)
            shutil.rmtree(scratch)
        argv = [*metac_argv(), "compute", "rootfs", "--debootstrap", suite,
                *(["--mirror", mirror] if mirror else []), str(scratch)]
        proc = subprocess.run(argv, env=python_env(), capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT, check=False)
        if proc.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(f"building the cached Debian root failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        os.rename(scratch, final)
        print(f"built {final}", file=sys.stderr)
        return final


def private_debian_root(dest: Path, suite: str = DEFAULT_SUITE) -> Path:
    """A copy of the cached root at ``dest`` (which must not exist), for one test to modify."""
    source = cached_debian_root(suite)
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(dest)], check=True,
                   timeout=600)
    return dest
