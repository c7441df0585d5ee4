"""The step kinds of a strategy, one per file, each a dspy ``Teleprompter`` with one protocol:
``compile(program, *, trainset, valset=None, ...)`` returns the optimized program.

Modules: ``prompt`` (``PromptStep``: BFRS, the ``p`` step), ``weight`` (``WeightStep``: LoRA
fine-tuning on passing traces, the ``w`` step), ``bootstrap`` (running a program over examples and
keeping the passing traces, which both use). A new kind (GEPA, MIPROv2, GRPO) is a new file here.
Imports ``engine.evaluate`` and ``actors``; does not know run dirs, reports or the CLI.
"""

from engine.steps.prompt import Candidate, PromptStep
from engine.steps.weight import NoTrainingDataError, WeightStep

__all__ = ["Candidate", "NoTrainingDataError", "PromptStep", "WeightStep"]
