"""Ray actors and workers: everything that runs on the cluster's processes, by runtime role.

Rooms (a lower one never imports a higher one):

- shared, beside the rooms: ``config`` (``ReplicaConfig``, ``PoolConfig``), ``types``, ``errors``,
  ``models`` (built-in models), ``runtime`` (connecting to Ray, stopping, what the cluster holds),
  ``environ``, ``progress``, ``typed_config``. They import no room.
- ``actors.inference``: vLLM replicas, the pool and its router, the engines (vLLM, scripted), the
  engine watchdog, CPU LoRA ops, adapter shipping, device binding. Imports only the shared modules.
- ``actors.training``: LoRA fine-tuning run by Ray Train (config, loop, guards, optimizer step,
  trainer, training rows). Imports only the shared modules.
- ``actors.dspy_side``: what DSPy sees: the ``dspy.LM`` on a pool (client), the ``Provider`` built
  around a pool, the fine-tune lifecycle (train, then relaunch or hot-load), evaluator actors, usage.
  Imports the shared modules, ``inference`` and ``training``.

Public names here: ``ReplicaConfig``, ``PoolConfig``, ``ReplicaPool``, ``LMReplica``, ``Router``,
``GenerateRequest``, ``Completion``, ``Adapter``, the errors, ``connect`` and ``pool_lm`` (imports
DSPy on first use). vLLM, torch and peft are imported only inside replica and training processes.
"""

from actors.config import PoolConfig, ReplicaConfig
from actors.errors import AdapterError, ContextLengthError, LMRequestError, PoolUnavailableError, UnknownModelError
from actors.inference import LMReplica, ReplicaPool, Router
from actors.runtime import connect
from actors.types import Adapter, Completion, GenerateRequest

__all__ = [
    "Adapter", "AdapterError", "Completion", "ContextLengthError", "GenerateRequest", "LMReplica",
    "LMRequestError", "PoolConfig", "PoolUnavailableError", "ReplicaConfig", "ReplicaPool", "Router",
    "UnknownModelError", "connect", "pool_lm",
]


def __getattr__(name: str):
    if name == "pool_lm":
        from actors.dspy_side.provider import pool_lm

        return pool_lm
    raise AttributeError(name)
