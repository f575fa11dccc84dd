"""Printing: tables, JSON, and errors as one line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from metac.codec.refs import redact_secrets, secrets_in

_SUITE_RE = re.compile(r"[a-z][a-z0-9.-]{0,63}")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Columns in upper case, then one line a row; an empty listing is just the header."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def as_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def redact(text: str) -> str:
    """``text`` without any secret: of a ref in it, or of a ref typed on the command line
    (which a path function may have mangled beyond looking like a ref)."""
    return redact_secrets(text, secrets_in(sys.argv))


def error(category: str, message: str) -> None:
    """The one way the CLI reports an error: one line, secrets redacted."""
    print(f"metac: {category}: {redact(message)}", file=sys.stderr, flush=True)


# --- argument types: a ref typed where a path or a name belongs is refused, not echoed ---


def local_path(text: str) -> str:
    """A path of this machine (``type=`` for argparse). A ref-shaped value is the ref and
    the path given in the wrong order: refused before anything is created or printed."""
    if secrets_in([text]):
        raise argparse.ArgumentTypeError(
            "this is a sturdy ref, not a path of this machine (arguments in the wrong order?)")
    return text


def suite_name(text: str) -> str:
    """A Debian suite or codename (``bookworm``, ``stable``)."""
    if not _SUITE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError("expected a Debian suite name such as bookworm")
    return text


def mirror_url(text: str) -> str:
    """A Debian mirror URL (http, https or file)."""
    if not text.startswith(("http://", "https://", "file:/")) or secrets_in([text]):
        raise argparse.ArgumentTypeError("expected an http://, https:// or file:/ mirror URL")
    return text
