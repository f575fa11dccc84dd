"""The pieces of metac.testing.guest that need no QEMU: modules, the cpio writer, the job."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from metac.testing import guest


def test_module_closure_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko "
        "kernel/fs/netfs/netfs.ko\n"
        "kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    order = guest.module_closure(tmp_path, ["9pnet-virtio", "9p", "virtio"])
    names = [Path(p).stem for p in order]
    assert sorted(names) == ["9p", "9pnet", "9pnet_virtio", "fscache", "netfs"]
    for before, after in (("9pnet", "9pnet_virtio"), ("netfs", "fscache"), ("fscache", "9p"),
                          ("9pnet", "9p")):
        assert names.index(before) < names.index(after)
    with pytest.raises(guest.GuestUnavailable, match="nbd"):
        guest.module_closure(tmp_path, ["nbd"])


def test_cpio_archive_is_read_back_by_busybox(tmp_path: Path) -> None:
    cpio = guest._Cpio()
    cpio.dir("bin")
    cpio.chardev("console", 5, 1)
    cpio.file("bin/hello", b"hello\n", 0o755)
    cpio.file("odd", b"x" * 5)
    archive = tmp_path / "a.cpio.gz"
    archive.write_bytes(gzip.compress(cpio.finish()))
    listing = subprocess.run(f"gzip -dc {archive} | busybox cpio -tv", shell=True,
                             capture_output=True, text=True, check=True).stdout
    assert [line.split()[-1] for line in listing.splitlines()] == [
        "bin", "console", "bin/hello", "odd"]
    assert listing.splitlines()[1].startswith("crw-------")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(f"gzip -dc {archive} | busybox cpio -id bin/hello odd", shell=True,
                   cwd=out, check=True, capture_output=True)
    assert (out / "bin" / "hello").read_bytes() == b"hello\n"
    assert (out / "odd").read_bytes() == b"xxxxx"


def test_job_script_quotes_everything(tmp_path: Path) -> None:
    script = guest.job_script(["printf", "%s|", "a b", "$HOME", "it's"], str(tmp_path),
                              {"X": "one two", "Y": "$(false)"})
    proc = subprocess.run(["sh", "-c", script + "\n"], capture_output=True, text=True,
                          check=True)
    assert proc.stdout == "a b|$HOME|it's|"
    env_dump = subprocess.run(["sh", "-c", script.replace("exec printf", "echo \"$X/$Y\" #")],
                              capture_output=True, text=True, check=True).stdout
    assert env_dump.strip() == "one two/$(false)"
    with pytest.raises(ValueError):
        guest.job_script(["true"], "/", {"NOT A NAME": "x"})


def test_busybox_is_static() -> None:
    assert guest._is_static_elf(guest.BUSYBOX)
    assert not guest._is_static_elf("/usr/bin/env")

