"""One writer per run dir: ``hold(run_dir)`` takes ``run.lock`` before a run writes anything.

The lock file names its holder (host, pid, start time, a random token) and is created with
``O_CREAT | O_EXCL``, so of two runs started on one run dir (a retried RayJob, a second submit on the
same volume) exactly one gets it; the other is refused with ``RunDirBusy`` naming the holder. A lock
whose holder is gone — same host, and its pid is not running or was reused by a later process — is
taken over (one taker at a time: a takeover claims ``run.lock.takeover`` with ``O_EXCL`` first), with
a warning. A holder on another host cannot be checked from here: it is refused, and the message says
to delete the file if that machine's run is gone. The lock is released (the file removed, if still
ours) when the block ends, also on errors and stops. It guards the local run dir only: a ``storage:``
copy is not locked (two runs on two machines pulling the same URI are not kept apart). Knows files and
processes; does not know what a run writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import psutil

logger = logging.getLogger(__name__)

LOCK = "run.lock"
TAKEOVER_STALE_S = 60.0  # a takeover claim older than this was left by a taker that died
FRESH_S = 5.0  # an unreadable lock file younger than this is still being written


class RunDirBusy(RuntimeError):
    """Another run holds the run dir."""


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[dict]:
    """Hold ``run_dir``'s lock for the block; yields the holder record written to ``run.lock``.

    Raises:
        RunDirBusy: a live run holds it (or a run on another host, which cannot be checked).

    Example:
        >>> with hold("runs/iris-smollm2"):  # doctest: +SKIP
        ...     run_the_steps()
    """
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": uuid.uuid4().hex}
    _take(path, me)
    try:
        yield me
    finally:
        holder = _read(path)
        if holder is not None and holder.get("token") == me["token"]:
            path.unlink(missing_ok=True)


def holder_of(run_dir: str | Path) -> dict | None:
    """The record of the run that holds ``run_dir`` (None: nobody, or an unreadable lock file)."""
    return _read(Path(run_dir) / LOCK)


def live_holder(run_dir: str | Path) -> dict | None:
    """The record of a run that holds ``run_dir`` and is not known to be gone (another host's counts as live);
    None when the run dir is free or its holder is gone (``hold`` would take it over)."""
    holder = holder_of(run_dir)
    return holder if holder is not None and not _gone(holder) else None


def _take(path: Path, me: dict) -> None:
    if _create(path, me):
        return
    holder = _read(path)
    if holder is not None and not _gone(holder):
        raise RunDirBusy(_busy(path, holder))
    if holder is None and _age(path) < FRESH_S:  # being written by its creator right now
        raise RunDirBusy(_busy(path, {}))
    claim = path.with_name(LOCK + ".takeover")
    if claim.exists() and time.time() - claim.stat().st_mtime > TAKEOVER_STALE_S:
        claim.unlink(missing_ok=True)
    if not _create(claim, me):
        raise RunDirBusy(f"run dir {path.parent} is being taken over by another run right now ({claim})")
    try:
        current = _read(path)
        if current is not None and current != holder and not _gone(current):  # someone took it meanwhile
            raise RunDirBusy(_busy(path, current))
        path.unlink(missing_ok=True)
        if not _create(path, me):
            raise RunDirBusy(_busy(path, _read(path) or {}))
    finally:
        claim.unlink(missing_ok=True)
    logger.warning("run dir %s: took over the lock of a run that is gone (%s)", path.parent, _describe(holder))


def _create(path: Path, record: dict) -> bool:
    """Write ``record`` to ``path`` only if it does not exist (atomic), fsynced; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _gone(holder: dict) -> bool:
    """Whether the holder's process is certainly gone: on this host, its pid not running, or running
    but started after the lock was taken (the pid was reused)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        proc = psutil.Process(int(holder["pid"]))
        return proc.create_time() > float(holder["started"]) + 1.0 or proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return True


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unreadable lock file"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {started}"


def _busy(path: Path, holder: dict) -> str:
    return (f"run dir {path.parent} is in use by another run ({_describe(holder)}): wait for it to end or use "
            f"another run dir; if that run is gone (e.g. its machine), delete {path}")
