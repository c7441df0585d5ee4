"""Adapter hot-load vs relaunch: how long until a live pool serves a new LoRA adapter (issue 19 §3).

The weight step ends with a new adapter that the next step's calls must reach. ``relaunch`` stops
the replicas and starts new ones that load it (what the embedded default does: training needs the
CPUs the replicas hold); ``hotswap`` loads it into the live replicas (``ReplicaPool.load_adapter``).
This measures both on the same pool, side by side, in one run: the call that makes the adapter
available, then the first request answered with it (vLLM loads LoRA weights on first use), then
a request once warm. Each hot-load uses a new adapter name (as every weight step does: one name
per version). Prints a table and writes JSON. Does not train: it serves an adapter that exists.

    flock /tmp/tandem-heavy.lock python benchmarks/adapter_swap.py --adapter runs/iris-smollm2/adapters/<dir>
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from report import save


def _first(pool, model: str) -> float:
    from actors import GenerateRequest

    started = time.perf_counter()
    pool.router.submit(GenerateRequest(model, messages=({"role": "user", "content": "Which iris has petals 1.4 cm?"},),
                                       max_tokens=16))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="a peft adapter dir of --model (e.g. a run's adapters/<dir>)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="hot-loads and relaunches each")
    ap.add_argument("--out", default="benchmarks/out/adapter_swap.json")
    args = ap.parse_args(argv)

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from actors.types import Adapter

    connect()
    cfg = PoolConfig(replica=ReplicaConfig(model=args.model, max_model_len=2048, max_lora_rank=64),
                     num_replicas=args.replicas, name="adapter-swap")
    rows = []
    started = time.perf_counter()
    with ReplicaPool(cfg).launch() as pool:
        launch_s = time.perf_counter() - started
        base = pool.model_id
        _first(pool, base)
        for i in range(args.repeats):
            name = f"{base}:hot-{i}"
            t0 = time.perf_counter()
            pool.load_adapter(name, args.adapter)
            ready = time.perf_counter() - t0
            first, warm = _first(pool, name), _first(pool, name)
            rows.append({"way": "hot-load", "repeat": i, "make_available_s": ready, "first_request_s": first,
                         "warm_request_s": warm, "until_served_s": ready + first})
            pool.unload_adapter(name)
        for i in range(args.repeats):
            name = f"{base}:re-{i}"
            t0 = time.perf_counter()
            pool.relaunch(Adapter(name, str(Path(args.adapter).resolve())))
            ready = time.perf_counter() - t0
            first, warm = _first(pool, name), _first(pool, name)
            rows.append({"way": "relaunch", "repeat": i, "make_available_s": ready, "first_request_s": first,
                         "warm_request_s": warm, "until_served_s": ready + first})
            pool.unload_adapter(name)
    head = "| way | repeat | make available s | first request s | warm request s | until served s |"
    print(f"\n{args.replicas} replica(s) of {args.model}, first launch {launch_s:.1f}s; {os.cpu_count()} CPUs\n")
    print(head + "\n" + "|---" * 6 + "|")
    for r in rows:
        print(f"| {r['way']} | {r['repeat']} | {r['make_available_s']:.1f} | {r['first_request_s']:.2f} | "
              f"{r['warm_request_s']:.2f} | {r['until_served_s']:.1f} |")
    save(args.out, "adapter_swap", args, launch_s=launch_s, rows=rows)


if __name__ == "__main__":
    main()
