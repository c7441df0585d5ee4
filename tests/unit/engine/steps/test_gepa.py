"""GEPAStep with scripted LMs: a 3-argument metric works, the reflection reaches the program's prompt,
the state lives in the step's state dir and a rerun resumes from it; the feedback text."""

import json
import threading
import time

import dspy
import pytest
from dspy import lm15

from engine.better_together import BetterTogether
from engine.store import load_program
from engine.steps.gepa import GEPAStep, default_feedback, feedback_metric, reflection_of
from tests.unit.engine.test_better_together import data, metric

MAGIC = "SOLVE"


class InstructionEngine:
    """The task LM: right (q3 -> a3) only when its system prompt holds ``MAGIC``; the reflection LM
    (a prompt without the task's question field) proposes an instruction that holds it."""

    def __init__(self):
        self.task_calls, self.reflections, self._lock = 0, 0, threading.Lock()
        self.temperatures = []

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        text = request.messages[-1].text
        with self._lock:
            self.temperatures.append(request.config.temperature)
            if "[[ ## question ## ]]" not in text:  # GEPA's reflection (dspy's proposer, JSONAdapter)
                self.reflections += 1
                out = json.dumps({"new_instruction": f"{MAGIC}: write the question with its q replaced by a."})
            else:
                self.task_calls += 1
                question = text.split("[[ ## question ## ]]")[-1].split()[0]
                answer = question.replace("q", "a") if MAGIC in (request.system or "") else "wrong"
                out = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(out),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


@pytest.fixture
def program():
    engine = InstructionEngine()
    prog = dspy.Predict("question -> answer")
    prog.set_lm(dspy.LM("scripted", engine=engine, cache=False, temperature=0.0))
    prog.engine = engine
    return prog


def test_a_three_argument_metric_becomes_gepas_feedback_metric():
    gepa_metric = feedback_metric(metric)
    gold = dspy.Example(question="q1", answer="a1").with_inputs("question")
    right, wrong = gepa_metric(gold, dspy.Prediction(answer="a1")), gepa_metric(gold, dspy.Prediction(answer="x"))
    assert (right.score, wrong.score) == (1.0, 0.0)
    assert wrong.feedback == "Incorrect. Expected answer='a1'; the program produced answer='x'."
    assert right.feedback.startswith("Correct.")
    own = feedback_metric(metric, lambda gold, pred: f"want {gold.answer}")
    assert own(gold, dspy.Prediction(answer="x"), None, "predict", None).feedback == "want a1"
    assert default_feedback(gold, dspy.Prediction(answer="y" * 500), 0.0).endswith("….")  # long outputs cut


def test_gepa_finds_the_instruction_and_its_reflection_samples_the_programs_lm(program):
    step = GEPAStep(metric, max_metric_calls=40, num_threads=4, reflection_minibatch_size=3)
    tuned = step.compile(program, trainset=data(6), valset=data(6, 100))
    assert MAGIC in tuned.signature.instructions
    assert tuned(question="q7").answer == "a7"
    assert program.engine.reflections >= 1
    assert 1.0 in program.engine.temperatures  # the reflection LM: the program's, sampling at 1.0
    assert step.last_run["gepa"]["metric_calls"] <= 40 + 6  # gepa may finish the valset eval it began


def test_parallel_proposals_reflect_several_parents_per_iteration(program):
    step = GEPAStep(metric, max_metric_calls=40, num_threads=8, proposals=3)
    tuned = step.compile(program, trainset=data(6), valset=data(6, 100))
    assert MAGIC in tuned.signature.instructions and step.last_run["gepa"]["proposals"] == 3
    assert program.engine.reflections >= 3  # the first iteration alone proposes three children
    with pytest.raises(ValueError, match="proposals must be >= 1"):
        GEPAStep(metric, proposals=0)


class SlowReflections(InstructionEngine):
    """Each reflection takes 0.3 s; counts how many were in flight at once."""

    def __init__(self):
        super().__init__()
        self.in_flight = self.most_in_flight = 0

    def complete(self, request):
        reflection = "[[ ## question ## ]]" not in request.messages[-1].text
        if reflection:
            with self._lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            time.sleep(0.3)
        try:
            return super().complete(request)
        finally:
            if reflection:
                with self._lock:
                    self.in_flight -= 1


def test_an_iterations_reflections_run_at_once_and_stock_gepa_is_left_as_it_was(program):
    from gepa.proposer.reflective_mutation.reflective_mutation import ReflectiveMutationProposer

    engine, stock = SlowReflections(), ReflectiveMutationProposer._propose_texts_batch
    program.set_lm(dspy.LM("scripted", engine=engine, cache=False, temperature=0.0))
    step = GEPAStep(metric, max_metric_calls=40, num_threads=8, proposals=3)
    tuned = step.compile(program, trainset=data(6), valset=data(6, 100))
    assert MAGIC in tuned.signature.instructions
    assert engine.most_in_flight == 3  # gepa alone reflects for one proposal task after the other
    assert ReflectiveMutationProposer._propose_texts_batch is stock  # restored once the step is done


def test_a_killed_gepa_step_resumes_from_its_state_dir(program, tmp_path):
    state = tmp_path / "01_gepa.state"
    state.mkdir()
    GEPAStep(metric, max_metric_calls=40, num_threads=4).compile(program, trainset=data(6), valset=data(6, 100),
                                                                 state_dir=state)
    assert any(state.iterdir())
    first = program.engine.task_calls
    resumed = GEPAStep(metric, max_metric_calls=40, num_threads=4).compile(
        program, trainset=data(6), valset=data(6, 100), state_dir=state)
    assert MAGIC in resumed.signature.instructions
    assert program.engine.task_calls - first < first / 2  # the budget was spent: nothing is redone


def test_a_gepa_step_in_a_strategy_keeps_its_state_in_the_step_folder(program, tmp_path):
    bt = BetterTogether(metric, gepa=GEPAStep(metric, max_metric_calls=40, num_threads=4))
    best = bt.compile(program, trainset=data(6), valset=data(6, 100), strategy="gepa", run_dir=str(tmp_path / "run"))
    assert best.best_strategy == "gepa" and best.candidate_programs[0].score == 100.0
    step_dir = tmp_path / "run" / "01_gepa"
    assert (step_dir / "step.json").is_file() and any((step_dir / "state").iterdir())
    assert not (tmp_path / "run" / "01_gepa.state").exists()
    saved = load_program(dspy.Predict("question -> answer"), step_dir / "program.json")  # what serve loads
    assert MAGIC in saved.signature.instructions


def test_reflection_needs_one_lm_or_an_explicit_one(program):
    assert reflection_of(program).kwargs["temperature"] == 1.0 and reflection_of(program).kwargs["max_tokens"] >= 512
    two = dspy.ChainOfThought("question -> answer")
    two.set_lm(program.lm)
    other = dspy.Predict("a -> b")
    other.set_lm(dspy.LM("other", engine=InstructionEngine(), cache=False))
    two.extra = other
    with pytest.raises(ValueError, match="reflection_lm="):
        reflection_of(two)
    with pytest.raises(ValueError, match="one budget"):
        GEPAStep(metric, auto="light", max_metric_calls=10)
    with pytest.raises(ValueError, match="GEPA does not take"):
        GEPAStep(metric, bogus=1)
