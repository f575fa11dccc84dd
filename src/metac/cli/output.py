"""Printing: tables, JSON, and errors as one line."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from metac.codec.refs import redact_secrets, secrets_in


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        return
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
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
