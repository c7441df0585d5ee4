"""The console of ``tandem run`` / ``table`` / ``serve``: a short log for a person, the whole one in a file.

``quiet(log_path)``: while the block runs, file descriptors 1 and 2 go to ``log_path`` (appended):
this process's prints and Python warnings, DSPy's and vLLM's bars, and the worker logs Ray forwards
to the driver (vLLM, Ray Train, Serve). The terminal keeps Tandem's own log lines (INFO and up of
the ``tandem``, ``engine``, ``actors``, ``serve`` and ``programs`` loggers, except records logged
with ``extra=FILE_ONLY``), any other ERROR that reaches the root logger (Ray's own logger does not
propagate: its lines are in the file), progress bars (``actors.progress``, on a TTY only) and what is
``echo``ed. Every record also goes to the file, with its time, level and logger. On exit the
descriptors are put back, so the CLI called in-process (tests) leaves the caller's streams as they
were. The CLI's ``-v`` does not use it: everything on the terminal, as before.
Does not know runs or Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import IO, Iterator

from actors import progress

OURS = ("tandem", "engine", "actors", "serve", "programs")
FILE_ONLY = {"console": False}  # ``logger.info(..., extra=FILE_ONLY)``: in the log file, not on the console

_out: IO[str] | None = None  # the terminal's stdout while ``quiet`` runs


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        ours = record.name.split(".")[0] in OURS
        return ours and record.levelno >= logging.INFO and getattr(record, "console", True)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"


@contextlib.contextmanager
def quiet(log_path: str | Path) -> Iterator[Path]:
    """Everything to ``log_path``, a short log on the terminal; see the module docstring.

    Example:
        >>> with quiet("runs/x/logs/tandem.log"):  # doctest: +SKIP
        ...     run(cfg)
    """
    global _out
    path = Path(log_path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    handler = logging.StreamHandler(err)
    handler.addFilter(_ConsoleFilter())
    handler.setFormatter(_ConsoleFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    _out = out
    progress.show_on(err if err.isatty() else None)
    try:
        yield path
    finally:
        progress.show_on(None)
        root.removeHandler(handler)
        _out = None
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        out.close()
        err.close()


def first_line(text: str | None, limit: int = 300) -> str:
    """The first line of an error message, at most ``limit`` characters (Ray's are pages long)."""
    lines = (text or "").strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def echo(text: str) -> None:
    """Print ``text`` for the person: on the terminal under ``quiet`` (and into its log), else on stdout."""
    if _out is None:
        print(text, flush=True)
        return
    _out.write(text + "\n")
    _out.flush()
    print(text, flush=True)  # fd 1: the log file
