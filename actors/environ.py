"""Environment variables set for the duration of a block, then restored (unset where they were unset).

For settings a library or a process spawned in the block reads from the environment: vLLM's
EngineCore process, Ray Train's controller, MLflow's client. Knows nothing else.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in this process's environment while the block runs."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
