"""The LoRA training module's pure parts: config checks, sharding, length buckets, the DeepSpeed
config, the completion-only labels of a real tokenizer (the tiny model's, built locally), the
rows that have nothing to learn, the non-finite-loss stop (a scripted model), the cluster
checks, and how Ray Train's retries and resource wait are bounded."""

import math
import os

import pytest

from actors import models
from actors.training.guards import (START_TIMEOUT_ENV, NoCompletionError, NonFiniteLossError, check_cluster, learnable,
                                run_config, start_timeout, wait_message)
from actors.training.config import LoraTrainConfig
from actors.training.loop import buckets, deepspeed_config, learnable_data, shard, tokenize, train_loop


@pytest.mark.parametrize("changes, message", [
    ({"zero_stage": 4}, "zero_stage must be 0 (DDP), 1, 2 or 3, got 4"),
    ({"zero_offload": True}, "zero_offload needs a ZeRO stage"),
    ({"bf16": "maybe"}, "bf16 must be 'auto', 'yes' or 'no'"),
    ({"micro_batch_size": 0}, "micro_batch_size must be >= 1"),
    ({"resource_wait_s": 0}, "resource_wait_s must be a finite number of seconds > 0, got 0"),
    ({"resource_wait_s": math.inf}, "resource_wait_s must be a finite number of seconds > 0, got inf"),
    ({"max_failures": -1}, "max_failures must be >= 0, got -1"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of ('cosine', 'linear', 'constant'), got 'step'"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number >= 0 (0 = off)"),
    ({"warmup_ratio": 1.0}, "got 1.0 and 1.0"),
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
    assert ds["gradient_clipping"] == cfg.max_grad_norm == 1.0  # DeepSpeed clips as the DDP path does


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


def test_rows_whose_prompt_fills_max_seq_len_are_dropped_and_counted():
    # (full length, prompt length): fits; prompt fills the window; prompt exactly max; empty completion
    check = learnable([(12, 8), (40, 20), (20, 16), (8, 8)], max_seq_len=16)
    assert check.keep == (0,) and check.dropped == 3 and check.rows == 4
    assert (check.shortest_prompt, check.longest_prompt) == (8, 20)
    assert learnable([(17, 15)], max_seq_len=16).keep == (0,)  # one completion token inside the window
    assert "dropped 3 of 4 training rows" in check.warning() and "max_seq_len=16" in check.warning()


def test_no_learnable_row_names_max_seq_len_and_the_prompt_lengths():
    error = learnable([(40, 30), (60, 50)], max_seq_len=24).error()
    assert isinstance(error, NoCompletionError) and isinstance(error, ValueError)
    assert "max_seq_len=24" in str(error) and "longest prompt 50" in str(error) and "30-50 tokens" in str(error)
    assert "no rows" in str(learnable([], max_seq_len=24).error())


def test_learnable_data_keeps_only_rows_with_learned_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.materialize(models.TINY)))
    short = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "two"}]
    long = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "two"}]
    data, check = learnable_data(tok, [long, short, long], max_seq_len=64)
    assert check.keep == (1,) and check.dropped == 2 and check.longest_prompt > 64
    assert data == [tokenize(tok, short, 64)] and any(lab != -100 for lab in data[0][1])


class _ScriptedModel:
    """A model whose loss is the next scripted value; it records each backward."""

    def __init__(self, losses):
        import torch

        self.weight = torch.nn.Parameter(torch.ones(()))
        self.losses, self.backwards = list(losses), 0

    def __call__(self, **batch):
        import torch

        loss = self.weight * torch.tensor(self.losses.pop(0))
        loss.register_hook(lambda grad: setattr(self, "backwards", self.backwards + 1))
        return type("Out", (), {"loss": loss})()

    def train(self):
        return self

    def parameters(self):
        return [self.weight]


def test_a_nan_loss_stops_training_before_its_backward_and_names_where():
    import torch

    from actors.training.loop import _epochs, _Worker

    cfg = LoraTrainConfig(epochs=2, batch_size=1, micro_batch_size=1, lr=3.0)
    model = _ScriptedModel([2.0, 1.0, 0.5, float("nan"), 0.1, 0.1])
    data = [([1, 2, 3], [-100, 2, 3])] * 3
    worker = _Worker(cfg, False, 0, 1, torch.device("cpu"), data, learnable([(3, 1)] * 3, 16),
                     model=model, optim=torch.optim.SGD([model.weight], lr=0.0))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, micro-batch 1 of 3: the loss is nan.*lora.lr=3"):
        _epochs(worker)
    assert model.backwards == 3  # the three finite micro-batches of epoch 1, not the NaN one


def test_a_cluster_too_small_for_the_workers_is_refused_naming_the_shortfall():
    with pytest.raises(ValueError, match=r"need 4 CPU \(1 x 4 CPU\) but the cluster has 2 CPU.*lora.cpus_per_worker"):
        check_cluster(LoraTrainConfig(cpus_per_worker=4), {"CPU": 2.0}, [{"CPU": 2.0}])
    with pytest.raises(ValueError, match=r"need 2 CPU, 2 GPU .* has 8 CPU, 1 GPU.*lora.use_gpu: false"):
        check_cluster(LoraTrainConfig(num_workers=2, cpus_per_worker=1, use_gpu=True), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ValueError, match=r"no node can hold one training worker \(3 CPU\): the nodes have 2 CPU; 2"):
        check_cluster(LoraTrainConfig(cpus_per_worker=3), {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}])
    check_cluster(LoraTrainConfig(cpus_per_worker=3), {"CPU": 4.0}, None)  # autoscaler: node shapes unknown
    check_cluster(LoraTrainConfig(num_workers=2, cpus_per_worker=2), {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}])


def test_the_wait_message_names_what_was_waited_for_and_what_is_free():
    text = wait_message(LoraTrainConfig(num_workers=2, cpus_per_worker=1, resource_wait_s=5),
                        {"CPU": 0.0, "memory": 1e9})
    assert "waited lora.resource_wait_s=5 s for 2 CPU (2 x 1 CPU)" in text and "free now 0 CPU." in text
    assert "memory" not in text and "lora.resource_wait_s" in text


def test_ray_train_retries_dead_workers_max_failures_times_and_never_a_start_that_timed_out():
    failure = run_config(LoraTrainConfig(max_failures=3), "run", "/tmp/storage").failure_config
    assert failure.max_failures == 3 and failure.controller_failure_limit == 0


@pytest.mark.parametrize("before", [None, "42"])
def test_start_timeout_sets_the_ray_train_variable_only_inside_the_block(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(START_TIMEOUT_ENV, before)
    with pytest.raises(KeyError):
        with start_timeout(7.5):
            assert os.environ[START_TIMEOUT_ENV] == "7.5"
            raise KeyError("fit failed")
    assert os.environ.get(START_TIMEOUT_ENV) == before


def test_local_training_data_travels_by_value_and_uris_are_read_where_they_are(tmp_path):
    import ray

    from actors import connect
    from actors.training.rows import read_rows, ship, write_rows

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "predictor": "p"} for i in range(3)]
    write_rows(rows, tmp_path / "rows.parquet")
    assert ship("s3://bucket/rows.parquet") == "s3://bucket/rows.parquet"  # each worker reads a URI itself
    started = not ray.is_initialized()
    connect(num_cpus=1)
    try:
        shipped = ship(str(tmp_path / "rows.parquet"))
        (tmp_path / "rows.parquet").unlink()  # the workers never need the driver's file
        expected = [r["messages"] for r in rows]
        assert isinstance(shipped, ray.ObjectRef) and read_rows(shipped) == expected
        assert ray.get(ray.remote(num_cpus=0)(read_rows).remote(shipped)) == expected  # a task gets the rows
    finally:
        if started:
            ray.shutdown()
