"""``/proc/<pid>/mountinfo`` lines parsed (pure): what is mounted where.

Fields are separated by spaces; the optional fields end at a lone ``-``. Spaces,
tabs, newlines and backslashes inside a path or source are written as octal
escapes (``\\040``), which ``unescape`` turns back. Lines that do not have the
shape are skipped (the kernel writes none; a test's text may).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Where the kernel shows this process's mounts (callers read it; parsing is here).
PATH = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    root: str
    mountpoint: str
    fstype: str
    source: str


def unescape(text: str) -> str:
    """A mountinfo field with its ``\\ooo`` octal escapes decoded."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and _octal(text[i + 1:i + 4]):
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _octal(digits: str) -> bool:
    return len(digits) == 3 and all(c in "01234567" for c in digits)


def escape(text: str) -> str:
    """What the kernel writes for a path: space, tab, newline and backslash escaped."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The mounts of a mountinfo text, in mount order (a later one hides an earlier one
    at the same mount point)."""
    entries = []
    # Only "\n" ends a line and only " " separates fields: other characters str.split
    # and splitlines() would break at (\x1c-\x1f, \x85, \u2028...) can be in a path.
    for line in text.split("\n"):
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(" "), right.split(" ")
        if not sep or len(fields) < 5 or len(tail) < 2 or not fields[0].isdigit():
            continue
        entries.append(MountEntry(int(fields[0]), unescape(fields[3]), unescape(fields[4]),
                                  tail[0], unescape(tail[1])))
    return entries
