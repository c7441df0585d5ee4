"""The names vLLM's ``AsyncEngineArgs`` accepts, read from the installed vLLM's source.

A run config's ``engine_kwargs`` go to ``AsyncEngineArgs(**kwargs)`` unchanged, so a misspelt
name only fails when a replica starts on the cluster. This module finds the fields of
``EngineArgs`` and ``AsyncEngineArgs`` in ``vllm/engine/arg_utils.py`` with ``ast``, without
importing vLLM (which pulls in torch and takes seconds). Knows only the class-level annotated
fields of those two classes; does not check values, and returns None when vLLM is not installed.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Iterable, Mapping

_CLASSES = ("EngineArgs", "AsyncEngineArgs")


def engine_arg_names(source: Path | None = None) -> frozenset[str] | None:
    """Field names of vLLM's ``EngineArgs`` + ``AsyncEngineArgs``; None without vLLM.

    Args:
        source: an ``arg_utils.py`` to read; default: the installed vLLM's.

    Example:
        >>> "gpu_memory_utilization" in (engine_arg_names() or {"gpu_memory_utilization"})
        True
    """
    if source is None:
        spec = importlib.util.find_spec("vllm")  # a top-level find_spec imports nothing
        if spec is None or not spec.origin:
            return None
        source = Path(spec.origin).parent / "engine" / "arg_utils.py"
    tree = ast.parse(Path(source).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in _CLASSES:
            names.update(s.target.id for s in node.body
                         if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name))
    if not names:
        raise ValueError(f"{source}: no {' / '.join(_CLASSES)} fields found (has vLLM moved them?)")
    return frozenset(names)


def check_engine_kwargs(kwargs: Mapping[str, object], names: Iterable[str], where: str = "engine_kwargs") -> None:
    """Refuse keys that are not engine-arg names.

    Raises:
        ValueError: the unknown keys, named.
    """
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown vLLM engine args {unknown}")
