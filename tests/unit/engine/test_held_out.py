"""Held-out test scores: the score, the answers' diversity (a one-class program is named as such),
their place in the run dir (reused by a rerun), the report, the CLI's table and ``tandem table``."""

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from engine.cli import _seeds
from engine.config import RunConfig
from engine.held_out import HeldOut, score_held_out
from engine.steps.prompt import Candidate
from engine.report.run_report import write_report
from actors.errors import PoolUnavailableError
from engine.evaluate import TooManyErrors
from engine.run import held_out_examples, score_after, score_steps
from engine.store.run_store import RunStore
from engine.table.config import Cell
from engine.table.report import write_table
from programs.base import ProgramSpec, Splits

LABELS = ["setosa", "versicolor", "virginica"]


class Answers(dspy.Module):
    """Answers ``pick(i)`` for input ``i`` without an LM; ``None`` raises a parse failure."""

    def __init__(self, pick):
        super().__init__()
        self.predict = dspy.Predict("i -> reasoning, answer")
        self.pick, self.calls = pick, 0

    def forward(self, i):
        self.calls += 1
        answer = self.pick(i)
        if answer is None:
            raise AdapterParseError(adapter_name="ChatAdapter", signature=self.predict.signature, lm_response="junk")
        return dspy.Prediction(reasoning="...", answer=answer)


def examples(n=30):
    return [dspy.Example(i=i, answer=LABELS[i % 3]).with_inputs("i") for i in range(n)]


def metric(example, prediction, trace=None):
    return prediction.answer.strip().lower() == example.answer


def test_a_program_that_answers_one_class_is_named_and_scores_that_class_share():
    (one, right) = score_held_out([Answers(lambda i: "Setosa "), Answers(lambda i: LABELS[i % 3])], examples(),
                                  metric, num_threads=4)
    assert one.score == pytest.approx(33.33, abs=0.01) and one.one_answer
    assert (one.distinct, one.top, one.top_count, one.answered, one.gold_distinct, one.gold_top_count) == \
        (1, "setosa", 30, 30, 3, 10)
    assert "answers one thing" in one.describe() and "'setosa' 30/30" in one.describe()
    assert right.score == 100.0 and not right.one_answer and right.distinct == 3
    assert HeldOut.from_dict(one.as_dict()) == one


def test_parse_failures_count_as_wrong_and_are_not_answers():
    (held,) = score_held_out([Answers(lambda i: None if i < 10 else LABELS[i % 3])], examples(), metric)
    assert held.parse_failures == 10 and held.errors == 0 and held.answered == 20
    assert held.score == pytest.approx(66.67, abs=0.01) and not held.one_answer


def test_labels_that_are_one_class_do_not_make_a_one_answer_warning():
    same = [dspy.Example(i=i, answer="setosa").with_inputs("i") for i in range(10)]
    (held,) = score_held_out([Answers(lambda i: "setosa")], same, metric)
    assert held.score == 100.0 and not held.one_answer


def test_an_empty_test_split_is_an_error_and_test_size_minus_one_skips_it():
    with pytest.raises(ValueError, match="test split is empty"):
        score_held_out([Answers(lambda i: "x")], [], metric)
    splits = Splits(examples(3), examples(3), examples(9))
    assert held_out_examples(RunConfig(test_size=-1), splits) == []
    assert len(held_out_examples(RunConfig(test_size=4), splits)) == 4 and len(held_out_examples(RunConfig(), splits)) == 9
    with pytest.raises(ValueError, match="test_size must be"):
        RunConfig(test_size=-2)
    assert "test_size" not in RunConfig().fingerprint()  # a rerun may score on another size


def _run_dir(tmp_path, programs):
    cfg = RunConfig(run_dir=str(tmp_path / "run"), strategy="p", threads=4)
    store = RunStore(cfg.run_dir, cfg.fingerprint())
    for index, (key, strategy, program) in enumerate(programs):
        store.commit(index, key, program=program, strategy=strategy, score=50.0, adapters=[])
    best = programs[-1][2]
    best.candidate_programs = [Candidate(p, 50.0, s) for _, s, p in programs]
    spec = ProgramSpec("answers", lambda: None, lambda seed: None, metric)
    return cfg, spec, store, best


def test_each_step_is_scored_once_and_a_rerun_reuses_the_stored_results(tmp_path):
    baseline, tuned = Answers(lambda i: "setosa"), Answers(lambda i: LABELS[i % 3])
    cfg, spec, store, best = _run_dir(tmp_path, [("", "", baseline), ("p", "p", tuned)])
    test = examples(12)
    first = score_steps(cfg, spec, test, best)
    assert first[""].one_answer and first["p"].score == 100.0
    assert (baseline.calls, tuned.calls) == (12, 12)
    assert [s.test["n"] for s in store.steps()] == [12, 12]  # test.json beside each step.json
    again = score_steps(cfg, spec, test, best)
    assert again == first and (baseline.calls, tuned.calls) == (12, 12)  # nothing scored twice
    score_steps(cfg, spec, test[:6], best)  # another size: scored again
    assert [s.test["n"] for s in store.steps()] == [6, 6]


class Breaks(Answers):
    """Raises a pool error (not a wrong answer) on the inputs ``broken(i)`` names."""

    def __init__(self, pick, broken):
        super().__init__(pick)
        self.broken = broken

    def forward(self, i):
        if self.broken(i):
            self.calls += 1
            raise PoolUnavailableError("pool 'run' has no replicas")
        return super().forward(i)


def test_a_result_with_errors_is_neither_a_score_nor_stored_and_a_rerun_scores_it_again(tmp_path, caplog):
    flaky = Breaks(lambda i: LABELS[i % 3], lambda i: i < 4)
    cfg, spec, store, best = _run_dir(tmp_path, [("", "", flaky)])
    test = examples(12)
    assert score_steps(cfg, spec, test, best) == {}
    assert store.steps()[0].test is None
    assert "held-out test 'baseline' not scored: 4 of 12 runs failed with an error" in caplog.text
    assert "PoolUnavailableError: pool 'run' has no replicas" in caplog.text
    flaky.broken = lambda i: False  # the pool is back
    again = score_steps(cfg, spec, test, best)
    assert again[""].score == 100.0 and again[""].errors == 0 and store.steps()[0].test["score"] == 100.0


def test_a_stored_result_with_errors_is_scored_again(tmp_path):
    program = Answers(lambda i: LABELS[i % 3])
    cfg, spec, store, best = _run_dir(tmp_path, [("", "", program)])
    store.write_test(store.steps()[0].name, {**score_steps(cfg, spec, examples(12), best)[""].as_dict(),
                                             "score": 0.0, "errors": 4})  # as an older Tandem stored it
    assert score_steps(cfg, spec, examples(12), best)[""].score == 100.0 and program.calls == 24


class DeadPool:
    def __init__(self, live):
        self.live, self.asked = live, 0

    def live_replicas(self):
        self.asked += 1
        return self.live


def test_after_a_failed_step_a_dead_pool_is_not_scored_and_a_broken_scoring_is_not_raised(tmp_path, caplog):
    program = Breaks(lambda i: LABELS[i % 3], lambda i: True)
    cfg, spec, store, best = _run_dir(tmp_path, [("", "", program)])
    best.flag_compilation_error_occurred = True
    best.compilation_error = "step 'p' failed: PoolUnavailableError: no live replica\n\tactor_id: 1395 (a page of Ray)"
    dead = DeadPool(0)
    assert score_after(cfg, spec, dead, examples(12), best) == {} and program.calls == 0 and dead.asked == 1
    assert "no replica of the pool is alive after the failed step (step 'p' failed" in caplog.text
    assert "actor_id" not in caplog.text  # the error's first line only
    assert score_after(cfg, spec, DeadPool(1), examples(12), best) == {}  # every run breaks: max_errors
    assert "held-out test not scored after the failed step: held-out test" in caplog.text
    assert store.steps()[0].test is None
    best.flag_compilation_error_occurred = False  # a run whose steps all ran fails loudly instead
    with pytest.raises(TooManyErrors):
        score_after(cfg, spec, DeadPool(0), examples(12), best)


def test_the_report_shows_test_scores_answers_and_warnings(tmp_path):
    baseline, tuned = Answers(lambda i: "setosa"), Answers(lambda i: LABELS[i % 3])
    cfg, spec, store, best = _run_dir(tmp_path, [("", "", baseline), ("p", "p", tuned)])
    score_steps(cfg, spec, examples(12), best)
    text = write_report(store.root, "t", "p", False, valset_size=15).read_text()
    assert "the valset has 15 examples (under 30)" in text
    assert "| 00_baseline | `(baseline)` | 50.0 | 33.3 (n=12) | 1 distinct; most common 'setosa' 12/12" in text
    assert "| 01_p | `p` | 50.0 | 100.0 (n=12) | 3 distinct" in text
    assert "`(baseline)` answers 'setosa' to 12 of 12 test inputs" in text
    assert "under 30" not in write_report(store.root, "t", "p", False, valset_size=50).read_text()


def test_the_table_marks_a_cell_whose_program_answers_one_thing(tmp_path):
    (one, right) = score_held_out([Answers(lambda i: "setosa"), Answers(lambda i: LABELS[i % 3])], examples(9),
                                  metric)
    cells = [Cell("p", 0, one.score, 50.0, None, "/r", 1.0, one.as_dict()),
             Cell("p -> w", 0, right.score, 60.0, None, "/r", 1.0, right.as_dict())]
    text = write_table(cells, tmp_path, "t", {})["md"].read_text()
    assert "| `p` | 33.3 | 33.3 [1] |" in text and "| `p -> w` | 100.0 | 100.0 |" in text
    assert "[1] answers one thing: 1 distinct; most common 'setosa' 9/9" in text


def test_table_seeds_take_a_count_or_a_list():
    assert _seeds("3") == (0, 1, 2) and _seeds("0,1,2") == (0, 1, 2) and _seeds("7, 11") == (7, 11)
    for bad in ("0", "a", "1,x"):
        with pytest.raises(Exception, match="--seeds"):
            _seeds(bad)
