"""BetterTogether logic with scripted LMs: validation, selection, ties, failures, resume, LM hand-over."""

import json

import dspy
import pytest
from dspy import lm15
from dspy.teleprompt.teleprompt import Teleprompter

from engine import strategy
from engine.better_together import BetterTogether
from engine.steps.prompt import PromptStep


class RuleEngine:
    """Answers every question right when the prompt holds demos (or always, when ``smart``)."""

    def __init__(self, smart=False):
        self.smart, self.calls = smart, 0

    def __deepcopy__(self, memo):  # program copies share the engine (as PoolEngine does)
        return self

    def complete(self, request):
        self.calls += 1
        question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        right = self.smart or len(request.messages) > 1
        answer = question.replace("q", "a") if right else "wrong"
        text = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


def scripted_lm(model="scripted", smart=False):
    engine = RuleEngine(smart)
    return dspy.LM(model, engine=engine, cache=False), engine


def metric(example, prediction, trace=None):
    return prediction.answer == example.answer


def data(n, start=0):
    return [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(start, start + n)]


@pytest.fixture
def program():
    lm, engine = scripted_lm()
    prog = dspy.Predict("question -> answer")
    prog.set_lm(lm)
    prog.engine = engine
    return prog


def p_step():
    return PromptStep(metric, num_candidate_programs=2, max_bootstrapped_demos=2, max_labeled_demos=2, num_threads=4)


class Swap(Teleprompter):
    """A fake weight step: hands the program a different LM (as fine-tuning does)."""

    def __init__(self, lm):
        self.lm, self.calls = lm, 0

    def compile(self, student, *, trainset, **kw):
        self.calls += 1
        new = student.deepcopy()
        new.set_lm(self.lm)
        return new


class Boom(Teleprompter):
    def compile(self, student, *, trainset, **kw):
        raise RuntimeError("training exploded")


class RemoteBoom(Teleprompter):
    """Fails as a step whose actor raised does: a Ray task error (its str the whole remote traceback) that
    wraps the actor's own exception as ``.cause``."""

    def compile(self, student, *, trainset, **kw):
        error = RuntimeError("Traceback (most recent call last):\n  File ...\nray::Trainer.fit() ...")
        error.cause = ValueError("no passing traces")
        raise error


def test_strategy_validation_messages():
    assert strategy.parse("p->w -> p", ["p", "w"]) == ["p", "w", "p"]
    with pytest.raises(ValueError, match="strategy cannot be empty"):
        strategy.parse("  ", ["p"])
    with pytest.raises(ValueError, match=r"invalid optimizer keys: \['x'\]. Valid keys are: \['p', 'w'\]"):
        strategy.parse("p -> x", ["p", "w"])
    with pytest.raises(ValueError, match="empty step"):
        strategy.parse("p -> -> w", ["p", "w"])


def test_compile_validation(program):
    bt = BetterTogether(metric, p=p_step())
    with pytest.raises(ValueError, match="trainset cannot be empty"):
        bt.compile(program, trainset=[], strategy="p")
    with pytest.raises(ValueError, match=r"valset_ratio must be in range \[0, 1\)"):
        bt.compile(program, trainset=data(20), valset_ratio=1.0, strategy="p")
    with pytest.raises(ValueError, match="leaves an empty valset"):
        bt.compile(program, trainset=data(5), strategy="p")
    with pytest.raises(TypeError, match="cannot contain 'student'"):
        bt.compile(program, trainset=data(20), strategy="p", optimizer_compile_args={"p": {"student": program}})
    with pytest.raises(ValueError, match="Invalid compile arguments for optimizer 'p'"):
        bt.compile(program, trainset=data(20), strategy="p", optimizer_compile_args={"p": {"bogus": 1}})
    with pytest.raises(ValueError, match="Invalid optimizer key 'q'"):
        bt.compile(program, trainset=data(20), strategy="p", optimizer_compile_args={"q": {}})
    with pytest.raises(ValueError, match="have no LM"):
        bt.compile(dspy.Predict("question -> answer"), trainset=data(20), strategy="p")
    with pytest.raises(TypeError, match="must be a Teleprompter"):
        BetterTogether(metric, p=object())


def test_prompt_step_beats_baseline_and_candidates_are_sorted(program):
    best = BetterTogether(metric, p=p_step()).compile(program, trainset=data(12), valset=data(6, 100),
                                                      strategy="p", seed=0)
    scores = [(c.strategy, c.score) for c in best.candidate_programs]
    assert scores == [("p", 100.0), ("", 0.0)]
    assert best.best_strategy == "p" and best.flag_compilation_error_occurred is False
    assert best.candidate_programs[0]["score"] == 100.0  # dict-style access like dspy 3.4.1
    assert len(best.demos) > 0


def test_ties_keep_the_earlier_program(program):
    best = BetterTogether(metric, p=p_step()).compile(program, trainset=data(12), valset=data(6, 100),
                                                      strategy="p -> p", seed=0)
    assert [c.strategy for c in best.candidate_programs] == ["p", "p -> p", ""]
    assert best.best_strategy == "p"


def test_failed_step_sets_flag_and_returns_best_so_far(program):
    best = BetterTogether(metric, p=p_step(), w=Boom()).compile(
        program, trainset=data(12), valset=data(6, 100), strategy="p -> w -> p")
    assert best.flag_compilation_error_occurred is True
    assert [c.strategy for c in best.candidate_programs] == ["p", ""]
    assert best.compilation_error == "step 'p -> w' failed: RuntimeError: training exploded"
    remote = BetterTogether(metric, w=RemoteBoom()).compile(program, trainset=data(12), valset=data(6, 100),
                                                           strategy="w")
    assert remote.compilation_error == "step 'w' failed: ValueError: no passing traces"  # no remote traceback


def test_next_prompt_step_scores_candidates_with_the_tuned_lm(program, tmp_path):
    tuned_lm, tuned = scripted_lm("scripted:ft-01", smart=True)  # right even zero-shot; the base is not
    base = program.engine
    best = BetterTogether(metric, p=p_step(), w=Swap(tuned_lm)).compile(
        program, trainset=data(12), valset=data(6, 100), strategy="w -> p", seed=0, run_dir=str(tmp_path))
    assert base.calls == 6  # the baseline's evaluation on the 6 valset examples, nothing after the swap
    candidates = json.loads((tmp_path / "02_p" / "step.json").read_text())["extra"]["candidates"]
    assert {c["seed"]: c["score"] for c in candidates}["-3"] == 100.0  # zero-shot: only the tuned LM is right
    assert {c.strategy: c.score for c in best.candidate_programs} == {"": 0.0, "w": 100.0, "w -> p": 100.0}
    assert best.lm.model == "scripted:ft-01"


def test_teacher_list_is_accepted_and_the_teacher_bootstraps(program):
    teacher_lm, teacher_engine = scripted_lm(smart=True)
    teacher = dspy.Predict("question -> answer")
    teacher.set_lm(teacher_lm)
    best = BetterTogether(metric, p=p_step()).compile(program, trainset=data(12), valset=data(6, 100),
                                                      teacher=[teacher], strategy="p")
    assert teacher_engine.calls == 12  # the teacher ran over the whole trainset once (dspy wraps it in a list)
    assert best.best_strategy == "p"


def test_no_valset_returns_latest(program):
    best = BetterTogether(metric, p=p_step()).compile(program, trainset=data(12), valset_ratio=0, strategy="p")
    assert best.best_strategy == "p" and best.candidate_programs[0].score is None


def test_resume_skips_completed_steps_and_returns_the_same_program(program, tmp_path):
    tuned_lm, _ = scripted_lm("scripted:ft-01", smart=True)
    swap = Swap(tuned_lm)
    bt = BetterTogether(metric, p=p_step(), w=swap)
    kwargs = dict(trainset=data(12), valset=data(6, 100), strategy="p -> w", seed=0, run_dir=str(tmp_path))
    first = bt.compile(program, **kwargs)
    assert swap.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_baseline", "01_p", "02_w", "run.json"]
    records = {s: json.loads((tmp_path / s / "step.json").read_text()) for s in ("01_p", "02_w")}
    assert len(records["01_p"]["extra"]["candidates"]) == 5
    assert "candidates" not in records["02_w"]["extra"]  # the weight step has none of its own
    saved = json.loads((tmp_path / "01_p" / "program.json").read_text())
    assert saved["lm"] is None and saved["demos"]  # dspy JSON, no LM endpoint in it
    (tmp_path / "03_p.tmp").mkdir()  # a half-written step is never taken as done
    second = bt.compile(program, **kwargs)
    assert swap.calls == 1  # nothing ran again
    assert [(c.strategy, c.score) for c in second.candidate_programs] == \
           [(c.strategy, c.score) for c in first.candidate_programs]
    restored = {c.strategy: c.program for c in second.candidate_programs}
    assert restored["p -> w"].lm.model == "scripted:ft-01"  # the step's model id came back from the record
    assert second.best_strategy == first.best_strategy == "p"
    assert [dict(d.items()) for d in second.demos] == [dict(d.items()) for d in first.demos]
    with pytest.raises(ValueError, match="other settings \\(strategy\\)"):
        bt.compile(program, **{**kwargs, "strategy": "p"})


def stock_bfrs():
    return dspy.BootstrapFewShotWithRandomSearch(metric, num_candidate_programs=2, max_bootstrapped_demos=2,
                                                 max_labeled_demos=2, num_threads=2)


def test_dspy_labeled_few_shot_as_a_step_with_run_dir_resumes(program, tmp_path):
    bt = BetterTogether(metric, p=dspy.LabeledFewShot(k=3))  # compile(student, *, trainset, sample): no valset
    kwargs = dict(trainset=data(12), valset=data(6, 100), strategy="p", seed=0, run_dir=str(tmp_path))
    first = bt.compile(program, **kwargs)
    assert [(c.strategy, c.score) for c in first.candidate_programs] == [("p", 100.0), ("", 0.0)]
    assert len(first.demos) == 3 and first.lm.model == "scripted"  # LabeledFewShot's reset_copy dropped it
    calls = program.engine.calls
    second = bt.compile(program, **kwargs)
    assert program.engine.calls == calls  # the stored steps were not run again
    assert [dict(d.items()) for d in second.demos] == [dict(d.items()) for d in first.demos]
    assert second.lm.model == "scripted"


def test_dspy_bfrs_as_steps_with_run_dir_records_its_candidates_and_resumes(program, tmp_path):
    bt = BetterTogether(metric, p=stock_bfrs())  # no dspy.settings.lm: the step runs on the program's LM
    kwargs = dict(trainset=data(12), valset=data(6, 100), strategy="p -> p", seed=0, run_dir=str(tmp_path),
                  optimizer_compile_args={"p": {"restrict": [-1, 0, 1]}})  # a bootstrapped, `_compiled` winner
    first = bt.compile(program, provide_traceback=True, **kwargs)
    assert first.flag_compilation_error_occurred is False  # the second BFRS got an uncompiled copy
    assert [c.strategy for c in first.candidate_programs] == ["p", "p -> p", ""]
    assert first.candidate_programs[0].score == 100.0 and first.lm is not None and first._compiled is True
    for step in ("01_p", "02_p"):
        candidates = json.loads((tmp_path / step / "step.json").read_text())["extra"]["candidates"]
        assert sorted(c["seed"] for c in candidates) == ["-1", "0", "1"]
        assert all(isinstance(c["score"], float) for c in candidates)
    calls = program.engine.calls
    second = bt.compile(program, **kwargs)
    assert program.engine.calls == calls
    assert [(c.strategy, c.score) for c in second.candidate_programs] == \
           [(c.strategy, c.score) for c in first.candidate_programs]


def test_dspy_bfrs_after_a_weight_step_scores_with_the_tuned_lm(program, tmp_path):
    tuned_lm, _ = scripted_lm("scripted:ft-01", smart=True)
    base = program.engine
    best = BetterTogether(metric, p=stock_bfrs(), w=Swap(tuned_lm)).compile(
        program, trainset=data(12), valset=data(6, 100), strategy="w -> p", seed=0, run_dir=str(tmp_path))
    assert base.calls == 6  # the baseline only: BFRS's reset copies ran on the tuned LM, not settings.lm
    candidates = json.loads((tmp_path / "02_p" / "step.json").read_text())["extra"]["candidates"]
    assert {c["seed"]: c["score"] for c in candidates}["-3"] == 100.0
    assert best.lm.model == "scripted:ft-01"


def test_compile_accepts_provide_traceback_like_dspy(program):
    import inspect

    stock = inspect.signature(dspy.BetterTogether.compile).parameters
    ours = inspect.signature(BetterTogether.compile).parameters
    assert set(stock) <= set(ours)
    best = BetterTogether(metric, p=p_step()).compile(program, trainset=data(12), valset=data(6, 100),
                                                      strategy="p", provide_traceback=False)
    assert best.best_strategy == "p"
