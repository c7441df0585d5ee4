"""Evaluator actors (``actors.dspy_side.evaluator``) on a real local Ray with scripted LMs: the runs they
return are the runs the driver's threads make (scores, parse failures, errors, named traces), the
LM calls they spend reach the run's meter, ``max_errors`` stops them, and an evaluator killed in
the middle of a batch loses no run."""

import threading
import time

import dspy
import pytest
import ray

from actors import connect
from actors.dspy_side import usage
from actors.dspy_side.evaluator import EvaluatorConfig, EvaluatorPool
from engine.steps.bootstrap import bootstrap
from engine.evaluate import TooManyErrors, evaluators, evaluators_of, run_all
from tests.unit.engine.test_evaluate import Scripted, data, metric, program


class Slow(Scripted):
    """``Scripted`` that takes ``delay_s`` per call."""

    def __init__(self, delay_s, **kwargs):
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def complete(self, request):
        time.sleep(self.delay_s)
        return super().complete(request)


@pytest.fixture(scope="module")
def pool():
    connect(num_cpus=2)
    with EvaluatorPool(EvaluatorConfig(count=2, threads=4, num_cpus=0)) as started:
        yield started
    ray.shutdown()


@pytest.fixture(autouse=True)
def chat_adapter():
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        yield


def _same(run):
    return (run.example_index, run.score, run.parse_failure, run.error, run.trace,
            None if run.prediction is None else dict(run.prediction))


def test_runs_on_evaluators_are_the_runs_of_the_drivers_threads(pool):
    jobs = [(program(Scripted(garbage={"q1"}, broken={"q2"})), ex) for ex in data(12)]
    here = run_all(jobs, metric, trace=True, max_errors=5)
    with evaluators(pool):
        there = run_all(jobs, metric, trace=True, max_errors=5)
    assert [_same(r) for r in there] == [_same(r) for r in here]
    assert [r.score for r in there[:4]] == [1.0, 0.0, 0.0, 1.0] and there[1].parse_failure
    assert "replica lost while answering q2" in there[2].error and there[2].broke
    assert there[0].trace == (("self", {"question": "q0"}, {"answer": "a0"}),)  # named, so it travels
    with evaluators(pool):
        far = bootstrap(program(Scripted()), data(6), metric)
    assert [t.calls for t in far.traces] == [t.calls for t in bootstrap(program(Scripted()), data(6), metric).traces]


def test_the_calls_evaluators_spend_are_counted_by_the_runs_meter(pool):
    with usage.metered() as meter, evaluators(pool):
        run_all([(program(Scripted()), ex) for ex in data(10)], metric)
    costs = meter.costs()
    assert (costs.lm_calls, costs.requests, costs.prompt_tokens, costs.completion_tokens) == (10, 10, 10, 10)


def test_max_errors_stops_the_evaluators_and_names_the_first_error(pool):
    engine = Slow(0.05, broken={f"q{i}" for i in range(40)})
    with evaluators(pool), pytest.raises(TooManyErrors, match="replica lost while answering"):
        run_all([(program(engine), ex) for ex in data(40)], metric, max_errors=3)


def test_an_evaluator_killed_mid_batch_loses_no_run():
    with EvaluatorPool(EvaluatorConfig(count=2, threads=2, num_cpus=0)) as own, evaluators(own):
        victim = own._actors[0]
        killer = threading.Timer(0.5, lambda: ray.kill(victim))
        killer.start()
        runs = run_all([(program(Slow(0.1)), ex) for ex in data(40)], metric)
        killer.join()
        assert len(own._actors) == 1  # the dead one is not sent more work
    assert [r.score for r in runs] == [1.0] * 40 and not any(r.error for r in runs)


def test_no_evaluators_configured_runs_in_the_driver():
    with evaluators_of(EvaluatorConfig()) as none:
        assert none is None
        assert [r.score for r in run_all([(program(Scripted()), ex) for ex in data(3)], metric)] == [1.0] * 3
