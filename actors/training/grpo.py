"""GRPO's learner: LoRA policy-gradient updates from groups of rollouts, kept in memory across steps.

Knows dspy 3.4.1's GRPO data (``dspy.clients.utils_finetune.GRPOGroup``: ``{"batch_id", "group": [{"messages",
"completion", "reward"}, ...]}``, one group = one input's rollouts; a rollout may add ``"completion_ids"``, the
tokens the replica sampled — Tandem's ``g`` step passes vLLM's — and is then trained on those tokens after the
prompt as the replica encoded it, not on its text tokenized again), group-relative advantages (a rollout's
reward minus its group's mean, divided by the group's std unless ``scale_rewards`` is off — Dr. GRPO's variant),
the policy-gradient loss on the completion's tokens where the group's completions differ (``mask_shared``: the
tokens all of them start and end with are the answer format's scaffolding, forced under constrained decoding;
trained on, they teach the policy what follows a choice instead of the choice — seen on the tiny model, where
the reward did not move until they were masked) (``loss``: 'grpo' averages each sequence's tokens, then the
sequences; 'token' averages every completion token of the batch at once, so long answers weigh more), a KL
penalty to the base model with weight ``beta`` (k3 estimator; the reference is the same model with the adapter
disabled, so no second copy is held), gradient clipping, and the adapter saved in peft format for the pool to
hot-load.

One optimizer step per ``step`` call. The rollouts of a step are taken to come from the version last put on the
replicas (``mark_served``; at the start, the policy the learner starts from). When that is the policy being
trained (the pool gets every version), PPO's ratio is 1, its clip never bites and the loss is the plain policy
gradient. When updates went by since (a caller that syncs every N updates), every token is weighted by its
importance ratio p_now / p_served, clipped to ``1 ± clip_eps`` as in PPO (the served policy's log-probs come
from a copy of its LoRA weights swapped in for one no-grad forward pass), so stale rollouts neither pull with
the wrong weight nor push the policy far from where they were sampled (several updates per batch are not
implemented). A group whose rewards are all equal has no advantage and teaches nothing: it is counted
(``zero_variance_groups``), not trained on. Plain Python: a Ray actor or a test holds one ``Learner`` for the
whole run, so the model and optimizer state persist between steps (no Ray Train start per step). ``save_state``
writes the whole learner (adapter, AdamW moments and the served version's weights as safetensors, step counts as
JSON: no pickle) and ``Learner(..., init=dir)`` resumes from it, bit for bit; ``init`` may also be a plain peft
adapter (e.g. a weight step's), which the policy then starts from (its own rank and modules).
Several workers (``rank`` of ``world`` in a ``torch.distributed`` process group that the caller set up,
``actors.training.learner_group``): every worker holds the same policy and optimizer (same seed, same
init), builds the same rows from the same groups and trains on its share (every ``world``-th row); the
loss is normalized by the whole batch's rows or tokens, so the gradients summed over the workers
(all-reduce) are the one-worker gradient, and every worker takes the same optimizer step — DDP's data
parallelism with the LoRA gradients (small) reduced once per update. With ``zero_stage`` 1-3 DeepSpeed
ZeRO takes over the reduction, the optimizer step and the sharding (``actors.training.grpo_zero``): every
rank then runs the same number of micro-batches (a rank short of rows runs an empty one) and joins every
call (``save``, ``save_state``, ``logprob``, ``mark_served``: collectives under ZeRO); only rank 0 writes.
Does not know Ray, the pool or DSPy.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import field
from pathlib import Path
from typing import Any

from actors.typed_config import typed_config

LOSSES = ("grpo", "token")
STATE_FILE = "learner.json"  # save_state's step count and optimizer groups, beside the adapter
MOMENTS_FILE = "optimizer.safetensors"  # save_state's AdamW state tensors
SERVED_FILE = "served.safetensors"  # save_state's copy of the served version's LoRA weights


@typed_config
class GRPOConfig:
    """The learner's LoRA and update settings (typed by field, ``actors.typed_config``)."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"),
                                            metadata={"help": "modules to adapt"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    beta: float = field(default=0.0, metadata={"help": "KL penalty to the base model (0: none, no reference pass)"})
    loss: str = field(default="grpo", metadata={"help": "'grpo' (mean of per-sequence token means) or 'token' "
                                                        "(mean over every completion token)", "choices": LOSSES})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group's std "
                                                                "(off: Dr. GRPO)"})
    max_seq_len: int = field(default=1024, metadata={"help": "truncate longer prompt + completion"})
    mask_shared: bool = field(default=True, metadata={
        "help": "train only on the span where a group's completions differ: the tokens every completion of the "
                "group starts or ends with are the answer format's scaffolding (under constrained decoding the "
                "sampler had no choice there), on which the gradient would teach only what follows a choice"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient's L2 norm (0: no clipping)"})
    zero_stage: int = field(default=0, metadata={
        "help": "DeepSpeed ZeRO across the learner workers (learner_workers >= 2), as the weight step's: 1 shards "
                "the optimizer state, 2 also gradients, 3 also the base model's weights; 0: each worker holds all "
                "and the LoRA gradients are all-reduced"})
    zero_offload: bool = field(default=False, metadata={"help": "ZeRO: keep the optimizer state in CPU memory"})
    clip_eps: float = field(default=0.2, metadata={
        "help": "PPO's clip range for the importance ratio of rollouts sampled from an older version than the one "
                "trained (a sync every N > 1 updates); on-policy the ratio is 1 and the clip never bites"})
    seed: int = field(default=0, metadata={"help": "LoRA init seed"})
    threads: int = field(default=0, metadata={
        "help": "torch threads of the learner (0: as many as the CPUs its actor reserves, every core of its node "
                "when it reserves none: it learns while the replicas wait)"})

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.rank < 1 or self.lr <= 0 or self.beta < 0 or self.micro_batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("rank, micro_batch_size >= 1, lr > 0, beta >= 0 and max_seq_len >= 2 are required")
        if self.clip_eps <= 0:
            raise ValueError(f"clip_eps must be > 0, got {self.clip_eps}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0 (all-reduce), 1, 2 or 3, got {self.zero_stage}")
        if self.zero_offload and not self.zero_stage:
            raise ValueError("zero_offload needs a ZeRO stage (zero_stage 1, 2 or 3)")


def saved_state(path: str | Path | None) -> Path | None:
    """The ``save_state`` folder at ``path`` to resume from, or None: the folder when complete, else the
    previous state a kill during the final move left beside it (``<path>.old``)."""
    if path is None:
        return None
    for candidate in (Path(path), Path(f"{path}.old")):
        if (candidate / STATE_FILE).is_file() and (candidate / MOMENTS_FILE).is_file():
            return candidate
    return None


def shared_ends(completions: list[list[int]]) -> tuple[int, int]:
    """How many tokens all ``completions`` share at their start and, beyond that, at their end.

    Example:
        >>> shared_ends([[1, 2, 7, 9, 5], [1, 2, 8, 9, 5], [1, 2, 6, 6, 9, 5]])
        (2, 2)
    """
    if len(completions) < 2:
        return 0, 0
    shortest = min(len(c) for c in completions)
    head = next((i for i in range(shortest) if len({c[i] for c in completions}) > 1), shortest)
    tail = next((i for i in range(shortest - head) if len({c[-1 - i] for c in completions}) > 1), shortest - head)
    return head, tail


def advantages(rewards: list[float], scale: bool = True) -> list[float]:
    """Group-relative advantages: reward minus the group's mean, over its (population) std when ``scale``.

    Example:
        >>> advantages([1.0, 0.0, 0.0, 1.0])
        [1.0, -1.0, -1.0, 1.0]
        >>> advantages([0.5, 0.5])
        [0.0, 0.0]
    """
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    std = math.sqrt(sum(c * c for c in centred) / len(rewards))
    if not scale:
        return centred
    return [c / std if std > 1e-8 else 0.0 for c in centred]


class Learner:
    """A peft LoRA policy and its optimizer, updated once per ``step`` (see the module docstring).

    Args:
        model_path: a local Hugging Face model directory (the pool's base model).
        cfg: the learner's settings.
        init: a directory to start from: a ``save_state`` directory (adapter, optimizer moments and step
            count: the run resumes exactly) or a peft adapter (the policy starts from it, a fresh optimizer).
        rank, world: this worker's place among ``world`` workers of an initialized ``torch.distributed``
            process group (default one worker, no group).

    Example:
        >>> learner = Learner(str(models.materialize(models.TINY)), GRPOConfig(lr=1e-3))  # doctest: +SKIP
        >>> learner.step([{"batch_id": 0, "group": rollouts}])["loss"]  # doctest: +SKIP
    """

    def __init__(self, model_path: str, cfg: GRPOConfig, init: str | Path | None = None, rank: int = 0,
                 world: int = 1):
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from actors.training import grpo_zero

        if cfg.zero_stage and not (world > 1 and torch.distributed.is_initialized()):
            raise ValueError(f"zero_stage {cfg.zero_stage} shards over learner workers: it needs learner_workers "
                             f">= 2 (a LearnerGroup), got {world} worker(s)")
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.torch, self.rank, self.world = cfg, torch, rank, world
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._zero3 = grpo_zero.zero3_loading(cfg)  # kept alive: stage 3 loads each weight into its shard
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.zero_stage != 3:
            base = base.to(self.device)
        if init is not None:
            self.model = PeftModel.from_pretrained(base, str(init), is_trainable=True)
        else:
            self.model = get_peft_model(base, LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.target_modules),
                task_type="CAUSAL_LM"))
        self.engine = grpo_zero.engine(self.model, self._trainable(), cfg) if cfg.zero_stage else None
        self.optim = None if self.engine else torch.optim.AdamW(self._trainable(), lr=cfg.lr)
        self.steps = 0
        self.mark_served()  # the replicas start with the policy the learner starts from
        if init is not None and (Path(init) / STATE_FILE).is_file():
            self._load_state(Path(init))

    def _trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def mark_served(self) -> None:
        """The current policy is now the replicas' (its adapter was saved and loaded): the next updates'
        rollouts are weighted against it (see the module docstring)."""
        from actors.training.grpo_zero import read

        self.served_step = self.steps
        self.served = read(self._trainable(), self.cfg.zero_stage)

    def encode(self, messages: list[dict], completion: dict,
               completion_ids: list[int] | None = None) -> tuple[list[int], int]:
        """Token ids of the prompt + completion, cut to ``max_seq_len``, and the prompt's length: the prompt as
        the replica encoded it (the chat template with the generation prompt) followed by ``completion_ids``, the
        tokens it sampled, when given; else the training loop's encoding of the chat (the completion's text
        re-tokenized, the template's end of turn after it)."""
        from actors.training.loop import encode

        if completion_ids is not None:
            prompt_ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                            return_dict=False)
            full, prompt = [*prompt_ids, *completion_ids], len(prompt_ids)
        else:
            full, prompt = encode(self.tokenizer, [*messages, completion])
        return full[: self.cfg.max_seq_len], min(prompt, self.cfg.max_seq_len)

    def retokenizes_differently(self, completion: dict, completion_ids: list[int]) -> bool:
        """Whether the completion's text, tokenized again, is not the sampled ``completion_ids`` (an end-of-turn
        token the sampler ended with aside): the tokens a learner on text would train are not the ones sampled."""
        special = set(self.tokenizer.all_special_ids)
        sampled = list(completion_ids)
        while sampled and sampled[-1] in special:
            sampled.pop()
        return self.tokenizer.encode(completion["content"], add_special_tokens=False) != sampled

    def step(self, groups: list[dict]) -> dict[str, Any]:
        """One update from dspy GRPO groups; the step's metrics.

        Returns:
            ``{"step", "groups", "rollouts", "reward_mean", "reward_std", "zero_variance_groups", "loss", "kl",
            "tokens", "grad_norm", "stale", "ratio_dev", "clipped", "sampled_ids", "retokenized_differ",
            "seconds"}`` (``sampled_ids``: rollouts trained on the tokens the replica sampled, the others on their
            re-tokenized text; ``retokenized_differ``: of those, how many a re-tokenization would have changed;
            ``loss``, ``kl``, ``ratio_dev``
            and ``clipped`` over the tokens trained on; ``stale``: updates since the served version the rollouts
            came from; ``ratio_dev``: the mean of |importance ratio - 1|, 0 on-policy; ``clipped``: the share of tokens
            whose ratio the clip held; loss and KL are 0 when every group had equal rewards and nothing was trained).
        """
        torch, started = self.torch, time.perf_counter()
        rewards = [float(r["reward"]) for g in groups for r in g["group"]]
        rows, flat = [], 0
        for g in groups:
            adv = advantages([float(r["reward"]) for r in g["group"]], self.cfg.scale_rewards)
            flat += all(a == 0.0 for a in adv)
            encoded = [self.encode(r["messages"], r["completion"], r.get("completion_ids")) for r in g["group"]]
            head, tail = shared_ends([ids[prompt:] for ids, prompt in encoded]) if self.cfg.mask_shared else (0, 0)
            for (ids, prompt), a in zip(encoded, adv):
                start, end = prompt + head, len(ids) - tail
                if a != 0.0 and end > start:
                    rows.append((ids, start, end, a))
        sampled = [r for g in groups for r in g["group"] if r.get("completion_ids") is not None]
        mean = sum(rewards) / max(1, len(rewards))
        out = {"step": self.steps + 1, "groups": len(groups), "rollouts": len(rewards), "reward_mean": mean,
               "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards))),
               "zero_variance_groups": flat, "loss": 0.0, "kl": 0.0, "tokens": 0, "grad_norm": 0.0,
               "stale": self.steps - self.served_step, "ratio_dev": 0.0, "clipped": 0.0, "sampled_ids": len(sampled),
               "retokenized_differ": sum(self.retokenizes_differently(r["completion"], r["completion_ids"])
                                         for r in sampled)}
        if rows:  # the same on every worker: each builds every row, then trains on its share
            (self.engine or self.model).train()
            total_tokens = sum(end - start for _, start, end, _ in rows)
            parts = self._micro_batches(rows)
            sums = [0.0, 0.0, 0.0, 0.0]  # loss, KL, ratio, clipped tokens
            if self.engine is None:
                self.optim.zero_grad(set_to_none=True)
            batches = [self._tensors(part) for part in parts]
            served = [None] * len(batches)
            if out["stale"] > 0:  # the served policy's log-probs, in one weight swap, before any pass with gradients
                with torch.no_grad(), self._served_weights():
                    served = [self._token_logprobs(b[0], b[2]) for b in batches]
            for k, (batch, sampled) in enumerate(zip(batches, served)):
                loss, *figures = self._loss(batch, len(rows), total_tokens, sampled)
                if self.engine is not None:  # DeepSpeed averages over ranks; the loss is already the batch's share
                    self.engine.set_gradient_accumulation_boundary(k == len(parts) - 1)
                    self.engine.backward(loss * self.world, scale_wrt_gas=False)
                    self.engine.step()  # reduces, clips and steps at the boundary only
                else:
                    loss.backward()
                sums = [a + b for a, b in zip(sums, [loss.item(), *figures])]
            if self.engine is not None:
                from actors.training.grpo_zero import grad_norm
                from actors.training.optim import sum_on_every_rank

                sums, norm = sum_on_every_rank(sums, self.world, self.device), grad_norm(self.engine)
            else:
                params = self._trainable()
                if self.world > 1:
                    sums = self._reduce(params, sums)
                norm = float(torch.nn.utils.clip_grad_norm_(
                    params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")))
                self.optim.step()
            out.update(loss=sums[0], kl=sums[1] / total_tokens, tokens=total_tokens, grad_norm=norm,
                       ratio_dev=sums[2] / total_tokens, clipped=sums[3] / total_tokens)
        self.steps += 1
        out["seconds"] = time.perf_counter() - started
        return out

    def _micro_batches(self, rows: list) -> list[list]:
        """This rank's share of ``rows`` (every ``world``-th) in micro-batches; under ZeRO every rank runs as
        many as the rank with the most (ZeRO's forward and backward passes are collectives), the missing ones
        an empty row (nothing trained: its span is empty)."""
        mine, size = rows[self.rank::self.world], self.cfg.micro_batch_size
        parts = [mine[i: i + size] for i in range(0, len(mine), size)]
        if self.engine is not None:
            most = math.ceil(math.ceil(len(rows) / self.world) / size)
            ids, start, _, _ = rows[0]
            parts += [[(ids, start, start, 0.0)]] * (most - len(parts))
        return parts

    def _reduce(self, params: list, sums: list[float]) -> list[float]:
        """Sum the workers' gradients (a worker with no rows adds zeros) and their ``sums`` (loss, KL, ...), in
        one flat all-reduce; every worker then holds the batch's gradient."""
        torch, dist = self.torch, self.torch.distributed
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                         + [torch.tensor(sums, dtype=params[0].dtype, device=self.device)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return [float(v) for v in flat[offset:]]

    def _tensors(self, rows: list[tuple[list[int], int, int, float]]):
        """A micro-batch's ids, trained-token mask, attention mask and advantages; a row is (ids, first trained
        position, end, advantage)."""
        torch = self.torch
        width = max(len(ids) for ids, _, _, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows], device=self.device)
        mask = torch.zeros_like(ids, dtype=torch.float32)
        for k, (_, start, end, _) in enumerate(rows):
            mask[k, start:end] = 1.0  # the completion's tokens the policy chose
        attention = (torch.arange(width, device=self.device)[None, :] < torch.tensor(
            [len(r[0]) for r in rows], device=self.device)[:, None]).long()
        return ids, mask, attention, torch.tensor([r[3] for r in rows], device=self.device)[:, None]

    def _loss(self, batch, n_rows: int, n_tokens: int, sampled=None):
        """This micro-batch's share of the batch loss (so the summed gradients are the batch's), and its sums of
        KL, importance ratio and clipped tokens; ``sampled``: the served policy's token log-probs (off-policy)."""
        torch = self.torch
        ids, mask, attention, adv = batch
        logp = self._token_logprobs(ids, attention)
        mask = mask[:, 1:]  # token t is predicted at position t-1
        ratio, clipped = torch.ones_like(logp), torch.zeros_like(logp)
        if sampled is not None:  # PPO's clipped surrogate against the policy the rollouts were sampled from
            ratio = torch.exp(logp - sampled)
            bounded = ratio.clamp(1.0 - self.cfg.clip_eps, 1.0 + self.cfg.clip_eps)
            per_token = -torch.min(ratio * adv, bounded * adv)
            clipped = ((bounded * adv < ratio * adv) & (bounded != ratio)).float()  # the clip holds: no gradient
        else:
            per_token = -adv * logp
        kl = torch.zeros_like(logp)
        if self.cfg.beta > 0:
            with torch.no_grad(), self.model.disable_adapter():
                ref = self._token_logprobs(ids, attention)
            delta = ref - logp
            kl = torch.exp(delta) - delta - 1.0  # k3: >= 0, unbiased for KL(policy || reference)
            per_token = per_token + self.cfg.beta * kl
        if self.cfg.loss == "grpo":
            per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            loss = per_seq.sum() / n_rows
        else:
            loss = (per_token * mask).sum() / n_tokens
        return (loss, float((kl.detach() * mask).sum()), float(((ratio.detach() - 1.0).abs() * mask).sum()),
                float((clipped * mask).sum()))

    @contextlib.contextmanager
    def _served_weights(self):
        """The served version's LoRA weights in place of the current ones, for no-grad passes inside."""
        from actors.training.grpo_zero import assign, read

        params, stage = self._trainable(), self.cfg.zero_stage
        current = read(params, stage)
        assign(params, self.served, stage)
        try:
            yield
        finally:
            assign(params, current, stage)

    def _token_logprobs(self, ids, attention):
        """log p(token t | tokens < t) for t >= 1, shape [batch, width - 1]."""
        logits = (self.engine or self.model)(input_ids=ids, attention_mask=attention).logits[:, :-1]
        # the chosen token's logit minus the log-partition: no [batch, width, vocab] log-softmax copy is kept
        return logits.gather(-1, ids[:, 1:, None]).squeeze(-1).float() - self.torch.logsumexp(logits.float(), -1)

    def footprint(self) -> dict[str, float]:
        """This worker's share of the model's weights (1.0; about 1/world under ZeRO-3) and its process's peak
        resident memory in MiB."""
        import resource

        from actors.training.optim import weights_held

        return {"weights_held": weights_held(self.model),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def progress(self) -> int:
        """Updates done so far (a resumed learner counts those before the resume)."""
        return self.steps

    def logprob(self, messages: list[dict], completion: dict, served: bool = False) -> float:
        """The summed log-probability of ``completion``'s tokens after ``messages`` under the current adapter
        (``served``: under the version last marked served)."""
        torch = self.torch
        seq, prompt = self.encode(messages, completion)
        ids = torch.tensor([seq], device=self.device)
        (self.engine or self.model).eval()
        with torch.no_grad(), self._served_weights() if served else contextlib.nullcontext():
            logp = self._token_logprobs(ids, torch.ones_like(ids))
        return float(logp[0, prompt - 1:].sum())

    def save(self, out_dir: str | Path) -> str:
        """Write the adapter (peft format: what the pool's replicas hot-load; rank 0 writes); its path."""
        from actors.training.optim import gathered

        out = Path(out_dir)
        with gathered(self.model, self.cfg.zero_stage):  # ZeRO-3: every rank joins the gather
            if self.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                self.model.save_pretrained(str(out))
        return str(out)

    def save_state(self, out_dir: str | Path) -> str:
        """Write everything a resumed learner needs: the adapter, the optimizer's moments (safetensors) and
        the step count and optimizer groups (JSON); written to a temporary folder, then moved into place, so
        a kill leaves the previous state or the new one, never half of one. Its path."""
        import json
        import os
        import shutil

        from safetensors.torch import save_file

        from actors.training.grpo_zero import moments

        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        if self.engine is not None:  # a collective: every rank gathers its partition of the moments
            tensors, groups = moments(self.engine, self._trainable())
        else:
            state = self.optim.state_dict()
            tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
                       for index, moments_ in state["state"].items() for name, value in moments_.items()}
            groups = state["param_groups"]
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.save(tmp)
        if self.rank != 0:
            return str(out)
        save_file(tensors, str(tmp / MOMENTS_FILE))
        save_file({str(i): w.cpu().contiguous() for i, w in enumerate(self.served)}, str(tmp / SERVED_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"steps": self.steps, "served_step": self.served_step,
                                                  "param_groups": groups}))
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return str(out)

    def _load_state(self, path: Path) -> None:
        import json

        from safetensors.torch import load_file

        meta = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / MOMENTS_FILE), device=str(self.device))
        if self.engine is not None:
            from actors.training.grpo_zero import load_moments

            load_moments(self.engine, self._trainable(), tensors)
        else:
            moments: dict[int, dict] = {}
            for key, value in tensors.items():
                index, _, name = key.partition(".")
                moments.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
            self.optim.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
        self.steps = int(meta["steps"])
        self.mark_served()  # a state from before SERVED_FILE: its own policy (on-policy next)
        if (path / SERVED_FILE).is_file():
            served = load_file(str(path / SERVED_FILE), device=str(self.device))
            self.served = [served[str(i)] for i in range(len(served))]
            self.served_step = int(meta["served_step"])
