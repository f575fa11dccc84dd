"""Validation of names inside a capability-confined directory.

A filesystem capability grants one directory and everything below it. Names that reach
it from the CLI or over RPC are split here into components, each of which a resolver
can open one at a time (``openat`` with ``O_NOFOLLOW``) without ever leaving the
directory. This module is pure: it looks at text only, never at the filesystem.

Rules for ``split_relative`` (names that may include slashes):

* ``""`` and ``"."`` mean the directory itself and give ``()``.
* Repeated slashes, a trailing slash and ``"."`` components are dropped:
  ``"a//./b/"`` gives ``("a", "b")``.
* Absolute names (leading ``/``), ``".."`` components and NUL characters are rejected,
  as are components longer than ``MAX_COMPONENT_BYTES`` and names longer than
  ``MAX_PATH_BYTES`` (both counted in UTF-8 bytes, undecodable bytes held as
  ``surrogateescape`` counting as one byte each).

``PathError`` is the only error raised; its messages do not quote the name.
"""

from __future__ import annotations

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096


class PathError(ValueError):
    """A name that is not a valid relative path or path component."""


def split_relative(name: str) -> tuple[str, ...]:
    """Split a relative name into validated components (see the module docstring)."""
    if not isinstance(name, str):
        raise PathError(f"path must be a str, not {type(name).__name__}")
    if _byte_length(name) > MAX_PATH_BYTES:
        raise PathError(f"path is longer than {MAX_PATH_BYTES} bytes")
    if name.startswith("/"):
        raise PathError("path must be relative (it starts with '/')")
    if "\0" in name:
        raise PathError("path must not contain NUL")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    for part in parts:
        validate_component(part)
    return parts


def validate_component(component: str) -> str:
    """Check one path component and return it unchanged.

    Rejects ``""``, ``"."``, ``".."``, anything containing ``/`` or NUL, and components
    longer than ``MAX_COMPONENT_BYTES``.
    """
    if not isinstance(component, str):
        raise PathError(f"path component must be a str, not {type(component).__name__}")
    if component in ("", ".", ".."):
        raise PathError(f"path component must not be {component!r}")
    if "/" in component:
        raise PathError("path component must not contain '/'")
    if "\0" in component:
        raise PathError("path component must not contain NUL")
    if _byte_length(component) > MAX_COMPONENT_BYTES:
        raise PathError(f"path component is longer than {MAX_COMPONENT_BYTES} bytes")
    return component


def _byte_length(text: str) -> int:
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise PathError("path contains a lone surrogate (not valid UTF-8)") from None
