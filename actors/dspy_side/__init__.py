"""The DSPy side: what a DSPy program sees of the pool and the trainer.

Modules: ``client`` (the ``dspy.LM`` engines that send calls to a pool's router), ``provider``
(``TandemProvider``, dspy's ``Provider`` built around a pool, and ``pool_lm``), ``finetune`` (train
an adapter, then relaunch the replicas with it or hot-load it), ``evaluator`` (program runs on Ray
actors with their own threads), ``usage`` (LM calls, tokens and replica-seconds). Imports the shared
modules of ``actors``, ``actors.inference`` and ``actors.training``; knows nothing of strategies or
run dirs (``engine/``).
"""

from actors.dspy_side.provider import TandemProvider, pool_lm

__all__ = ["TandemProvider", "pool_lm"]
