"""What one optimizer step of LoRA training (``actors.training.loop``) does, and what it reports.

Knows: which tokens get a loss (``completion_tokens``: labels other than -100 after the causal
LM's shift by one) and how many each accumulation window has (``window_tokens``), so that a step's
gradient is that of the token mean over its whole window on every rank; the number of optimizer
steps of a run (``optimizer_steps``) and the lr over them (``lr_factor``: linear warmup, then
cosine, linear or constant, as a torch ``LambdaLR`` from ``scheduler``); clipping the gradient's
global norm before the step (``clip_and_step``); the per-epoch figures (``TrainLog``); the
all-reduces the ranks agree through (``sum_on_every_rank``, ``finite_on_every_rank``); and the
DeepSpeed config and ZeRO-3 helpers (``deepspeed_config``, ``gathered``, ``gathered_params``, ``weights_held``), in
which DeepSpeed clips and steps the same schedule itself.
Does not know tokenizers, data, Ray or the training loop (``actors.training.loop`` does); torch and
DeepSpeed are imported inside the calls that need them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.training.config import LoraTrainConfig


def completion_tokens(labels: list[int]) -> int:
    """The tokens of one row that get a loss: labels other than -100 after the causal LM's shift by one.

    Example:
        >>> completion_tokens([-100, -100, 7, 8, 9])
        3
    """
    return sum(1 for label in labels[1:] if label != -100)


def window_tokens(counts: list[int], accum: int) -> list[int]:
    """Loss tokens of each optimizer step's window of ``accum`` micro-batches (the last may be shorter).

    Example:
        >>> window_tokens([5, 1, 9, 2, 7], accum=2)
        [6, 11, 7]
    """
    return [sum(counts[i:i + accum]) for i in range(0, len(counts), accum)]


def optimizer_steps(rows: int, micro_batch_size: int, accum: int, epochs: int) -> int:
    """Optimizer steps of a run on one worker's ``rows``: each epoch's micro-batches in windows of ``accum``.

    Example:
        >>> optimizer_steps(rows=13, micro_batch_size=2, accum=4, epochs=3)  # 7 micro-batches: 4 + 3
        6
    """
    return epochs * math.ceil(math.ceil(rows / micro_batch_size) / accum)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The lr multiplier of optimizer step ``step`` (from 0) of ``total``.

    A linear rise over the first ``warmup`` steps ((s + 1) / (warmup + 1), so no step is wasted at
    lr 0), then ``schedule`` from 1 towards 0 at step ``total`` ('cosine', 'linear'), or 1 ('constant').

    Example:
        >>> [round(lr_factor(s, total=5, warmup=1, schedule="linear"), 2) for s in range(5)]
        [0.5, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - progress if schedule == "linear" else 1.0


def scheduler(cfg: LoraTrainConfig, total: int):
    """optimizer -> torch ``LambdaLR`` of ``cfg``'s warmup (``warmup_ratio`` of ``total``, rounded up)
    and schedule over ``total`` steps; DeepSpeed takes the callable too."""
    import torch

    factor = functools.partial(lr_factor, total=total, warmup=math.ceil(cfg.warmup_ratio * total),
                               schedule=cfg.lr_schedule)
    return lambda optim: torch.optim.lr_scheduler.LambdaLR(optim, factor)


def current_lr(sched, optim) -> float:
    """The lr the next optimizer step uses."""
    return sched.get_last_lr()[0] if sched is not None else optim.param_groups[0]["lr"]


def clip_and_step(model, optim, sched, max_grad_norm: float) -> float:
    """Clip the gradient's global L2 norm to ``max_grad_norm`` (0 = no clipping), step the optimizer and
    the schedule, clear the gradients; the norm before clipping."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    optim.step()
    if sched is not None:
        sched.step()
    optim.zero_grad(set_to_none=True)
    return float(norm)


@dataclass
class TrainLog:
    """Per-epoch figures: token-mean loss, the lr of the epoch's last step, mean pre-clip gradient norm."""

    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    last_norm: float = math.nan
    tokens: int = 0  # tokens seen on this worker (padding excluded)

    def epoch(self, loss: float, tokens: int, lr: float, norms: list[float]) -> None:
        self.loss.append(loss)
        self.lr.append(lr)
        self.grad_norm.append(sum(norms) / len(norms))
        self.last_norm, self.tokens = norms[-1], self.tokens + tokens

    def latest(self, seconds: float) -> dict:
        return {"loss": self.loss[-1], "tokens": self.tokens, "tokens_per_s": self.tokens / seconds,
                "lr": self.lr[-1], "grad_norm": self.grad_norm[-1]}

    def final(self) -> dict:
        return {"loss_history": self.loss, "lr_history": self.lr, "grad_norm_history": self.grad_norm,
                "grad_norm_last": self.last_norm}


def sum_on_every_rank(values: list, world: int, device: Any) -> list[float]:
    """``values`` summed over all ranks (one all-reduce when world > 1)."""
    if world == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def finite_on_every_rank(value: float, world: int, device: Any) -> bool:
    """Whether every rank's micro-batch loss is finite (one tiny all-reduce when world > 1)."""
    finite = math.isfinite(value)
    if world == 1:
        return finite
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0.0 if finite else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def weights_held(model) -> float:
    """The share of the model's weights this worker holds (1.0, or about 1/world under ZeRO-3)."""
    held = total = 0
    for p in model.parameters():
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
        total += full
    return held / max(1, total)


def deepspeed_config(cfg: LoraTrainConfig, accum: int, bf16: bool) -> dict:
    """The DeepSpeed config for ``cfg``'s ZeRO stage; it wraps our AdamW and clips as we do, so results
    match DDP's (the loop passes its loss unscaled by ``accum``: ``backward(scale_wrt_gas=False)``)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "gradient_clipping": cfg.max_grad_norm,  # 0 = off, as ours
        "zero_allow_untested_optimizer": True,  # torch AdamW, the same optimizer as the DDP path
        "zero_force_ds_cpu_optimizer": False,  # offload without compiling DeepSpeedCPUAdam
        "steps_per_print": 1 << 30,
    }


def gathered(model, zero_stage: int):
    """Context in which ZeRO-3's partitioned adapter weights are whole (a no-op otherwise)."""
    return gathered_params([p for p in model.parameters() if p.requires_grad], zero_stage)


def gathered_params(params: list, zero_stage: int, modifier_rank: int | None = None):
    """Context in which ZeRO-3's partitioned ``params`` are whole (a no-op otherwise); with
    ``modifier_rank``, that rank's writes are re-partitioned to every rank on exit."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
