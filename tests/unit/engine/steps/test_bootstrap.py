"""Bootstrapping rounds (dspy's BootstrapFewShot ``max_rounds``) with a scripted LM whose greedy
answer is wrong on some questions and whose sampled answers are right on some seeds: only the
examples that have not passed run again, sampling at temperature 1.0 with the round as the seed,
through the predictors' own LMs, and the program given is left as it was."""

import dspy
import pytest
from dspy import lm15

from engine.steps.bootstrap import bootstrap, chat_rows
from tests.unit.engine.test_evaluate import data, metric


class Sampled:
    """Answers ``a<i>`` for ``q<i>``, except the questions in ``wrong``: those are answered right only
    when sampled (temperature > 0) with a seed in ``wrong[question]``, else ``wrong``."""

    def __init__(self, wrong: dict[str, set[int]]):
        self.wrong, self.calls = wrong, []

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        cfg = request.config
        self.calls.append((question, cfg.temperature, cfg.seed))
        right = question not in self.wrong or (cfg.temperature and cfg.seed in self.wrong[question])
        text = f"[[ ## answer ## ]]\n{question.replace('q', 'a') if right else 'wrong'}\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


def _program(engine):
    prog = dspy.Predict("question -> answer")
    prog.set_lm(dspy.LM("scripted", engine=engine, cache=False, num_retries=0, temperature=0.0))
    return prog


@pytest.fixture(autouse=True)
def chat_adapter():
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        yield


def test_later_rounds_sample_only_the_examples_that_have_not_passed():
    engine = Sampled({"q1": {1}, "q2": {2}, "q3": set()})
    program = _program(engine)
    result = bootstrap(program, data(5), metric, max_rounds=3)
    assert [t.example_index for t in result.traces] == [0, 1, 2, 4] and result.attempted == 5
    assert [t.calls[0][2]["answer"] for t in result.traces] == ["a0", "a1", "a2", "a4"]
    greedy = sorted(q for q, temperature, _ in engine.calls if not temperature)
    assert greedy == ["q0", "q1", "q2", "q3", "q4"]  # round 1: every example, greedy
    assert sorted((q, s) for q, t, s in engine.calls if t) == [("q1", 1), ("q2", 1), ("q2", 2), ("q3", 1), ("q3", 2)]
    assert all(t == 1.0 for _, t, _ in engine.calls if t)
    assert program.lm.kwargs["temperature"] == 0.0 and "rollout_id" not in program.lm.kwargs  # left as it was
    rows = chat_rows(program, result.traces)
    assert [r["example_index"] for r in rows] == [0, 1, 2, 4]


def test_one_round_is_a_single_greedy_pass():
    engine = Sampled({"q1": {1}})
    result = bootstrap(_program(engine), data(3), metric)
    assert [t.example_index for t in result.traces] == [0, 2]
    assert len(engine.calls) == 3 and all(not t for _, t, _ in engine.calls)


def test_rounds_stop_when_every_example_passed():
    engine = Sampled({"q0": {1}})
    result = bootstrap(_program(engine), data(2), metric, max_rounds=5)
    assert len(result.traces) == 2 and len(engine.calls) == 3  # 2 greedy + 1 sampled, then nothing left


def test_rounds_below_one_are_refused():
    with pytest.raises(ValueError, match="max_rounds must be >= 1, got 0"):
        bootstrap(_program(Sampled({})), data(1), metric, max_rounds=0)


class Broken(Sampled):
    """Like ``Sampled``, but ``q0`` gets an unparsable answer and ``q1`` a pool error (not retried)."""

    def complete(self, request):
        question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        if question == "q1":
            raise RuntimeError("pool 'run' has no replicas")
        if question == "q0":
            return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant("no fields here"),
                                 finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))
        return super().complete(request)


def test_wrong_answers_and_runs_that_broke_are_counted_apart():
    result = bootstrap(_program(Broken({})), data(4), metric)
    assert [t.example_index for t in result.traces] == [2, 3]
    assert (result.failed_calls, result.parse_failures, result.broken) == (2, 1, 1)
    assert any("no replicas" in e for e in result.errors)
