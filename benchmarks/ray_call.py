"""A caller's CPU per Ray actor call with many calls in flight: threads blocked in ``ray.get`` vs asyncio tasks.

The evaluators (``actors.dspy_side.evaluator``) and the driver's threads hold one blocked thread per LM call in
flight. Would an asyncio path (``await ref``) cost the caller less per call? This sends the same
calls both ways, alternately, in one process, to actors that answer after a fixed delay (as a
replica would), with a request the size of a formatted DSPy prompt, and measures the caller's
CPU seconds per call (``time.process_time``: every thread of the process, Ray's own included).
Prints a table and writes JSON.

    flock /tmp/tandem-heavy.lock python benchmarks/ray_call.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

from report import save


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--inflight", type=int, default=500)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--delay-s", type=float, default=1.0, help="seconds an actor takes to answer")
    ap.add_argument("--work-ms", type=float, default=0.0,
                    help="pure-Python work before each call, as a run's prompt formatting (ms, single-threaded)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/ray_call.json")
    args = ap.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0, max_concurrency=args.inflight * 2)
    class Answerer:
        async def generate(self, request: dict) -> dict:
            await asyncio.sleep(args.delay_s)
            return {"text": "[[ ## answer ## ]]\nsetosa\n\n[[ ## completed ## ]]" * 4, "index": request["index"]}

    actors = [Answerer.remote() for _ in range(args.actors)]
    ray.get([a.generate.remote({"index": 0}) for a in actors])

    def request(i: int) -> dict:
        text, until = [], time.thread_time() + args.work_ms / 1e3  # this thread's CPU, not the wall
        while time.thread_time() < until:
            text.append(str(len(text)))
        return {"index": i, "messages": [{"role": "user", "content": "x" * 1500}], "max_tokens": 200}

    def threads() -> None:
        def one(i: int) -> dict:
            return ray.get(actors[i % len(actors)].generate.remote(request(i)), timeout=600)

        with ThreadPoolExecutor(args.inflight) as ex:
            list(ex.map(one, range(args.calls)))

    def tasks() -> None:
        async def all_calls() -> None:
            gate = asyncio.Semaphore(args.inflight)

            async def one(i: int) -> dict:
                async with gate:
                    return await actors[i % len(actors)].generate.remote(request(i))

            await asyncio.gather(*(one(i) for i in range(args.calls)))

        asyncio.run(all_calls())

    rows = []
    for repeat in range(args.repeats):
        for way, fn in ((f"{args.inflight} threads in ray.get", threads), (f"{args.inflight} asyncio tasks", tasks)):
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rows.append({"way": way, "repeat": repeat, "wall_s": wall, "calls_per_s": args.calls / wall,
                         "caller_cpu_ms_per_call": 1e3 * cpu / args.calls})
            print(f"{way} #{repeat}: {args.calls / wall:.0f} calls/s, {1e3 * cpu / args.calls:.2f} ms CPU/call", flush=True)
    ray.shutdown()
    print(f"\n{args.calls} calls to {args.actors} actors answering after {args.delay_s:g}s; {os.cpu_count()} CPUs\n")
    print("| way | repeat | calls/s | caller CPU ms/call |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['repeat'] + 1} | {r['calls_per_s']:.0f} | {r['caller_cpu_ms_per_call']:.2f} |")
    save(args.out, "ray_call", args, rows=rows)


if __name__ == "__main__":
    main()
