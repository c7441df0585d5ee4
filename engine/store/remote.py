"""Run-dir storage: copy a run dir to a shared filesystem or object store, and back to resume.

Knows pyarrow's filesystems (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://`` or a plain
path), what of a run dir is worth keeping (everything but unfinished step dirs, ``*.tmp``, Ray
Train's own checkpoint copies, ``ray_train/`` and ``.ray_train/`` — the adapters are kept in
``adapters/`` — and the run dir's lock, which names this machine's process) and the order that
keeps a copy cut halfway consistent: adapters first, then each
step's files, then the ``step.json`` that names them, then the run's records, ``run.json`` last —
a copy that has a record has what it names. On a filesystem a file lands whole (a temp name, then a
rename); an object store writes an object whole by itself. ``pull`` brings a stale local copy up to
date (files missing here, or of another size and newer there), never replaces a newer local file,
and refuses keys that would land outside the run dir. Does not know what the files mean, nor lock
the storage (one run per URI is the user's rule; the run dir's own lock is local).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

SKIP = ("ray_train", ".ray_train", "run.lock", "run.lock.takeover")  # the lock: engine.store.lock.LOCK
RECORDS = ("step.json",)  # a step's record: copied after its folder's other files


def _fs(uri: str):
    import pyarrow.fs as pafs

    if "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    return pafs.FileSystem.from_uri(uri)


def kept(rel: PurePosixPath) -> bool:
    """Whether a run-dir file is worth copying."""
    return not any(part.endswith(".tmp") or part in SKIP for part in rel.parts)


def rank(rel: PurePosixPath) -> tuple[int, str]:
    """The copy order: adapters, step files, step records, the run's other records, ``run.json`` last."""
    if rel.parts[0] == "adapters":
        order = 0
    elif len(rel.parts) > 1:
        order = 2 if rel.name in RECORDS and len(rel.parts) == 2 else 1
    else:
        order = 4 if rel.name == "run.json" else 3
    return order, rel.as_posix()


def _key(path: str, base: str) -> PurePosixPath:
    """A stored file's path relative to the run dir's base; one that leaves it is refused."""
    rel = PurePosixPath(path).relative_to(PurePosixPath(base))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"storage: {path!r} is not inside {base!r}; refusing to copy it into the run dir")
    return rel


def _copy(src: str, src_fs, dst: str, dst_fs) -> None:
    """One file, landing whole: on a filesystem through a temp name and a rename."""
    import pyarrow.fs as pafs

    if isinstance(dst_fs, pafs.LocalFileSystem):
        part = f"{dst}.part-{uuid.uuid4().hex[:8]}"
        pafs.copy_files(src, part, source_filesystem=src_fs, destination_filesystem=dst_fs)
        os.replace(part, dst)
    else:
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def push(run_dir: str | Path, uri: str) -> int:
    """Copy the run dir's kept files to ``uri`` in dependency order, but those stored already and unchanged
    here since (a run pushes at its end and when it stops; a resumed run does not upload its adapters
    again); return how many were copied."""
    import pyarrow.fs as pafs

    fs, base = _fs(uri)
    root = Path(run_dir)
    files = []
    for path in root.rglob("*"):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if path.is_symlink():
            logger.warning("storage: %s is a symlink, not copied", path)
        elif path.is_file() and kept(rel):
            files.append(rel)
    there = {_key(info.path, base): info for info in fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                                                        allow_not_found=True))
             if info.type == pafs.FileType.File}
    local = pafs.LocalFileSystem()
    copied = 0
    for rel in sorted(files, key=rank):
        if _current(there.get(rel), root / rel):
            continue  # stored already, and not changed here since (steps and adapters never change)
        fs.create_dir(f"{base}/{rel.parent.as_posix()}", recursive=True)
        _copy(str(root / rel), local, f"{base}/{rel.as_posix()}", fs)
        copied += 1
    logger.info("storage: copied %d of %d files of %s to %s (the rest were stored already)", copied, len(files),
                root, uri)
    return copied


def _current(stored, here: Path) -> bool:
    """Whether the stored copy of ``here`` is up to date: the same size, and stored after ``here`` last changed."""
    if stored is None or stored.size != here.stat().st_size or stored.mtime is None:
        return False
    return stored.mtime.timestamp() >= here.stat().st_mtime


def pull(uri: str, run_dir: str | Path) -> bool:
    """Bring the local run dir up to date with a stored run (see the module docstring); True when a file
    was copied, False when nothing is stored or the local copy is current."""
    import pyarrow.fs as pafs

    fs, base = _fs(uri)
    if fs.get_file_info(f"{base}/run.json").type != pafs.FileType.File:
        return False
    root = Path(run_dir)
    stored = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.File:
            rel = _key(info.path, base)
            if kept(rel):  # Ray Train's checkpoints (the weight step's, under STORAGE/ray_train/) stay there
                stored[rel] = info
    local = pafs.LocalFileSystem()
    copied = 0
    for rel in sorted(stored, key=rank):
        info, here = stored[rel], root / rel
        if here.is_file() and (here.stat().st_size == info.size or (
                info.mtime is not None and here.stat().st_mtime >= info.mtime.timestamp())):
            continue  # the same (steps and adapters never change once written), or newer here
        here.parent.mkdir(parents=True, exist_ok=True)
        _copy(info.path, fs, str(here), local)
        copied += 1
    if copied:
        logger.info("storage: %d file(s) of %s brought %s up to date", copied, uri, root)
    return copied > 0
