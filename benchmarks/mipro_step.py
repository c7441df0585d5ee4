"""MIPROv2 on the pool: stock ``dspy.MIPROv2`` vs Tandem's MIPROv2 step, same settings, same pool.

Rows, side by side in one run on one pool (same program, data, seed, candidates and trials):
(a) ``stock``: ``dspy.MIPROv2(metric, auto=None, num_candidates=C, num_threads=T)``, its prompt model given the
    step's 512 tokens — its demo sets bootstrapped
    one set and one example at a time, its instructions proposed one at a time, trials one at a time;
(b) ``tandem``: ``MIPROStep`` — one concurrent bootstrap for every demo set, every proposal at once;
(c) ``tandem xN``: the same with ``trials_at_once=N``.
Full-valset trials (``minibatch=False``: the valset is small). DSPy's cache is off (each variant pays for its
own calls). Each: wall time, valset and held-out test score (%), the test answers' distinct count.

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/mipro_step.py --candidates 4 --trials 8 --seeds 0 \
        [--adapter chat]
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


def one(variant: str, program, splits, spec, args, seed: int) -> dict:
    import dspy

    from engine.evaluate import evaluate_many
    from engine.held_out import score_held_out
    from engine.steps.mipro import MIPROStep
    from engine.steps.options import with_room

    settings = dict(auto=None, num_candidates=args.candidates, max_bootstrapped_demos=2, max_labeled_demos=2,
                    num_threads=args.threads, seed=seed)
    compile_args = dict(num_trials=args.trials, minibatch=False)
    started = time.perf_counter()
    if variant == "stock":
        lm = program.predictors()[0].lm  # the prompt model gets the step's default room for an instruction
        optimizer = dspy.MIPROv2(metric=spec.metric, prompt_model=with_room(lm), task_model=lm,
                                 **settings)
        tuned = optimizer.compile(program.deepcopy(), trainset=splits.train, valset=splits.dev, **compile_args)
    else:
        at_once = int(variant.split("x")[-1]) if "x" in variant else 1
        step = MIPROStep(spec.metric, trials_at_once=at_once, **settings)
        tuned = step.compile(program.deepcopy(), trainset=splits.train, valset=splits.dev, **compile_args)
    wall = time.perf_counter() - started
    val = evaluate_many([tuned], splits.dev, spec.metric, num_threads=args.threads)[0]
    (test,) = score_held_out([tuned], splits.test, spec.metric, num_threads=args.threads)
    return {"variant": variant, "seed": seed, "wall_s": round(wall, 1), "val_score": val, "test_score": test.score,
            "test_distinct": test.as_dict().get("distinct"), "best_trial_score": getattr(tuned, "score", None),
            "instructions": [p.signature.instructions for p in tuned.predictors()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--program", default="iris")
    ap.add_argument("--candidates", type=int, default=4, help="num_candidates (demo sets and instructions)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--variants", default="stock,tandem,tandem x4")
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--val", type=int, default=15)
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--adapter", default="constrained", help="constrained, chat or json (every variant the same)")
    ap.add_argument("--out", default="benchmarks/out/mipro_step.json")
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
    with ReplicaPool(cfg).launch() as pool, dspy.context(adapter=make_adapter(args.adapter)):
        for seed in (int(s) for s in args.seeds.split(",")):
            full = spec.splits(seed)
            splits = Splits(full.train[:args.train], full.dev[:args.val], full.test)
            for variant in args.variants.split(","):
                program = spec.program()
                program.set_lm(pool_lm(pool, max_tokens=args.max_tokens, stop=stop_for(args.adapter), cache=False))
                rows.append(one(variant.strip(), program, splits, spec, args, seed))
                r = rows[-1]
                print(f"{r['variant']:<10} seed {seed} wall {r['wall_s']:>7.1f}s val {r['val_score']:.1f} "
                      f"test {r['test_score']:.1f} distinct {r['test_distinct']}", flush=True)
    stock = {r["seed"]: r["wall_s"] for r in rows if r["variant"] == "stock"}
    for r in rows:
        if r["seed"] in stock:
            r["speedup_vs_stock"] = round(stock[r["seed"]] / r["wall_s"], 2)
    print(f"{'variant':<10} {'seed':>4} {'wall_s':>8} {'val':>6} {'test':>6} {'distinct':>8} {'x stock':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['seed']:>4} {r['wall_s']:>8.1f} {r['val_score']:>6.1f} {r['test_score']:>6.1f} "
              f"{str(r['test_distinct']):>8} {r.get('speedup_vs_stock', '-'):>8}")
    report.save(args.out, "mipro_step", args, rows=rows)


if __name__ == "__main__":
    main()
