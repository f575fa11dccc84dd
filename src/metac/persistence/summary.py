"""One line saying what a ref is, from its object's stored category and data.

Only the fields named here are shown (a path, an endpoint, an interface, an id): stored
data may hold sealed refs (a mount's target) that must never be printed."""

from __future__ import annotations

import json
from typing import Any

from metac.codec.refs import redact_secrets, show_endpoint

MAX_FIELD = 200


def _text(value: Any) -> str:
    """A stored value as printable text, cut short."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= MAX_FIELD else text[:MAX_FIELD - 1] + "…"


def _read_only(data: dict[str, Any]) -> str:
    return " (read-only)" if data.get("readOnly") else ""


def _describe(service: str, category: str, data: dict[str, Any]) -> str:
    if category == "tcp":
        return "tcp:" + _text(show_endpoint(str(data.get("host", "?")), int(data.get("port", 0))))
    if category == "unix":
        return f"unix:{_text(data.get('path', '?'))}"
    if category in ("filesystem", "file", "block"):
        what = {"filesystem": "directory", "file": "file", "block": "disk image"}[category]
        return f"{what} {_text(data.get('path', '?'))}{_read_only(data)}"
    if category in ("l2iface", "kiface"):
        dev = data.get("dev") if isinstance(data.get("dev"), dict) else {}
        return f"interface {_text(dev.get('name', '?'))}"
    if category == "launcher":
        return f"{service} launcher"
    if category in ("process", "env", "vm"):
        what = {"process": "process", "env": "environment", "vm": "VM"}[category]
        return f"{what} {_text(data.get('id', '?'))}"
    if category == "serial":
        return f"VM {_text(data.get('vm', '?'))} serial port {_text(data.get('port', '?'))}"
    if category == "mount":
        return f"mount at {_text(data.get('path', '?'))}{_read_only(data)}"
    if category == "attachment":
        at = data.get("mountPath")
        return "block attachment" + (f" at {_text(at)}" if at else "") + _read_only(data)
    if category == "stream":
        return f"{_text(data.get('protocol', '?'))} stream"
    if category == "bind":
        return f"{service} bind"
    if category == "namespace":
        return f"{service} namespace"
    return _text(category)


def summarize(service: str, category: str, stored: bytes, parent: str = "") -> str:
    """What the ref is (``derived from <id>`` where it was made through another ref)."""
    try:
        data = json.loads(stored or b"{}")
    except ValueError:
        data = {}
    try:
        text = _describe(service, category, data if isinstance(data, dict) else {})
    except (TypeError, ValueError):
        text = _text(category)
    if parent:
        text += f", derived from {parent}"
    return redact_secrets(text)
