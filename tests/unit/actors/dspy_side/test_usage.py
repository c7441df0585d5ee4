"""Cost accounting (``actors.dspy_side.usage``) with scripted LMs: calls, cache hits, tokens, per step."""

import json
import uuid

import dspy
import pytest

from actors.dspy_side import usage
from actors.dspy_side.usage import Costs
from engine.better_together import BetterTogether
from engine.evaluate import run_all
from engine.steps.prompt import PromptStep
from tests.unit.engine.test_better_together import RuleEngine


def _program(cache: bool):
    engine = RuleEngine(smart=True)  # right answers; 1 prompt and 1 completion token per call
    program = dspy.Predict("question -> answer")
    program.set_lm(dspy.LM(f"echo-{uuid.uuid4().hex[:8]}", engine=engine, cache=cache))  # a new cache key space
    return program, engine


def _examples(n, start=0):
    return [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(start, start + n)]


def metric(example, prediction, trace=None):
    return prediction.answer == example.answer


def test_calls_from_threads_cache_hits_and_tokens_are_counted():
    program, engine = _program(cache=True)
    examples = _examples(6)
    with usage.metered() as meter:
        run_all([(program, ex) for ex in examples], metric, num_threads=4)  # 6 calls from worker threads
        run_all([(program, ex) for ex in examples[:2]], metric, num_threads=2)  # 2 answered from DSPy's cache
        costs = meter.costs()
    assert engine.calls == 6
    assert (costs.lm_calls, costs.requests, costs.cache_hits) == (8, 6, 2)
    assert (costs.prompt_tokens, costs.completion_tokens) == (6, 6)
    assert usage.active() is None and usage.now() is None  # nothing counts outside the block


def test_nothing_is_counted_outside_a_metered_block_and_blocks_do_not_leak_into_each_other():
    program, _ = _program(cache=False)
    with usage.metered() as first:
        program(question="q1")
    program(question="q2")
    with usage.metered() as second:
        program(question="q3")
        program(question="q4")
    assert first.costs().lm_calls == 1 and second.costs().lm_calls == 2


def test_each_step_records_what_it_spent_and_the_steps_add_up(tmp_path):
    program, engine = _program(cache=False)
    step = PromptStep(metric, num_candidate_programs=1, max_bootstrapped_demos=1, max_labeled_demos=2, num_threads=4)
    with usage.metered() as meter:
        BetterTogether(metric, p=step).compile(program, trainset=_examples(8), valset=_examples(4, 100),
                                               strategy="p", run_dir=str(tmp_path))
        total = meter.costs()
    steps = [json.loads((tmp_path / s / "step.json").read_text())["extra"]["costs"] for s in ("00_baseline", "01_p")]
    assert steps[0]["lm_calls"] == 4  # the baseline: one call per valset example
    assert steps[1]["lm_calls"] > 4  # bootstrapping + 4 candidates x 4 examples + the winner on the valset
    assert sum(s["lm_calls"] for s in steps) == total.lm_calls == engine.calls
    assert sum(s["prompt_tokens"] for s in steps) == engine.calls


def test_costs_subtract_add_and_round_trip_through_json():
    a = Costs(lm_calls=10, requests=7, prompt_tokens=1500, completion_tokens=20, replica_s=12.25, train_device_s=3)
    b = Costs(lm_calls=4, requests=4, prompt_tokens=500, completion_tokens=5, replica_s=2.0)
    assert (a - b).lm_calls == 6 and (a - b).cache_hits == 3 and (a - b + b) == a
    assert Costs.from_dict(json.loads(json.dumps(a.as_dict()))) == Costs(10, 7, 1500, 20, 12.2, 3)
    assert a.describe() == "10 LM calls (3 cached), 1.5k+20 tokens, 12 replica-s, 3 train device-s"


@pytest.mark.parametrize("seconds", [0.0, 2.5])
def test_training_time_is_added_to_the_active_meter(seconds):
    with usage.metered() as meter:
        usage.active().add_training(seconds)
    assert meter.costs().train_device_s == seconds
