"""PromptStep edges with a scripted LM: the teacher's demos (dspy's rule), ``restrict``, no bootstrapped demos."""

import dspy
import pytest
from dspy import lm15

from engine.steps.prompt import PromptStep


class NeedsDemos:
    """Right when the prompt holds demos, wrong zero-shot."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        self.calls += 1
        question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        answer = question.replace("q", "a") if len(request.messages) > 2 else "wrong"
        text = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


def metric(example, prediction, trace=None):
    return prediction.answer == example.answer


def data(n, start=0):
    return [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(start, start + n)]


def predictor(engine):
    pred = dspy.Predict("question -> answer")
    pred.set_lm(dspy.LM("scripted", engine=engine, cache=False))
    return pred


def augmented(program):
    return [d for d in program.demos if d.get("augmented")]


def step(**kw):
    return PromptStep(metric, **{"num_candidate_programs": 1, "max_bootstrapped_demos": 2, "max_labeled_demos": 2,
                                 "num_threads": 2, **kw})


def test_an_uncompiled_teacher_bootstraps_with_labelled_demos_a_compiled_one_keeps_its_own():
    engine = NeedsDemos()
    student, teacher = predictor(engine), predictor(engine)
    teacher.demos = []
    best = step().compile(student, trainset=data(6), teacher=teacher, valset=data(2, 100), restrict=[-1])
    assert len(augmented(best)) == 2  # dspy's BootstrapFewShot gave the teacher LabeledFewShot demos
    teacher._compiled = True  # dspy keeps a compiled teacher's demos: none here, so nothing passes
    best = step().compile(student, trainset=data(6), teacher=teacher, valset=data(2, 100), restrict=[-1])
    assert augmented(best) == [] and len(best.demos) == 2  # labelled top-ups only
    assert teacher.demos == []  # the caller's teacher is left alone


def test_restrict_keeps_only_those_seeds_and_refuses_none():
    engine = NeedsDemos()
    best = step(num_candidate_programs=3).compile(predictor(engine), trainset=data(6), valset=data(2, 100),
                                                  restrict=[-3, 2])
    assert [c.strategy for c in best.candidate_programs] == ["2", "-3"]
    calls = engine.calls
    step().compile(predictor(engine), trainset=data(6), valset=data(2, 100), restrict=[-3, -2])
    assert engine.calls == calls + 4  # no teacher run when no candidate bootstraps: 2 candidates x 2 examples
    with pytest.raises(ValueError, match="does not match any candidate seed"):
        step().compile(predictor(engine), trainset=data(6), restrict=[7])


def test_no_bootstrapped_demos_means_labelled_ones_only():
    best = step(max_bootstrapped_demos=0, num_candidate_programs=2).compile(
        predictor(NeedsDemos()), trainset=data(6), valset=data(2, 100))
    for candidate in best.candidate_programs:
        assert augmented(candidate.program) == []
        assert len(candidate.program.demos) == (0 if candidate.strategy == "-3" else 2)
