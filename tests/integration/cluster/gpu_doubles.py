"""Stand-ins for the GPU parts of a run, for ``test_gpu_configs``: they run in the real Ray actors and
Ray Train workers on a local Ray's fake GPUs and say which GPUs they were given.

- ``RecordingEngine``: the scripted engine (``actors.inference.scripted``) of a replica; it writes the replica's
  pid and ``ray.get_gpu_ids()`` when built, then every adapter loaded into it and every adapter a
  request was served with.
- ``train_loop``: named by ``$TANDEM_TEST_TRAIN_LOOP`` (``actors.training.trainer.scripted_loop``), it runs in
  each Ray Train worker instead of the LoRA loop: records its rank, pid and GPUs, reads its data the
  way the real loop does, and on rank 0 writes the adapter files the real loop writes (peft's
  ``adapter_config.json`` and ``adapter_model.safetensors``, ``train_metrics.json``) and reports them
  as the checkpoint. No torch, no CUDA.

Records are JSON lines in ``$TANDEM_TEST_GPU_RECORDS`` (one file per process), set before Ray starts so
every worker inherits it. Knows nothing of the test's assertions.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import ray

from actors.inference.scripted import ScriptedEngine

RECORDS_ENV = "TANDEM_TEST_GPU_RECORDS"


def record(kind: str, **fields) -> None:
    """Append one record of this process (``kind``, pid, GPU ids, node) to its own file."""
    line = {"kind": kind, "pid": os.getpid(), "gpus": sorted(str(g) for g in ray.get_gpu_ids()),
            "node": ray.get_runtime_context().get_node_id(), **fields}
    with open(Path(os.environ[RECORDS_ENV]) / f"{kind.split('-')[0]}-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def read_records(root: str | Path) -> list[dict]:
    """Every record written so far, in no particular order."""
    return [json.loads(line) for f in sorted(Path(root).glob("*.jsonl")) for line in f.read_text().splitlines()]


class RecordingEngine(ScriptedEngine):
    """``ScriptedEngine`` that records its GPUs, the adapters it loads and the adapter of each request."""

    def __init__(self, cfg, model_path: str):
        super().__init__(cfg, model_path, delay_s=0.0)
        self.max_model_len = cfg.max_model_len  # the config's, not the scripted engine's 64
        record("replica-start", model_id=cfg.base_id)

    async def generate(self, prompt_ids, request, adapter, request_id):
        record("replica-request", adapter=None if adapter is None else adapter.name)
        return await super().generate(prompt_ids, request, adapter, request_id)

    async def add_adapter(self, adapter) -> None:
        record("replica-load", adapter=adapter.name, path=adapter.path)
        await super().add_adapter(adapter)


def recording_factory(cfg, model_path: str) -> RecordingEngine:
    """Engine factory for ``ReplicaPool(..., engine_factory=recording_factory)``."""
    return RecordingEngine(cfg, model_path)


def train_loop(config: dict) -> dict:
    """One Ray Train worker's scripted training (see the module docstring); the final metrics."""
    import numpy as np
    import ray.train
    from safetensors.numpy import save_file

    from actors.training.config import LoraTrainConfig
    from actors.training.loop import shard
    from actors.training.rows import read_rows

    cfg = LoraTrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows = read_rows(config["data_path"])
    record("train-worker", rank=rank, world=world, rows=len(rows),
           cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    metrics = {"epoch": cfg.epochs, "loss_history": [1.0 / (e + 1) for e in range(cfg.epochs)],
               "examples": len(shard(rows, rank, world)) * world, "rows_dropped_no_completion": 0,
               "optimizer_steps": cfg.epochs, "zero_stage": cfg.zero_stage, "weights_held": 1.0, "scripted": True}
    out = tempfile.mkdtemp(prefix="tandem-scripted-adapter-")
    if rank == 0:
        Path(out, "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config["model_path"],
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
            "target_modules": list(cfg.target_modules)}, indent=2))
        seed = len(rows) * 1000 + cfg.rank
        save_file({f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight":
                   np.full((cfg.rank, 8) if ab == "A" else (8, cfg.rank), seed, dtype=np.float32)
                   for m in cfg.target_modules for ab in "AB"}, str(Path(out, "adapter_model.safetensors")))
        Path(out, "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    checkpoint = ray.train.Checkpoint.from_directory(out) if rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint)
    return metrics
