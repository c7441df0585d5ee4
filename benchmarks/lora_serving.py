"""Serving a LoRA adapter on vLLM-CPU: Tandem's grouped LoRA ops vs vLLM 0.29's stock CPU ops.

Same replica (1 x ``--cores`` cores, SmolLM2-135M-Instruct fp32), same prompts (Iris calls
formatted by DSPy's ChatAdapter with 3 demos each — the prompt-heavy calls of an evaluation after
fine-tuning), same random rank-32 q/k adapter, greedy, ``--max-tokens`` each, all requests at once:
(a) the base model; (b) the adapter with Tandem's ops (``actors/inference/cpu_lora.py``, the default);
(c) the adapter with vLLM's own CPU ops (``VLLM_PLUGINS=none`` keeps Tandem's plugin out).
Each variant runs in its own process with its own local Ray, one after the other. Prints a table
and writes JSON. Target: (b) within 1.5x of (a)'s wall time.

    python benchmarks/lora_serving.py --prompts 32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prompts(n: int) -> list[list[dict]]:
    import dspy

    from programs import iris

    splits = iris.load_splits(0)
    signature = iris.Program().predict.signature
    demos = [dspy.Example(**ex.toDict(), reasoning="The petal sizes decide it.") for ex in splits.train[:3]]
    return [dspy.ChatAdapter().format(signature, demos=demos, inputs=ex.inputs().toDict())
            for ex in (splits.dev + splits.test)[:n]]


def make_adapter(model_dir: str, out: str) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def variant(args) -> dict:
    from actors import GenerateRequest, PoolConfig, ReplicaConfig, ReplicaPool, connect, models

    connect(num_cpus=int(args.cores))
    model_dir = models.resolve(args.model)
    adapter = make_adapter(model_dir, tempfile.mkdtemp(prefix="bench-lora-"))
    cfg = PoolConfig(replica=ReplicaConfig(model=args.model, num_cpus=args.cores, max_model_len=2048,
                                           max_lora_rank=32), num_replicas=1, name="bench-lora")
    with ReplicaPool(cfg).launch() as pool:
        model = pool.model_id
        if args.variant != "base":
            pool.load_adapter(f"{model}:bench", adapter)
            model = f"{model}:bench"
        reqs = [GenerateRequest(model, messages=tuple(m), max_tokens=args.max_tokens) for m in prompts(args.prompts)]
        pool.router.submit(reqs[0])  # warm
        import asyncio

        async def all_at_once():
            return await asyncio.gather(*(pool.router.asubmit(r) for r in reqs))

        started = time.perf_counter()
        done = asyncio.run(all_at_once())
        wall = time.perf_counter() - started
    return {"variant": args.variant, "wall_s": wall, "prompt_tokens": sum(c.prompt_tokens for c in done),
            "completion_tokens": sum(c.completion_tokens for c in done), "texts": [c.text for c in done]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cores", type=float, default=2)
    ap.add_argument("--variant", choices=("base", "tandem", "stock"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/out/lora_serving.json")
    args = ap.parse_args()
    if args.variant:
        Path(args.result).write_text(json.dumps(variant(args)))
        return
    rows = {}
    for name in ("base", "tandem", "stock"):
        env = {**os.environ, **({"VLLM_PLUGINS": "none"} if name == "stock" else {})}
        result = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, __file__, "--variant", name, "--result", str(result), "--model", args.model,
               "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens), "--cores", str(args.cores)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows[name] = json.loads(result.read_text())
        print(f"{name}: {rows[name]['wall_s']:.1f} s", flush=True)
    same = sum(a == b for a, b in zip(rows["tandem"]["texts"], rows["stock"]["texts"]))
    print("\n| variant | wall s | prompt tokens | completion tokens | prefill+decode tok/s |\n|---|---|---|---|---|")
    labels = {"base": "(a) base model", "tandem": "(b) adapter, Tandem ops", "stock": "(c) adapter, vLLM stock CPU ops"}
    for name, r in rows.items():
        tps = (r["prompt_tokens"] + r["completion_tokens"]) / r["wall_s"]
        print(f"| {labels[name]} | {r['wall_s']:.1f} | {r['prompt_tokens']} | {r['completion_tokens']} | {tps:.0f} |")
    print(f"\n(b)/(a) wall = {rows['tandem']['wall_s'] / rows['base']['wall_s']:.2f} (target <= 1.5); "
          f"(c)/(b) = {rows['stock']['wall_s'] / rows['tandem']['wall_s']:.1f}x; "
          f"identical adapter texts (b) vs (c): {same}/{len(rows['tandem']['texts'])}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "lora_serving", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpus": os.cpu_count(), "args": vars(args), "identical_adapter_texts": same,
        "results": {k: {x: v for x, v in r.items() if x != "texts"} for k, r in rows.items()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
