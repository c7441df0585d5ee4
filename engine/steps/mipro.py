"""``MIPROStep``: dspy's MIPROv2 (instructions and demos searched together) as a step kind, on the pool.

Runs stock ``dspy.MIPROv2``, built at compile time so that its task model is the program's LM as the
step gets it (after a weight step: the fine-tuned one; dspy binds ``settings.lm`` at construction)
and its prompt model is the program's LM unless ``prompt_model=`` is given. Its evaluations run on
``num_threads`` concurrent program runs sized to the pool (dspy's default is 8). ``optuna`` (its
search, which dspy imports only after bootstrapping and instruction proposal have spent their LM
calls) is a dependency (``dspy[optuna]``) and is imported here before any LM call. Trials run one at
a time, as in dspy (TPE's ``n_jobs=1``). Compile arguments (``num_trials``, ``max_bootstrapped_demos``,
``minibatch`` …) come from the run's per-step ``compile_args``. Does not know run dirs or pools.
"""

from __future__ import annotations

from typing import Any, Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter


class MIPROStep(Teleprompter):
    """Run ``dspy.MIPROv2`` as a BetterTogether step (see the module docstring).

    Args:
        metric: the program's metric.
        prompt_model: the LM that proposes instructions; default the program's LM.
        num_threads: concurrent program runs for MIPROv2's evaluations (size it to the pool).
        auto: MIPROv2's preset ('light', 'medium', 'heavy'; None with ``num_candidates``).
        seed: MIPROv2's seed.
        **mipro_options: more ``dspy.MIPROv2`` constructor arguments (``num_candidates``,
            ``max_bootstrapped_demos``, ``max_labeled_demos``, ``init_temperature`` …).

    Example:
        >>> step = MIPROStep(iris.metric, auto="light", num_threads=32)  # doctest: +SKIP
        >>> tuned = step.compile(program, trainset=train, valset=val, num_trials=10)  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, *, prompt_model: dspy.LM | None = None, num_threads: int = 32,
                 auto: str | None = "light", seed: int = 9, **mipro_options: Any):
        import inspect

        import optuna  # noqa: F401  # pyflakes: ignore -- dspy imports it only after the bootstrap's LM calls

        taken = set(inspect.signature(dspy.MIPROv2.__init__).parameters) - {"self", "metric", "task_model"}
        unknown = sorted(set(mipro_options) - taken)
        if unknown:
            raise ValueError(f"MIPROv2 does not take {unknown}; its arguments: {sorted(taken)}")
        self.metric = metric
        self.prompt_model = prompt_model
        self.num_threads = num_threads
        self.auto = auto
        self.seed = seed
        self.mipro_options = mipro_options

    def compile(self, student: dspy.Module, *, trainset: list, valset: list | None = None, teacher=None,
                **compile_args: Any) -> dspy.Module:
        """MIPROv2 on ``student`` with ``compile_args`` (dspy's ``MIPROv2.compile`` arguments)."""
        lms = {id(p.lm): p.lm for p in student.predictors() if p.lm is not None}
        task = next(iter(lms.values())) if len(lms) == 1 else None
        optimizer = dspy.MIPROv2(metric=self.metric, prompt_model=self.prompt_model or task, task_model=task,
                                 num_threads=self.num_threads, auto=self.auto, seed=self.seed, **self.mipro_options)
        return optimizer.compile(student, trainset=trainset, valset=valset or None, teacher=teacher, **compile_args)
