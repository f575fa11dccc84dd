"""schema.kinds (type ids as our interface names) and persistence.summary (what a ref is)."""

from __future__ import annotations

import json

import pytest

from metac import errors
from metac.persistence.summary import summarize
from metac.schema import kinds
from metac.schema.load import fs, stream


def test_type_ids_map_to_our_names_and_commands() -> None:
    assert kinds.name_of(fs.Filesystem.schema.node.id) == "Filesystem"
    kinds.check_kind(fs.Filesystem.schema.node.id, fs.Filesystem)
    kinds.check_kind(0, fs.Filesystem)  # a node that does not say: no check
    with pytest.raises(errors.InvalidArgument, match=r"^this ref is a Stream; use metac stream"):
        kinds.check_kind(stream.Stream.schema.node.id, fs.Filesystem)
    text = ("remote exception: Requested interface not implemented. interfaceName = "
            f"x.capnp:Y; requestedTypeId = {fs.File.schema.node.id}")
    explained = errors.from_kj(Exception(text))
    assert isinstance(explained, errors.Unsupported) and str(explained) == \
        "the object is not a File"


def test_summaries_show_whitelisted_fields_only() -> None:
    def data(d: dict) -> bytes:
        return json.dumps(d).encode()

    assert summarize("stream", "tcp", data({"host": "::1", "port": 22})) == "tcp:[::1]:22"
    assert summarize("fs", "filesystem", data({"path": "/srv", "readOnly": True}),
                     "abc123") == "directory /srv (read-only), derived from abc123"
    secret = "ref://10.0.0.1/fs/" + "A" * 32
    shown = summarize("fs", "mount", data({"path": "/mnt/x", "target": secret, "source": secret}))
    assert shown == "mount at /mnt/x" and "AAAA" not in shown
    assert summarize("net", "l2iface", data({"dev": {"name": "eth1\nx"}})) == "interface eth1?x"
    assert summarize("x", "odd", b"not json") == "odd"
