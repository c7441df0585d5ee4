"""The step kinds of a strategy, one per file, each a dspy ``Teleprompter`` with one protocol:
``compile(program, *, trainset, valset=None, ...)`` returns the optimized program.

Modules: ``prompt`` (``PromptStep``: BFRS, kind ``bfrs``, the ``p`` step), ``weight`` (``WeightStep``:
LoRA fine-tuning on passing traces, kind ``finetune``, the ``w`` step), ``grpo`` (``GRPOStep``: RL on every
rollout's reward, kind ``grpo``, the ``g`` step), ``gepa`` (``GEPAStep``: dspy's
GEPA on the pool), ``mipro`` (``MIPROStep``: dspy's MIPROv2 on the pool), ``bootstrap`` (running a
program over examples and keeping the passing traces), ``kinds`` (the kinds by name, the run's step
table, building a step from its entry), ``options`` (a wrapped optimizer's arguments checked up
front). A new kind is a new file here and a name in ``kinds``.
Imports ``engine.evaluate`` and ``actors``; does not know run dirs, reports or the CLI.
"""

from engine.steps.prompt import Candidate, PromptStep
from engine.steps.weight import NoTrainingDataError, WeightStep

__all__ = ["Candidate", "NoTrainingDataError", "PromptStep", "WeightStep"]
