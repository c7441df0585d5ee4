"""Resource planning: phases by lifecycle, first-fit placement, and problems named before any start."""

import pytest

from actors.training.config import LoraTrainConfig
from engine.config import RunConfig
from engine.plan import Node, check, describe, make_plan

GPU_NODES = [Node("10.0.0.1", {"CPU": 48.0, "GPU": 4.0}), Node("10.0.0.2", {"CPU": 48.0, "GPU": 4.0})]


def _gpu(**changes):
    base = dict(replicas=8, gpus_per_replica=1, cpus_per_replica=4,
                lora=LoraTrainConfig(num_workers=4, micro_batch_size=2, use_gpu=True, cpus_per_worker=4))
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


def test_a_plan_that_does_not_fit_names_flags_that_make_it_fit():
    from engine.cli import _run_config, build_parser
    from engine.plan import suggest

    two_cores = [Node("127.0.0.1", {"CPU": 2.0})]
    cfg = RunConfig(lifecycle="hotswap")  # the embedded default with hotswap: 2 replicas + a 2-CPU trainer
    fix = suggest(cfg, two_cores)
    assert fix == "--replicas 1 --lora-cpus-per-worker 1"
    with pytest.raises(ValueError, match="This fits the cluster: --replicas 1 --lora-cpus-per-worker 1"):
        check(make_plan(cfg, two_cores), fix)
    args = build_parser().parse_args(["run", "--lifecycle", "hotswap", *fix.split()])  # the advice as given works
    assert not any(phase.problems for phase in make_plan(_run_config(args), two_cores))
    assert suggest(RunConfig(replicas=3, cpus_per_replica=2), [Node("a", {"CPU": 1.0})]) is None  # nothing fits


def test_every_lora_and_prompt_field_is_a_flag_over_the_yaml(tmp_path):
    from engine.cli import _run_config, build_parser

    (tmp_path / "run.yaml").write_text("lora: {epochs: 6, lr: 0.001, rank: 16}\nprompt: {max_labeled_demos: 2}\n")
    args = build_parser().parse_args([
        "run", "--config", str(tmp_path / "run.yaml"), "--lora-epochs", "3", "--lora-use-gpu",
        "--lora-target-modules", "q_proj,v_proj", "--prompt-num-candidate-programs", "4"])
    cfg = _run_config(args)
    assert (cfg.lora.epochs, cfg.lora.lr, cfg.lora.rank, cfg.lora.use_gpu) == (3, 0.001, 16, True)
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert (cfg.prompt.num_candidate_programs, cfg.prompt.max_labeled_demos) == (4, 2)
    assert _run_config(build_parser().parse_args(["run"])).lora == RunConfig().lora  # no flag: the defaults


def test_gpu_replicas_with_cpu_training_are_flagged():
    from engine.plan import warnings

    assert warnings(_gpu()) == []
    (warning,) = warnings(_gpu(lora=LoraTrainConfig(num_workers=4, micro_batch_size=2, cpus_per_worker=4)))
    assert "--lora-use-gpu" in warning
    assert warnings(_gpu(strategy="p", lora=LoraTrainConfig())) == []  # no weight step, no training


def test_fewer_workers_are_suggested_only_when_they_divide_the_effective_batch():
    from engine.plan import suggest

    cfg = _gpu(replicas=3, lora=LoraTrainConfig(num_workers=4, micro_batch_size=2, use_gpu=True, cpus_per_worker=4))
    three_gpus = [Node("10.0.0.1", {"CPU": 48.0, "GPU": 3.0})]
    assert suggest(cfg, three_gpus) == "--lora-num-workers 2"  # 3 workers x 2 would not make a batch of 8


def test_custom_resources_pin_replicas_and_training_workers_to_their_nodes():
    nodes = [Node("10.0.0.1", {"CPU": 8.0, "GPU": 2.0, "training": 1.0}),
             Node("10.0.0.2", {"CPU": 8.0, "GPU": 2.0, "inference": 2.0})]
    cfg = _gpu(replicas=2, lifecycle="hotswap", replica_resources={"inference": 1},
               lora=LoraTrainConfig(num_workers=1, micro_batch_size=2, use_gpu=True, cpus_per_worker=4,
                                    resources={"training": 1}))
    prompt, weight = make_plan(cfg, nodes)
    assert [p.node for p in prompt.placed] == ["10.0.0.2"] * 2  # not the first node, which has room too
    assert {p.what: p.node for p in weight.placed}["training worker 0"] == "10.0.0.1"
    check([prompt, weight])
    with pytest.raises(ValueError, match="replica 2 needs 4 CPU, 1 GPU, 1 inference on one node"):
        check(make_plan(cfg.with_overrides(replicas=3), nodes))
    assert RunConfig(replica_resources={"inference": 1}).fingerprint() == RunConfig().fingerprint()  # where, not what


def test_cpus_and_gpus_are_not_custom_resources():
    with pytest.raises(ValueError, match="resources is for custom resources"):
        LoraTrainConfig(resources={"GPU": 1})
    from actors import ReplicaConfig

    with pytest.raises(ValueError, match="resources is for custom resources"):
        ReplicaConfig(resources={"CPU": 2})


def test_evaluators_are_planned_beside_replicas_and_workers_and_named_when_they_do_not_fit():
    from actors.dspy_side.evaluator import EvaluatorConfig

    fits = make_plan(_gpu(evaluators=EvaluatorConfig(count=4, num_cpus=4)), GPU_NODES)  # 8 x 4 + 4 x 4 <= 96 CPU
    assert [sum(p.what.startswith("evaluator") for p in phase.placed) for phase in fits] == [4, 4]
    check(fits)
    too_many = make_plan(_gpu(evaluators=EvaluatorConfig(count=4, num_cpus=20)), GPU_NODES)
    with pytest.raises(ValueError, match="prompt steps: evaluator 2 needs 20 CPU on one node"):
        check(too_many)


def test_a_grpo_step_places_its_learner_beside_the_live_replicas():
    from engine.plan import suggest

    node = [Node("10.0.0.1", {"CPU": 2.0})]
    phases = make_plan(RunConfig(strategy="p -> g"), node)
    assert [p.name for p in phases] == ["prompt steps", "grpo step"]
    assert [p.what for p in phases[1].placed] == ["replica 0", "replica 1", "grpo learner 0"]
    assert "grpo step: grpo learner 0 needs 1 CPU" in phases[1].problems[0]  # 2 replicas hold both cores
    assert suggest(RunConfig(strategy="p -> g"), node) == "--replicas 1"
    assert suggest(RunConfig(strategy="p -> g", replicas=2, cpus_per_replica=1, lora=LoraTrainConfig(
        cpus_per_worker=1), grpo={"learner_cpus": 1}), [Node("a", {"CPU": 1.0})]) is None  # one core: nothing fits
    assert not make_plan(RunConfig(strategy="g", grpo={"learner_cpus": 0}), node)[1].problems
    gpu = make_plan(RunConfig(strategy="g", gpus_per_replica=1, grpo={"learner_gpus": 1}),
                    [Node("g", {"CPU": 8.0, "GPU": 3.0})])
    assert not gpu[1].problems and gpu[1].placed[2].bundles == ({"CPU": 1.0, "GPU": 1.0},)
    four = [Node("g", {"CPU": 8.0, "GPU": 4.0})]  # 2 replicas + a data-parallel learner of one GPU per worker
    two = make_plan(RunConfig(strategy="g", gpus_per_replica=1, grpo={"learner_gpus": 1, "learner_workers": 2}), four)
    assert [p.what for p in two[1].placed][-2:] == ["grpo learner 0", "grpo learner 1"] and not two[1].problems
    assert "grpo learner 2 needs" in make_plan(RunConfig(strategy="g", gpus_per_replica=1, grpo={
        "learner_gpus": 1, "learner_workers": 3}), four)[1].problems[0]
