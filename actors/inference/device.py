"""Everything that differs between the CPU and the GPU path of a replica, in one place.

Knows: the placement-group bundles a replica needs (one per tensor-parallel worker, as vLLM's
Ray executor expects), the environment a vLLM-CPU engine reads at start (core binding, KV cache
size, and whether its model runs in the EngineCore process), the default dtype per device, and which
executor vLLM should use. Does not start anything.
"""

from __future__ import annotations

import os

from actors.config import ReplicaConfig


def is_gpu(cfg: ReplicaConfig) -> bool:
    """True when the replica runs on GPUs."""
    return cfg.num_gpus > 0


def bundles(cfg: ReplicaConfig) -> list[dict[str, float]]:
    """Placement-group bundles: one per tensor-parallel worker (the first hosts the actor and holds the
    replica's custom ``resources``, which pin the replica to nodes that offer them)."""
    if not is_gpu(cfg):
        return [{"CPU": float(cfg.num_cpus), **cfg.resources}]
    per = {"CPU": float(cfg.num_cpus), "GPU": float(cfg.num_gpus)}
    return [{**per, **cfg.resources}] + [dict(per) for _ in range(cfg.tensor_parallel_size - 1)]


def dtype(cfg: ReplicaConfig) -> str:
    """float32 on CPU (faster than bf16 without AMX, and LoRA outputs match peft), bf16 on GPU."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if is_gpu(cfg) else "float32"


def cpu_bind(cfg: ReplicaConfig, rank: int, cores: int | None = None) -> str:
    """The VLLM_CPU_OMP_THREADS_BIND value for replica ``rank``.

    'auto' gives each replica its own block of ``num_cpus`` cores from ``cpu_first_core`` on, wrapping
    around the node's cores; two replicas left on vLLM's own 'auto' would both pin to core 0.
    """
    if cfg.cpu_bind != "auto":
        return cfg.cpu_bind
    cores = cores or os.cpu_count() or 1
    width = max(1, min(int(cfg.num_cpus), cores))
    first = (cfg.cpu_first_core + rank * width) % cores
    if first + width > cores:
        first = 0
    return str(first) if width == 1 else f"{first}-{first + width - 1}"


def _cores(bind: str) -> list[int] | None:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND value for one rank ('0', '0-3', '0,2'), None if not a list."""
    cores: list[int] = []
    for part in bind.split(","):
        lo, _, hi = part.partition("-")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            return None
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores or None


def inproc_worker_env(cfg: ReplicaConfig) -> dict[str, str]:
    """Environment under which a CPU engine runs its model in the EngineCore process (no worker process).

    vLLM-CPU otherwise starts a second process for a one-rank worker only to give it the OpenMP
    environment of its cores (OMP_NUM_THREADS, OMP_PLACES, OMP_PROC_BIND); set here, the EngineCore
    process vLLM spawns inherits it, and vLLM keeps the one-process executor
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the async engine still runs its EngineCore in a process of
    its own). Empty (vLLM's own two processes) on GPUs, with ``cpu_worker_process``, or when the
    binding is 'nobind'/'auto' or a per-rank list.
    """
    if is_gpu(cfg) or cfg.cpu_worker_process:
        return {}
    cores = _cores(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    if cores is None:
        return {}
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(len(cores)),
            "OMP_PLACES": "{" + ",".join(map(str, cores)) + "}", "OMP_PROC_BIND": "true"}


def engine_env(cfg: ReplicaConfig, rank: int) -> dict[str, str]:
    """Environment variables to set in the replica process before its engine starts."""
    if is_gpu(cfg):
        return {}
    return {
        "VLLM_CPU_OMP_THREADS_BIND": cpu_bind(cfg, rank),
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_gib),
    }


def executor_backend(cfg: ReplicaConfig) -> str | None:
    """Ray's executor for multi-GPU replicas (workers land in the replica's placement group)."""
    return "ray" if cfg.tensor_parallel_size > 1 else None


def actor_resources(cfg: ReplicaConfig) -> dict[str, float]:
    """What the replica actor itself holds in bundle 0.

    With tensor parallelism vLLM's Ray workers take the GPUs of every bundle, so the actor
    holds none; otherwise the actor's own process runs the model and holds bundle 0 whole.
    """
    if cfg.tensor_parallel_size > 1:
        return {"num_cpus": 0, "num_gpus": 0}
    return {"num_cpus": float(cfg.num_cpus), "num_gpus": float(cfg.num_gpus)}
