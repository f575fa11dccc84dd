"""metac.codec.mountinfo: the one mountinfo parser (pure, fuzzed)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from metac.codec.mountinfo import MountEntry, escape, parse_mountinfo, unescape

TEXT = ("22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
        "40 22 0:35 /sub /mnt/with\\040space rw master:1 - fuse.sshfs metac:m1 rw\n"
        "not a mount line\n"
        "41 22 0:36 / /x rw - tmpfs\n")

paths = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                min_size=1, max_size=40).map(lambda t: "/" + t)


def test_fields_and_escapes() -> None:
    assert parse_mountinfo(TEXT) == [
        MountEntry(22, "/", "/sys", "sysfs", "sysfs"),
        MountEntry(40, "/sub", "/mnt/with space", "fuse.sshfs", "metac:m1"),
    ]


def test_escapes_are_only_octal_triples() -> None:
    assert unescape("a\\040b\\134c") == "a b\\c"
    assert unescape("\\999 \\04 end\\") == "\\999 \\04 end\\"


@given(paths, paths, st.text(st.sampled_from("abcdef:.-_/"), min_size=1, max_size=12),
       st.integers(0, 2**31))
def test_what_the_kernel_writes_is_read_back(root: str, point: str, source: str,
                                             mount_id: int) -> None:
    line = f"{mount_id} 1 0:9 {escape(root)} {escape(point)} rw shared:1 - ext4 " \
           f"{escape(source)} rw\n"
    assert parse_mountinfo(line) == [MountEntry(mount_id, root, point, "ext4", source)]


@given(st.text(max_size=300))
def test_any_text_parses_without_error(text: str) -> None:
    for entry in parse_mountinfo(text):
        assert isinstance(entry.mount_id, int)
