"""``GRPOStep``: reinforcement learning on the program's own rollouts as a step kind (``grpo``, the ``g`` step).

Each of ``steps`` updates: ``examples_per_step`` training examples (drawn by the run's seed and the update's
number, so a resumed step draws what the killed one would have), each run ``group_size`` times at
``temperature`` on the pool's replicas (every rollout its own ``rollout_id``, cache off), all at once
(``num_threads``); every rollout's metric value is its reward, the winners' and the losers' alike (the weight
step keeps only the winners), and a rollout whose answer did not parse (e.g. reasoning cut at ``max_tokens``)
gets ``unparsed_reward``. One group per (example, predictor): the predictor's first call in each rollout, the
prompt as sent (demos included: the policy is trained on what it saw) and the text the replica returned with the
token ids it sampled, read from the call's LM history. Then one update of
``actors.dspy_side.reinforce.TandemReinforceJob`` (a learner in a Ray actor that keeps the LoRA policy and its
optimizer for the whole step) and the new version hot-loaded into every replica before the next rollouts
(``sync_every``; between syncs the learner weighs the stale rollouts' tokens by their clipped importance ratio).
A rollout that broke (an error, not a wrong answer) is left out of its group (counted). Per update,
``last_run["grpo"]["history"]`` holds reward mean/std, groups without variance, loss, KL, tokens, staleness,
importance ratio and clipped share, rollouts/s, completion tokens/s and the seconds of rollouts, learning and
sync; the run stores it in ``step.json``, the report and MLflow show it.

Resume: the learner is checkpointed into the step's state dir after every update (adapter, optimizer
moments, step count, history); a killed step restarts from the last update done, serving that version.
Starts from the program's current model: the base model or a weight step's adapter (``p -> w -> g``). One
LM for all predictors (the multitask adapter). Does not know run dirs beyond the dirs it is given.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import field, fields
from pathlib import Path
from typing import Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from actors.dspy_side import usage
from actors.training.grpo import GRPOConfig
from actors.typed_config import typed_config
from engine.evaluate import run_all
from engine.steps.bootstrap import Trace, chat_rows

logger = logging.getLogger(__name__)


@typed_config
class GRPOStepConfig(GRPOConfig):
    """A ``g`` step: the learner's settings (``GRPOConfig``) and the rollout schedule."""

    steps: int = field(default=8, metadata={"help": "learner updates (GRPO steps)"})
    examples_per_step: int = field(default=4, metadata={"help": "training examples per update (one group each)"})
    group_size: int = field(default=6, metadata={"help": "rollouts per example (GRPO's group)"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    sync_every: int = field(default=1, metadata={
        "help": "put a new version on the replicas every N updates (N > 1: rollouts up to N-1 updates stale, their "
                "tokens weighted by the importance ratio clipped to 1 ± clip_eps)"})
    learner_cpus: float = field(default=1.0, metadata={
        "help": "CPUs each learner worker reserves (0 on a CPU box whose cores the replicas hold: it learns while "
                "they wait)"})
    learner_gpus: float = field(default=0.0, metadata={"help": "GPUs each learner worker reserves"})
    learner_workers: int = field(default=1, metadata={
        "help": "learner workers (N > 1: data parallel, each trains on 1/N of an update's rollouts and their "
                "gradients are summed: the same update as one worker's)"})
    unparsed_reward: float = field(default=-1.0, metadata={
        "help": "reward of a rollout whose answer did not parse (dspy GRPO's format_failure_score); it is trained "
                "on like the others, so the policy learns to finish its answer"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "examples_per_step", "sync_every", "learner_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo {name} must be >= 1, got {getattr(self, name)}")
        if self.zero_stage and self.learner_workers < 2:
            raise ValueError(f"grpo zero_stage {self.zero_stage} shards over learner workers: set learner_workers >= 2 "
                             f"(got {self.learner_workers}) or zero_stage 0")
        if self.group_size < 2:
            raise ValueError(f"grpo group_size must be >= 2 (a group of one has no relative advantage), "
                             f"got {self.group_size}")
        if self.temperature <= 0 or self.learner_cpus < 0 or self.learner_gpus < 0:
            raise ValueError("temperature must be > 0, learner_cpus and learner_gpus >= 0")

    def learner(self) -> dict:
        """The ``GRPOConfig`` fields, as the job's ``train_kwargs``."""
        return {f.name: getattr(self, f.name) for f in fields(GRPOConfig)}


class GRPOStep(Teleprompter):
    """GRPO updates of the program's pool LM from its own rollouts (see the module docstring).

    Args:
        metric: ``metric(example, prediction, trace)``; its value (``True`` = 1.0) is a rollout's reward.
        config: the schedule and the learner's settings.
        num_threads: rollouts in flight.
        seed: draws the examples of each update.
        learner_factory: passed to ``TandemReinforceJob`` (default: a Ray actor).

    Example:
        >>> step = GRPOStep(metric, GRPOStepConfig(steps=4, lr=1e-4))  # doctest: +SKIP
        >>> tuned = step.compile(program, trainset=train)  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, config: GRPOStepConfig | None = None, num_threads: int = 16, seed: int = 0,
                 learner_factory: Callable | None = None):
        self.metric = metric
        self.config = config or GRPOStepConfig()
        self.num_threads = num_threads
        self.seed = seed
        self.learner_factory = learner_factory
        self.last_run: dict = {}

    def compile(self, student: dspy.Module, *, trainset: list, valset=None, step_dir: str | Path | None = None,
                step_index: int = 0, adapter_root: str | Path | None = None,
                state_dir: str | Path | None = None) -> dspy.Module:
        """Run ``config.steps`` updates on ``trainset`` rollouts; the program on the last version.

        Raises:
            ValueError: an empty trainset, or predictors on different LMs (one policy is trained).
            engine.evaluate.TooManyErrors: rollouts hit ``max_errors`` errors.
        """
        from actors.dspy_side.reinforce import TandemReinforceJob
        from engine.steps.weight import provider_of

        if not trainset:
            raise ValueError("the GRPO step needs training examples")
        provider_of(student)  # every predictor on one Tandem pool, named otherwise
        lm = _shared_lm(student)
        cfg = self.config
        step_dir = Path(step_dir or tempfile.mkdtemp(prefix="tandem-g-"))
        job = TandemReinforceJob(
            lm.copy(), {**cfg.learner(), "groups_per_step": cfg.examples_per_step, "sync_every": cfg.sync_every,
                        "learner_cpus": cfg.learner_cpus, "learner_gpus": cfg.learner_gpus,
                        "learner_workers": cfg.learner_workers},
            self.learner_factory, job_id=f"grpo-{step_index:02d}", adapter_root=adapter_root or step_dir,
            state_dir=state_dir or step_dir / "grpo-state")
        meter = usage.active()
        try:
            job.initialize()  # inside: a learner that started before a failed resume is stopped too
            for update in range(job.version, cfg.steps):
                before, started = usage.now(), time.perf_counter()
                groups, counts = self._rollouts(student, job.lm, trainset, update)
                rollout_s = time.perf_counter() - started
                spent = usage.now() - before if before is not None else None
                tokens = spent.completion_tokens if spent is not None else None
                metrics = job.step(groups, "grpo_chat", extra={
                    **counts, "rollouts_per_s": round(counts["rollouts_run"] / rollout_s, 2),
                    "completion_tokens_per_s": round(tokens / rollout_s, 1) if tokens is not None else None})
                if meter is not None:
                    meter.add_training(metrics["seconds"])
            job.sync()  # the last version on the replicas, whatever sync_every
        finally:
            job.terminate()
        adapter = next(a for a in job.pool.adapter_records() if a.name == job.lm.model)
        self.last_run = {"grpo": {"job": job.job_id, "start_model": lm.model, "updates": job.version,
                                  "adapter": adapter.name, "adapter_path": str(adapter.path),
                                  "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
                                  "history": job.history}}
        tuned = student.deepcopy()
        for pred in tuned.predictors():
            pred.lm = pred.lm.copy(model=job.lm.model)
        return tuned

    def _rollouts(self, program: dspy.Module, lm: dspy.LM, trainset: list, update: int) -> tuple[list[dict], dict]:
        """One update's groups (dspy's GRPO chat format) from ``group_size`` rollouts of each drawn example."""
        cfg = self.config
        rng = random.Random(f"{self.seed}-grpo-{update}")
        examples = rng.sample(trainset, min(cfg.examples_per_step, len(trainset)))
        jobs, lms = [], []
        for k in range(cfg.group_size):
            for ex in examples:
                copy = program.deepcopy()
                mine = {}
                for name, pred in copy.named_predictors():  # an LM per call site: its history is this rollout's
                    # no per-request seed: vLLM 0.29's CPU runner crashes its engine when a seeded request's token
                    # is discarded (a prompt prefilled in chunks: "CPU Generator does not use offset")
                    pred.lm = mine[name] = lm.copy(temperature=cfg.temperature, rollout_id=update * cfg.group_size + k,
                                                   cache=False)
                jobs.append((copy, ex))
                lms.append(mine)
        runs = run_all(jobs, self.metric, num_threads=self.num_threads, trace=True,
                       desc=f"grpo update {update + 1}/{cfg.steps}: rollouts")
        groups: dict[tuple[int, str], list[dict]] = {}
        for run, mine in zip(runs, lms):
            if run.broke:
                continue
            reward = cfg.unparsed_reward if run.error else float(run.score)
            for name, call in _first_calls(program, run, mine).items():
                groups.setdefault((run.example_index % len(examples), name), []).append({**call, "reward": reward})
        batch = [{"batch_id": update, "group": group} for _, group in sorted(groups.items()) if len(group) > 1]
        counts = {"rollouts_run": len(runs), "rollouts_unparsed": sum(r.parse_failure for r in runs),
                  "rollouts_broken": sum(r.broke for r in runs)}
        return batch, counts


def _first_calls(program: dspy.Module, run, lms: dict[str, dspy.LM]) -> dict[str, dict]:
    """Each predictor's first call in a rollout as ``{"messages", "completion"}``: the prompt as sent and the text
    the replica returned (its LM's history: an answer that did not parse is there too), with
    ``"completion_ids"``, the tokens the replica sampled, when it sent them (vLLM's do: the learner then trains on
    those tokens, not on a re-tokenization of the text); for a rollout that ran elsewhere (evaluator actors: no
    history here), the trace's calls in the adapter's layout (parsed runs only)."""
    from actors.dspy_side.client import TOKEN_IDS_KEY

    calls = {}
    for name, lm in lms.items():
        if lm.history:
            entry = lm.history[0]
            output = entry["outputs"][0]
            text = output.get("text", "") if isinstance(output, dict) else str(output)
            calls[name] = {"messages": list(entry["messages"]), "completion": {"role": "assistant", "content": text}}
            sampled = (getattr(entry.get("response"), "provider_data", None) or {}).get(TOKEN_IDS_KEY)
            if sampled:
                calls[name]["completion_ids"] = list(sampled[0])
    if calls or run.error:
        return calls
    for row in chat_rows(program, [Trace(run.example_index, None, run.trace)], with_demos=True):
        messages = row["messages"]
        calls.setdefault(row["predictor"], {"messages": messages[:-1], "completion": messages[-1]})
    return calls


def _shared_lm(program: dspy.Module) -> dspy.LM:
    """The one LM model every predictor uses (the policy to train).

    Raises:
        ValueError: predictors on different models.
    """
    lms = {pred.lm.model: pred.lm for pred in program.predictors()}
    if len(lms) != 1:
        raise ValueError(f"the GRPO step trains one policy; the predictors use {sorted(lms)}: put them on one model")
    return next(iter(lms.values()))
