"""Ray actors that host LMs: vLLM replicas, the replica pool and its router, the DSPy client.

Public names: ``ReplicaConfig``, ``PoolConfig``, ``ReplicaPool``, ``LMReplica``, ``Router``,
``GenerateRequest``, ``Completion``, ``Adapter``, ``pool_lm`` (imports DSPy on first use),
``connect``. vLLM, torch and peft are imported only inside replica processes.
"""

from actors.config import PoolConfig, ReplicaConfig
from actors.errors import AdapterError, ContextLengthError, LMRequestError, PoolUnavailableError, UnknownModelError
from actors.pool import ReplicaPool
from actors.replica import LMReplica
from actors.router import Router
from actors.runtime import connect
from actors.types import Adapter, Completion, GenerateRequest

__all__ = [
    "Adapter", "AdapterError", "Completion", "ContextLengthError", "GenerateRequest", "LMReplica",
    "LMRequestError", "PoolConfig", "PoolUnavailableError", "ReplicaConfig", "ReplicaPool", "Router",
    "UnknownModelError", "connect", "pool_lm",
]


def __getattr__(name: str):
    if name == "pool_lm":
        from actors.client import pool_lm

        return pool_lm
    raise AttributeError(name)
