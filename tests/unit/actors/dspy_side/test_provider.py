"""TandemProvider's input checks (no Ray needed: every one fails before the pool is touched)."""

import pytest

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.training.config import LoraTrainConfig
from actors.dspy_side.provider import TandemProvider, TandemTrainingJob

ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]


@pytest.fixture
def provider(tmp_path):
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama"), name="provider-bad"))
    return TandemProvider(pool, LoraTrainConfig(epochs=3), adapter_root=tmp_path)


def test_dspy_train_kwargs_names_map_onto_the_lora_config(provider):
    cfg = provider._train_config({"num_train_epochs": 1, "learning_rate": 3e-4, "rank": 4})
    assert (cfg.epochs, cfg.lr, cfg.rank, cfg.alpha) == (1, 3e-4, 4, 64)


@pytest.mark.parametrize("args, message", [
    (("tiny-llama", ROWS, "chat", {"warmup": 3}), r"unknown train_kwargs \['warmup'\]"),
    (("tiny-llama", ROWS, "completion"), "chat data only"),
    (("tiny-llama", [], "chat"), "no training data"),
    (("gpt-4o", ROWS, "chat"), "not pool 'provider-bad'"),
])
def test_bad_finetune_input_is_named_and_nothing_is_launched(provider, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        provider.finetune(None, *args)
    assert not provider.pool.launched and not list(tmp_path.iterdir())


def test_unknown_lifecycle_is_refused(provider):
    with pytest.raises(ValueError, match="lifecycle must be one of"):
        TandemProvider(provider.pool, lifecycle="swap")


def test_training_job_status_follows_the_future():
    job = TandemTrainingJob()
    assert job.status() == "running"
    job.set_result(RuntimeError("boom"))
    assert job.status() == "failed"
