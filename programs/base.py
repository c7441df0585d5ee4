"""What a program module offers and how a program is named on the command line.

A *program module* (``programs/iris.py`` and friends, or a user's own) exposes three names:

- ``Program(**program_args) -> dspy.Module``: a fresh, unoptimized program;
- ``load_splits(seed=0, **data_args) -> Splits``: train / dev / test ``dspy.Example`` lists (a
  plain ``(train, dev, test)`` tuple works too);
- ``metric(example, prediction, trace=None) -> bool | float``;
- optionally ``feedback(example, prediction) -> str``: what GEPA's reflection reads about one run
  (default: the expected and the produced outputs).

``resolve(name)`` turns ``--program`` into a ``ProgramSpec``: a name under ``programs/``
(``iris``), a dotted module (``mypkg.tasks``), or ``module:Attr`` where ``Attr`` has the three
names itself or is a factory whose result has them. Knows DSPy only; does not load data or build
programs until asked.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import dspy

REQUIRED = ("Program", "load_splits", "metric")


@dataclass(frozen=True)
class Splits:
    """Train, dev and test examples."""

    train: list[dspy.Example]
    dev: list[dspy.Example]
    test: list[dspy.Example]


@dataclass(frozen=True)
class ProgramSpec:
    """A resolved program: its name as given, factory, data loader and metric."""

    name: str
    factory: Callable[..., dspy.Module]
    loader: Callable[..., Splits]
    metric: Callable
    feedback: Callable | None = None  # the module's optional ``feedback(example, prediction) -> str``

    def program(self, **program_args: Any) -> dspy.Module:
        """A fresh program; ``program_args`` go to the module's ``Program``."""
        return self.factory(**program_args)

    def splits(self, seed: int = 0, **data_args: Any) -> Splits:
        """The data; ``data_args`` (paths, sizes) go to the module's ``load_splits``.

        Raises:
            ValueError: ``load_splits`` returned neither a ``Splits`` nor a (train, dev, test) triple.
        """
        splits = self.loader(seed, **data_args)
        if isinstance(splits, Splits):
            return splits
        if isinstance(splits, (tuple, list)) and len(splits) == 3:
            return Splits(*(list(part) for part in splits))
        raise ValueError(f"program {self.name!r}: load_splits returned {type(splits).__name__}; "
                         "return programs.base.Splits(train, dev, test) or a (train, dev, test) tuple")


def resolve(name: str) -> ProgramSpec:
    """The program named ``name``; see the module docstring for the forms.

    Raises:
        ValueError: no such module or attribute, or the object lacks ``Program``, ``load_splits``
            or ``metric`` (the missing ones are named).

    Example:
        >>> resolve("iris").name
        'iris'
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("program name cannot be empty")
    module_name, _, attr = name.partition(":")
    candidates = [module_name] if "." in module_name else [f"programs.{module_name}", module_name]
    module = None
    for candidate in candidates:
        try:
            module = importlib.import_module(candidate)
            break
        except ModuleNotFoundError as exc:
            if exc.name is None or not candidate.startswith(exc.name):
                raise  # the module exists but one of its own imports is missing: say that, not "unknown"
    if module is None:
        raise ValueError(f"unknown program {name!r}: no module {' or '.join(candidates)} "
                         "(use a name under programs/ or a dotted path 'package.module[:Factory]')")
    target = module
    if attr:
        if not hasattr(module, attr):
            raise ValueError(f"program {name!r}: module {module_name} has no attribute {attr!r}")
        target = getattr(module, attr)
        if not _has_all(target) and callable(target):
            target = target()
    missing = [n for n in REQUIRED if not callable(getattr(target, n, None))]
    if missing:
        raise ValueError(f"program {name!r} lacks {missing}: a program module needs Program(**args), "
                         "load_splits(seed, **args) and metric(example, prediction, trace=None)")
    feedback = getattr(target, "feedback", None)
    return ProgramSpec(name, target.Program, target.load_splits, target.metric, feedback if callable(feedback) else None)


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line of a JSONL file, parsed, with its ``file:line`` for error messages.

    Raises:
        ValueError: a line that is not valid JSON (file and line named).
    """
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def _has_all(obj: object) -> bool:
    return all(callable(getattr(obj, n, None)) for n in REQUIRED)
