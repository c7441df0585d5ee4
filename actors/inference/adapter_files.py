"""Adapter files that travel through Ray's object store instead of a path every node must see.

``pack(path)`` reads a peft adapter dir (every file under it, by relative path) into a dict the pool
``ray.put``s once; ``materialize(files, source)`` writes that dict on the node that needs it, once,
into ``local_root()/<name>-<hash>/`` (the hash covers the source path and the content, so a
different adapter never lands in the same dir), atomically (a temp dir renamed into place), and
returns the dir; the same call again returns it at once. Replicas load their own copy, so one on a
node that cannot see the driver's run dir serves an adapter exactly as one on the driver's node.
Knows files and hashes; does not know Ray, vLLM or peft.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

ENV_ROOT = "TANDEM_ADAPTER_CACHE"  # where replicas keep their copies (default: a dir in the temp dir)


def pack(path: str | Path) -> dict[str, bytes]:
    """Every file under the adapter dir ``path``, by relative path.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter dir {root} does not exist (or is not a directory)")
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def local_root() -> Path:
    """Where this node keeps materialized adapters: ``$TANDEM_ADAPTER_CACHE`` or ``<tmp>/tandem-adapters``."""
    return Path(os.environ.get(ENV_ROOT) or Path(tempfile.gettempdir()) / "tandem-adapters")


def materialize(files: dict[str, bytes], source: str | Path) -> Path:
    """The adapter's files written on this node (once per source and content); its dir.

    Example:
        >>> local = materialize(pack("runs/x/adapters/a"), "runs/x/adapters/a")  # doctest: +SKIP
    """
    digest = hashlib.sha256(str(source).encode())
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(files[name])
    target = local_root() / f"{Path(source).name[-60:]}-{digest.hexdigest()[:12]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        for name, data in files.items():
            out = staging / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # not another replica of this node that got there first
            raise
    return target
