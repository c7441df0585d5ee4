"""Pool throughput vs one offline vLLM engine, same prompts, same model, same total cores.

(a) the replica pool (N replicas x C cores) driven through the DSPy client by concurrent callers;
(b) one ``vllm.LLM`` offline ``generate`` over all prompts on N x C cores.
Prompts: Iris examples formatted by DSPy's ChatAdapter (the calls Tandem actually makes), greedy,
``max_tokens`` each. Prints a table and writes JSON. Target: (a)/(b) >= 0.9.

    python benchmarks/pool_throughput.py --prompts 256 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def dspy_prompts(n: int) -> list[list[dict]]:
    """``n`` ChatAdapter-formatted Iris calls (examples repeated with varied rounding)."""
    import dspy

    from programs import iris

    splits = iris.load_splits(0)
    examples = splits.train + splits.dev + splits.test
    adapter = dspy.ChatAdapter()
    signature = iris.Program().predict.signature
    out = []
    for i in range(n):
        ex = examples[i % len(examples)]
        inputs = {k: round(v + 0.01 * (i // len(examples)), 2) for k, v in ex.inputs().items()}
        out.append(adapter.format(signature, demos=[], inputs=inputs))
    return out


def run_pool(model: str, prompts, replicas: int, cores: int, max_tokens: int, callers: int) -> dict:
    import dspy
    from dspy import lm15

    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from actors.dspy_side.provider import pool_lm

    connect(num_cpus=replicas * cores)
    cfg = PoolConfig(replica=ReplicaConfig(model=model, num_cpus=cores, max_model_len=2048), num_replicas=replicas)
    with ReplicaPool(cfg).launch() as pool:
        lm = pool_lm(pool, max_tokens=max_tokens, temperature=0.0, cache=False)
        config = lm15.Config(max_tokens=max_tokens, temperature=0.0)  # an explicit Request ignores lm kwargs
        requests = [lm15.Request(model=lm.model, system=m[0]["content"], config=config,
                                 messages=tuple(lm15.Message.user(x["content"]) for x in m[1:]))
                    for m in prompts]
        lm(requests[0])  # warm both paths once
        before = sum(s["completion_tokens"] for s in pool.stats())
        started = time.perf_counter()
        with ThreadPoolExecutor(callers) as ex:
            responses = list(ex.map(lm, requests))
        wall = time.perf_counter() - started
        texts = [r.text for r in responses]
        tokens = sum(r.usage.output_tokens for r in responses)
        counted = sum(s["completion_tokens"] for s in pool.stats()) - before
        assert counted == tokens, f"replica counters ({counted}) disagree with the responses ({tokens})"
    import ray

    ray.shutdown()
    _ = dspy  # the client is a dspy.LM
    return {"wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall, "texts": texts}


def run_offline(model: str, prompts, cores: int, max_tokens: int) -> dict:
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 1}" if cores > 1 else "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
    from vllm import LLM, SamplingParams, TokensPrompt

    from actors import models

    llm = LLM(model=models.resolve(model), dtype="float32", max_model_len=2048, enable_lora=True,
              max_lora_rank=32, enforce_eager=True, seed=0)
    tok = llm.get_tokenizer()
    ids = [TokensPrompt(prompt_token_ids=tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True,
                                                                  return_dict=False)) for m in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate(ids[:1], params, use_tqdm=False)
    started = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall,
            "texts": [o.outputs[0].text for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--cores-per-replica", type=int, default=1)
    ap.add_argument("--callers", type=int, default=64, help="concurrent DSPy callers")
    ap.add_argument("--out", default="benchmarks/out/pool_throughput.json")
    args = ap.parse_args()

    prompts = dspy_prompts(args.prompts)
    pool = run_pool(args.model, prompts, args.replicas, args.cores_per_replica, args.max_tokens, args.callers)
    offline = run_offline(args.model, prompts, args.replicas * args.cores_per_replica, args.max_tokens)
    same = sum(a == b for a, b in zip(pool.pop("texts"), offline.pop("texts")))
    ratio = pool["tok_s"] / offline["tok_s"]
    rows = [("pool via DSPy client", pool), ("offline vllm.LLM.generate", offline)]
    print("| path | prompts | output tokens | wall s | tok/s |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {args.prompts} | {r['output_tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} |")
    print(f"\nratio (pool / offline) = {ratio:.2f}  (target >= 0.9); identical greedy texts: {same}/{args.prompts}")
    result = {"benchmark": "pool_throughput", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "cpus": os.cpu_count(), "args": vars(args), "pool": pool, "offline": offline, "ratio": ratio,
              "identical_texts": same}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
