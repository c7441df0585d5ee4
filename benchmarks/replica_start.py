"""Replica start on the CPU path: the model in the EngineCore process vs in a worker process of its own.

vLLM-CPU runs a one-rank engine as three processes: the replica's (the async client), the
EngineCore it spawns, and a worker process the EngineCore spawns only to give the model the
OpenMP binding of its cores; each new process imports vLLM and torch again. Tandem runs the model
in the EngineCore process under the same binding (``ReplicaConfig.cpu_worker_process`` False, the
default). This starts the same pool both ways, alternately, in one run, and for each start measures:
seconds until every replica is ready, the resident memory of the replicas' process trees, and
the seconds to answer one fixed batch of chat requests (greedy; the texts of both ways are
compared). Every pool start pays it twice in a relaunching run (start, then relaunch with the
adapter). Prints a table and writes JSON.

    flock /tmp/tandem-heavy.lock python benchmarks/replica_start.py
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from report import save

PROMPT = ("Given the fields sepal_length, sepal_width, petal_length, petal_width, produce the field species. " * 12
          + "Flower {i}: petal length {p:.1f} cm, sepal length {s:.1f} cm. Which iris is it?")


def _tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def _batch(pool, n: int) -> tuple[float, list[str]]:
    from actors import GenerateRequest

    reqs = [GenerateRequest(pool.model_id, messages=({"role": "user", "content": PROMPT.format(
        i=i, p=1 + i % 50 / 10, s=5 + i % 7 / 10)},), max_tokens=32) for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(min(64, n)) as ex:
        texts = [c.text for c in ex.map(pool.router.submit, reqs)]
    return time.perf_counter() - started, texts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="starts of each way (alternating)")
    ap.add_argument("--requests", type=int, default=128, help="chat requests in the timed batch")
    ap.add_argument("--out", default="benchmarks/out/replica_start.json")
    args = ap.parse_args(argv)

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect

    connect()
    base = PoolConfig(replica=ReplicaConfig(model=args.model, max_model_len=2048), num_replicas=args.replicas,
                      name="replica-start")
    rows, texts = [], {}
    for repeat in range(args.repeats):
        for way, worker_process in (("worker process (vLLM's)", True), ("in EngineCore (Tandem)", False)):
            cfg = replace(base, replica=replace(base.replica, cpu_worker_process=worker_process))
            started = time.perf_counter()
            with ReplicaPool(cfg).launch() as pool:
                ready_s = time.perf_counter() - started
                rss = sum(_tree_rss_mb(h["pid"]) for h in pool.health())
                batch_s, out = _batch(pool, args.requests)
            texts.setdefault(way, out)
            rows.append({"way": way, "repeat": repeat, "ready_s": ready_s, "rss_mb": rss, "batch_s": batch_s})
            print(f"{way} #{repeat}: ready {ready_s:.1f}s, {rss:.0f} MB, batch {batch_s:.1f}s", flush=True)
    same = len({tuple(t) for t in texts.values()}) == 1
    print(f"\n{args.replicas} replica(s) of {args.model}; {os.cpu_count()} CPUs; batch: {args.requests} chat requests "
          f"x 32 tokens; identical texts both ways: {same}\n")
    print("| way | start | ready s | replicas' RSS MB | batch s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['repeat'] + 1} | {r['ready_s']:.1f} | {r['rss_mb']:.0f} | {r['batch_s']:.1f} |")
    save(args.out, "replica_start", args, identical_texts=same, rows=rows)


if __name__ == "__main__":
    main()
