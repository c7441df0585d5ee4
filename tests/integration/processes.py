"""Finding the processes a test started, without touching anyone else's (no machine-wide `ray stop`).

A test gives a subprocess an environment carrying ``TANDEM_TEST_MARK=<uuid>``; every process it
starts (its local Ray, Ray workers, vLLM engines) inherits the mark, so the test can list what is
left and kill exactly that.
"""

import os
import time
import uuid

import psutil

MARK = "TANDEM_TEST_MARK"


def new_mark() -> str:
    return uuid.uuid4().hex


def marked_env(mark: str, **extra: str) -> dict:
    """The test's environment plus the mark (and ``extra``)."""
    return {**os.environ, MARK: mark, **extra}


def marked(mark: str) -> list[psutil.Process]:
    """The live processes carrying ``mark``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def left_behind(mark: str, wait_s: float = 30.0) -> list[str]:
    """What still carries ``mark`` after up to ``wait_s`` seconds: '<pid> <command line>' each."""
    deadline = time.monotonic() + wait_s
    while True:
        procs = marked(mark)
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(1)
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            continue
    return out


def kill_marked(mark: str) -> None:
    """SIGKILL every process carrying ``mark`` and wait for them to go."""
    procs = marked(mark)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=30)
