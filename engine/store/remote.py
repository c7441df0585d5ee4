"""Run-dir storage: copy a run dir to a shared filesystem or object store, and back to resume.

Knows pyarrow's filesystems (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://`` or a plain
path) and what of a run dir is worth keeping: everything but unfinished step dirs (``*.tmp``) and
Ray Train's own checkpoint copies (``ray_train/``, ``.ray_train/``: the adapters are kept in
``adapters/``). Does not know what the files mean.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SKIP = ("ray_train", ".ray_train")


def _fs(uri: str):
    import pyarrow.fs as pafs

    if "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    return pafs.FileSystem.from_uri(uri)


def push(run_dir: str | Path, uri: str) -> int:
    """Copy the run dir's kept files to ``uri``; return how many files were copied."""
    import pyarrow.fs as pafs

    fs, base = _fs(uri)
    root = Path(run_dir)
    count = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.endswith(".tmp") or part in SKIP for part in rel.parts):
            continue
        fs.create_dir(f"{base}/{rel.parent.as_posix()}", recursive=True)
        pafs.copy_files(str(path), f"{base}/{rel.as_posix()}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        count += 1
    logger.info("storage: copied %d files of %s to %s", count, root, uri)
    return count


def pull(uri: str, run_dir: str | Path) -> bool:
    """Copy a stored run dir back when the local one has no run yet; True when something was copied."""
    import pyarrow.fs as pafs

    root = Path(run_dir)
    if (root / "run.json").is_file():
        return False
    fs, base = _fs(uri)
    if fs.get_file_info(f"{base}/run.json").type != pafs.FileType.File:
        return False
    local = pafs.LocalFileSystem()
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = Path(info.path).relative_to(Path(base))
        if info.type != pafs.FileType.File or any(part.endswith(".tmp") or part in SKIP for part in rel.parts):
            continue  # Ray Train's checkpoints (the weight step's, under STORAGE/ray_train/) stay there
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(root / rel), source_filesystem=fs, destination_filesystem=local)
    logger.info("storage: resumed %s from %s", root, uri)
    return True
