"""Printing: tables, JSON, and errors as one line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
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


# --- telling the user about waits and progress ---


def progress_enabled() -> bool:
    """Whether waits and progress are told on stderr: when it is a terminal, unless
    ``METAC_PROGRESS`` is ``always`` (logs, scripts that want them) or ``never``."""
    mode = os.environ.get("METAC_PROGRESS", "auto")
    if mode in ("always", "never"):
        return mode == "always"
    return sys.stderr.isatty()


def slow_notice(what: str) -> None:
    """One line about a wait that has lasted a second already (core.client.on_slow)."""
    if progress_enabled():
        print(redact(what), file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def waiting(what: str) -> Any:
    """Tell about a long call that reports no progress of its own: after a second
    ``what … N s`` on a terminal (updated each second), one line otherwise."""
    if not progress_enabled():
        yield
        return
    from metac.core import client

    what = redact(what)
    tty = sys.stderr.isatty()
    start = time.monotonic()
    shown = False

    async def tick() -> None:
        nonlocal shown
        await asyncio.sleep(client.SLOW_AFTER)
        while True:
            shown = True
            if not tty:
                print(f"{what} …", file=sys.stderr, flush=True)
                return
            sys.stderr.write(f"\r{what} … {time.monotonic() - start:.0f} s ")
            sys.stderr.flush()
            await asyncio.sleep(1.0)

    task = asyncio.get_running_loop().create_task(tick(), name=f"waiting: {what}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if shown and tty:
            sys.stderr.write(f"\r{what}: {time.monotonic() - start:.0f} s\n")
            sys.stderr.flush()


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
