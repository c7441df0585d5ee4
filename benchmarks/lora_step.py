"""LoRA training throughput: Tandem's training loop vs a plain peft + torch loop, same data and device.

(a) ``actors.training.loop.train_loop`` run directly (no Ray): length-bucketed micro-batches,
    gradient accumulation to the effective batch, loss on completion tokens only;
(b) the loop most scripts write: one example per step, no bucketing, same LoRA, same optimizer.
Data: Iris chats formatted by DSPy's ChatAdapter with the gold answer as the assistant turn.
Prints a table (real tokens/s, i.e. padding excluded) and writes JSON. Target: (a)/(b) >= 1.0.

    python benchmarks/lora_step.py --rows 64 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path


def iris_rows(n: int) -> list[list[dict]]:
    import dspy

    from programs import iris

    splits = iris.load_splits(0)
    examples = (splits.train + splits.dev + splits.test)[:n]
    signature = iris.Program().predict.signature
    adapter = dspy.ChatAdapter()
    return [adapter.format_finetune_data(signature, [], ex.inputs(),
                                         {"reasoning": "The petal sizes decide it.", "answer": ex.answer})["messages"]
            for ex in examples]


def plain_loop(cfg, model_path: str, rows: list[list[dict]], threads: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.training.loop import tokenize

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                           LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    data = [tokenize(tok, m, cfg.max_seq_len) for m in rows]
    model.train()
    tokens, started = 0, time.perf_counter()
    for _ in range(cfg.epochs):
        for step, (ids, labels) in enumerate(data):
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            (loss / cfg.batch_size).backward()
            if (step + 1) % cfg.batch_size == 0:
                optim.step()
                optim.zero_grad()
            tokens += len(ids)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/out/lora_step.json")
    args = ap.parse_args()

    from actors import models
    from actors.training.config import LoraTrainConfig
    from actors.training.loop import train_loop

    model_path = models.resolve(args.model)
    rows = iris_rows(args.rows)
    cfg = LoraTrainConfig(epochs=args.epochs, micro_batch_size=args.micro_batch, cpus_per_worker=args.threads)
    config = {"train": asdict(cfg), "model_path": model_path, "rows": rows, "device": "cpu",
              "out_dir": "benchmarks/out/lora_step_adapter"}
    train_loop(config)
    ours = config["result"]
    plain = plain_loop(cfg, model_path, rows, args.threads)
    ratio = ours["tokens_per_s"] / plain["tokens_per_s"]
    print("| loop | rows x epochs | tokens | wall s | tokens/s |\n|---|---|---|---|---|")
    print(f"| tandem train_loop (bucketed, micro-batch {args.micro_batch}) | {args.rows} x {args.epochs} | "
          f"{ours['tokens']} | {ours['wall_s']:.1f} | {ours['tokens_per_s']:.0f} |")
    print(f"| plain peft loop (batch 1) | {args.rows} x {args.epochs} | {plain['tokens']} | "
          f"{plain['wall_s']:.1f} | {plain['tokens_per_s']:.0f} |")
    print(f"\nratio (tandem / plain) = {ratio:.2f}  (target >= 1.0)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "lora_step", "date": time.strftime("%Y-%m-%d"),
                                          "machine": platform.node(), "cpus": os.cpu_count(), "args": vars(args),
                                          "tandem": ours, "plain": plain, "ratio": ratio}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
