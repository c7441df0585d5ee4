"""DeepSpeed ZeRO for GRPO's learner: what ``actors.training.grpo.Learner`` hands to DeepSpeed when
``GRPOConfig.zero_stage`` is 1, 2 or 3 (its ranks are a ``LearnerGroup``'s, in one process group).

- ``zero3_loading``: under stage 3, the base model's weights load straight into each rank's shard
  (transformers' ``zero.Init``), the way the weight step loads them; LoRA layers added after are
  partitioned by ``deepspeed.initialize``.
- ``engine``: our AdamW wrapped by DeepSpeed (``actors.training.optim.deepspeed_config``: clipping at
  ``max_grad_norm``, fp32; no accumulation count of its own: the learner marks each update's last
  micro-batch as the boundary).
- ``read`` / ``assign``: the trainable weights as whole tensors, and written back (under stage 3 each is
  a shard: gathered, written on rank 0 and re-partitioned), for the pass under the served version.
  Only the weights the forward pass uses are written, never the fp32 master copy the optimizer steps:
  an ``assign`` must be undone by another (the learner swaps, runs a no-grad pass and swaps back).
- ``moments`` / ``load_moments``: AdamW's moments as whole tensors per trainable parameter, keyed as the
  plain learner's ``optimizer.safetensors`` (``<index>.exp_avg``, ``<index>.exp_avg_sq``,
  ``<index>.step``), so a state saved under ZeRO resumes without it, at any number of ranks, and the
  other way round; loaded back into each rank's partition.

Every function but ``zero3_loading`` is a collective: every rank calls it at the same point.
Knows the internals of the pinned DeepSpeed (0.19) it relies on: the torch optimizer inside ZeRO holds
one state per flat fp32 partition (``single_partition_of_fp32_groups`` under stages 1-2,
``fp32_partitioned_groups_flat`` under 3), created lazily at the first step (``load_moments`` creates it and
links ZeRO-1/2's fragments with ``_lazy_init_hp_params_optimizer_state``); ``safe_get/set_full_optimizer_state``.
Does not know GRPO's math, Ray or the pool.
"""

from __future__ import annotations

from typing import Any

from actors.training.optim import deepspeed_config, gathered_params

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def zero3_loading(cfg) -> Any:
    """Under stage 3, the object that must stay alive while the base model loads (each weight into its
    shard); None otherwise."""
    if cfg.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, 1, False))


def engine(model, params: list, cfg) -> Any:
    """The DeepSpeed engine over ``model`` with AdamW on ``params`` (the LoRA weights)."""
    import deepspeed
    import torch

    wrapped, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=cfg.lr),
                                            config=deepspeed_config(cfg, 1, False))
    return wrapped


def read(params: list, stage: int) -> list:
    """Copies of ``params`` as whole tensors."""
    with gathered_params(params, stage):
        return [p.detach().clone() for p in params]


def assign(params: list, values: list, stage: int) -> None:
    """Write ``values`` into the weights the forward pass uses (see the module docstring)."""
    import torch

    with gathered_params(params, stage, modifier_rank=0), torch.no_grad():
        for p, v in zip(params, values):
            p.data.copy_(v)


def _inner(wrapped) -> Any:
    """The torch optimizer inside ZeRO (over flat fp32 partitions)."""
    return wrapped.optimizer.optimizer


def moments(wrapped, params: list) -> tuple[dict, list[dict]]:
    """AdamW's state as whole tensors per parameter index, and its param groups (plain AdamW's
    ``state_dict()`` layout: params are indices); no tensors before the first optimizer step."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _inner(wrapped)
    hyper = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
    groups = [{**hyper, "params": list(range(len(params)))}]
    states = [s for s in inner.state.values() if "step" in s]
    if not states:
        return {}, groups
    step = states[0]["step"]
    tensors = {}
    for i, p in enumerate(params):
        for key in MOMENT_KEYS:
            tensors[f"{i}.{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu().contiguous()
        tensors[f"{i}.step"] = step.detach().cpu().clone()
    return tensors, groups


def load_moments(wrapped, params: list, tensors: dict) -> None:
    """Put ``moments``' whole tensors into each rank's partition (a state saved before any optimizer step,
    with no tensors, leaves the optimizer fresh)."""
    import torch
    from deepspeed.utils import safe_set_full_optimizer_state

    if not tensors:
        return
    inner, zero = _inner(wrapped), wrapped.optimizer
    step = tensors["0.step"]
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups  # 3 or 1/2
    for flat in flats:
        inner.state[flat] = {"step": step.clone().to(torch.float32),
                             **{key: torch.zeros_like(flat) for key in MOMENT_KEYS}}
    lazy = getattr(wrapped.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if lazy is not None:  # ZeRO-1/2: link each parameter's fragment to the states just made
        lazy()
    for i, p in enumerate(params):
        for key in MOMENT_KEYS:
            safe_set_full_optimizer_state(p, tensors[f"{i}.{key}"].to(p.device), key)


def grad_norm(wrapped) -> float:
    """The gradient's global norm before clipping, as DeepSpeed computed it at the last step (NaN if it did not)."""
    norm = wrapped.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
