"""``LearnerGroup``: one GRPO ``Learner`` on several Ray workers, data parallel, up for a whole run.

``workers`` Ray actors each hold the LoRA policy and its optimizer (``actors.training.grpo.Learner``,
built with the same seed and ``init``, so they start equal) in one ``torch.distributed`` process group
(gloo on CPUs, nccl when the workers hold GPUs; rank 0's node address and a free port there). A
``step`` sends the update's groups to every worker at once; each trains on its share of the rows and
the gradients are summed with one all-reduce (``Learner._reduce``), so every worker takes the update
a single worker would have taken on the whole batch and the copies never drift (with ``cfg.zero_stage``
DeepSpeed ZeRO shards the optimizer state, gradients or weights over the ranks instead). ``save``,
``save_state``, ``logprob`` and ``mark_served`` go to every rank (collectives under ZeRO; rank 0 writes
and answers); ``progress`` asks rank 0. Same methods as an in-process ``Learner``
(plain calls that block), so ``actors.dspy_side.reinforce`` drives one or the other alike.

Knows Ray actors and the process group's setup; not GRPO's math, the pool or DSPy. Placement: plain
actors with ``num_cpus`` / ``num_gpus`` each (no placement group: ``tandem plan`` checks that they fit;
a worker that cannot be placed waits, as a Ray actor does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.training.grpo import GRPOConfig, Learner


class _Worker:
    """A Ray actor's body: joins the process group, then holds one ``Learner`` rank."""

    def address(self) -> str:
        """``host:port`` on this worker's node where rank 0 listens for the others."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, address: str, rank: int, world: int, model_path: str, cfg: GRPOConfig, init: str | None,
              backend: str) -> None:
        import os

        import torch.distributed as dist

        host, port = address.rsplit(":", 1)  # what DeepSpeed reads when it wraps the group (ZeRO)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=host, MASTER_PORT=port)
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world)
        self.learner = Learner(model_path, cfg, init, rank=rank, world=world)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.learner, method)(*args)


class LearnerGroup:
    """``workers`` learner ranks in Ray actors (see the module docstring).

    Args:
        model_path: the pool's base model directory (on every worker's node).
        cfg: the learner's settings (``threads`` per worker).
        workers: ranks, >= 2 (one worker is a plain ``ray_learner``).
        cpus, gpus: Ray resources each worker reserves.
        init: a ``save_state`` directory or a peft adapter every rank starts from.

    Raises:
        ValueError: fewer than 2 workers.
    """

    def __init__(self, model_path: str, cfg: GRPOConfig, workers: int, cpus: float, gpus: float,
                 init: str | None = None):
        import ray

        if workers < 2:
            raise ValueError(f"a LearnerGroup has >= 2 workers, got {workers}")
        actor = ray.remote(_Worker).options(num_cpus=cpus, num_gpus=gpus)
        self.workers = [actor.remote() for _ in range(workers)]
        try:
            address = ray.get(self.workers[0].address.remote())
            backend = "nccl" if gpus > 0 else "gloo"
            ray.get([w.start.remote(address, rank, workers, model_path, cfg, init, backend)
                     for rank, w in enumerate(self.workers)])
        except BaseException:
            self.stop()
            raise

    def _all(self, method: str, *args: Any) -> list:
        import ray

        refs = [ray.put(a) for a in args]  # sent to the object store once, not once per worker
        return ray.get([w.call.remote(method, *refs) for w in self.workers])

    def _first(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(self.workers[0].call.remote(method, *args))

    def step(self, groups: list[dict]) -> dict[str, Any]:
        """One update on every rank; rank 0's metrics (its ``seconds``: the update's wall time there)."""
        return self._all("step", groups)[0]

    def mark_served(self) -> None:
        self._all("mark_served")

    def save(self, out_dir: str | Path) -> str:
        return self._all("save", str(out_dir))[0]

    def save_state(self, out_dir: str | Path) -> str:
        return self._all("save_state", str(out_dir))[0]

    def progress(self) -> int:
        return self._first("progress")

    def logprob(self, messages: list[dict], completion: dict, served: bool = False) -> float:
        return self._all("logprob", messages, completion, served)[0]

    def stop(self) -> None:
        """Kill every worker and return once they are gone (``ray.kill`` alone returns before: a call sent
        right after could still be answered); idempotent."""
        import ray

        workers, self.workers = self.workers, []
        for w in workers:
            ray.kill(w)
        for w in workers:
            gone(w)


def gone(actor, timeout_s: float = 30.0) -> None:
    """Wait until the killed ``actor`` answers no call (its process is gone).

    Raises:
        TimeoutError: it still answers after ``timeout_s``.
    """
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            break
        time.sleep(0.05)
    raise TimeoutError(f"actor {actor} still answers {timeout_s:.0f} s after it was killed")
