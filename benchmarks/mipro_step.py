"""MIPROv2 on the pool: stock ``dspy.MIPROv2`` vs Tandem's MIPROv2 step, same settings, same pool.

Rows, side by side in one run on one pool (same program, data, seed, candidates and trials):
(a) ``stock``: ``dspy.MIPROv2(metric, auto=None, num_candidates=C, num_threads=T)``, its prompt model given the
    step's 512 tokens — its demo sets bootstrapped
    one set and one example at a time, its instructions proposed one at a time, trials one at a time;
(b) ``tandem``: ``MIPROStep`` — one concurrent bootstrap for every demo set, every proposal at once;
(c) ``tandem xN``: the same with ``trials_at_once=N``.
``--prompt-model M`` gives every variant the built-in model M as prompt model (a pool of its own, its cores
after the program's replicas'), as the docs' users give MIPROv2 a stronger model than the one it tunes.
``--mode sim``: the same against gepa_step's simulated replicas (a cluster's replicas that one trial does not fill).
Full-valset trials (``minibatch=False``: the valset is small). DSPy's cache is off (each variant pays for its
own calls). Each: wall time, valset and held-out test score (%), the test answers' distinct count.

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/mipro_step.py --candidates 4 --trials 8 --seeds 0 \
        [--adapter chat]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")

import report  # noqa: E402  (benchmarks/report.py)


def one(variant: str, program, splits, spec, args, seed: int, prompt_lm=None) -> dict:
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
        optimizer = dspy.MIPROv2(metric=spec.metric, prompt_model=prompt_lm or with_room(lm), task_model=lm,
                                 **settings)
        tuned = optimizer.compile(program.deepcopy(), trainset=splits.train, valset=splits.dev, **compile_args)
    else:
        at_once = int(variant.split("x")[-1]) if "x" in variant else 1
        step = MIPROStep(spec.metric, trials_at_once=at_once, prompt_model=prompt_lm, **settings)
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
    ap.add_argument("--prompt-model", default=None,
                    help="a built-in model as every variant's prompt model, on a pool of its own (one replica of "
                         "--prompt-cpus CPUs, bf16); default: the program's LM")
    ap.add_argument("--prompt-cpus", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=2, help="the program's replicas (one CPU each; --mode sim: 16)")
    ap.add_argument("--mode", choices=("real", "sim"), default="real",
                    help="real: SmolLM2 on vLLM-CPU; sim: gepa_step's simulated replicas (--replicas of them; "
                         "driver_scale's latency model, ChatAdapter)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="--mode sim: multiplies every simulated duration")
    ap.add_argument("--wrong", type=float, default=0.4, help="--mode sim: the share of prompts answered wrongly")
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
    cfg = PoolConfig(replica=ReplicaConfig(model=args.model, max_model_len=2048), num_replicas=args.replicas)
    with contextlib.ExitStack() as stack:
        prompt_lm = None
        if args.prompt_model:  # its cores after the program's replicas'
            prompt_pool = stack.enter_context(ReplicaPool(PoolConfig(replica=ReplicaConfig(
                model=args.prompt_model, dtype="bfloat16", num_cpus=args.prompt_cpus, max_model_len=4096,
                enable_lora=False, cpu_first_core=args.replicas), num_replicas=1, name="prompt-model")).launch())
            prompt_lm = pool_lm(prompt_pool, max_tokens=512, stop=stop_for(args.adapter), cache=False)
        if args.mode == "sim":  # gepa_step's simulated replicas answer in ChatAdapter's layout
            import gepa_step

            args.adapter = "chat"
            pool = stack.enter_context(gepa_step.sim_pool(args).launch())
        else:
            pool = stack.enter_context(ReplicaPool(cfg).launch())
        stack.enter_context(dspy.context(adapter=make_adapter(args.adapter)))
        for seed in (int(s) for s in args.seeds.split(",")):
            if args.mode == "sim":
                work, splits = gepa_step.sim_splits(args.program, seed)
                spec = dataclasses.replace(spec, factory=work.make, metric=work.metric)
            else:
                full = spec.splits(seed)
                splits = Splits(full.train[:args.train], full.dev[:args.val], full.test)
            for variant in args.variants.split(","):
                program = spec.program()
                program.set_lm(pool_lm(pool, max_tokens=args.max_tokens, stop=stop_for(args.adapter), cache=False))
                rows.append(one(variant.strip(), program, splits, spec, args, seed, prompt_lm))
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
