"""What a run spends: LM calls, tokens, cache hits, replica-seconds and training device-seconds.

``metered(pool)`` makes a ``Meter`` the process's active one for a block (one run at a time per
driver; table cells run one after another). It counts, in the driver:

- ``lm_calls``: every call a program's predictors make (a dspy callback, ``on_lm_end``), cached or not;
- ``requests``, ``prompt_tokens``, ``completion_tokens``: the calls that reached an LM, i.e. were not
  answered from DSPy's cache (dspy's ``usage_tracker`` hook, which dspy calls only for those);
- ``cache_hits`` = ``lm_calls - requests``;
- ``replica_s``: the pool's replica-seconds (each replica from start to stop, ``ReplicaPool``);
- ``train_device_s``: the fit seconds of each LoRA training x its workers (``actors.dspy_side.finetune``).

``meter.costs()`` is a frozen ``Costs``; ``later - earlier`` is what a step spent. With model groups
(``metered(pool, groups={"teacher": pool2})``), ``costs()`` counts every pool and ``by_group()`` splits
it: a call counts to the group whose pool serves its model id, the rest to ``"student"`` (so a group
serving the student's own base model counts to the student). Thread-safe
(evaluation threads and the training thread count into one meter). Knows dspy's callback and
usage-tracker hooks; does not know steps or runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import dspy
from dspy.utils.callback import BaseCallback


@dataclass(frozen=True)
class Costs:
    """Counters at one moment (or between two, after ``-``)."""

    lm_calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica_s: float = 0.0
    train_device_s: float = 0.0

    @property
    def cache_hits(self) -> int:
        return max(0, self.lm_calls - self.requests)

    def __sub__(self, other: "Costs") -> "Costs":
        return Costs(*(getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self)))

    def __add__(self, other: "Costs") -> "Costs":
        return Costs(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(cache_hits=self.cache_hits, replica_s=round(self.replica_s, 1),
                   train_device_s=round(self.train_device_s, 1))
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "Costs":
        data = data or {}
        return cls(**{f.name: data.get(f.name, f.default) for f in dataclasses.fields(cls)})

    def describe(self) -> str:
        """One line: ``"120 LM calls (30 cached), 41.2k+3.1k tokens, 95 replica-s, 60 train device-s"``."""
        return (f"{self.lm_calls} LM calls ({self.cache_hits} cached), {_k(self.prompt_tokens)}+"
                f"{_k(self.completion_tokens)} tokens, {self.replica_s:.0f} replica-s, "
                f"{self.train_device_s:.0f} train device-s")


class Meter(BaseCallback):
    """Counts into one ``Costs``; see the module docstring."""

    def __init__(self, pool=None, groups: dict | None = None):
        self._pool = pool
        self._groups = dict(groups or {})
        self._lock = threading.Lock()
        self._counts = Costs()
        self._by_model: dict[str, Costs] = {}  # the same counts per model id (model groups only)
        self._calls: dict[str, str] = {}  # call id -> model id, between on_lm_start and on_lm_end

    def costs(self) -> Costs:
        with self._lock:
            counts = self._counts
        pools = [self._pool, *self._groups.values()] if self._pool is not None else list(self._groups.values())
        return dataclasses.replace(counts, replica_s=sum(p.replica_seconds() for p in pools))

    def by_group(self) -> dict[str, Costs]:
        """``costs()`` split by model group, ``"student"`` first (empty without groups)."""
        if not self._groups:
            return {}
        with self._lock:
            by_model = dict(self._by_model)
        ids = {pool.model_id: name for name, pool in self._groups.items()}
        student_id = self._pool.model_id if self._pool is not None else None
        out = {name: Costs(replica_s=pool.replica_seconds()) for name, pool in self._groups.items()}
        total = self.costs()
        for model, counts in by_model.items():
            name = ids.get(model) if model != student_id else None
            if name is not None:
                out[name] = out[name] + dataclasses.replace(counts, replica_s=0.0)
        student = total - sum(out.values(), Costs())
        return {"student": student, **out}

    def _add(self, model: str | None = None, **deltas) -> None:
        with self._lock:
            self._counts = self._counts + Costs(**deltas)
            if self._groups and model is not None:
                self._by_model[model] = self._by_model.get(model, Costs()) + Costs(**deltas)

    # dspy's callbacks: every LM call, answered from the cache or not
    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if self._groups:
            with self._lock:
                self._calls[call_id] = getattr(instance, "model", None)

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        with self._lock:
            model = self._calls.pop(call_id, None)
        self._add(model, lm_calls=1)

    # dspy's usage tracker: only calls that were not cache hits (``settings.usage_tracker.add_usage``)
    def add_usage(self, lm: str, usage: dict) -> None:
        usage = usage or {}
        self._add(lm, requests=1, prompt_tokens=int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0),
                  completion_tokens=int(usage.get("completion_tokens") or usage.get("output_tokens") or 0))

    def add(self, spent: Costs) -> None:
        """Count what was spent elsewhere (an evaluator actor's meter, ``actors.dspy_side.evaluator``); not replica-seconds."""
        self._add(**{k: v for k, v in dataclasses.asdict(spent).items() if k != "replica_s"})

    def add_training(self, device_s: float) -> None:
        self._add(train_device_s=device_s)

    def __deepcopy__(self, memo) -> "Meter":  # dspy's ParallelExecutor copies the usage tracker per thread
        return self


_active: Meter | None = None


def active() -> Meter | None:
    """The meter of the run in progress (None outside ``metered``)."""
    return _active


def now() -> Costs | None:
    """The active meter's counters (None outside ``metered``)."""
    return _active.costs() if _active is not None else None


@contextlib.contextmanager
def metered(pool=None, groups: dict | None = None) -> Iterator[Meter]:
    """Count what the block spends (LM calls through dspy in this thread and its dspy workers); ``groups``:
    the run's model-group pools by name (``Meter.by_group``).

    Example:
        >>> with metered(pool) as meter:  # doctest: +SKIP
        ...     program(question="...")
        >>> meter.costs().lm_calls  # doctest: +SKIP
        1
    """
    global _active
    meter, previous = Meter(pool, groups), _active
    _active = meter
    try:
        with dspy.context(callbacks=[*dspy.settings.get("callbacks", []), meter], usage_tracker=meter):
            yield meter
    finally:
        _active = previous


def _k(tokens: int) -> str:
    return f"{tokens / 1000:.1f}k" if tokens >= 1000 else str(tokens)
