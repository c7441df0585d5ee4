"""GEPA on the pool: stock ``dspy.GEPA`` (its defaults) vs Tandem's GEPA step, same budget, same pool.

Rows, side by side in one run on one pool (same program, data, seed, metric-call budget):
(a) ``stock``: ``dspy.GEPA(metric, max_metric_calls=B, reflection_lm=<the program's LM at T=1>)`` with
    dspy's default threads, the 5-argument metric written as a user of stock GEPA would;
(b) ``tandem``: ``GEPAStep(metric, max_metric_calls=B, num_threads=T)`` — the program's own metric,
    evaluations sized to the pool;
(c) ``tandem xN``: the same with ``proposals=N`` (gepa's parallel proposals).
DSPy's cache is off (each variant pays for its own calls). Each: wall time, metric calls, valset and held-out test score (%), and how many distinct answers the
test predictions hold (a one-class program scores that class's share). Prints a table, writes JSON.

    python benchmarks/gepa_step.py --budget 120 --seeds 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")

import report  # noqa: E402  (benchmarks/report.py)


def one(variant: str, program, splits, spec, budget: int, threads: int, seed: int) -> dict:
    import dspy

    from engine.evaluate import evaluate_many
    from engine.held_out import score_held_out
    from engine.steps.gepa import GEPAStep, feedback_metric, reflection_of

    started = time.perf_counter()
    if variant == "stock":
        optimizer = dspy.GEPA(metric=feedback_metric(spec.metric), max_metric_calls=budget,
                              reflection_lm=reflection_of(program), seed=seed, track_stats=True)
        tuned = optimizer.compile(program.deepcopy(), trainset=splits.train, valset=splits.dev)
    else:
        proposals = int(variant.split("x")[-1]) if "x" in variant else 1
        step = GEPAStep(spec.metric, max_metric_calls=budget, num_threads=threads, seed=seed, proposals=proposals)
        tuned = step.compile(program.deepcopy(), trainset=splits.train, valset=splits.dev)
    wall = time.perf_counter() - started
    details = getattr(tuned, "detailed_results", None)
    val = evaluate_many([tuned], splits.dev, spec.metric, num_threads=threads)[0]
    (test,) = score_held_out([tuned], splits.test, spec.metric, num_threads=threads)
    return {"variant": variant, "seed": seed, "wall_s": round(wall, 1),
            "metric_calls": getattr(details, "total_metric_calls", None),
            "candidates": len(getattr(details, "candidates", []) or []), "val_score": val,
            "test_score": test.score, "test_distinct": test.as_dict().get("distinct"),
            "instructions": [p.signature.instructions for p in tuned.predictors()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--program", default="iris")
    ap.add_argument("--budget", type=int, default=120, help="max_metric_calls of every variant")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--variants", default="stock,tandem,tandem x4")
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--val", type=int, default=15)
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--out", default="benchmarks/out/gepa_step.json")
    args = ap.parse_args()

    import dspy

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from actors.dspy_side.provider import pool_lm
    from engine.adapters import make_adapter, stop_for
    from programs.base import Splits, resolve

    spec = resolve(args.program)
    connect(num_cpus=2)
    rows = []
    cfg = PoolConfig(replica=ReplicaConfig(model=args.model, max_model_len=2048), num_replicas=2)
    with ReplicaPool(cfg).launch() as pool, dspy.context(adapter=make_adapter("constrained")):
        for seed in (int(s) for s in args.seeds.split(",")):
            full = spec.splits(seed)
            splits = Splits(full.train[:args.train], full.dev[:args.val], full.test)
            for variant in args.variants.split(","):
                program = spec.program()
                program.set_lm(pool_lm(pool, max_tokens=args.max_tokens, stop=stop_for("constrained"), cache=False))
                rows.append(one(variant.strip(), program, splits, spec, args.budget, args.threads, seed))
                r = rows[-1]
                print(f"{r['variant']:<10} seed {seed} wall {r['wall_s']:>7.1f}s calls {r['metric_calls']} "
                      f"candidates {r['candidates']} val {r['val_score']:.1f} test {r['test_score']:.1f} "
                      f"distinct {r['test_distinct']}", flush=True)
    stock = {r["seed"]: r["wall_s"] for r in rows if r["variant"] == "stock"}
    for r in rows:
        if r["seed"] in stock:
            r["speedup_vs_stock"] = round(stock[r["seed"]] / r["wall_s"], 2)
    print(f"{'variant':<10} {'seed':>4} {'wall_s':>8} {'calls':>6} {'val':>6} {'test':>6} {'x stock':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['seed']:>4} {r['wall_s']:>8.1f} {str(r['metric_calls']):>6} "
              f"{r['val_score']:>6.1f} {r['test_score']:>6.1f} {r.get('speedup_vs_stock', '-'):>8}")
    report.save(args.out, "gepa_step", args, rows=rows)


if __name__ == "__main__":
    main()
