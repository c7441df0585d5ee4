"""The LoRA training module's pure parts: config checks, sharding, length buckets, the DeepSpeed
config, and the completion-only labels of a real tokenizer (the tiny model's, built locally)."""

import pytest

from actors import models
from actors.lora_train import LoraTrainConfig, buckets, deepspeed_config, shard, tokenize, train_loop


@pytest.mark.parametrize("changes, message", [
    ({"zero_stage": 4}, "zero_stage must be 0 (DDP), 1, 2 or 3, got 4"),
    ({"zero_offload": True}, "zero_offload needs a ZeRO stage"),
    ({"bf16": "maybe"}, "bf16 must be 'auto', 'yes' or 'no'"),
    ({"micro_batch_size": 0}, "micro_batch_size must be >= 1"),
])
def test_bad_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoraTrainConfig(**changes)


@pytest.mark.parametrize("n, world", [(15, 2), (16, 2), (7, 3), (1, 4), (5, 1)])
def test_every_rank_gets_the_same_count_and_every_row_is_used(n, world):
    rows = list(range(n))
    shards = [shard(rows, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # DDP / ZeRO ranks take the same number of steps
    assert set().union(*shards) == set(rows)
    assert sum(len(s) for s in shards) - n < world  # at most world - 1 rows repeat


def test_buckets_group_similar_lengths_and_cover_every_row_once():
    lengths = [5, 100, 6, 98, 7, 97, 8]
    batches = buckets(lengths, size=2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) <= 3
    assert buckets(lengths, 2, seed=0) == batches and buckets(lengths, 2, seed=1) != batches


@pytest.mark.parametrize("stage, offload", [(1, False), (2, False), (3, True)])
def test_deepspeed_config_keeps_the_effective_batch_and_our_optimizer(stage, offload):
    cfg = LoraTrainConfig(zero_stage=stage, zero_offload=offload, batch_size=8, micro_batch_size=2, num_workers=2)
    ds = deepspeed_config(cfg, accum=2, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * cfg.num_workers == 8
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in ds["zero_optimization"]) is offload
    assert ds["bf16"] == {"enabled": True} and "optimizer" not in ds  # the client AdamW, as with DDP


def test_zero_without_ray_train_workers_is_refused_before_loading_anything():
    with pytest.raises(ValueError, match="zero_stage needs Ray Train workers"):
        train_loop({"train": {"zero_stage": 2}, "model_path": "/nonexistent", "rows": []})


def test_only_the_assistant_turn_is_learned():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.materialize(models.TINY)))
    chat = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "two"}]
    ids, labels = tokenize(tok, chat, max_seq_len=256)
    learned = [t for t, lab in zip(ids, labels) if lab != -100]
    assert len(ids) == len(labels) and "two" in tok.decode(learned) and "What" not in tok.decode(learned)
    assert tokenize(tok, chat, max_seq_len=5)[0] == ids[:5]
