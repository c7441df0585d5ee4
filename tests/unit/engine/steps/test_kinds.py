"""Step kinds: the run's step table, named steps from YAML and flags, import-path kinds, their checks."""

import dspy
import pytest
from dspy.teleprompt.teleprompt import Teleprompter

from engine.cli import build_parser, _run_config
from engine.config import RunConfig, load_yaml
from engine.steps import PromptStep, WeightStep
from engine.steps.gepa import GEPAStep
from engine.steps.grpo import GRPOStep, GRPOStepConfig
from engine.steps.kinds import DEFAULT_STEPS, RL_KINDS, StepContext, build, resolve_steps, weight_keys
from engine.steps.mipro import MIPROStep
from tests.unit.engine.test_better_together import metric


class Echo(Teleprompter):
    """A user's own step kind, by import path."""

    def __init__(self, metric, times=1):
        self.metric, self.times = metric, times

    def compile(self, student, *, trainset, **kw):
        return student


def test_the_built_in_keys_name_their_kinds_and_an_entry_without_kind_changes_arguments():
    table = resolve_steps({"gepa": {"max_metric_calls": 200}, "g2": {"kind": "gepa", "auto": "medium"}})
    assert {k: v["kind"] for k, v in table.items()} == {"p": "bfrs", "w": "finetune", "g": "grpo", "gepa": "gepa",
                                                         "mipro": "mipro", "g2": "gepa"}
    assert table["gepa"] == {"kind": "gepa", "max_metric_calls": 200}
    assert weight_keys(resolve_steps({"ft": {"kind": "finetune"}})) == {"w", "ft"}
    assert weight_keys(resolve_steps({"rl": {"kind": "grpo"}}), RL_KINDS) == {"g", "rl"}
    assert resolve_steps({}) == DEFAULT_STEPS


@pytest.mark.parametrize("steps, match", [
    ({"x": {"kind": "sgd"}}, r"step kind must be one of \['bfrs', 'finetune', 'grpo', 'gepa', 'mipro'\]"),
    ({"x": {"auto": "light"}}, "steps.x needs a kind"),
    ({"a b": {"kind": "gepa"}}, "cannot be empty or contain spaces"),
    ({"x": "gepa"}, "must be a mapping"),
    ({"x": {"kind": "gepa", "compile_args": [1]}}, "compile_args must be a mapping"),
])
def test_bad_step_entries_are_refused_by_name(steps, match):
    with pytest.raises(ValueError, match=match):
        resolve_steps(steps)


def test_each_kind_builds_its_step_with_the_runs_settings():
    ctx = StepContext(metric, threads=48, seed=3, prompt={"num_candidate_programs": 2})
    p = build("p", {"kind": "bfrs"}, ctx)
    assert isinstance(p, PromptStep) and p.num_threads == 48 and p.num_candidate_programs == 2
    assert isinstance(build("w", {"kind": "finetune"}, ctx), WeightStep)
    gepa = build("gepa", {"kind": "gepa", "max_metric_calls": 50}, ctx)
    assert isinstance(gepa, GEPAStep) and gepa.num_threads == 48 and gepa.budget == {"max_metric_calls": 50}
    assert build("gepa", {"kind": "gepa"}, ctx).budget == {"auto": "light"}
    mipro = build("mipro", {"kind": "mipro", "num_candidates": 3, "auto": None}, ctx)
    assert isinstance(mipro, MIPROStep) and mipro.num_threads == 48 and mipro.mipro_options == {"num_candidates": 3}
    rl = build("g", {"kind": "grpo", "steps": 3}, StepContext(metric, threads=48, seed=3, grpo=GRPOStepConfig(lr=1e-4)))
    assert isinstance(rl, GRPOStep) and rl.num_threads == 48 and rl.seed == 3
    assert (rl.config.steps, rl.config.lr) == (3, 1e-4)  # the entry's fields over the run's grpo: section
    with pytest.raises(ValueError, match=r"steps.g: .*unknown keys \['epochs'\]"):
        build("g", {"kind": "grpo", "epochs": 3}, ctx)
    echo = build("e", {"kind": "tests.unit.engine.steps.test_kinds:Echo", "times": 2}, ctx)
    assert isinstance(echo, Echo) and echo.times == 2
    lm = dspy.LM("reflector", max_tokens=200)
    reflection = build("g", {"kind": "gepa", "reflection_model": "big"}, StepContext(metric, models={"big": lm})
                       ).reflection_lm
    assert reflection.model == "reflector" and reflection.kwargs["temperature"] == 1.0
    assert reflection.kwargs["max_tokens"] >= 512  # room for an instruction, as the default reflection LM
    released = []
    big = StepContext(metric, models={"big": lm}, release=released.append)
    weight = build("w", {"kind": "finetune", "teacher": "big"}, big)
    assert weight.teacher_lm is lm and weight.after_teacher is not None
    weight.after_teacher()
    assert released == ["big"]  # the run releases the teacher's replicas once its traces are in
    assert build("p", {"kind": "bfrs", "teacher": "big"}, big).teacher_lm is lm
    with pytest.raises(ValueError, match=r"no model 'big' in this run"):
        build("g", {"kind": "gepa", "reflection_model": "big"}, ctx)
    with pytest.raises(ValueError, match="is not a dspy Teleprompter class"):
        build("e", {"kind": "engine.steps.kinds:build"}, ctx)
    with pytest.raises(ValueError, match="cannot import 'Nope'"):
        build("e", {"kind": "engine.steps.kinds:Nope"}, ctx)


def test_a_run_names_steps_of_any_kind_in_yaml_and_flags(tmp_path):
    assert RunConfig(strategy="mipro -> gepa -> mipro").strategy_keys() == ["mipro", "gepa", "mipro"]
    with pytest.raises(ValueError, match=r"Valid keys are: \['p', 'w', 'g', 'gepa', 'mipro'\]"):
        RunConfig(strategy="p -> sgd")
    path = tmp_path / "run.yaml"
    path.write_text("strategy: g2 -> ft\nsteps:\n  g2: {kind: gepa, max_metric_calls: 120, compile_args: {}}\n"
                    "  ft: {kind: finetune}\n")
    cfg = load_yaml(path)
    assert cfg.strategy_keys() == ["g2", "ft"] and cfg.trains()
    assert not RunConfig(strategy="gepa -> mipro").trains()
    with pytest.raises(ValueError, match="adapter 'json' cannot write the weight step's training rows"):
        RunConfig(strategy="g2 -> ft", adapter="json", steps=cfg.steps)
    args = build_parser().parse_args(["run", "--strategy", "g3 -> w", "--step", "g3={kind: gepa, auto: medium}"])
    flagged = _run_config(args)
    assert flagged.steps == {"g3": {"kind": "gepa", "auto": "medium"}} and flagged.strategy_keys() == ["g3", "w"]
    assert RunConfig(strategy="gepa").fingerprint()["steps"] == {}
    rl = load_yaml(_write(tmp_path / "g.yaml", "strategy: p -> g\ngrpo: {steps: 4, beta: 0.02}\n"))
    assert rl.reinforces() and not rl.trains() and (rl.grpo.steps, rl.grpo.beta, rl.grpo.lr) == (4, 0.02, 1e-4)
    assert "grpo" in rl.fingerprint() and "grpo" not in RunConfig().fingerprint()  # older run dirs still resume
    flags = _run_config(build_parser().parse_args(["run", "--strategy", "g", "--grpo-group-size", "8"]))
    assert flags.grpo.group_size == 8 and flags.grpo.rank == 8  # the run's defaults for the fields not given


def _write(path, text):
    path.write_text(text)
    return path
