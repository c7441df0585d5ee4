"""Frozen configs for one vLLM replica and for a pool of them.

Knows the knobs a user sets for serving an LM on Ray: model, context length, LoRA limits, the
resource shape of one replica, how many replicas. vLLM's own engine kwargs are passed through
as an opaque mapping (``engine_kwargs``), the way Ray Serve LLM does, rather than re-modelled.
Does not know Ray or vLLM objects; validation here is on values only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from actors.models import EMBEDDED

_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def custom_resources(resources: Mapping[str, float], instead: str) -> dict[str, float]:
    """``resources`` as floats, refused when it names CPUs, GPUs or memory (``instead`` says which knobs set those)."""
    if {"CPU", "GPU", "memory"} & set(resources):
        raise ValueError(f"resources is for custom resources; set CPUs and GPUs with {instead}")
    return {k: float(v) for k, v in resources.items()}


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ReplicaConfig:
    """How one LM replica (a Ray actor holding one vLLM engine) is built."""

    model: str = _help("built-in name, local HF checkpoint dir, or hub id", EMBEDDED)
    model_id: str | None = _help("id requests use for the base model; default: `model`")
    dtype: str = _help("'auto' = float32 on CPU (faster there), bfloat16 on GPU; or a torch dtype", "auto")
    max_model_len: int = _help("context length in tokens (prompt + completion)", 2048)
    enable_lora: bool = _help("serve LoRA adapters next to the base model", True)
    max_lora_rank: int = _help("largest adapter rank accepted; one of 8/16/32/64/128/256/320/512", 32)
    max_loras: int = _help("adapters resident in one batch at once", 2)
    num_cpus: float = _help("CPUs reserved for the replica (per tensor-parallel worker on GPU)", 1)
    num_gpus: float = _help("GPUs per tensor-parallel worker; 0 = the CPU path", 0)
    tensor_parallel_size: int = _help("vLLM tensor parallel size (a placement-group bundle each)", 1)
    cpu_kvcache_gib: int = _help("CPU path: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)", 1)
    cpu_bind: str = _help(
        "CPU path: 'auto' gives replica i its own cores (i*num_cpus ...), 'nobind', or a vLLM "
        "VLLM_CPU_OMP_THREADS_BIND value used as is", "auto")
    cpu_first_core: int = _help(
        "CPU path, cpu_bind 'auto': the core replica 0's block starts at; pools that share a node start at "
        "different cores (a run's model groups start after the student's)", 0)
    cpu_worker_process: bool = _help(
        "CPU path: run the model in a worker process of its own, as vLLM does by default; off (the default), "
        "it runs in the EngineCore process under the same core binding: one process (and its start) fewer",
        False)
    seed: int = _help("engine seed; a request's own seed wins", 0)
    max_restarts: int = _help("times Ray restarts a dead replica actor (-1 = always)", 3)
    hung_after_s: float = _help(
        "the replica's health check fails (and the replica is restarted) when requests are in flight and none "
        "finished for this long: an engine that hangs (Serve polls the check every 10 s)", 900.0)
    engine_kwargs: Mapping[str, Any] = _help(
        "extra vllm AsyncEngineArgs fields, passed through unchanged", default_factory=dict)
    resources: Mapping[str, float] = _help(
        "custom Ray resources each replica reserves (in its first bundle), e.g. {'inference': 1} to place "
        "replicas only on nodes started with --resources '{\"inference\": N}'", default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine_kwargs", dict(self.engine_kwargs))  # a private copy
        object.__setattr__(self, "resources", custom_resources(self.resources, "num_cpus / num_gpus"))
        if self.max_lora_rank not in _LORA_RANKS:
            raise ValueError(f"max_lora_rank={self.max_lora_rank} must be one of {_LORA_RANKS} (vLLM's rule)")
        for name in ("max_model_len", "max_loras", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hung_after_s <= 0:
            raise ValueError(f"hung_after_s must be > 0, got {self.hung_after_s}")
        if self.num_cpus <= 0 or self.num_gpus < 0 or self.cpu_kvcache_gib < 1:
            raise ValueError("num_cpus must be > 0, cpu_kvcache_gib >= 1 and num_gpus >= 0")
        if self.tensor_parallel_size > 1 and self.num_gpus == 0:
            raise ValueError("tensor_parallel_size > 1 needs GPUs (num_gpus > 0); on CPU use more replicas")
        if self.cpu_first_core < 0:
            raise ValueError(f"cpu_first_core must be >= 0, got {self.cpu_first_core}")

    @property
    def base_id(self) -> str:
        """The model id that addresses the base weights."""
        return self.model_id or self.model


@dataclass(frozen=True)
class PoolConfig:
    """A pool of identical replicas behind one router."""

    replica: ReplicaConfig = _help("the replica every pool member runs", default_factory=ReplicaConfig)
    num_replicas: int = _help("replicas launched", 2)
    name: str = _help("pool name; replicas are named actors `tandem:<name>:<generation>:<rank>`", "default")
    placement_strategy: str = _help("placement-group strategy for each replica's bundles", "STRICT_PACK")
    request_retries: int = _help(
        "times a request is re-sent to another replica when one dies or does not answer in time", 3)
    request_timeout_s: float = _help(
        "seconds one attempt of a request may take; then it is cancelled and re-sent to another "
        "replica (a re-send), and a request out of re-sends fails naming the timeout", 600.0)
    start_timeout_s: float = _help("seconds to wait for replicas to become ready", 600.0)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if not self.name or ":" in self.name:
            raise ValueError(f"pool name must be non-empty and contain no ':', got {self.name!r}")
        if self.request_retries < 0:
            raise ValueError("request_retries must be >= 0")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")

    def with_replica(self, **changes: Any) -> "PoolConfig":
        """A copy with some replica fields changed."""
        return replace(self, replica=replace(self.replica, **changes))
