"""Concurrent ``TandemProvider.finetune`` calls (dspy runs each job in a thread) train one at a time.

The training function the provider calls is replaced by a slow stub that records when each job
ran: this tests the provider's locking only, not training.
"""

import threading
import time

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.dspy_side import provider as provider_module
from actors.dspy_side.finetune import FinetuneResult
from actors.dspy_side.provider import TandemProvider

ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]


def test_concurrent_finetune_jobs_never_overlap(tmp_path, monkeypatch):
    spans, lock = [], threading.Lock()

    def slow_finetune(pool, datasets, train, *, lifecycle, adapter_root, prefix, storage):
        start = time.monotonic()
        time.sleep(0.3)
        with lock:
            spans.append((start, time.monotonic(), prefix))
        return {"": FinetuneResult(f"tiny-llama:{prefix}", str(tmp_path / prefix), {})}

    monkeypatch.setattr(provider_module, "finetune", slow_finetune)
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama"), name="provider-lock"))
    provider = TandemProvider(pool, adapter_root=tmp_path)
    names = []
    jobs = [threading.Thread(target=lambda: names.append(provider.finetune(None, "tiny-llama", ROWS, "chat")))
            for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=30)
    assert sorted(names) == ["tiny-llama:ft-p01", "tiny-llama:ft-p02", "tiny-llama:ft-p03"]
    spans.sort()
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:])), spans
    assert set(provider.trained) == set(names)
