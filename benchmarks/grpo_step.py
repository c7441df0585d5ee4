"""GRPO on a real pool: Tandem's ``g`` step at 1 and 2 replicas (``--mode g``, the default), or unmodified dspy
GRPO through ``TandemProvider`` (``--mode dspy``) (issue 31).

The tiny random Llama on one vLLM-CPU replica picks a colour (a ``Literal``: constrained decoding makes
every rollout parse); the reward is 1 for 'blue' only. Per GRPO step: reward mean, groups without
variance, loss, and the time split into rollouts / learn / adapter sync (the new version on every
replica). Then the same ``--samples`` seeded samples (vLLM's per-request seed: the same random draws)
from the base model and from the final version: 'blue' gains only if the learner learned from the
pool's rollouts and the replica serves its adapter under the LM's model id.

``--mode g`` also measures, on the same pool and just before the step, the pool's batch throughput: the
same number of rollouts (same program, temperature, cache off) run at once with no learner — the
ratio of the step's rollouts/s to it is the issue's "within 0.9" figure; and each update's time split
(rollouts / learn / sync: the issue's "sync under 5 %").

``--mode sim`` runs the same g step against 8-64 *simulated* replicas (``benchmarks/driver_scale.py``'s
``SimulatedEngine``: a continuously batching engine modelled as processor sharing, by default an 8B model on one
H100; here it also samples: at temperature > 0 an Iris answer is a random class half of the time, so groups have
reward variance). The program is Iris's chain of thought, the learner the real one (LoRA on the tiny model,
which the simulated replicas "serve": they keep the adapter's id, not its weights). What it measures is Tandem's
own overhead at scale: the driver's rollouts/s against the same rollouts run as one batch with no learner, and
the sync (the adapter saved, then hot-loaded on every replica and the old version unloaded) at 8-64 replicas.
It does not measure learning (the simulated answers ignore the adapter) nor a GPU learner's speed.

Knows and does not: ``--mode g``: 1-2 real replicas and a learner that reserves no CPU (it learns while the
replicas wait), 2 cores, the tiny random model, not a real task.

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/grpo_step.py [--replicas 1,2 --steps 6 --lr 3e-2]
    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/grpo_step.py --mode sim --replicas 8,16,32,64 \
        --groups 32 --rollouts 4 --steps 3
    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/grpo_step.py --mode dspy --replicas 1
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import dspy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dspy.teleprompt.grpo import GRPO  # noqa: E402  (dspy 3.4.1 does not export it as dspy.GRPO)
from dspy.utils.exceptions import AdapterParseError  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect  # noqa: E402
from actors.dspy_side.provider import TandemProvider  # noqa: E402
from engine.adapters.registry import make_adapter  # noqa: E402


class Pick(dspy.Signature):
    """Name a colour."""

    question: str = dspy.InputField()
    answer: Literal["red", "green", "blue"] = dspy.OutputField()


def blue_share(lm, model: str, n: int) -> float:
    """The share of 'blue' in ``n`` samples from ``model`` with seeds 0..n-1 (an unparsed answer counts as not blue)."""
    predict = dspy.Predict(Pick)
    predict.set_lm(lm.copy(model=model))
    answers = []
    with dspy.context(adapter=make_adapter("constrained")):
        for i in range(n):
            try:
                answers.append(predict(question=f"Item {i % 8}: what colour?", config={"seed": i}).answer)
            except AdapterParseError:  # the random model can run out of tokens in the layout's whitespace
                answers.append(None)
    return answers.count("blue") / n


def blue(example, prediction, trace=None) -> float:
    return float(prediction.answer == "blue")


def batch_then_step(args, program, lm, examples: list, metric) -> tuple[float, object, object, float]:
    """Inside the caller's adapter context: one update's rollouts (``args.groups`` x ``args.rollouts``, temperature 1,
    no learner) run once to warm up and once timed, then the g step on ``examples``; (batch rollouts/s, the step,
    the tuned program, the step's wall seconds)."""
    from engine.evaluate import run_all
    from engine.steps.grpo import GRPOStep, GRPOStepConfig

    n = args.groups * args.rollouts
    sample = program.deepcopy()
    sample.set_lm(lm.copy(temperature=1.0))
    jobs = [(sample, examples[i % len(examples)]) for i in range(n)]
    run_all(jobs, metric, num_threads=n, desc="warm-up")
    started = time.perf_counter()
    run_all(jobs, metric, num_threads=n, desc="batch throughput")
    batch_rps = n / (time.perf_counter() - started)
    step = GRPOStep(metric, GRPOStepConfig(steps=args.steps, examples_per_step=args.groups, group_size=args.rollouts,
                                           lr=args.lr, rank=8, alpha=16, learner_cpus=0), num_threads=n)
    started = time.perf_counter()
    tuned = step.compile(program, trainset=examples)
    return batch_rps, step, tuned, time.perf_counter() - started


def g_step(args, replicas: int) -> dict:
    """The pool's batch throughput, then the g step, then base vs final 'blue' share, on ``replicas`` replicas."""
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=512, num_cpus=2 / replicas,
                                                        max_lora_rank=8), num_replicas=replicas,
                                  name=f"grpo-bench-{replicas}"))
    provider = TandemProvider(pool, lifecycle="hotswap", adapter_root=tempfile.mkdtemp(prefix="grpo-bench-"))
    program = dspy.Predict(Pick)
    program.set_lm(provider.lm(max_tokens=64, cache=False))
    trainset = [dspy.Example(question=f"Item {i}: what colour?").with_inputs("question") for i in range(8)]
    try:
        pool.launch()
        with dspy.context(adapter=make_adapter("constrained")):
            batch_rps, step, tuned, wall = batch_then_step(args, program, program.lm, trainset, blue)
        sampled = program.lm.copy(temperature=1.0)
        shares = {m: blue_share(sampled, m, args.samples) for m in (pool.model_id, tuned.lm.model)}
        greedy = {m: blue_share(program.lm, m, 8) for m in (pool.model_id, tuned.lm.model)}
    finally:
        pool.kill()
    history = step.last_run["grpo"]["history"]
    return {"replicas": replicas, "batch_rollouts_per_s": batch_rps, "history": history, "wall_s": wall,
            "blue_base": shares[pool.model_id], "blue_final": shares[tuned.lm.model],
            "greedy_blue_base": greedy[pool.model_id], "greedy_blue_final": greedy[tuned.lm.model]}


_ANSWER = re.compile(r"(\[\[ ## answer ## \]\]\n)(\w+)")
_CLASSES = ("setosa", "versicolor", "virginica")


def sampling_factory(model):
    """driver_scale's ``SimulatedFactory`` whose engines, at temperature > 0, answer a random Iris class half of the
    time (the rule's answer otherwise): GRPO groups then have reward variance."""
    import driver_scale
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(driver_scale)  # the replica actors cannot import benchmarks/ modules

    class SamplingEngine(driver_scale.SimulatedEngine):
        async def generate(self, prompt_ids, request, adapter, request_id):
            texts, reasons, tokens = await super().generate(prompt_ids, request, adapter, request_id)
            if request.temperature > 0:
                texts = [_ANSWER.sub(lambda m: m.group(1) + random.choice(_CLASSES), t) if random.random() < 0.5
                         else t for t in texts]
            return texts, reasons, tokens

    class SamplingFactory(driver_scale.SimulatedFactory):
        def __call__(self, cfg, model_path):
            return SamplingEngine(cfg, model_path, self.model)

    return SamplingFactory(model)


def sim_step(args, replicas: int) -> dict:
    """The batch throughput of one update's rollouts, then the g step, on ``replicas`` simulated replicas."""
    import driver_scale

    model = driver_scale.LatencyModel(time_scale=args.time_scale)
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", model_id="sim-8b", num_cpus=0.01,
                                                        max_model_len=8192, max_lora_rank=8, max_restarts=0),
                                  num_replicas=replicas, name=f"grpo-sim-{replicas}", start_timeout_s=600),
                       engine_factory=sampling_factory(model))
    provider = TandemProvider(pool, lifecycle="hotswap", adapter_root=tempfile.mkdtemp(prefix="grpo-sim-"))
    work = driver_scale.workload("iris", args.groups)
    program, lm = work.make(), provider.lm(max_tokens=model.answer_tokens, cache=False)
    program.set_lm(lm)
    try:
        started = time.perf_counter()
        pool.launch()
        launch_s = time.perf_counter() - started
        with dspy.context(adapter=make_adapter("chat")):
            batch_rps, step, _, wall = batch_then_step(args, program, lm, work.examples, work.metric)
    finally:
        pool.kill()
    return {"replicas": replicas, "launch_s": launch_s, "batch_rollouts_per_s": batch_rps, "wall_s": wall,
            "history": step.last_run["grpo"]["history"], "model": asdict(model)}


def time_split(row: dict) -> dict:
    """Per-update means of rollouts/s and the rollout / learn / sync seconds; sets ``row``'s ratio (to the batch
    throughput) and sync share (of an update's time)."""
    h = row["history"]
    mean = {k: sum(m[k] for m in h) / len(h) for k in ("rollouts_per_s", "rollout_s", "seconds", "sync_s")}
    row["ratio"] = mean["rollouts_per_s"] / row["batch_rollouts_per_s"]
    row["sync_share"] = mean["sync_s"] / (mean["rollout_s"] + mean["seconds"] + mean["sync_s"])
    return mean


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("g", "sim", "dspy"), default="g")
    ap.add_argument("--replicas", default="", help="--mode g / sim: replica counts, one pool each (1,2 / 8,16,32,64)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="--mode sim: multiplies every simulated duration")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--groups", type=int, default=8, help="groups (inputs) per step")
    ap.add_argument("--rollouts", type=int, default=8, help="rollouts per group")
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/out/grpo_step.json")
    args = ap.parse_args(argv)
    args.replicas = args.replicas or ("8,16,32,64" if args.mode == "sim" else "1,2")
    connect(num_cpus=2)
    if args.mode == "sim":
        rows = [sim_step(args, int(r)) for r in args.replicas.split(",")]
        print("| replicas | rollouts per update | batch rollouts/s | g rollouts/s | ratio | rollouts s | learn s | "
              "sync s | sync share |\n|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            mean = time_split(row)
            print(f"| {row['replicas']} | {args.groups * args.rollouts} | {row['batch_rollouts_per_s']:.1f} | "
                  f"{mean['rollouts_per_s']:.1f} | {row['ratio']:.2f} | {mean['rollout_s']:.1f} | "
                  f"{mean['seconds']:.1f} | {mean['sync_s']:.2f} | {100 * row['sync_share']:.1f} % |")
        report.save(args.out, "grpo_step", args, mode="sim", rows=rows)
        return
    if args.mode == "g":
        rows = [g_step(args, int(r)) for r in args.replicas.split(",")]
        print("| replicas | batch rollouts/s | g rollouts/s | ratio | rollouts s | learn s | sync s | sync share | "
              "reward per update | 'blue' sampled, base -> final | greedy |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            h, mean = row["history"], time_split(row)
            print(f"| {row['replicas']} | {row['batch_rollouts_per_s']:.1f} | {mean['rollouts_per_s']:.1f} | "
                  f"{row['ratio']:.2f} | {mean['rollout_s']:.1f} | {mean['seconds']:.1f} | {mean['sync_s']:.2f} | "
                  f"{100 * row['sync_share']:.1f} % | {[round(m['reward_mean'], 2) for m in h]} | "
                  f"{row['blue_base']:.3f} -> {row['blue_final']:.3f} | {row['greedy_blue_base']:.0%} -> "
                  f"{row['greedy_blue_final']:.0%} |")
        report.save(args.out, "grpo_step", args, mode="g", rows=rows)
        return
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=512, num_cpus=1,
                                                        max_lora_rank=8), num_replicas=1, name="grpo-bench"))
    provider = TandemProvider(pool, lifecycle="hotswap", adapter_root=tempfile.mkdtemp(prefix="grpo-bench-"))
    program = dspy.Predict(Pick)
    program.set_lm(provider.lm(max_tokens=64, cache=False, temperature=1.0))
    trainset = [dspy.Example(question=f"Item {i}: what colour?").with_inputs("question") for i in range(8)]
    started = time.perf_counter()
    try:
        pool.launch()
        with dspy.context(adapter=make_adapter("constrained")):
            GRPO(metric=lambda example, prediction, trace=None: float(prediction.answer == "blue"),
                 num_train_steps=args.steps, num_dspy_examples_per_grpo_step=args.groups,
                 num_rollouts_per_grpo_step=args.rollouts, exclude_demos=True, num_threads=8,
                 train_kwargs={"lr": args.lr, "rank": 8, "alpha": 16, "groups_per_step": args.groups}
                 ).compile(program, trainset=trainset)
        wall = time.perf_counter() - started
        (job,) = provider.reinforce_jobs
        shares = {m: blue_share(program.lm, m, args.samples) for m in (pool.model_id, program.lm.model)}
    finally:
        pool.kill()
    print("| step | reward mean | groups w/o variance | loss | rollouts s | learn s | sync s |\n"
          "|---|---|---|---|---|---|---|")
    for m in job.history:
        print(f"| {m['step']} | {m['reward_mean']:.3f} | {m['zero_variance_groups']}/{m['groups']} | {m['loss']:.4f} | "
              f"{m['rollout_s']:.1f} | {m['seconds']:.1f} | {m['sync_s']:.2f} |")
    print(f"'blue' in {args.samples} seeded samples: base {shares[pool.model_id]:.3f}, final "
          f"{shares[program.lm.model]:.3f}; wall {wall:.0f} s")
    report.save(args.out, "grpo_step", args, mode="dspy", history=job.history, blue_share=shares, wall_s=wall)


if __name__ == "__main__":
    main()
