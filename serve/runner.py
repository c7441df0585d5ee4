"""Running a served DSPy program on one input: the async path or a bounded pool of worker threads.

Knows: which path a program takes (``runs_async``: a program whose own class defines ``aforward``
runs on the event loop through ``Module.acall``; one that only defines a sync ``forward`` — most
DSPy programs — runs through ``Module.__call__`` in a worker thread, at most ``max_threads`` at
once), that the adapter and usage tracking (``dspy.context``) are entered inside the code that
runs the program (so inside the worker thread on the sync path), and that the caller's
contextvars travel into the thread (Serve's request context, so the LM calls carry the request
id). On the sync path each predictor's LM must have a sync engine that may block (the
``SyncHandleEngine`` of ``serve.deployments``). Does not know Ray, Serve or HTTP.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy

logger = logging.getLogger(__name__)

DEFAULT_MAX_THREADS = 32


def runs_async(program: dspy.Module) -> bool:
    """Whether ``program`` runs through ``acall`` (its own ``aforward``) rather than sync ``forward``.

    ``aforward`` counts only where it is defined at or below the class that defines ``forward``:
    a subclass of ``dspy.ChainOfThought`` that overrides ``forward`` alone runs its ``forward``
    (the inherited ``aforward`` would skip the override).

    Args:
        program: the program to serve.

    Returns:
        True for the async path, False for the worker-thread path.

    Example:
        >>> runs_async(dspy.ChainOfThought("question -> answer"))
        True
    """
    mro = type(program).__mro__

    def defined_at(name: str) -> int | None:
        return next((i for i, cls in enumerate(mro) if name in vars(cls)), None)

    aforward, forward = defined_at("aforward"), defined_at("forward")
    return aforward is not None and (forward is None or aforward <= forward)


class ProgramRunner:
    """Runs one program on input dicts with a given adapter, returning (outputs, LM usage).

    Args:
        program: the program; each predictor's LM already set (a sync engine for the thread path).
        adapter: the DSPy adapter the program runs with.
        output_names: the output fields to return, in order.
        max_threads: most sync programs running at once (more requests wait their turn).

    Example:
        >>> runner = ProgramRunner(program, dspy.ChatAdapter(), ["answer"])  # doctest: +SKIP
        >>> outputs, usage = await runner.run({"question": "2 + 2?"})  # doctest: +SKIP
    """

    def __init__(self, program: dspy.Module, adapter: dspy.Adapter, output_names: list[str],
                 max_threads: int = DEFAULT_MAX_THREADS):
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.program, self.adapter, self.output_names = program, adapter, list(output_names)
        self.is_async = runs_async(program)
        self.max_threads = max_threads
        self._slots: asyncio.Semaphore | None = None  # made on first use, on the serving loop
        self._threads: ThreadPoolExecutor | None = None
        logger.info("serving %s on the %s path", type(program).__name__,
                    "async (aforward)" if self.is_async else f"sync (forward, {max_threads} threads)")

    async def run(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run the program on one input dict.

        Returns:
            The output fields by name, and dspy's per-LM token usage (``{}`` if none).

        Raises:
            Whatever the program raises (LM errors, ``AdapterParseError``…), unchanged.
        """
        if self.is_async:
            with dspy.context(adapter=self.adapter, track_usage=True):
                prediction = await self.program.acall(**inputs)
        else:
            prediction = await self._in_thread(inputs)
        outputs = {name: prediction.get(name) for name in self.output_names}
        return outputs, prediction.get_lm_usage() or {}

    async def _in_thread(self, inputs: dict[str, Any]) -> dspy.Prediction:
        if self._slots is None or self._threads is None:
            self._slots = asyncio.Semaphore(self.max_threads)
            self._threads = ThreadPoolExecutor(self.max_threads, thread_name_prefix="tandem-program")
        async with self._slots:  # waiters queue here (cancellable), not in the executor
            context = contextvars.copy_context()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, context.run, self._call, inputs)

    def _call(self, inputs: dict[str, Any]) -> dspy.Prediction:
        """The worker thread's part: dspy's settings are per context, so enter them here."""
        with dspy.context(adapter=self.adapter, track_usage=True):
            return self.program(**inputs)

    def close(self) -> None:
        """Stop the worker threads (running calls finish first)."""
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._threads = None
