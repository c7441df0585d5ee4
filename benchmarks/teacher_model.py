"""A built-in model as a teacher on this machine: replica start, throughput, memory and Iris zero-shot.

Before relying on a model as a teacher (``models:`` + ``teacher:``), measure what it costs and what it
knows: for each dtype, one pool of ``--replicas`` replicas of ``--model`` (``--cpus`` CPUs each) is
started (seconds to ready, the replicas' resident memory), then the Iris program, zero-shot (or with
``--demos N`` labelled demos, as a weight step's ``teacher_demos: N`` gives its teacher) with the
run's constrained adapter and max_tokens, answers the held-out test split of each seed: accuracy, the
answers' diversity, wall seconds, prompt and completion tokens, completion tokens/s per core. The
same model is then the teacher of ``benchmarks/RESULTS.md``'s quality table.

    python benchmarks/teacher_model.py --model qwen2.5-coder-1.5b-instruct --dtypes float32,bfloat16 --seeds 0

Prints a table and writes JSON (benchmarks/out/teacher_model.json).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from report import save


def _tree_rss_gb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**30


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--cpus", type=float, default=2.0, help="CPUs per replica")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--demos", type=int, default=0,
                    help="labelled demos from the run's trainset (its first --train examples), as a weight step's "
                         "teacher_demos gives the teacher; 0: zero-shot")
    ap.add_argument("--train", type=int, default=30, help="the run's train_size (the demos' pool)")
    ap.add_argument("--out", default="benchmarks/out/teacher_model.json")
    args = ap.parse_args(argv)

    import dspy

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from actors.dspy_side.provider import pool_lm
    from engine.adapters.registry import make_adapter, stop_for
    from engine.config import RunConfig
    from engine.held_out import score_held_out
    from engine.steps.bootstrap import labeled
    from programs import iris

    run = RunConfig()
    connect()
    rows = []
    for dtype in args.dtypes.split(","):
        pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(
            model=args.model, dtype=dtype, num_cpus=args.cpus, max_model_len=run.max_model_len, enable_lora=False),
            num_replicas=args.replicas, name=f"teacher-bench-{dtype}"))
        started = time.perf_counter()
        pool.launch()
        start_s = time.perf_counter() - started
        try:
            rss = sum(_tree_rss_gb(h["pid"]) for h in pool.health())
            for seed in (int(s) for s in args.seeds.split(",")):
                splits = iris.load_splits(seed)
                test, program = splits.test, iris.Program()
                if args.demos:
                    program = labeled(program, splits.train[:args.train], args.demos, sample=True)
                program.set_lm(pool_lm(pool, max_tokens=run.max_tokens, stop=stop_for(run.adapter), cache=False))
                before = pool.stats()
                began = time.perf_counter()
                with dspy.context(adapter=make_adapter(run.adapter)):
                    (held,) = score_held_out([program], test, iris.metric, num_threads=args.threads)
                wall = time.perf_counter() - began
                after = pool.stats()
                tokens = {k: sum(a[k] - b[k] for a, b in zip(after, before))
                          for k in ("prompt_tokens", "completion_tokens")}
                row = {"dtype": dtype, "seed": seed, "demos": args.demos, "start_s": round(start_s, 1), "rss_gb": round(rss, 2),
                       "test": asdict(held), "wall_s": round(wall, 1), **tokens,
                       "completion_tok_s_per_core": round(tokens["completion_tokens"] / wall / (args.cpus * args.replicas), 2)}
                rows.append(row)
                print(f"{dtype} seed {seed}: {held.score:.1f} % ({held.describe()}), {wall:.0f} s, "
                      f"{tokens['completion_tokens']} completion tokens", flush=True)
        finally:
            pool.kill()
    shots = f"{args.demos} labelled demos" if args.demos else "zero-shot"
    print(f"\n{args.model}, {args.replicas} replica(s) x {args.cpus:g} CPU, Iris {shots} (constrained, "
          f"max_tokens {run.max_tokens})\n")
    print("| dtype | seed | start s | RSS GB | test % | answers | wall s | prompt tok | completion tok | "
          "completion tok/s/core |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["test"]
        print(f"| {r['dtype']} | {r['seed']} | {r['start_s']} | {r['rss_gb']} | {t['score']:.1f} | "
              f"{t['distinct']} distinct, {t['top']!r} {t['top_count']}/{t['answered']}, {t['parse_failures']} unparsed | "
              f"{r['wall_s']} | {r['prompt_tokens']} | {r['completion_tokens']} | {r['completion_tok_s_per_core']} |")
    save(args.out, "teacher_model", args, rows=rows)


if __name__ == "__main__":
    main()
