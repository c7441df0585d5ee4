"""Progress bars for the long phases of a run (launch, bootstrap, candidates, training, relaunch).

``bar(desc, total)`` is a context manager yielding an object with ``update(n=1)``. Bars are off (the
object does nothing) unless ``show_on(stream)`` gave them a terminal: the CLI's quiet console does
that when its stdout is a TTY. A bar is drawn while its phase runs and erased when it ends; the
phase's own log line is what stays on the screen, so a pipe or a job log (no bars) reads the same
as a terminal. Evaluation threads may update one bar together. ``active()`` says whether bars are
drawn (so callers can turn off dspy's own bars, which would print over them). Knows tqdm; does not
know what the phases are.
"""

from __future__ import annotations

import contextlib
import threading
from typing import IO, Iterator

from tqdm import tqdm

_stream: IO[str] | None = None


class _Off:
    def update(self, n: int = 1) -> None:
        """Nothing is drawn."""


def show_on(stream: IO[str] | None) -> None:
    """Draw bars on ``stream`` from now on (None: no bars)."""
    global _stream
    _stream = stream


def active() -> bool:
    """Whether bars are drawn."""
    return _stream is not None


class _Shared:
    """A tqdm bar that several threads update."""

    def __init__(self, progress: tqdm):
        self._progress, self._lock = progress, threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self._progress.update(n)

    def refresh(self) -> None:
        with self._lock:
            self._progress.refresh()


@contextlib.contextmanager
def bar(desc: str, total: int | None = None, unit: str = "it", bar_format: str | None = None
        ) -> Iterator[_Shared | _Off]:
    """A bar for one phase, erased when the phase ends (``total=None``: a counter with elapsed time).

    Example:
        >>> with bar("launch 2 replicas", total=2, unit="replica") as b:  # doctest: +SKIP
        ...     b.update()
    """
    stream = _stream
    if stream is None:
        yield _Off()
        return
    with tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False, mininterval=0.2,
              bar_format=bar_format) as progress:
        yield _Shared(progress)


@contextlib.contextmanager
def ticking(desc: str, every_s: float = 1.0) -> Iterator[None]:
    """A bar without a count, redrawn every ``every_s`` seconds while a blocking call runs (its elapsed time)."""
    if _stream is None:
        yield
        return
    done = threading.Event()
    with bar(desc, bar_format="{desc}: {elapsed}") as progress:
        def tick() -> None:
            while not done.wait(every_s):
                progress.refresh()

        thread = threading.Thread(target=tick, name="tandem-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
