"""metac.fs.resolve: confined walks below a directory fd (no root needed)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from metac import errors
from metac.fs.resolve import Directory, Entry, join, parse_name
from metac.testing.fstree import make_export_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """export/ (a/b/file, link-out -> ../outside, file-link -> ../outside/secret) and outside/."""
    export = make_export_tree(tmp_path)
    (export / "a" / "up").symlink_to("..")
    return export


def open_dir(path: Path) -> Directory:
    return Directory.open_absolute(str(path))


@pytest.mark.parametrize("name", ["..", "a/..", "a/../..", "/etc", "/", "a\0b", "a/b/../../.."])
def test_bad_names_are_rejected(tree: Path, name: str) -> None:
    d = open_dir(tree)
    with pytest.raises(errors.InvalidArgument):
        d.subdir(parse_name(name))
    with pytest.raises(errors.InvalidArgument):
        Entry.resolve(d, name)


def test_walks_down_and_keeps_the_path(tree: Path) -> None:
    d = open_dir(tree)
    sub = d.subdir(parse_name("a//./b/"))
    assert sub.path == str(tree / "a" / "b")
    entry = Entry.resolve(d, "a/b/file")
    fd = entry.open_regular(os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"inside"
    finally:
        os.close(fd)
    assert entry.path == str(tree / "a" / "b" / "file")
    assert join("/", ("x", "y")) == "/x/y"


@pytest.mark.parametrize("name", ["link-out", "abs-out", "link-out/secret", "a/up",
                                  "a/up/link-out"])
def test_symlinked_directories_are_not_followed(tree: Path, name: str) -> None:
    d = open_dir(tree)
    with pytest.raises(errors.PermissionDenied):
        d.subdir(parse_name(name))


@pytest.mark.parametrize("name", ["file-link", "link-out/secret", "abs-out/secret"])
def test_symlinked_files_are_not_opened(tree: Path, name: str) -> None:
    d = open_dir(tree)
    with pytest.raises((errors.PermissionDenied, errors.FailedPrecondition)):
        entry = Entry.resolve(d, name)
        os.close(entry.open_regular(os.O_RDONLY))


def test_a_file_need_not_exist_but_its_directory_must(tree: Path) -> None:
    d = open_dir(tree)
    entry = Entry.resolve(d, "a/new-file")
    assert entry.lstat() is None
    with pytest.raises(errors.NotFound):
        entry.open_regular(os.O_RDONLY)
    with pytest.raises(errors.NotFound):
        Entry.resolve(d, "missing/file")


def test_creating_through_a_symlink_is_refused(tree: Path) -> None:
    d = open_dir(tree)
    entry = Entry.resolve(d, "file-link")
    with pytest.raises(errors.PermissionDenied):
        entry.open_regular(os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    assert (tree.parent / "outside" / "secret").read_text() == "SECRET"


def test_a_fifo_is_not_a_regular_file(tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    entry = Entry.resolve(open_dir(tree), "fifo")
    with pytest.raises(errors.FailedPrecondition):
        entry.open_regular(os.O_RDONLY)


def test_the_type_is_checked_before_anything_is_opened(tree: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO (or a device node) is never opened for real: opening has side effects (a
    writer blocked on the FIFO would be released; a tape would rewind)."""
    os.mkfifo(tree / "fifo")
    writer_opened = threading.Event()

    def writer() -> None:
        fd = os.open(tree / "fifo", os.O_WRONLY)  # blocks until somebody opens for reading
        writer_opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    opens: list[int] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        opens.append(flags)
        return real_open(path, flags, *args, **kwargs)

    entry = Entry.resolve(open_dir(tree), "fifo")
    monkeypatch.setattr(os, "open", spy)
    with pytest.raises(errors.FailedPrecondition, match="not a regular file"):
        entry.open_regular(os.O_RDONLY)
    monkeypatch.undo()
    assert opens and all(flags & os.O_PATH for flags in opens)
    assert not writer_opened.is_set()
    os.close(os.open(tree / "fifo", os.O_RDONLY))  # release the writer
    thread.join(30)
    assert writer_opened.is_set()


def test_open_regular_reads_creates_and_truncates_the_checked_file(tree: Path) -> None:
    d = open_dir(tree)
    existing = Entry.resolve(d, "a/b/file")
    with os.fdopen(existing.open_regular(os.O_RDONLY), "rb") as f:
        assert f.read()
    new = Entry.resolve(d, "a/made")
    fd = new.open_regular(os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o600)
    os.write(fd, b"0123456789")
    os.close(fd)
    assert (tree / "a" / "made").stat().st_mode & 0o777 == 0o600
    os.close(new.open_regular(os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
    assert (tree / "a" / "made").read_bytes() == b""
    fd = new.open_regular(os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, b"x")
    os.close(fd)
    assert (tree / "a" / "made").read_bytes() == b"x"


def test_a_symlinked_path_to_the_export_itself_is_refused(tree: Path) -> None:
    alias = tree.parent / "alias"
    alias.symlink_to(tree)
    with pytest.raises(errors.PermissionDenied):
        open_dir(alias)


def test_symlink_swapped_in_during_walks_never_leads_out(tree: Path) -> None:
    """A component flips between a directory and a symlink to outside while we walk."""
    outside = tree.parent / "outside"
    (outside / "b").mkdir()
    (outside / "b" / "file").write_text("SECRET")
    flip = tree / "a"
    parked = tree / "a-parked"
    stop = threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            os.rename(flip, parked)
            os.symlink(str(outside), flip)
            os.unlink(flip)
            os.rename(parked, flip)
            time.sleep(0.0002)  # leave windows in which the walk can succeed too

    d = open_dir(tree)
    thread = threading.Thread(target=flipper)
    thread.start()
    seen = {"inside": 0, "refused": 0}
    try:
        deadline = time.monotonic() + 20
        while min(seen.values()) < 20 and time.monotonic() < deadline:
            try:
                fd = Entry.resolve(d, "a/b/file").open_regular(os.O_RDONLY)
            except (errors.PermissionDenied, errors.NotFound):
                seen["refused"] += 1
                continue
            try:
                data = os.read(fd, 100)
            finally:
                os.close(fd)
            assert data == b"inside", "read a file outside the export"
            seen["inside"] += 1
    finally:
        stop.set()
        thread.join()
    assert seen["inside"] and seen["refused"], seen


def test_a_missing_mount_point_is_not_found_with_the_whole_path(tmp_path: Path) -> None:
    from metac.fs.service import check_mount_point

    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(errors.NotFound, match=f"^{missing}: no such directory$"):
        check_mount_point(str(missing))
    export = Directory.open_absolute(str(tmp_path))
    try:  # below an export only the client's name: never where the export lives
        with pytest.raises(errors.NotFound, match="^no: no such directory$"):
            export.subdir(("no", "such"))
    finally:
        export.close()
