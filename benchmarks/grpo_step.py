"""Unmodified dspy GRPO on a real pool through ``TandemProvider`` (issue 31, a first measurement).

The tiny random Llama on one vLLM-CPU replica picks a colour (a ``Literal``: constrained decoding makes
every rollout parse); the reward is 1 for 'blue' only. Per GRPO step: reward mean, groups without
variance, loss, and the time split into rollouts / learn / adapter sync (the new version on every
replica). Then the same ``--samples`` seeded samples (vLLM's per-request seed: the same random draws)
from the base model and from the final version: 'blue' gains only if the learner learned from the
pool's rollouts and the replica serves its adapter under the LM's model id.

Knows and does not: one replica and one in-process-sized learner (1 CPU), 2 cores; not the
8-64 simulated replicas of the issue (driver_scale), not a real model.

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/grpo_step.py [--steps 6 --lr 3e-2]
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--groups", type=int, default=8, help="groups (inputs) per step")
    ap.add_argument("--rollouts", type=int, default=8, help="rollouts per group")
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/out/grpo_step.json")
    args = ap.parse_args(argv)
    connect(num_cpus=2)
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
