"""Prompt step wall-clock: Tandem's parallel ``PromptStep`` vs stock ``dspy.BootstrapFewShotWithRandomSearch``.

Same pool (N vLLM-CPU replicas), same program (Iris chain of thought on SmolLM2-135M), same
train/val data, same candidate count (3 fixed seeds + ``--candidates`` random ones), same thread
count; stock BFRS's threads call the pool through the same DSPy client. LM caching is off on both
sides, so every call really runs. Prints a table (wall s, LM calls, best valset score) and writes
JSON. Target: stock / Tandem wall-clock >= 3.

    python benchmarks/prompt_step.py --candidates 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--cores", type=float, default=1)
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--val", type=int, default=15)
    ap.add_argument("--candidates", type=int, default=6, help="random candidates besides the 3 fixed seeds")
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/out/prompt_step.json")
    args = ap.parse_args()

    import dspy

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from actors.dspy_side.provider import pool_lm
    from engine.steps.prompt import PromptStep
    from programs import iris

    splits = iris.load_splits(0)
    train, val = splits.train[: args.train], splits.dev[: args.val]
    connect(num_cpus=max(2, int(args.replicas * args.cores)))
    cfg = PoolConfig(replica=ReplicaConfig(model=args.model, num_cpus=args.cores, max_model_len=2048),
                     num_replicas=args.replicas, name="bench-prompt")
    rows = {}
    with ReplicaPool(cfg).launch() as pool, dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        lm = pool_lm(pool, max_tokens=args.max_tokens, stop=("[[ ## completed ## ]]",), cache=False)

        def program():
            p = iris.Program()
            p.set_lm(lm)
            return p

        lm(messages=[{"role": "user", "content": "Hello"}])  # a first call (SmolLM2 zero-shot does not parse)
        optimizers = {
            "tandem PromptStep": lambda: PromptStep(
                iris.metric, num_candidate_programs=args.candidates, max_bootstrapped_demos=3, max_labeled_demos=3,
                num_threads=args.threads, seed=0),
            "dspy BootstrapFewShotWithRandomSearch": lambda: dspy.BootstrapFewShotWithRandomSearch(
                iris.metric, num_candidate_programs=args.candidates, max_bootstrapped_demos=3, max_labeled_demos=3,
                num_threads=args.threads, max_errors=10**6),
        }
        for name, make in optimizers.items():
            before = sum(s["requests"] for s in pool.stats())
            started = time.perf_counter()
            with dspy.context(lm=lm):  # stock BFRS's zero-shot seed resets the predictors' LMs to the global one
                best = make().compile(program(), trainset=list(train), valset=list(val))
            wall = time.perf_counter() - started
            scores = [c["score"] for c in best.candidate_programs]
            rows[name] = {"wall_s": wall, "lm_calls": sum(s["requests"] for s in pool.stats()) - before,
                          "candidates": len(scores), "best_score": max(scores)}
            print(f"{name}: {wall:.1f} s, {rows[name]['lm_calls']} LM calls, best {max(scores):.1f}", flush=True)
    tandem, stock = rows["tandem PromptStep"], rows["dspy BootstrapFewShotWithRandomSearch"]
    ratio = stock["wall_s"] / tandem["wall_s"]
    print("\n| optimizer | candidates | wall s | LM calls | best valset % |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['candidates']} | {r['wall_s']:.1f} | {r['lm_calls']} | {r['best_score']:.1f} |")
    print(f"\nspeed-up (stock / tandem wall-clock) = {ratio:.2f}  (target >= 3)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "prompt_step", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpus": os.cpu_count(), "args": vars(args), "results": rows, "speedup": ratio}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
