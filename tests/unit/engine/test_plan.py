"""Resource planning: phases by lifecycle, first-fit placement, and problems named before any start."""

import pytest

from actors.lora_train import LoraTrainConfig
from engine.config import RunConfig
from engine.plan import Node, check, describe, make_plan

GPU_NODES = [Node("10.0.0.1", {"CPU": 48.0, "GPU": 4.0}), Node("10.0.0.2", {"CPU": 48.0, "GPU": 4.0})]


def _gpu(**changes):
    base = dict(replicas=8, gpus_per_replica=1, cpus_per_replica=4,
                lora=LoraTrainConfig(num_workers=4, use_gpu=True, cpus_per_worker=4))
    return RunConfig(**{**base, **changes})


def test_relaunch_reuses_the_replicas_gpus_for_training():
    phases = make_plan(_gpu(), GPU_NODES)
    assert [p.name for p in phases] == ["prompt steps", "weight step (relaunch)"]
    assert [p.node for p in phases[0].placed] == ["10.0.0.1"] * 4 + ["10.0.0.2"] * 4
    assert all(p.node for p in phases[1].placed)
    check(phases)


def test_hotswap_needs_room_for_both_and_names_what_does_not_fit():
    phases = make_plan(_gpu(lifecycle="hotswap"), GPU_NODES)
    assert phases[1].name == "weight step (hotswap)"
    with pytest.raises(ValueError, match="training worker 0 needs 4 CPU, 1 GPU on one node") as err:
        check(phases)
    assert "training worker 3" in str(err.value) and "replica" not in str(err.value).split("training")[0]
    check(make_plan(_gpu(lifecycle="hotswap", replicas=4), GPU_NODES))


def test_tensor_parallel_bundles_share_a_node():
    phases = make_plan(_gpu(replicas=1, tensor_parallel_size=8), GPU_NODES)
    with pytest.raises(ValueError, match="replica 0 needs 32 CPU, 8 GPU on one node"):
        check(phases)
    assert make_plan(_gpu(replicas=2, tensor_parallel_size=4), GPU_NODES)[0].placed[1].node == "10.0.0.2"


def test_a_prompt_only_strategy_has_no_training_phase_and_gpus_on_a_cpu_cluster_fail():
    cpu = [Node("127.0.0.1", {"CPU": 2.0, "memory": 1e9})]
    assert [p.name for p in make_plan(RunConfig(strategy="p -> p"), cpu)] == ["prompt steps"]
    check(make_plan(RunConfig(), cpu))  # the embedded default fits 2 cores
    with pytest.raises(ValueError, match="replica 0 needs 1 CPU, 1 GPU.*add nodes"):
        check(make_plan(RunConfig(gpus_per_replica=1), cpu))
    text = describe(make_plan(RunConfig(), cpu), cpu)
    assert "127.0.0.1: 2 CPU\n" in text and "training worker 0: 2 CPU -> 127.0.0.1" in text
