"""Evaluation and bootstrapping with scripted LMs: wrong answers score 0, errors are counted and
stop a step at ``max_errors``, only passing traces become demos / training rows (vanilla prompt)."""

import json

import dspy
import pytest
from dspy import lm15

from engine.better_together import BetterTogether
from engine.steps.bootstrap import bootstrap, chat_rows
from engine.evaluate import TooManyErrors, collect_errors, evaluate_many, run_all
from engine.steps.prompt import PromptStep


class Scripted:
    """Answers ``a<i>`` for question ``q<i>``; garbage (no fields) for questions listed in ``garbage``;
    raises for questions listed in ``broken``."""

    def __init__(self, garbage=(), broken=()):
        self.garbage, self.broken, self.prompts = set(garbage), set(broken), []

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        self.prompts.append(request)
        if question in self.broken:
            raise RuntimeError(f"replica lost while answering {question}")
        text = "no fields here" if question in self.garbage else \
            f"[[ ## answer ## ]]\n{question.replace('q', 'a')}\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


def program(engine):
    prog = dspy.Predict("question -> answer")
    prog.set_lm(dspy.LM("scripted", engine=engine, cache=False, num_retries=0))
    return prog


def data(n):
    return [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(n)]


def metric(example, prediction, trace=None):
    return prediction.answer == example.answer


@pytest.fixture(autouse=True)
def chat_adapter():
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        yield


def test_a_parse_failure_is_a_wrong_answer_not_an_error():
    runs = run_all([(program(Scripted(garbage={"q1", "q2"})), ex) for ex in data(4)], metric, max_errors=1)
    assert [r.score for r in runs] == [1.0, 0.0, 0.0, 1.0]
    assert [r.parse_failure for r in runs] == [False, True, True, False]


def test_errors_below_the_limit_are_no_score_and_are_logged():
    with collect_errors() as log:
        scores = evaluate_many([program(Scripted(broken={"q3"}))], data(4), metric, num_threads=2)
    assert scores == [100.0]  # the 3 completed runs, all right: the broken one is not a wrong answer
    assert log.count == 1 and log.runs == 4 and "replica lost while answering q3" in log.messages[0]
    with pytest.raises(TooManyErrors, match="all 2 runs of a program failed with errors, none to score"):
        evaluate_many([program(Scripted(broken={"q0", "q1"}))], data(2), metric, num_threads=2)


def test_errors_at_the_limit_stop_with_the_first_error_and_the_count():
    broken = {f"q{i}" for i in range(10)}  # dspy's default max_errors is 10
    with pytest.raises(TooManyErrors, match=r"10 runs failed with errors \(max_errors=10.*replica lost"):
        evaluate_many([program(Scripted(broken=broken))], data(14), metric, num_threads=1)
    with dspy.context(max_errors=2), pytest.raises(TooManyErrors, match="max_errors=2"):  # dspy's setting
        evaluate_many([program(Scripted(broken={"q0", "q1"}))], data(6), metric, num_threads=1)


def test_a_metric_that_raises_is_an_error_not_a_zero():
    def bad_metric(example, prediction, trace=None):
        return prediction.answr == example.answer  # a typo in the user's metric

    with pytest.raises(TooManyErrors, match="metric raised AttributeError"):
        evaluate_many([program(Scripted())], data(12), bad_metric)


def test_bootstrap_keeps_only_passing_traces_and_rows_use_the_vanilla_prompt():
    engine = Scripted(garbage={"q1"})
    prog = program(engine)
    prog.demos = [dspy.Example(question="q9", answer="a9")]  # the prompt step's demos
    half_right = lambda ex, pred, trace=None: ex.question in ("q0", "q2")  # noqa: E731
    result = bootstrap(prog, data(4), half_right, num_threads=2)
    assert sorted(t.example_index for t in result.traces) == [0, 2]
    assert len(engine.prompts[0].messages) > 1  # the run itself saw the demo (a user/assistant pair)
    rows = chat_rows(prog, result.traces)
    assert [r["example_index"] for r in sorted(rows, key=lambda r: r["example_index"])] == [0, 2]
    for row in rows:
        messages = row["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]  # no demo turns
        assert "q9" not in json.dumps(messages)
        assert f"a{row['example_index']}" in messages[-1]["content"]  # the target is the traced answer


def test_a_step_that_hits_max_errors_is_not_committed(tmp_path):
    engine = Scripted()
    prog = program(engine)
    calls = {"n": 0}

    def flaky_metric(example, prediction, trace=None):
        calls["n"] += 1
        if trace is not None:  # the prompt step's bootstrap: the metric's dependency is down
            raise ConnectionError("retriever unreachable")
        return metric(example, prediction)

    p = PromptStep(flaky_metric, num_candidate_programs=1, num_threads=2)
    result = BetterTogether(flaky_metric, p=p).compile(prog, trainset=data(12), valset=data(4), strategy="p",
                                                       run_dir=str(tmp_path), max_errors=5)
    assert result.flag_compilation_error_occurred
    assert "TooManyErrors" in result.compilation_error and "retriever unreachable" in result.compilation_error
    assert (tmp_path / "00_baseline" / "step.json").is_file() and not (tmp_path / "01_p").exists()
    assert json.loads((tmp_path / "00_baseline" / "step.json").read_text())["extra"]["errors"]["count"] == 0


def test_a_steps_valset_score_is_over_its_completed_runs_and_says_so(tmp_path):
    prog = program(Scripted(broken={"q1"}))  # one valset run breaks (below max_errors): not a wrong answer
    result = BetterTogether(metric, p=PromptStep(metric, num_candidate_programs=0, num_threads=2)).compile(
        prog, trainset=data(8), valset=data(4), strategy="p", run_dir=str(tmp_path))
    record = json.loads((tmp_path / "00_baseline" / "step.json").read_text())
    assert record["score"] == 100.0 and record["extra"]["valset"] == {"n": 4, "completed": 3}
    assert record["extra"]["errors"]["count"] == 1
    assert not result.flag_compilation_error_occurred
