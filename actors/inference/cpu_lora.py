"""Grouped LoRA ops for vLLM's CPU path, installed as a vLLM general plugin in every vLLM process.

vLLM 0.29's CPU punica ops (``vllm.lora.ops.torch_ops``) gather a full LoRA matrix *per token*
(``lora_b_weights[lora_indices]``, then an einsum): a 4,096-token prefill through SmolLM2's q/k
adapters at rank 32 costs ~0.5 s per projection and layer, ~30x a matmul, so every prompt-heavy
step on a fine-tuned LM (evaluation, the next prompt step, serving) crawled. These replacements
compute one matmul per distinct adapter in the batch (usually one) on the rows that use it, and
treat a negative index as "no LoRA" (as vLLM's GPU kernels do). Same signatures and results
(``tests/unit/actors/inference/test_cpu_lora.py`` checks them against vLLM's own ops).

Registered through the ``vllm.general_plugins`` entry point (pyproject.toml), which vLLM loads in
the engine-core and worker processes it spawns; ``register`` is idempotent and only rebinds the
names ``PunicaWrapperCPU`` calls. Does not know Tandem's pools.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _groups(indices: torch.Tensor, rows: int):
    """(lora index, row selector) for each adapter used by the first ``rows`` tokens; skips index < 0."""
    indices = indices[:rows]
    first = int(indices[0]) if rows else -1
    if rows and bool((indices == first).all()):
        if first >= 0:
            yield first, slice(0, rows)
        return
    for idx in torch.unique(indices).tolist():
        if idx >= 0:
            yield idx, (indices == idx).nonzero().squeeze(1)


def _weight(weights: torch.Tensor, idx: int, dtype) -> torch.Tensor:
    w = weights[idx]
    return (w.squeeze(0) if w.dim() == 3 else w).to(dtype)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    x = inputs.to(output_tensor.dtype)
    rows = min(x.shape[0], output_tensor.shape[0], lora_indices_tensor.shape[0])
    for idx, sel in _groups(lora_indices_tensor, rows):
        w = _weight(lora_a_weights, idx, output_tensor.dtype)  # [rank, in]
        output_tensor[sel, : w.shape[0]] = scaling * (x[sel] @ w.t())


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    _expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, None, add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    _expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs)


def _expand(inputs, weights, out, indices, offset: int, size: int | None, add: bool) -> None:
    x = inputs.to(out.dtype)
    rows = min(x.shape[0], out.shape[0], indices.shape[0])
    for idx, sel in _groups(indices, rows):
        w = _weight(weights, idx, out.dtype)  # [out, rank]
        width = min(w.shape[0], out.shape[1] - offset) if size is None else size
        y = x[sel] @ w[:width].t()
        if add:
            out[sel, offset:offset + width] += y
        else:
            out[sel, offset:offset + width] = y


def _explode(seq_len_tensor, lora_indices_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _explode(seq_len_tensor, lora_indices_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _explode(seq_len_tensor, lora_indices_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _explode(seq_len_tensor, lora_indices_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand,
                               sgmv_expand_slice)}


def register() -> None:
    """vLLM general-plugin hook: point ``PunicaWrapperCPU`` at the grouped ops (idempotent)."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as exc:  # a vLLM without the CPU LoRA wrapper: nothing to replace
        logger.debug("tandem CPU LoRA ops not installed: %s", exc)
        return
    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
