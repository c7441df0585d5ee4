"""Model groups (``engine.groups``, ``RunConfig.models``): config checks, the CLI flag, the plan, and each
group's lifetime and costs on real Ray actors with scripted engines."""

import pytest
import ray

from actors import connect
from actors.dspy_side import usage
from actors.inference import device
from actors.inference.scripted import scripted_factory
from engine.cli import _run_config, build_parser
from engine.config import RunConfig
from engine.groups import ModelGroups
from engine.plan import Node, make_plan, summary
from tests.ray_state import alive_actors


def test_a_step_names_only_declared_groups_and_student_is_the_runs_own():
    with pytest.raises(ValueError, match=r"steps.w.teacher: no model 'big' in this run's models \(none declared\)"):
        RunConfig(strategy="p -> w", steps={"w": {"teacher": "big"}})
    with pytest.raises(ValueError, match="'student' is the run's own model"):
        RunConfig(models={"student": {"model": "tiny-llama"}})
    with pytest.raises(ValueError, match=r"models.big.model: required"):
        RunConfig(models={"big": {"replicas": 2}})
    cfg = RunConfig(strategy="p -> w -> p", models={"big": {"model": "x"}, "idle": {"model": "y"}},
                    steps={"w": {"teacher": "big"}, "gepa": {"reflection_model": "idle"}})
    assert cfg.group_uses() == {"big": [2], "idle": []}  # gepa is not in the strategy: idle is never launched
    assert "models" not in RunConfig().fingerprint()  # run dirs from before model groups still resume
    assert cfg.fingerprint()["models"]["big"]["model"] == "x"


def test_the_cli_declares_a_group_with_model_group():
    args = build_parser().parse_args(["run", "--model-group", "big={model: tiny-llama, replicas: 2}",
                                      "--step", "w={teacher: big}", "--strategy", "p -> w"])
    cfg = _run_config(args)
    assert cfg.models["big"].model == "tiny-llama" and cfg.models["big"].replicas == 2
    assert cfg.model == RunConfig().model  # --model is still the student's


def test_the_plan_places_a_group_beside_the_replicas_and_frees_a_teacher_for_training():
    nodes = [Node("10.0.0.1", {"CPU": 2.0})]
    teacher_in_w = RunConfig(strategy="p -> w", replicas=1, models={"t": {"model": "x"}}, steps={"w": {"teacher": "t"}})
    assert summary(make_plan(teacher_in_w, nodes), nodes) == (
        "plan on 1 node(s) (2 CPU): prompt steps: 1 replica + 1 t replica, 2 CPU; "
        "weight step (relaunch): 1 training worker, 2 CPU")  # released once the traces are in
    later_use = RunConfig(strategy="p -> w -> p", replicas=1, models={"t": {"model": "x"}},
                          steps={"w": {"teacher": "t"}, "p": {"teacher": "t"}})
    problems = [p for phase in make_plan(later_use, nodes) for p in phase.problems]
    assert problems == ["weight step (relaunch): t replica 0 needs 1 CPU on one node; no node has that left"]


@pytest.fixture(scope="module")
def ray_local():
    connect(num_cpus=4)
    yield
    ray.shutdown()


def test_a_group_is_up_only_around_the_steps_that_use_it(ray_local, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = RunConfig(strategy="p -> w -> p", models={"t": {"model": str(tmp_path), "replicas": 1}},
                    steps={"w": {"teacher": "t"}})
    groups = ModelGroups(cfg, lambda name: f"groups-test-{name}", engine_factory=scripted_factory)
    pool, lm = groups.pools["t"], groups.lms["t"]  # the LM exists before its pool is up
    with groups.around(1, "p"):
        assert not pool.launched
    with usage.metered(groups=groups.pools) as meter:
        with groups.around(2, "w"):
            assert pool.launched and alive_actors("groups-test-t")
            assert lm.copy(cache=False)("hello")[0].startswith("ok")  # answered by the group's replica
            groups.release("t")  # the last step that uses it: released within the step
            assert not pool.launched
        spent = meter.by_group()
    assert spent["t"].requests == 1 and spent["t"].replica_s > 0 and spent["student"].requests == 0
    assert not alive_actors("groups-test-t")
    with groups.around(3, "p"):
        assert not pool.launched  # no later step uses it: not launched again
    groups.kill()


def test_on_cpu_each_group_pins_the_cores_after_the_students_and_the_groups_before_it():
    cfg = RunConfig(strategy="p -> w", replicas=2, models={"t": {"model": "x", "replicas": 1, "cpus_per_replica": 2},
                                                          "r": {"model": "y"}},
                    steps={"w": {"teacher": "t"}, "p": {"teacher": "r"}})
    groups = ModelGroups(cfg, lambda name: f"cores-test-{name}")
    binds = {name: device.cpu_bind(pool.cfg.replica, 0, cores=8) for name, pool in groups.pools.items()}
    assert binds == {"t": "2-3", "r": "4"}  # in the order declared; the student's 2 replicas hold cores 0 and 1
