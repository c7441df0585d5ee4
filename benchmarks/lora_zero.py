"""Multi-worker LoRA training: DDP vs DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 + optimizer offload.

Each mode trains the same adapter with ``actors.training.loop.train_lora`` on real Ray Train workers
(same data, seed and effective batch). The table gives the whole call's wall time (worker start and
DeepSpeed setup included), the loop's tokens/s, the share of the weights each worker holds and its
peak memory (RSS on CPU, CUDA allocations on GPU). ZeRO's point is memory, not speed: on a CPU
machine with a 135M model expect it to cost time; on GPUs it is what lets an 8B model's LoRA fit.

    python benchmarks/lora_zero.py --rows 32 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

MODES = {"ddp": {}, "zero2": {"zero_stage": 2}, "zero3": {"zero_stage": 3},
         "zero3-offload": {"zero_stage": 3, "zero_offload": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    ap.add_argument("--out", default="benchmarks/out/lora_zero.json")
    args = ap.parse_args()
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; valid: {list(MODES)}")

    from actors import connect, models
    from actors.training.config import LoraTrainConfig
    from actors.training.loop import train_lora
    from actors.training.rows import write_rows
    from lora_step import iris_rows  # this folder is on sys.path

    connect()  # $RAY_ADDRESS, else a local Ray
    model_path = models.resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="lora-zero-"))
    data = work / "rows.parquet"
    write_rows(({"messages": m} for m in iris_rows(args.rows)), data)
    results = {}
    for mode in args.modes.split(","):
        cfg = LoraTrainConfig(epochs=args.epochs, batch_size=8, micro_batch_size=2,
                              num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                              use_gpu=args.gpu, **MODES[mode])
        started = time.perf_counter()
        result = train_lora(cfg, model_path, str(data), str(work / mode), str(work / "ray_train"), name=mode)
        results[mode] = {**result.metrics, "call_s": time.perf_counter() - started}
    base = results.get("ddp")
    print("| mode | call s | loop tokens/s | weights held per worker | peak MiB per worker | vs DDP memory |")
    print("|---|---|---|---|---|---|")
    for mode, m in results.items():
        vs = f"{m['peak_mib'] / base['peak_mib']:.2f}" if base else "-"
        print(f"| {mode} | {m['call_s']:.1f} | {m['tokens_per_s']:.0f} | {m['weights_held']:.2f} | "
              f"{m['peak_mib']:.0f} | {vs} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "lora_zero", "date": time.strftime("%Y-%m-%d"),
                                          "machine": platform.node(), "cpus": os.cpu_count(), "args": vars(args),
                                          "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
