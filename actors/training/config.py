"""``LoraTrainConfig``: the LoRA and optimisation settings of a weight step, typed by field.

The one config both sides read: the training loop (``actors.training.loop``) and its guards and
optimizer step, and the driver (``engine.config``'s ``lora:`` section, the DSPy provider). Knows the
paper's defaults and which combinations are valid; does not know Ray Train, torch or DSPy.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

from pydantic import field_validator

from actors.config import custom_resources
from actors.typed_config import typed_config

SCHEDULES = ("cosine", "linear", "constant")  # lr after warmup (actors.training.optim.scheduler)


@typed_config
class LoraTrainConfig:
    """LoRA and optimisation settings; defaults are the paper's; values typed by field (``actors.typed_config``)."""

    rank: int = field(default=32, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=64, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj"), metadata={"help": "modules to adapt"})
    epochs: int = field(default=5, metadata={"help": "passes over the data"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "effective batch (micro x workers x accumulation)"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per worker per forward pass"})
    max_seq_len: int = field(default=1024, metadata={
        "help": "truncate longer sequences; rows whose prompt alone fills it are dropped"})
    bf16: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPUs that have it), 'yes', 'no'",
                                                "choices": ("auto", "yes", "no")})
    seed: int = field(default=0, metadata={"help": "shuffle and init seed"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP, or ZeRO with zero_stage)"})
    cpus_per_worker: int = field(default=2, metadata={"help": "CPUs per worker (torch threads on CPU)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    resources: dict[str, float] = field(default_factory=dict, metadata={
        "help": "custom Ray resources each worker reserves, e.g. {'training': 1} to place the workers only on "
                "nodes started with --resources '{\"training\": N}'"})
    zero_stage: int = field(default=0, metadata={
        "help": "DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights; 0 = DDP"})
    zero_offload: bool = field(default=False, metadata={"help": "ZeRO: keep the optimizer state in CPU memory"})
    resource_wait_s: float = field(default=600.0, metadata={
        "help": "seconds the workers wait for busy CPUs/GPUs to free up before the step fails"})
    max_failures: int = field(default=1, metadata={
        "help": "times a training run whose worker died or raised is started again (from scratch); 0 = never"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "clip the gradient's global L2 norm to this before each optimizer step; 0 = no clipping"})
    warmup_ratio: float = field(default=0.03, metadata={
        "help": "share of the optimizer steps over which the lr rises linearly to lr (rounded up; 0 = none)"})
    lr_schedule: str = field(default="cosine", metadata={
        "help": "lr after warmup: 'cosine' (to 0 after the last step), 'linear' (to 0) or 'constant'",
        "choices": SCHEDULES})

    @field_validator("bf16", mode="before")
    @classmethod
    def _yaml_yes_no(cls, value: Any) -> Any:
        """YAML 1.1 reads ``bf16: yes`` / ``no`` as a bool."""
        return ("yes" if value else "no") if isinstance(value, bool) else value

    def __hash__(self) -> int:  # hashable like the other configs, though ``resources`` is a dict
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in vars(self).values()))

    def __post_init__(self) -> None:
        custom_resources(self.resources, "cpus_per_worker / use_gpu")
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
        if not (self.resource_wait_s > 0 and math.isfinite(self.resource_wait_s)):
            raise ValueError(f"resource_wait_s must be a finite number of seconds > 0, got {self.resource_wait_s}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0 = off) and warmup_ratio in [0, 1), got "
                             f"{self.max_grad_norm} and {self.warmup_ratio}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        self._check_batch()

    def _check_batch(self) -> None:
        """The effective batch must be a whole number of micro-batches on every worker."""
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            low, high = per_step * max(1, self.batch_size // per_step), per_step * (self.batch_size // per_step + 1)
            near = " or ".join(str(b) for b in sorted({low, high}))
            micro = [m for m in range(self.micro_batch_size, 0, -1) if self.batch_size % (m * self.num_workers) == 0]
            fix = f"set batch_size to {near}" + (f", or micro_batch_size to {micro[0]}" if micro else "")
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size} x "
                f"num_workers={self.num_workers} = {per_step} (the sequences one accumulation step takes): {fix}")
