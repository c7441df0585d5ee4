"""LoRA fine-tuning with peft, run by Ray Train (``TorchTrainer``, N workers, DDP or DeepSpeed ZeRO).

Knows: the paper's LoRA defaults (r=32, alpha=64, dropout 0, q/k attention, 5 epochs, lr 1e-5,
effective batch 8, bf16 where the device has it), turning chat rows into token ids with the
model's chat template and loss only on the completion (the assistant turn), length-bucketed
micro-batches so padding stays small, gradient accumulation to reach the effective batch, and
saving the adapter as a Ray Train checkpoint. Workers run DDP, or — for models whose weights do
not fit one device — DeepSpeed ZeRO (stage 1-3, optional CPU offload of the optimizer state).
``train_loop`` is a plain function: benchmarks run it without Ray. Data comes as a Parquet
dataset of ``messages`` (JSON) rows (see ``read_rows``).
Does not know DSPy or the pool. torch/peft/transformers are imported inside the workers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTrainConfig:
    """LoRA and optimisation settings; defaults are the paper's."""

    rank: int = field(default=32, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=64, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj"), metadata={"help": "modules to adapt"})
    epochs: int = field(default=5, metadata={"help": "passes over the data"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "effective batch (micro x workers x accumulation)"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per worker per forward pass"})
    max_seq_len: int = field(default=1024, metadata={"help": "truncate longer sequences"})
    bf16: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPUs that have it), 'yes', 'no'"})
    seed: int = field(default=0, metadata={"help": "shuffle and init seed"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP, or ZeRO with zero_stage)"})
    cpus_per_worker: int = field(default=2, metadata={"help": "CPUs per worker (torch threads on CPU)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    zero_stage: int = field(default=0, metadata={
        "help": "DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights; 0 = DDP"})
    zero_offload: bool = field(default=False, metadata={"help": "ZeRO: keep the optimizer state in CPU memory"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("rank", "alpha", "epochs", "batch_size", "micro_batch_size", "max_seq_len", "num_workers",
                     "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("lr must be > 0 and dropout in [0, 1)")
        if self.bf16 not in ("auto", "yes", "no"):
            raise ValueError(f"bf16 must be 'auto', 'yes' or 'no', got {self.bf16!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0 (DDP), 1, 2 or 3, got {self.zero_stage}")
        if self.zero_offload and not self.zero_stage:
            raise ValueError("zero_offload needs a ZeRO stage (zero_stage 1, 2 or 3)")


@dataclass(frozen=True)
class TrainResult:
    """Where the adapter is and how training went."""

    adapter_path: str
    metrics: dict


def tokenize(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one chat: -100 on the prompt, the assistant turn is learned."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if full[:len(prompt)] != prompt:  # template does not extend the prompt: append content + eos
        full = prompt + tokenizer.encode(messages[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = list(full[:max_seq_len])
    labels = [-100] * min(len(prompt), len(ids)) + ids[len(prompt):]
    return ids, labels


def shard(rows: list, rank: int, world: int) -> list:
    """Rank ``rank``'s rows, every rank the same count (the first rows repeat to fill the last
    ranks, as torch's DistributedSampler does), so all ranks take the same number of steps."""
    total = -(-len(rows) // world) * world
    return [rows[i % len(rows)] for i in range(rank, total, world)]


def buckets(lengths: list[int], size: int, seed: int) -> list[list[int]]:
    """Micro-batches of indices of similar length, in a seeded random order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    random.Random(seed).shuffle(batches)
    return batches


def train_loop(config: dict) -> None:
    """One Ray Train worker (or a plain process when ``config['rows']`` is given).

    Config keys: ``train`` (LoraTrainConfig as dict), ``model_path``, and either ``rows``
    (list of message lists, no Ray) or ``data_path`` (Parquet; each worker takes its ``shard``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = LoraTrainConfig(**config["train"])
    in_ray = "rows" not in config
    if cfg.zero_stage and not in_ray:
        raise ValueError("zero_stage needs Ray Train workers (a process group): use train_lora")
    if in_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        rows = shard(read_rows(config["data_path"]), rank, world)
        device = ray.train.torch.get_device()
    else:
        rank, world, rows = 0, 1, config["rows"]
        device = torch.device(config.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32

    accum = max(1, cfg.batch_size // (cfg.micro_batch_size * world))
    ds_config = deepspeed_config(cfg, accum, bf16) if cfg.zero_stage else None
    if cfg.zero_stage == 3:  # transformers loads each weight straight into its shard (zero.Init)
        from transformers.integrations import HfDeepSpeedConfig

        zero3_loading = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers keeps a weakref)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    base = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=dtype)
    if cfg.zero_stage != 3:
        base = base.to(device)
    model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    data = [tokenize(tokenizer, m, cfg.max_seq_len) for m in rows]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    engine = None
    if ds_config:
        import deepspeed

        engine, optim, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config)
    elif in_ray and world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    held = weights_held(model)  # fixed once DeepSpeed has partitioned (or not)
    history, tokens_total, steps, started = [], 0, 0, time.perf_counter()
    (engine or model).train()
    for epoch in range(cfg.epochs):
        batches = buckets([len(ids) for ids, _ in data], cfg.micro_batch_size, cfg.seed + epoch)
        epoch_loss, epoch_tokens = 0.0, 0
        for step, batch in enumerate(batches):
            boundary = (step + 1) % accum == 0 or step == len(batches) - 1
            ids, labels, mask = _collate([data[i] for i in batch], pad, device)
            if engine is not None:  # DeepSpeed scales by 1/accum, reduces and steps at the boundary
                engine.set_gradient_accumulation_boundary(boundary)
                loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
                engine.backward(loss)
                engine.step()
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                (loss / accum).backward()
                if boundary:
                    optim.step()
                    optim.zero_grad(set_to_none=True)
                    steps += 1
            n = int(mask.sum())
            epoch_loss += float(loss.detach()) * n
            epoch_tokens += n
        tokens_total += epoch_tokens
        history.append(epoch_loss / max(1, epoch_tokens))
        metrics = {"epoch": epoch + 1, "loss": history[-1], "tokens": tokens_total,
                   "tokens_per_s": tokens_total / (time.perf_counter() - started), "examples": len(data),
                   "optimizer_steps": engine.global_steps if engine is not None else steps,
                   "zero_stage": cfg.zero_stage, "weights_held": held}
        if in_ray and epoch < cfg.epochs - 1:
            ray.train.report(metrics)
    metrics = {**metrics, "loss_history": history, "wall_s": time.perf_counter() - started,
               "peak_mib": _peak_mib(device)}
    out = config.get("out_dir") or tempfile.mkdtemp(prefix="tandem-adapter-")
    unwrapped = model.module if hasattr(model, "module") else model
    with _gathered(unwrapped, cfg.zero_stage):  # ZeRO-3: every rank joins the gather of the adapter
        if rank == 0:
            unwrapped.save_pretrained(out)
            Path(out, "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    if in_ray:
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(out) if rank == 0 else None)
    config.setdefault("result", metrics)


def weights_held(model) -> float:
    """The share of the model's weights this worker holds (1.0, or about 1/world under ZeRO-3)."""
    held = total = 0
    for p in model.parameters():
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
        total += full
    return held / max(1, total)


def deepspeed_config(cfg: LoraTrainConfig, accum: int, bf16: bool) -> dict:
    """The DeepSpeed config for ``cfg``'s ZeRO stage; it wraps our AdamW, so results match DDP's."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW, the same optimizer as the DDP path
        "zero_force_ds_cpu_optimizer": False,  # offload without compiling DeepSpeedCPUAdam
        "steps_per_print": 1 << 30,
    }


def _gathered(model, zero_stage: int):
    """Context in which ZeRO-3's partitioned adapter weights are whole (a no-op otherwise)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])


def _peak_mib(device) -> float:
    """This worker's peak memory: CUDA allocations on a GPU, the process's peak RSS on a CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _collate(items, pad: int, device):
    import torch

    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (i, lab) in enumerate(items):
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(i)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def write_rows(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write chat rows (``messages`` lists plus metadata) as a Parquet file; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    table = pa.table({
        "messages": [json.dumps(r["messages"]) for r in rows],
        "predictor": [r.get("predictor", "") for r in rows],
        "example_index": [int(r.get("example_index", -1)) for r in rows],
    })
    pq.write_table(table, str(path))
    return len(rows)


def read_rows(path: str) -> list[list[dict]]:
    """The ``messages`` lists of a Parquet file or dir (local path or pyarrow-filesystem URI).

    Workers read the file themselves rather than through Ray Data: Ray Data's planning and read
    tasks each need a CPU, and while the replicas and the training workers hold every core (a
    2-core machine, or a cluster packed on purpose) they never get one.
    """
    import pyarrow.parquet as pq

    return [json.loads(m) for m in pq.read_table(path, columns=["messages"]).column("messages").to_pylist()]


def train_lora(cfg: LoraTrainConfig, model_path: str, data_path: str, out_dir: str,
               storage_path: str, name: str = "lora") -> TrainResult:
    """Fine-tune a LoRA adapter on the Parquet chat data with Ray Train; copy it to ``out_dir``.

    Args:
        cfg: LoRA and optimisation settings (workers, CPUs/GPUs per worker included).
        model_path: local HF checkpoint of the base model (reachable from every worker).
        data_path: Parquet file or dir with a ``messages`` column (JSON chat lists).
        out_dir: where the adapter (peft format) is written.
        storage_path: Ray Train storage (local path or a pyarrow-filesystem URI).
        name: the Ray Train run name.

    Returns:
        The adapter path and the final metrics (loss per epoch, tokens/s, wall time).

    Raises:
        ValueError: a ZeRO stage is asked for and DeepSpeed is not installed.
        ray.train.TrainingFailedError: a worker failed (the cause is attached).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.zero_stage and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"zero_stage={cfg.zero_stage} needs DeepSpeed, which is not installed here: "
                         "pip install 'tandem[deepspeed]' (or set zero_stage: 0 for DDP)")
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": asdict(cfg), "model_path": model_path, "data_path": data_path},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={**resources, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without an adapter checkpoint")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(ckpt, out)
    metrics = json.loads((out / "train_metrics.json").read_text())
    return TrainResult(str(out), metrics)
