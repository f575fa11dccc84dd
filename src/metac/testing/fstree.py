"""A small directory tree with symlinks pointing out of it, for confinement tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_export_tree"]


def make_export_tree(tmp_path: Path) -> Path:
    """Build ``export/`` and ``outside/`` below ``tmp_path``; return ``export``.

    ``outside/secret`` holds ``SECRET``; ``export/a/b/file`` holds ``inside``;
    ``export/link-out -> ../outside``, ``export/abs-out -> <abs>/outside`` and
    ``export/file-link -> ../outside/secret`` lead out of the export.
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("SECRET")
    export = tmp_path / "export"
    (export / "a" / "b").mkdir(parents=True)
    (export / "a" / "b" / "file").write_text("inside")
    (export / "link-out").symlink_to("../outside")
    (export / "abs-out").symlink_to(str(outside))
    (export / "file-link").symlink_to("../outside/secret")
    return export
