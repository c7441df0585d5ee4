"""The training rows' I/O: chat rows to and from Parquet, and how they reach the Ray Train workers.

Knows: the Parquet layout of a dataset of chat rows (``messages`` as JSON text, ``predictor``,
``example_index``; ``write_rows`` / ``read_rows``), that a local file's rows travel to the workers
through the object store while a URI is read by each worker itself (``ship``), and why workers read
the rows themselves rather than through Ray Data. Does not know tokenizers, models or training
(``actors.training.loop`` does) nor where the rows come from (``engine.steps.weight``, ``actors.dspy_side.provider``).
"""

from __future__ import annotations

import json
import os
from typing import Iterable


def write_rows(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write chat rows (``messages`` lists plus metadata) as a Parquet file; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    table = pa.table({
        "messages": [json.dumps(r["messages"]) for r in rows],
        "predictor": [r.get("predictor", "") for r in rows],
        "example_index": [int(r.get("example_index", -1)) for r in rows],
    })
    pq.write_table(table, str(path))
    return len(rows)


def read_rows(path) -> list[list[dict]]:
    """The ``messages`` lists of a Parquet file or dir (local path or pyarrow-filesystem URI), or of
    rows ``train_lora`` shipped through the object store (an ObjectRef, or the rows themselves).

    Workers read the data themselves rather than through Ray Data: Ray Data's planning and read
    tasks each need a CPU, and while the replicas and the training workers hold every core (a
    2-core machine, or a cluster packed on purpose) they never get one.
    """
    if isinstance(path, list):
        return path
    if not isinstance(path, str):  # an ObjectRef of the rows
        import ray

        return ray.get(path)
    import pyarrow.parquet as pq

    return [json.loads(m) for m in pq.read_table(path, columns=["messages"]).column("messages").to_pylist()]


def ship(data_path: str):
    """What the workers read: a URI as it is (each worker reads it), a local file's rows through the
    object store (a worker on another node cannot see the driver's files)."""
    if "://" in str(data_path):
        return str(data_path)
    import ray

    return ray.put(read_rows(str(data_path)))
