"""The ``g`` step (``GRPOStep``): rollouts in groups, one learner update each, every version on the replicas
before the next rollouts, and a killed step resumed from its last update.

The rollouts come from the scripted engine of ``test_reinforce`` (answers 'a' and 'b' in turn, recording the
model id each call named); the pool is its stand-in; the learner is the real one (torch + peft on the tiny
model, in this process), checkpointed for real. ``tests/integration`` runs the step on a real pool."""

import dataclasses

import dspy
import pytest

from actors import models
from actors.dspy_side.provider import TandemProvider
from actors.training.grpo import Learner
from engine.steps.grpo import GRPOStep, GRPOStepConfig
from tests.unit.actors.dspy_side.test_reinforce import BASE, Pool, Rollouts, versions

CFG = GRPOStepConfig(steps=3, examples_per_step=2, group_size=2, lr=1e-3, rank=8, alpha=16, learner_cpus=0)


def metric(example, pred, trace=None):
    return pred.answer == example.answer


@pytest.fixture(scope="module")
def tiny():
    return str(models.materialize(models.TINY))


def _program(tmp_path, engine):
    pool = Pool()
    lm = dspy.LM(BASE, engine=engine, provider=TandemProvider(pool, adapter_root=tmp_path / "adapters"),
                 cache=False, max_tokens=16)
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    return program, pool


class Killed(RuntimeError):
    pass


def test_a_killed_g_step_resumes_from_its_last_update_and_every_version_reaches_the_next_rollouts(tiny, tmp_path):
    engine = Rollouts()
    program, pool = _program(tmp_path, engine)
    trainset = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(4)]
    dirs = dict(step_dir=tmp_path / "step", step_index=2, adapter_root=tmp_path / "adapters",
                state_dir=tmp_path / "state")

    class DiesOnSecondUpdate(Learner):
        def step(self, groups):
            if self.steps == 1:
                raise Killed("the learner's node went away")
            return super().step(groups)

    first = GRPOStep(metric, CFG, num_threads=2,
                     learner_factory=lambda m, c, cpus, gpus, init, workers: DiesOnSecondUpdate(m, c, init))
    with pytest.raises(Killed):
        first.compile(program, trainset=trainset, **dirs)
    first_v1 = engine.models[-1]
    assert versions(engine.models) == [BASE] * 4 + [f"{BASE}:grpo-02-v1"] * 4  # update 2's on version 1

    engine.models.clear()
    starts = []

    def resumed(m, c, cpus, gpus, init, workers):
        starts.append(init)
        return Learner(m, c, init)

    second = GRPOStep(metric, CFG, num_threads=2, learner_factory=resumed)
    tuned = second.compile(program, trainset=trainset, **dirs)
    assert starts == [str(tmp_path / "state" / "learner")]  # from the checkpoint, not from scratch
    history = second.last_run["grpo"]["history"]
    assert [m["step"] for m in history] == [1, 2, 3] and second.last_run["grpo"]["updates"] == 3
    assert all(m["groups"] == 2 and m["reward_mean"] == 0.5 and m["rollouts_run"] == 4 for m in history)
    assert versions(engine.models) == [f"{BASE}:grpo-02-v1"] * 4 + [f"{BASE}:grpo-02-v2"] * 4  # v1 again, then v2
    assert engine.models[0] == first_v1  # the same weights: the same name, though the step was killed
    assert versions([tuned.lm.model]) == [f"{BASE}:grpo-02-v3"] and program.lm.model == BASE  # student untouched
    assert versions([name for name, _ in pool.loaded][-3:]) == [f"{BASE}:grpo-02-v{v}" for v in (1, 2, 3)]
    assert tuned.lm.model not in pool.unloaded and f"{BASE}:grpo-02-v2" in versions(pool.unloaded)
    assert (tmp_path / "adapters" / "grpo-02-v3" / "adapter_config.json").is_file()


def test_bad_g_settings_are_named():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOStepConfig(group_size=1)
    with pytest.raises(ValueError, match="learner_workers must be >= 1, got 0"):
        GRPOStepConfig(learner_workers=0)
    with pytest.raises(ValueError, match="clip_eps must be > 0"):
        GRPOStepConfig(clip_eps=0)
    with pytest.raises(ValueError, match="unknown keys"):
        GRPOStepConfig(bogus=1)
    with pytest.raises(ValueError, match="needs training examples"):
        GRPOStep(metric).compile(dspy.Predict("q -> a"), trainset=[])


class HalfUnparsed(Rollouts):
    """Answers 'a' in the chat layout, then a text with no answer field, in turn for each question."""

    def complete(self, request):
        response = super().complete(request)
        if "[[ ## answer ## ]]\nb" in response.text:
            return type(response)(id=None, model=request.model, message=dspy.lm15.Message.assistant("I think it is"),
                                  finish_reason="length", usage=response.usage)
        return response


def test_an_answer_that_did_not_parse_is_trained_on_with_the_unparsed_reward(tiny, tmp_path):
    """dspy's GRPO gives a format failure its own score; dropping it would hide the one signal that teaches a
    policy to finish its answer (a reasoning cut at max_tokens). The learner gets the text the replica sent."""
    program, _ = _program(tmp_path, HalfUnparsed())
    seen = []

    class Recording(Learner):
        def step(self, groups):
            seen.extend(groups)
            return super().step(groups)

    step = GRPOStep(metric, GRPOStepConfig(**{**vars(CFG), "steps": 1}), num_threads=2,
                    learner_factory=lambda m, c, cpus, gpus, init, workers: Recording(m, c, init))
    step.compile(program, trainset=[dspy.Example(question="q", answer="a").with_inputs("question")],
                 step_dir=tmp_path / "g")
    (group,) = seen
    assert sorted((r["reward"], r["completion"]["content"]) for r in group["group"]) == [
        (-1.0, "I think it is"), (1.0, "[[ ## answer ## ]]\na\n\n[[ ## completed ## ]]")]
    assert group["group"][0]["messages"][0]["role"] == "system"  # the prompt as sent
    assert step.last_run["grpo"]["history"][0]["rollouts_unparsed"] == 1


def test_with_a_sync_every_two_updates_the_stale_rollouts_are_weighted_against_the_version_they_came_from(
        tiny, tmp_path):
    """Updates 2 and 4 train on rollouts of the version two updates back (the replicas got no new one after
    updates 1 and 3): the learner weighs them by the importance ratio, which is then not 1; updates 1 and 3
    are on-policy (ratio exactly 1: |ratio - 1| is 0)."""
    engine = Rollouts()
    program, _ = _program(tmp_path, engine)
    trainset = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(4)]
    cfg = dataclasses.replace(CFG, steps=4, sync_every=2, lr=5e-3)
    step = GRPOStep(metric, cfg, num_threads=2,
                    learner_factory=lambda m, c, cpus, gpus, init, workers: Learner(m, c, init))
    tuned = step.compile(program, trainset=trainset, step_dir=tmp_path / "step", step_index=1)
    history = step.last_run["grpo"]["history"]
    assert [m["stale"] for m in history] == [0, 1, 0, 1]
    assert [m["ratio_dev"] for m in history[::2]] == [0.0, 0.0]
    assert all(m["ratio_dev"] > 1e-3 for m in history[1::2])
    assert versions(engine.models) == [BASE] * 8 + [f"{BASE}:grpo-01-v2"] * 8  # v1 and v3 never served
    assert versions([tuned.lm.model]) == [f"{BASE}:grpo-01-v4"]  # the last version is served at the end


def test_the_tokens_the_replicas_sampled_reach_the_learner(tiny, tmp_path):
    """A replica's sampled token ids ride in the response (``provider_data``) into the LM's history; the step
    hands them to the learner with each rollout, which trains on them (a vLLM replica sends them; this engine
    sends the canonical tokens of its text, so no re-tokenization would have differed)."""
    from transformers import AutoTokenizer

    from actors.dspy_side.client import TOKEN_IDS_KEY

    tokenizer = AutoTokenizer.from_pretrained(tiny)

    class Sampled(Rollouts):
        def complete(self, request):
            response = super().complete(request)
            ids = tokenizer.encode(response.text, add_special_tokens=False) + [tokenizer.eos_token_id]
            return dataclasses.replace(response, provider_data={TOKEN_IDS_KEY: [ids]})

    program, _ = _program(tmp_path, Sampled())
    trainset = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(4)]
    step = GRPOStep(metric, dataclasses.replace(CFG, steps=1), num_threads=2,
                    learner_factory=lambda m, c, cpus, gpus, init, workers: Learner(m, c, init))
    step.compile(program, trainset=trainset, step_dir=tmp_path / "step", step_index=1)
    (update,) = step.last_run["grpo"]["history"]
    assert update["sampled_ids"] == update["rollouts"] == 4 and update["retokenized_differ"] == 0
