"""Multi-worker LoRA training on real Ray Train: DDP and DeepSpeed ZeRO (stage 2, and stage 3 with
the optimizer state offloaded) on 2 CPU workers reach the same adapter, and ZeRO-3 holds only its
shard of the weights. 15 rows, so the two workers' shards are evened out by the sampler."""

import pytest
from safetensors.torch import load_file

from actors.training.loop import train_lora
from actors.training.rows import write_rows
from tests.integration.conftest import lora_b_moved, tiny_train_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i + 1}, forty two"}]} for i in range(15)]
    path = tmp_path_factory.mktemp("zero") / "rows.parquet"
    write_rows(rows, path)
    return str(path)


@pytest.fixture(scope="module")
def trained(ray_session, tiny_model, data, tmp_path_factory):
    """stage name -> (adapter weights, metrics), each trained from the same seed on 2 workers."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, changes in {"ddp": {}, "zero2": {"zero_stage": 2},
                          "zero3-offload": {"zero_stage": 3, "zero_offload": True}}.items():
        cfg = tiny_train_config(num_workers=2, epochs=3, batch_size=8, **changes)  # 2 micro-batches a step
        result = train_lora(cfg, tiny_model, data, str(root / name), str(root / "ray_train"), name=name)
        assert lora_b_moved(result.adapter_path)
        out[name] = (load_file(f"{result.adapter_path}/adapter_model.safetensors"), result.metrics)
    return out


@pytest.mark.parametrize("zero", ["zero2", "zero3-offload"])
def test_zero_reaches_the_adapter_ddp_reaches(trained, zero):
    ddp, _ = trained["ddp"]
    weights, metrics = trained[zero]
    assert weights.keys() == ddp.keys() and all(weights[k].shape == ddp[k].shape for k in ddp)
    for key in (k for k in ddp if "lora_B" in k):  # B starts at 0: all of it is what training moved
        gap = float((weights[key] - ddp[key]).norm() / ddp[key].norm())
        assert gap < 0.01, f"{zero} {key} is {gap:.1%} away from DDP's"  # the same token-mean gradient
    assert metrics["optimizer_steps"] == trained["ddp"][1]["optimizer_steps"] == 3 * 2  # 8 rows a worker
    assert metrics["examples"] == 8 and metrics["loss_history"][-1] < metrics["loss_history"][0]


def test_only_zero3_shards_the_weights(trained):
    held = {name: metrics["weights_held"] for name, (_, metrics) in trained.items()}
    assert held["ddp"] == held["zero2"] == 1.0
    assert held["zero3-offload"] <= 0.55, held  # its half of every weight, on each of 2 workers
