"""Durable files of a run dir: a file is written whole or not at all, and survives a crash once written.

``atomic_write`` writes a temp file, fsyncs it, renames it over the target and fsyncs the directory
(so the rename itself is on disk); ``fsync_dir`` is that last step for a renamed step folder.
``read_json`` turns a damaged file (empty, cut short, not an object) into ``DamagedFile`` naming the
file and what to do. Knows files only; does not know what they hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class DamagedFile(ValueError):
    """A run-dir file that cannot be read (empty, truncated, not JSON, not an object)."""


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all, fsynced, the directory too."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON at ``path`` (``atomic_write``)."""
    atomic_write(path, json.dumps(data, indent=2, default=str))


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | Path, fix: str) -> dict:
    """The JSON object in ``path``.

    Args:
        fix: what to do when the file is damaged (it ends the error's message).

    Raises:
        DamagedFile: the file is empty, cut short or not a JSON object (named, with ``fix``).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "empty" if not text.strip() else f"not valid JSON ({exc.msg}, line {exc.lineno})"
        raise DamagedFile(f"{path} is damaged: {what}; {fix}") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{path} is damaged: not a JSON object; {fix}")
    return data
