"""`metac ref ls` shows refs as a tree: children (refs made through a ref) under it."""

from __future__ import annotations

from metac.cli.ref_cli import _tree_order


def test_children_follow_their_parent_indented() -> None:
    rows = [{"id": "a1", "parent": ""}, {"id": "b2", "parent": "a1"},
            {"id": "d4", "parent": ""}, {"id": "c3", "parent": "b2"},
            {"id": "e5", "parent": "a1"}, {"id": "f6", "parent": "gone"}]
    assert [r["id"] for r in _tree_order(rows)] == \
        ["a1", "  b2", "    c3", "  e5", "d4", "f6"]  # an unknown parent: shown at the top
    assert [r["parent"] for r in _tree_order(rows)] == ["", "a1", "b2", "a1", "", "gone"]
