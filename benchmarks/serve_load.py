"""Serving load: K concurrent HTTP clients for S seconds against ``/v1/predict`` of a served run.

(a) ``tandem serve``'s application (Ray Serve: FastAPI program ingress + vLLM LM deployment, one
    LM replica on ``--lm-cpus`` cores), called over HTTP by K client threads;
(b) the same program and adapter called in process by K threads on a one-replica pool with the
    same cores (DSPy client -> router -> replica), the cost floor without HTTP/Serve.
Inputs cycle through Iris test examples (greedy; DSPy's cache off on both sides). Prints
requests/s, p50/p99 latency and error counts (goal: 0 transport errors; a 502 is an answer that
did not parse, counted apart) and writes JSON.

    python benchmarks/serve_load.py --run-dir benchmarks/out/e2e-run --clients 8 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import threading
import time
from pathlib import Path


def _load(call, inputs: list[dict], clients: int, seconds: float) -> dict:
    """Run ``call(inputs) -> status`` from ``clients`` threads for ``seconds``; latency stats."""
    latencies, statuses, lock = [], {}, threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                status = call(inputs[i % len(inputs)])
            except Exception as exc:  # a transport failure is counted, the load goes on
                status = type(exc).__name__
            with lock:
                latencies.append(time.perf_counter() - started)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
    errors = sum(n for s, n in statuses.items() if s not in ("200", "502"))
    return {"requests": len(lat), "rps": len(lat) / wall, "p50_s": pct(0.5), "p99_s": pct(0.99),
            "statuses": statuses, "errors": errors, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="benchmarks/out/e2e-run", help="a finished run dir")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--lm-cpus", type=float, default=2)
    ap.add_argument("--out", default="benchmarks/out/serve_load.json")
    args = ap.parse_args()

    import dspy
    import httpx

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from programs import iris
    from serve.app import ServeConfig, start, stop
    from serve.deployments import STOP
    from serve.winner import build_program, load_winner

    winner = load_winner(args.run_dir)
    inputs = [ex.inputs().toDict() for ex in iris.load_splits(0).test]
    connect(num_cpus=max(2, int(args.lm_cpus)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(run_dir=args.run_dir, port=port, lm_cpus=args.lm_cpus)
    start(cfg)
    try:
        with httpx.Client(base_url=cfg.url, timeout=600,
                          limits=httpx.Limits(max_connections=args.clients)) as client:
            client.post("/v1/predict", json=inputs[0])  # warm
            served = _load(lambda x: client.post("/v1/predict", json=x).status_code, inputs, args.clients,
                           args.seconds)
    finally:
        stop(cfg)
    print(f"served: {served}", flush=True)

    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model=winner.base_model, num_cpus=args.lm_cpus,
                                                        max_model_len=winner.max_model_len,
                                                        max_lora_rank=winner.max_lora_rank),
                                  num_replicas=1, name="bench-serve"))
    with pool.launch():
        for name, path in winner.adapters.items():
            pool.load_adapter(name, path)
        program = build_program(winner)
        program.set_lm(pool.lm(winner.model, max_tokens=winner.max_tokens, stop=STOP, cache=False))
        adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)

        def in_process(x: dict) -> int:
            with dspy.context(adapter=adapter):
                try:
                    program(**x)
                except Exception as exc:
                    from dspy.utils.exceptions import AdapterParseError

                    if isinstance(exc, AdapterParseError) or isinstance(exc.__cause__, AdapterParseError):
                        return 502
                    raise
            return 200

        in_process(inputs[0])
        local = _load(in_process, inputs, args.clients, args.seconds)
    print(f"in process: {local}", flush=True)

    print("\n| path | clients | requests | req/s | p50 s | p99 s | 200 | 502 (no parse) | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in (("HTTP /v1/predict (Ray Serve)", served), ("in process (pool)", local)):
        print(f"| {name} | {args.clients} | {r['requests']} | {r['rps']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} "
              f"| {r['statuses'].get('200', 0)} | {r['statuses'].get('502', 0)} | {r['errors']} |")
    print(f"\nserved / in-process throughput = {served['rps'] / local['rps']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "serve_load", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpus": os.cpu_count(), "args": vars(args), "model": winner.model, "served": served, "in_process": local,
        "ratio": served["rps"] / local["rps"]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
