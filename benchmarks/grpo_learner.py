"""GRPO's learner alone, on several workers: one worker vs two (LoRA gradients all-reduced) vs two under
DeepSpeed ZeRO-2 and ZeRO-3 (issue 31 §2: "DDP/ZeRO as the w step").

The same fixed update batches (Iris-like prompts, reasoned completions of 60-200 tokens, rewards drawn with the
seed; no pool: what is measured is the learner) go to each layout in turn; per layout: seconds per update
(after the first), each worker's peak resident memory and share of the model's weights, the loss and gradient
norm of every update, and how far the final adapter is from the one-worker adapter (max |delta| over the LoRA
weights: the layouts take the same updates, so it should be float noise).

Knows and does not: CPU workers (gloo), each with ``--threads`` torch threads; on a 2-core machine two workers
share the cores, so the two-worker times say what the split costs, not what two machines would gain. Memory is
the point of ZeRO-3 (each worker loads its shard of the base model); ZeRO-1/2 shard only LoRA's optimizer state
and gradients, which are small.

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/grpo_learner.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402  (benchmarks/report.py)

from actors import connect, models  # noqa: E402
from actors.dspy_side.reinforce import ray_learner  # noqa: E402
from actors.training.grpo import GRPOConfig  # noqa: E402

LAYOUTS = {"one": ("1 worker", 1, 0), "allreduce": ("2 workers, all-reduce", 2, 0),
           "zero2": ("2 workers, ZeRO-2", 2, 2), "zero3": ("2 workers, ZeRO-3", 2, 3)}
WORDS = ("petal", "sepal", "length", "width", "is", "short", "long", "so", "the", "flower", "looks", "like", "a",
         "wide", "narrow", "and", "measures", "cm", "compared", "with", "typical", "species")


def batches(updates: int, groups: int, size: int, seed: int) -> list[list[dict]]:
    """``updates`` lists of ``groups`` GRPO groups of ``size`` rollouts each."""
    rng = random.Random(seed)
    out = []
    for u in range(updates):
        batch = []
        for g in range(groups):
            sample = [round(rng.uniform(1, 8), 1) for _ in range(4)]
            prompt = [{"role": "system", "content": "Classify the iris from its measurements."},
                      {"role": "user", "content": f"sepal length {sample[0]}, sepal width {sample[1]}, petal length "
                                                  f"{sample[2]}, petal width {sample[3]}. Which species?"}]
            rollouts = []
            for _ in range(size):
                reasoning = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 150)))
                answer = rng.choice(("setosa", "versicolor", "virginica"))
                rollouts.append({"messages": prompt, "reward": float(rng.random() < 0.4), "completion": {
                    "role": "assistant", "content": f"[[ ## reasoning ## ]]\n{reasoning}\n\n[[ ## answer ## ]]\n"
                                                    f"{answer}\n\n[[ ## completed ## ]]"}})
            batch.append({"batch_id": u, "group": rollouts})
        out.append(batch)
    return out


def run(layout: str, model_path: str, cfg: GRPOConfig, data: list, out: Path) -> dict:
    import ray
    from safetensors.torch import load_file

    label, workers, stage = LAYOUTS[layout]
    learner = ray_learner(model_path, dataclasses.replace(cfg, zero_stage=stage), 0, 0, None, workers)
    try:
        times, history = [], []
        for batch in data:
            started = time.perf_counter()
            metrics = learner.step(batch) if workers > 1 else ray.get(learner.step.remote(batch))
            times.append(time.perf_counter() - started)
            history.append({k: metrics[k] for k in ("loss", "grad_norm", "tokens")})
        path = learner.save(str(out)) if workers > 1 else ray.get(learner.save.remote(str(out)))
        handles = learner.workers if workers > 1 else [learner]
        feet = ray.get([(w.call.remote("footprint") if workers > 1 else w.footprint.remote()) for w in handles])
    finally:
        if workers > 1:
            learner.stop()
        else:
            ray.kill(learner)
    return {"layout": label, "workers": workers, "zero_stage": stage,
            "s_per_update": sum(times[1:]) / max(1, len(times) - 1), "first_update_s": times[0],
            "peak_rss_mib": [f["peak_rss_mib"] for f in feet], "weights_held": [f["weights_held"] for f in feet],
            "history": history, "weights": load_file(f"{path}/adapter_model.safetensors")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.EMBEDDED)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/grpo_learner.json")
    args = ap.parse_args(argv)
    connect(num_cpus=2)
    model_path = str(models.materialize(args.model))
    cfg = GRPOConfig(lr=1e-4, rank=16, alpha=32, micro_batch_size=2, threads=args.threads, seed=args.seed)
    data = batches(args.updates, args.groups, args.group_size, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            rows.append(run(layout, model_path, cfg, data, Path(tmp) / layout))
            print(f"{rows[-1]['layout']}: {rows[-1]['s_per_update']:.1f} s per update", flush=True)
    base = rows[0]["weights"]
    for row in rows:
        weights = row.pop("weights")
        row["max_abs_delta_vs_first"] = max(float((weights[k] - base[k]).abs().max()) for k in base)
    print(f"\nGRPO learner on {args.model}: {args.updates} updates of {args.groups} x {args.group_size} rollouts, "
          f"{args.threads} torch thread(s) per worker\n")
    print("| layout | s per update | first update s | peak RSS MiB per worker | weights held per worker | "
          "loss per update | max abs delta vs first layout |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['s_per_update']:.1f} | {r['first_update_s']:.1f} | "
              f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib'])} | "
              f"{', '.join(f'{w:.2f}' for w in r['weights_held'])} | "
              f"{[round(h['loss'], 4) for h in r['history']]} | {r['max_abs_delta_vs_first']:.2e} |")
    report.save(args.out, "grpo_learner", args, rows=rows)


if __name__ == "__main__":
    main()
