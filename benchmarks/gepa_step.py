"""GEPA on the pool: stock ``dspy.GEPA`` (its defaults) vs Tandem's GEPA step, same budget, same pool.

Rows, side by side in one run on one pool (same program, data, seed, metric-call budget):
(a) ``stock``: ``dspy.GEPA(metric, max_metric_calls=B, reflection_lm=<the program's LM at T=1>)`` with
    dspy's default threads, the 5-argument metric written as a user of stock GEPA would;
(b) ``tandem``: ``GEPAStep(metric, max_metric_calls=B, num_threads=T)`` — the program's own metric,
    evaluations sized to the pool;
(c) ``tandem xN``: the same with ``proposals=N`` (gepa's parallel proposals).
``--mode sim`` runs the same variants against ``--replicas`` simulated replicas (``driver_scale``'s latency model of a
GPU replica: ~5 s per 200-token answer alone, batching up to 2,500 tok/s; its rule answers Iris and its synthetic
HotPotQA questions, wrongly for a ``--wrong`` share of prompts; a fixed instruction for the reflection LM): a cluster
whose replicas one GEPA iteration does not fill (on 2 CPU cores the real replicas are bound by their cores).
DSPy's cache is off (each variant pays for its own calls). Each: wall time, metric calls, valset and held-out test
score (%), and how many distinct answers the test predictions hold (a one-class program scores that class's share).
Prints a table, writes JSON.

    python benchmarks/gepa_step.py --budget 120 --seeds 0
    python benchmarks/gepa_step.py --mode sim --replicas 16 --program hotpotqa --seeds 0,1,2
    TANDEM_HOTPOTQA_CORPUS=tests/fixtures/hotpotqa/corpus.jsonl python benchmarks/gepa_step.py --program hotpotqa \
        --data-args '{path: tests/fixtures/hotpotqa/questions.json, train_size: 6, dev_size: 3}' --budget 60
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
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


_ANSWER = re.compile(r"(\[\[ ## answer ## \]\]\n)([^\n]+)")
_JSON_FIELDS = re.compile(r"`(\w+)`")
SIM_INSTRUCTION = "Classify the flower: setosa when the petal is short, else versicolor or virginica by its width."


def noisy_factory(model, wrong: float):
    """driver_scale's simulated replicas (its rule answers Iris and HotPotQA's synthetic questions), answering
    wrongly for a ``wrong`` share of prompts (chosen by a hash of the prompt: the same prompt, the same answer; a
    new instruction changes which) and writing a fixed instruction when dspy's GEPA proposer asks for one (its
    JSONAdapter's fields)."""
    import hashlib
    import json

    import driver_scale
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(driver_scale)  # the replica actors cannot import benchmarks/ modules

    class NoisyEngine(driver_scale.SimulatedEngine):
        async def generate(self, prompt_ids, request, adapter, request_id):
            texts, reasons, tokens = await super().generate(prompt_ids, request, adapter, request_id)
            text = (request.messages or [{"content": request.prompt}])[-1]["content"]
            _, found, asked = text.rpartition("Respond with a JSON object")
            if found:  # the reflection LM, under dspy's JSONAdapter
                reply = json.dumps({f: SIM_INSTRUCTION for f in dict.fromkeys(_JSON_FIELDS.findall(asked))})
                return [reply] * request.n, reasons, tokens
            full = "".join(m["content"] for m in request.messages or [{"content": request.prompt}])
            if int(hashlib.sha256(full.encode()).hexdigest()[:8], 16) % 1000 < wrong * 1000:
                texts = [_ANSWER.sub(lambda m: m.group(1) + ("virginica" if m.group(2) == "setosa" else "setosa"), t)
                         for t in texts]
            return texts, reasons, tokens

    class NoisyFactory(driver_scale.SimulatedFactory):
        def __call__(self, cfg, model_path):
            return NoisyEngine(cfg, model_path, self.model)

    return NoisyFactory(model)


def sim_pool(args):
    """``--replicas`` simulated replicas (driver_scale's latency model; no model runs)."""
    import driver_scale

    from actors import PoolConfig, ReplicaConfig, ReplicaPool

    model = driver_scale.LatencyModel(time_scale=args.time_scale)
    return ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", model_id="sim-8b", num_cpus=0.01,
                                                        max_model_len=8192, max_lora_rank=8, max_restarts=0),
                                  num_replicas=args.replicas, name=f"gepa-sim-{args.replicas}", start_timeout_s=600),
                       engine_factory=noisy_factory(model, args.wrong))


def sim_splits(program: str, seed: int):
    """Train 30 / val 15 / test 50 of driver_scale's synthetic examples (Iris's are its own rows)."""
    import random

    import driver_scale

    from programs.base import Splits

    work = driver_scale.workload(program, 95)
    examples = list(work.examples)
    random.Random(seed).shuffle(examples)
    return work, Splits(examples[:30], examples[30:45], examples[45:])


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
    ap.add_argument("--data-args", default="{}",
                    help="YAML mapping for the program's splits, e.g. HotPotQA's fixture: '{path: "
                         "tests/fixtures/hotpotqa/questions.json, train_size: 6, dev_size: 3}'")
    ap.add_argument("--mode", choices=("real", "sim"), default="real",
                    help="real: SmolLM2 on 2 vLLM-CPU replicas; sim: --replicas simulated replicas (a cluster's "
                         "replicas that the driver does not saturate; driver_scale's latency model)")
    ap.add_argument("--replicas", type=int, default=16, help="--mode sim: simulated replicas")
    ap.add_argument("--time-scale", type=float, default=1.0, help="--mode sim: multiplies every simulated duration")
    ap.add_argument("--wrong", type=float, default=0.4, help="--mode sim: the share of prompts answered wrongly")
    ap.add_argument("--out", default="benchmarks/out/gepa_step.json")
    args = ap.parse_args()

    import dspy
    import yaml

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from actors.dspy_side.provider import pool_lm
    from engine.adapters import make_adapter, stop_for
    from programs.base import Splits, resolve

    spec = resolve(args.program)
    connect(num_cpus=2)
    rows = []
    adapter = "chat" if args.mode == "sim" else "constrained"  # the simulated replicas write ChatAdapter's layout
    cfg = PoolConfig(replica=ReplicaConfig(model=args.model, max_model_len=2048), num_replicas=2)
    pool = sim_pool(args) if args.mode == "sim" else ReplicaPool(cfg)
    with pool.launch(), dspy.context(adapter=make_adapter(adapter)):
        for seed in (int(s) for s in args.seeds.split(",")):
            if args.mode == "sim":
                work, splits = sim_splits(args.program, seed)
                spec = dataclasses.replace(spec, factory=work.make, metric=work.metric)
            else:
                full = spec.splits(seed, **yaml.safe_load(args.data_args))
                splits = Splits(full.train[:args.train], full.dev[:args.val], full.test)
            for variant in args.variants.split(","):
                program = spec.program()
                program.set_lm(pool_lm(pool, max_tokens=args.max_tokens, stop=stop_for(adapter), cache=False))
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
