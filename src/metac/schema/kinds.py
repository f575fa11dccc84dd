"""What kind of object a ref names, in words, and which command takes it.

Built from the loaded schemas: a type id (a restore's ``interfaceId``, or the
``requestedTypeId`` of Cap'n Proto's "Requested interface not implemented") maps to the
interface's name."""

from __future__ import annotations

import functools
import re
from typing import Any

from metac import errors
from metac.schema import load

#: Interface name -> the command that takes a ref of it.
USE = {
    "Filesystem": "metac fs mount",
    "File": "metac file cat|put",
    "BlockDevice": "metac block attach",
    "Stream": "metac stream cat|forward|bind",
    "L2Interface": "metac net bind",
    "KernelInterface": "metac net bind",
    "ComputeLauncher": "metac run --on",
    "Process": "metac ps / metac kill",
    "VMLauncher": "metac vm launch --on",
    "VM": "metac vm console|destroy",
    "Holder": "metac ref rm to undo it",
    "WaitableHolder": "metac ref rm to undo it",
}

_TYPE_ID = re.compile(r"requestedTypeId = (\d+)")


@functools.cache
def _interfaces() -> dict[int, Any]:
    """Type id -> schema of every interface of our schema files."""
    found: dict[int, Any] = {}
    for module_name in ("core", "fs", "stream", "network", "compute", "vm", "persistence",
                        "demo"):
        module = getattr(load, module_name, None)
        for value in vars(module).values() if module is not None else ():
            schema = getattr(value, "schema", None)
            node = getattr(schema, "node", None)
            if node is not None and node.which() == "interface":
                found[node.id] = schema
    return found


def name_of(type_id: int) -> str | None:
    schema = _interfaces().get(type_id)
    return None if schema is None else str(schema.node.displayName).rpartition(":")[2]


def _ancestors(schema: Any) -> set[int]:
    ids = {schema.node.id}
    for parent in schema.superclasses:
        ids |= _ancestors(parent)
    return ids


def wrong_kind(name: str, wanted: str | None) -> errors.InvalidArgument:
    use = USE.get(name)
    text = f"this ref is a{'n' if name[0] in 'AEIOU' else ''} {name}"
    if use:
        text += f"; use {use}"
    elif wanted:
        text += f", not a {wanted}"
    return errors.InvalidArgument(text)


def check_kind(type_id: int, interface: Any) -> None:
    """InvalidArgument naming the kind if an object of interface ``type_id`` is not an
    ``interface`` (nothing if the node did not say: older nodes)."""
    schema = _interfaces().get(type_id)
    if not type_id or schema is None:
        return
    wanted = interface.schema.node.id
    if wanted not in _ancestors(schema):
        raise wrong_kind(name_of(type_id) or "?", name_of(wanted))


def from_unimplemented(text: str) -> errors.MetacError | None:
    """Cap'n Proto's "Requested interface not implemented … requestedTypeId = N" as one
    line naming what was asked for (the object's own kind is unknown here)."""
    if "interface not implemented" not in text:
        return None
    m = _TYPE_ID.search(text)
    wanted = name_of(int(m.group(1))) if m else None
    # (Unsupported, as any unimplemented call: the restore-time check above is what
    # tells a user's wrong ref, with its kind.)
    return errors.Unsupported(f"the object is not a {wanted}" if wanted else
                              "the object is of another kind than the call needs")


errors.EXPLAIN_UNIMPLEMENTED.append(from_unimplemented)
