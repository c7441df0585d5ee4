"""PromptStep builds the same candidates as stock dspy 3.4.1 BootstrapFewShotWithRandomSearch.

Both run on one scripted, deterministic LM (no network): it answers some questions right and
others wrong whatever the demos, so bootstrapping is partial, and the demo sets of every candidate
(by seed) must be equal field by field, ``augmented`` flag included, in order. A second LM answers
right only when it sees the example's own answer in its prompt: dspy never shows an example its
own demo while bootstrapping, so nothing bootstraps there, and neither may PromptStep.
"""

import dspy
import pytest
from dspy import lm15

from engine.steps.bootstrap import bootstrap
from engine.steps.prompt import PromptStep


class Parity:
    """Right on even-numbered questions, wrong on odd ones, whatever the demos (deterministic)."""

    def __deepcopy__(self, memo):
        return self

    def answer(self, request, number: int) -> str:
        return f"a{number}" if number % 2 == 0 else "wrong"

    def complete(self, request):
        question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        text = f"[[ ## answer ## ]]\n{self.answer(request, int(question[1:]))}\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


class Cheat(Parity):
    """Right only when the example's own answer is among the prompt's demos."""

    def answer(self, request, number: int) -> str:
        earlier = " ".join(m.text for m in request.messages[:-1] if m.text)
        return f"a{number}" if f"\na{number}\n" in earlier else "wrong"


class TwoSteps(dspy.Module):
    """Two predictors, each called once: the labelled samples and top-ups share dspy's RNGs across them."""

    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> answer")
        self.final = dspy.Predict("question -> answer")

    def forward(self, question):
        self.draft(question=question)
        return self.final(question=question)


class Twice(dspy.Module):
    """One predictor called twice per example: dspy keeps one of its calls, chosen by the demos' hash."""

    def __init__(self):
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    def forward(self, question):
        self.step(question=question)
        return self.step(question=f"{question} again")


def metric(example, prediction, trace=None):
    return prediction.answer == example.answer


def data(n, start=0):
    return [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(start, start + n)]


def demo_sets(program):
    return {name: [dict(d.items()) for d in pred.demos] for name, pred in program.named_predictors()}


def stock(lm, student, trainset, valset, n, max_boot, max_labeled, **compile_kw):
    optimizer = dspy.BootstrapFewShotWithRandomSearch(
        metric, num_candidate_programs=n, max_bootstrapped_demos=max_boot, max_labeled_demos=max_labeled,
        num_threads=1)
    with dspy.context(lm=lm):  # stock BFRS resets the predictors' LMs: it runs on settings.lm
        best = optimizer.compile(student, trainset=trainset, valset=valset, **compile_kw)
    return {c["seed"]: demo_sets(c["program"]) for c in best.candidate_programs}


def tandem(lm, student, trainset, valset, n, max_boot, max_labeled, **compile_kw):
    student = student.deepcopy()
    student.set_lm(lm)
    step = PromptStep(metric, num_candidate_programs=n, max_bootstrapped_demos=max_boot,
                      max_labeled_demos=max_labeled, num_threads=2)
    best = step.compile(student, trainset=trainset, valset=valset, **compile_kw)
    return {int(c.strategy): demo_sets(c.program) for c in best.candidate_programs}


CASES = {
    "brief: 3 boot, 3 labelled": (Parity, lambda: dspy.Predict("question -> answer"), 6, 3, 3, {}),
    "top-ups: 3 boot, 5 labelled": (Parity, lambda: dspy.Predict("question -> answer"), 6, 3, 5, {}),
    "two predictors": (Parity, TwoSteps, 6, 3, 4, {}),
    "one predictor called twice": (Parity, Twice, 6, 3, 3, {}),
    "labeled_sample=False": (Parity, TwoSteps, 2, 2, 3, {"labeled_sample": False}),
    "restrict": (Parity, lambda: dspy.Predict("question -> answer"), 4, 3, 3, {"restrict": [-2, 0, 3]}),
    "own answer never shown": (Cheat, lambda: dspy.Predict("question -> answer"), 4, 3, 3, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_candidates_equal_stock_bfrs_seed_by_seed(case):
    engine_cls, make, n, max_boot, max_labeled, kw = CASES[case]
    lm = dspy.LM("scripted", engine=engine_cls(), cache=False)
    trainset, valset = data(10), data(4, 100)
    expected = stock(lm, make(), trainset, valset, n, max_boot, max_labeled, **kw)
    got = tandem(lm, make(), trainset, valset, n, max_boot, max_labeled, **kw)
    assert sorted(got) == sorted(expected)
    for seed in expected:
        assert got[seed] == expected[seed], f"seed {seed}"
    demos = [d for sets in expected.values() for ds in sets.values() for d in ds]
    if engine_cls is Parity:  # not vacuous: some demos were bootstrapped, some labelled
        assert any(d.get("augmented") for d in demos) and any(not d.get("augmented") for d in demos)
    else:
        assert not any(d.get("augmented") for d in demos)

def test_an_example_never_sees_its_own_demo_while_bootstrapping():
    lm = dspy.LM("scripted", engine=Cheat(), cache=False)
    teacher = dspy.Predict("question -> answer")
    teacher.set_lm(lm)
    trainset = data(6)
    teacher.demos = trainset[:3]
    assert len(bootstrap(teacher, trainset, metric, num_threads=2).traces) == 3  # the old way: they cheat
    result = bootstrap(teacher, trainset, metric, num_threads=2, exclude_own_demo=True)
    assert result.traces == [] and result.attempted == 6
    assert teacher.demos == trainset[:3]  # the caller's program is left alone


def test_base_seed_zero_is_stock_and_other_base_seeds_draw_other_candidates():
    lm = dspy.LM("scripted", engine=Parity(), cache=False)
    student = dspy.Predict("question -> answer")
    student.set_lm(lm)
    trainset = data(10)

    def candidates(seed):
        step = PromptStep(metric, num_candidate_programs=4, max_bootstrapped_demos=3, max_labeled_demos=3,
                          num_threads=2, seed=seed)
        best = step.compile(student, trainset=trainset, valset=data(2, 100))
        return {c.strategy: demo_sets(c.program) for c in best.candidate_programs}

    zero, seven = candidates(0), candidates(7)
    assert zero == candidates(0)  # reproducible
    assert all(zero[s] == seven[s] for s in ("-3", "-2", "-1"))  # the fixed seeds do not shuffle
    assert any(zero[s] != seven[s] for s in ("0", "1", "2", "3"))
