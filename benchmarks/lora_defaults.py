"""LoRA defaults for the embedded run: which epochs / lr / target modules / batch lower the loss most per second.

Trains ``actors.training.loop.train_loop`` (no Ray, as a training worker runs it) on the weight step's
own rows (``<run>/02_w/traces.parquet`` of ``tandem run --strategy "p -> w"``) for each setting of
a small grid, then measures the token-mean completion loss of the rows with the base model
(before) and with the trained adapter (after), in eval mode. Prints a table and writes JSON.
Target (issue 16): after / before <= 0.5 in < ~90 s of training on 2 cores.

    python benchmarks/lora_defaults.py --data /tmp/run/02_w/traces.parquet --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

QK = ("q_proj", "k_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR = QKVO + ("gate_proj", "up_proj", "down_proj")
# name -> LoraTrainConfig changes on top of the RunConfig default's shape (r 32, alpha 64, micro-batch 4)
GRID = {
    "old default (e2 lr1e-4 qk b8)": dict(epochs=2, lr=1e-4, target_modules=QK, batch_size=8),
    "e2 lr1e-3 qk b8": dict(epochs=2, lr=1e-3, target_modules=QK, batch_size=8),
    "e2 lr1e-3 qkvo b4": dict(epochs=2, lr=1e-3, target_modules=QKVO, batch_size=4),
    "e2 lr2e-3 qkvo b4": dict(epochs=2, lr=2e-3, target_modules=QKVO, batch_size=4),
    "e2 lr1e-3 all-linear b4": dict(epochs=2, lr=1e-3, target_modules=LINEAR, batch_size=4),
    "e3 lr1e-3 qkvo b4": dict(epochs=3, lr=1e-3, target_modules=QKVO, batch_size=4),
    "e3 lr5e-4 all-linear b4": dict(epochs=3, lr=5e-4, target_modules=LINEAR, batch_size=4),
    "e3 lr1e-3 qkvo b8": dict(epochs=3, lr=1e-3, target_modules=QKVO, batch_size=8),
    "e1 lr1e-3 qkvo b4": dict(epochs=1, lr=1e-3, target_modules=QKVO, batch_size=4),
    "e2 lr1e-3 qkvo b4 constant": dict(epochs=2, lr=1e-3, target_modules=QKVO, batch_size=4, lr_schedule="constant"),
    "e2 lr1e-3 qkvo b4 no clip": dict(epochs=2, lr=1e-3, target_modules=QKVO, batch_size=4, max_grad_norm=0.0),
}


def eval_loss(model, tokenizer, rows: list, max_seq_len: int) -> float:
    """Token-mean loss over the completion tokens of ``rows``, one row a forward pass (no padding)."""
    import torch

    from actors.training.optim import completion_tokens
    from actors.training.loop import learnable_data

    data, _ = learnable_data(tokenizer, rows, max_seq_len)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for ids, labels in data:
            n = completion_tokens(labels)
            total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) * n
            count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="Parquet rows (a weight step's traces.parquet)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated grid names (default: all)")
    ap.add_argument("--out", default="benchmarks/out/lora_defaults.json")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors import models
    from actors.training.config import LoraTrainConfig
    from actors.training.loop import train_loop
    from actors.training.rows import read_rows

    torch.set_num_threads(args.threads)
    model_path = models.resolve(args.model)
    rows, tokenizer = read_rows(args.data), AutoTokenizer.from_pretrained(model_path)
    base_model = lambda: AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)  # noqa: E731
    before = eval_loss(base_model(), tokenizer, rows, 1024)
    grid = {k: v for k, v in GRID.items() if not args.only or k in args.only.split(",")}
    results = {}
    for name, changes in grid.items():
        cfg = LoraTrainConfig(cpus_per_worker=args.threads, **changes)
        out = tempfile.mkdtemp(prefix="lora-defaults-")
        config = {"train": asdict(cfg), "model_path": model_path, "rows": rows, "device": "cpu", "out_dir": out}
        metrics = train_loop(config)
        after = eval_loss(PeftModel.from_pretrained(base_model(), out), tokenizer, rows, cfg.max_seq_len)
        results[name] = {"config": changes, "before": before, "after": after, "after_over_before": after / before,
                         "epoch_loss": metrics["loss_history"], "lr_history": metrics["lr_history"],
                         "grad_norm_history": metrics["grad_norm_history"], "wall_s": metrics["wall_s"],
                         "optimizer_steps": metrics["optimizer_steps"], "tokens_per_s": metrics["tokens_per_s"]}
        print(f"{name}: {before:.3f} -> {after:.3f} in {metrics['wall_s']:.1f} s", flush=True)
    print(f"\n{len(rows)} rows, {args.threads} threads\n")
    print("| setting | steps | epoch loss first -> last | eval loss before -> after | after/before | train s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['optimizer_steps']} | {r['epoch_loss'][0]:.3f} -> {r['epoch_loss'][-1]:.3f} | "
              f"{r['before']:.3f} -> {r['after']:.3f} | {r['after_over_before']:.2f} | {r['wall_s']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "lora_defaults", "date": time.strftime("%Y-%m-%d"),
                                          "machine": platform.node(), "cpus": os.cpu_count(), "args": vars(args),
                                          "rows": len(rows), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
