"""The inference room: vLLM replicas in Ray actors, the pool that launches, relaunches and kills
them, and the router that spreads requests over them.

Modules: ``replica`` (``LMReplica``, one engine per actor), ``pool`` (``ReplicaPool``), ``router``,
``vllm_engine`` (the vLLM ``AsyncLLM`` behind a replica), ``scripted`` (a scripted engine for
tests), ``watchdog`` (an engine dies with its replica), ``cpu_lora`` (grouped LoRA ops on vLLM-CPU),
``adapter_files`` (shipping adapter files to replicas), ``device`` (cores and GPUs per replica).
Imports only the shared modules of ``actors`` (never ``training`` or ``dspy_side``); knows nothing
of DSPy or of what the requests are for.
"""

from actors.inference.pool import ReplicaPool
from actors.inference.replica import LMReplica
from actors.inference.router import Router

__all__ = ["LMReplica", "ReplicaPool", "Router"]
