"""LoRA fine-tuning with peft, run by Ray Train (``TorchTrainer``, N workers, DDP or DeepSpeed ZeRO).

Knows: the paper's LoRA defaults (r=32, alpha=64, dropout 0, q/k attention, 5 epochs, lr 1e-5,
effective batch 8, bf16 where the device has it), turning chat rows into token ids with the
model's chat template and loss only on the completion (the assistant turn), length-bucketed
micro-batches so padding stays small, gradient accumulation to the effective batch (each step's
loss is the token mean over its whole window on all ranks; ``actors.training.optim`` holds the step:
token counts, clipping, warmup and lr schedule), and saving the adapter as a Ray Train checkpoint.
Workers run DDP (``no_sync`` inside a window), or — for models whose weights do not fit one device
— DeepSpeed ZeRO (stage 1-3, optional CPU offload of the optimizer state).
``train_loop`` is a plain function: benchmarks run it without Ray. Data comes as a Parquet
dataset of ``messages`` (JSON) rows (``actors.training.rows``); a local file's rows reach the workers
through the object store, so workers on nodes that cannot see the driver's files train the same.
Faults become clear errors (``actors.training.guards`` holds the checks, their messages and the
errors, which are importable from here too): rows whose prompt fills ``max_seq_len`` (nothing to
learn; an all-masked micro-batch has loss NaN) are dropped and counted, and if none is left a
zero-CPU task says so before any worker starts (``NoCompletionError``); a NaN/inf loss, agreed by
all ranks per micro-batch, stops them all (``NonFiniteLossError``, no adapter). Both come back as
rank 0's return value, since Ray Train retries a raised error ``max_failures`` times, which is
kept for workers that die (also while they start: ``actors.training.trainer`` builds the trainer).
Workers the cluster can never hold are refused at once; busy resources are waited for
``resource_wait_s`` at most, then ``ResourceWaitTimeout`` names what it waited for and what is free.
Does not know DSPy or the pool. torch/peft/transformers are imported inside the workers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


from actors.training.guards import (NoCompletionError, NonFiniteLossError, ResourceWaitTimeout, RowCheck, check_cluster,
                                learnable, non_finite_message, start_timeout, wait_message)
from actors.runtime import cluster_now
from actors.training.config import LoraTrainConfig
from actors.training.optim import (TrainLog, clip_and_step, completion_tokens, current_lr, deepspeed_config,
                               finite_on_every_rank, gathered, optimizer_steps, scheduler, sum_on_every_rank,
                               weights_held, window_tokens)
from actors.training.rows import read_rows, ship

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Where the adapter is and how training went."""

    adapter_path: str
    metrics: dict


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Untruncated token ids of one chat and the length of its prompt (all turns but the last)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if full[:len(prompt)] != prompt:  # template does not extend the prompt: append content + eos
        full = prompt + tokenizer.encode(messages[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return list(full), len(prompt)


def tokenize(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one chat: -100 on the prompt, the assistant turn is learned."""
    full, prompt = encode(tokenizer, messages)
    return _truncate(full, prompt, max_seq_len)


def _truncate(full: list[int], prompt: int, max_seq_len: int) -> tuple[list[int], list[int]]:
    ids = full[:max_seq_len]
    return ids, [-100] * min(prompt, len(ids)) + ids[prompt:]


def learnable_data(tokenizer, rows: list, max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], RowCheck]:
    """Ids and labels of the rows that have a completion token inside ``max_seq_len``, and the check."""
    encoded = [encode(tokenizer, m) for m in rows]
    check = learnable([(len(full), prompt) for full, prompt in encoded], max_seq_len)
    return [_truncate(*encoded[i], max_seq_len) for i in check.keep], check


def check_data(model_path: str, data_path, max_seq_len: int) -> RowCheck:
    """``learnable_data``'s check of a Parquet dataset with the model's tokenizer (a Ray task)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return learnable_data(tokenizer, read_rows(data_path), max_seq_len)[1]


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


@dataclass
class _Worker:
    """One worker's training state, shared by train_loop's parts."""

    cfg: LoraTrainConfig
    in_ray: bool
    rank: int
    world: int
    device: Any
    data: list
    check: RowCheck
    model: Any = None
    engine: Any = None  # the DeepSpeed engine under ZeRO
    optim: Any = None
    sched: Any = None  # the lr schedule (torch LambdaLR); DeepSpeed steps it under ZeRO
    accum: int = 1
    steps: int = 0  # optimizer steps taken
    pad: int = 0
    held: float = 1.0
    keep_alive: Any = None  # ZeRO-3's HfDeepSpeedConfig (transformers holds only a weakref)


def train_loop(config: dict) -> dict:
    """One Ray Train worker (or a plain process when ``config['rows']`` is given).

    Config keys: ``train`` (LoraTrainConfig as dict), ``model_path``, and either ``rows``
    (list of message lists, no Ray) or ``data_path`` (Parquet; each worker takes its ``shard``
    of the learnable rows). Returns the final metrics (also left in ``config['result']``). Under
    Ray a failure every rank agrees on comes back as ``{"failed": <error class>, "message": ...}``
    (Ray Train would retry a raised one); without Ray it is raised.

    Raises:
        NoCompletionError: no row has a completion token inside max_seq_len (without Ray).
        NonFiniteLossError: the loss became NaN or inf (without Ray).
    """
    cfg = LoraTrainConfig(**config["train"])
    in_ray = "rows" not in config
    if cfg.zero_stage and not in_ray:
        raise ValueError("zero_stage needs Ray Train workers (a process group): use train_lora")
    try:
        worker = _start_worker(cfg, config, in_ray)
        _build_model(worker, config["model_path"])
        metrics = _epochs(worker)
    except (NoCompletionError, NonFiniteLossError) as exc:  # raised on every rank at the same point
        if not in_ray:
            raise
        return {"failed": type(exc).__name__, "message": str(exc)}
    out = config.get("out_dir") or tempfile.mkdtemp(prefix="tandem-adapter-")
    unwrapped = worker.model.module if hasattr(worker.model, "module") else worker.model
    with gathered(unwrapped, cfg.zero_stage):  # ZeRO-3: every rank joins the gather of the adapter
        if worker.rank == 0:
            unwrapped.save_pretrained(out)
            Path(out, "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    if in_ray:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(out) if worker.rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)
    config.setdefault("result", metrics)
    return metrics


def _start_worker(cfg: LoraTrainConfig, config: dict, in_ray: bool) -> _Worker:
    """Rank, device and this rank's shard of the learnable rows (every rank drops the same rows)."""
    import torch
    from transformers import AutoTokenizer

    if in_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        rows, device = read_rows(config["data_path"]), ray.train.torch.get_device()
    else:
        rank, world, rows = 0, 1, config["rows"]
        device = torch.device(config.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    data, check = learnable_data(tokenizer, rows, cfg.max_seq_len)
    if not check.keep:
        raise check.error()
    if check.dropped and rank == 0:
        logger.warning(check.warning())
    worker = _Worker(cfg, in_ray, rank, world, device, shard(data, rank, world), check)
    worker.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return worker


def _build_model(w: _Worker, model_path: str) -> None:
    """The peft model, its optimizer and lr schedule, and the DDP wrapper or DeepSpeed engine, on ``w``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = w.cfg
    torch.manual_seed(cfg.seed)
    bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and w.device.type == "cuda" and torch.cuda.is_bf16_supported())
    w.accum = cfg.batch_size // (cfg.micro_batch_size * w.world)  # exact: LoraTrainConfig checks it divides
    ds_config = deepspeed_config(cfg, w.accum, bf16) if cfg.zero_stage else None
    if cfg.zero_stage == 3:  # transformers loads each weight straight into its shard (zero.Init)
        from transformers.integrations import HfDeepSpeedConfig

        w.keep_alive = HfDeepSpeedConfig(ds_config)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    if cfg.zero_stage != 3:
        base = base.to(w.device)
    w.model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    w.optim = torch.optim.AdamW([p for p in w.model.parameters() if p.requires_grad], lr=cfg.lr)
    schedule = scheduler(cfg, optimizer_steps(len(w.data), cfg.micro_batch_size, w.accum, cfg.epochs))
    if ds_config:  # DeepSpeed clips (gradient_clipping) and steps the schedule at each boundary itself
        import deepspeed

        w.engine, w.optim, _, w.sched = deepspeed.initialize(model=w.model, optimizer=w.optim, config=ds_config,
                                                             lr_scheduler=schedule)
    else:
        w.sched = schedule(w.optim)
        if w.in_ray and w.world > 1:
            import ray.train.torch

            w.model = ray.train.torch.prepare_model(w.model, move_to_device=False)
    w.held = weights_held(w.model)  # fixed once DeepSpeed has partitioned (or not)


def _epochs(w: _Worker) -> dict:
    """Train ``w.cfg.epochs`` passes; report each but the last to Ray Train; the final metrics.

    Each optimizer step's gradient is that of the token-mean loss over its window: the sum of every
    completion token's loss over the window's micro-batches on every rank, divided by their count
    (all-reduced once per epoch); DDP and ZeRO average over ranks, hence the factor ``world``.
    """
    cfg, started, log = w.cfg, time.perf_counter(), TrainLog()
    (w.engine or w.model).train()
    for epoch in range(cfg.epochs):
        batches = buckets([len(ids) for ids, _ in w.data], cfg.micro_batch_size, cfg.seed + epoch)
        counts = [sum(completion_tokens(w.data[i][1]) for i in batch) for batch in batches]
        totals = sum_on_every_rank(window_tokens(counts, w.accum), w.world, w.device)
        loss_sum, seen, lrs, norms = 0.0, 0, [], []
        for step, batch in enumerate(batches):
            boundary = (step + 1) % w.accum == 0 or step == len(batches) - 1
            lr = current_lr(w.sched, w.optim)  # the lr of this window's step (read before DeepSpeed's step moves it)
            value, tokens = _micro_step(w, [w.data[i] for i in batch], counts[step] * w.world / totals[step // w.accum],
                                        boundary, (epoch, step, len(batches)))
            loss_sum, seen = loss_sum + value * counts[step], seen + tokens
            if boundary:
                norms.append(_optimizer_step(w))
                lrs.append(lr)
        loss_sum, completion = sum_on_every_rank([loss_sum, sum(counts)], w.world, w.device)
        log.epoch(loss_sum / max(1.0, completion), seen, lrs[-1], norms)
        metrics = {"epoch": epoch + 1, **log.latest(time.perf_counter() - started), "examples": len(w.data),
                   "rows_dropped_no_completion": w.check.dropped, "optimizer_steps": w.steps,
                   "zero_stage": cfg.zero_stage, "weights_held": w.held}
        if w.in_ray and epoch < cfg.epochs - 1:
            import ray.train

            ray.train.report(metrics)
    return {**metrics, **log.final(), "wall_s": time.perf_counter() - started, "peak_mib": _peak_mib(w.device)}


def _micro_step(w: _Worker, items: list, scale: float, boundary: bool, where: tuple) -> tuple[float, int]:
    """Forward and backward of one micro-batch, its summed token loss times ``scale``; its mean loss and
    its token count (padding excluded). DDP skips the gradient all-reduce (``no_sync``) but at the
    window's last micro-batch; DeepSpeed is told the boundary and steps (it acts only there)."""
    import torch

    ids, labels, mask = _collate(items, w.pad, w.device)
    ddp = isinstance(w.model, torch.nn.parallel.DistributedDataParallel)
    with w.model.no_sync() if ddp and not boundary else contextlib.nullcontext():
        if w.engine is not None:
            w.engine.set_gradient_accumulation_boundary(boundary)
        loss = (w.engine or w.model)(input_ids=ids, attention_mask=mask, labels=labels).loss
        value = float(loss.detach())
        if not finite_on_every_rank(value, w.world, w.device):  # before backward, so no rank waits in a collective
            raise NonFiniteLossError(non_finite_message(value, *where, w.cfg.lr))
        if w.engine is not None:
            w.engine.backward(loss * scale, scale_wrt_gas=False)  # scale already is the window's
            w.engine.step()
        else:
            (loss * scale).backward()
    return value, int(mask.sum())


def _optimizer_step(w: _Worker) -> float:
    """Clip, step and schedule at a window's end (DeepSpeed did all three in its step); the gradient's
    global norm before clipping (NaN when DeepSpeed does not say)."""
    w.steps += 1
    if w.engine is not None:
        norm = w.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)
    return clip_and_step(w.model, w.optim, w.sched, w.cfg.max_grad_norm)


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


_FAILURES = {"NoCompletionError": NoCompletionError, "NonFiniteLossError": NonFiniteLossError}


def train_lora(cfg: LoraTrainConfig, model_path: str, data_path: str, out_dir: str,
               storage_path: str, name: str = "lora") -> TrainResult:
    """Fine-tune a LoRA adapter on the Parquet chat data with Ray Train; copy it to ``out_dir``.

    Args:
        cfg: LoRA and optimisation settings (workers, CPUs/GPUs per worker, waits, retries).
        model_path: local HF checkpoint of the base model (reachable from every worker).
        data_path: Parquet file or dir with a ``messages`` column (JSON chat lists); a local one is
            read here and its rows reach the workers through the object store (``ship``).
        out_dir: where the adapter (peft format) is written.
        storage_path: Ray Train storage (local path or a pyarrow-filesystem URI).
        name: the Ray Train run name.

    Returns:
        The adapter path and the final metrics (loss per epoch, tokens/s, wall time, rows dropped).

    Raises:
        ValueError: the cluster can never hold the workers, or a ZeRO stage is asked for and
            DeepSpeed is not installed.
        NoCompletionError: no row has a completion token inside max_seq_len (a ValueError).
        NonFiniteLossError: the loss became NaN/inf (a RuntimeError); no adapter is written.
        ResourceWaitTimeout: the workers' resources stayed busy for ``cfg.resource_wait_s``.
        ray.train.TrainingFailedError: a worker failed ``max_failures + 1`` times (the cause is attached).

    Example:
        >>> train_lora(LoraTrainConfig(), "/models/smollm2", "rows.parquet", "adapter", "/tmp/ray_train")
    """
    import ray

    if cfg.zero_stage and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"zero_stage={cfg.zero_stage} needs DeepSpeed, which is not installed here: "
                         "pip install 'tandem[deepspeed]' (or set zero_stage: 0 for DDP)")
    check_cluster(cfg, *cluster_now())
    data = ship(data_path)
    check = ray.get(ray.remote(num_cpus=0, max_calls=1)(check_data).remote(model_path, data, cfg.max_seq_len))
    if not check.keep:
        raise check.error()
    if check.dropped:
        logger.warning(check.warning())
    result = _fit(cfg, {"train": asdict(cfg), "model_path": model_path, "data_path": data}, storage_path, name)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(ckpt, out)
    metrics = json.loads((out / "train_metrics.json").read_text())
    return TrainResult(str(out), metrics)


def _fit(cfg: LoraTrainConfig, loop_config: dict, storage_path: str, name: str):
    """Run ``train_loop`` on Ray Train; its failures and a timed-out resource wait become our errors."""
    import ray
    from ray.train import ControllerError

    from actors.training.trainer import make_trainer  # also retries workers that die while starting

    trainer = make_trainer(cfg, train_loop, loop_config, storage_path, name)
    with start_timeout(cfg.resource_wait_s):
        try:
            result = trainer.fit()
        except ControllerError as exc:
            if type(exc.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
                raise
            raise ResourceWaitTimeout(wait_message(cfg, ray.available_resources())) from exc
    failed = result.return_value if isinstance(result.return_value, dict) else {}
    if failed.get("failed") in _FAILURES:
        raise _FAILURES[failed["failed"]](failed["message"])
    if result.checkpoint is None:
        raise RuntimeError("training finished without an adapter checkpoint")
    return result
