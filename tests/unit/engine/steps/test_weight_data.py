"""What the weight step trains on and what it returns, with scripted LMs and a provider that only
records its training jobs (the training itself is tested with real Ray Train in tests/integration):
the prompts of the returned program are the prompts the adapter was trained on, and ``teacher=``
supplies the traces."""

import json
from types import SimpleNamespace

import dspy
import pytest

from actors.dspy_side.finetune import FinetuneResult
from actors.training.config import LoraTrainConfig
from actors.training.rows import read_rows
from actors.dspy_side.provider import TandemProvider
from engine.better_together import BetterTogether
from engine.steps.weight import WeightStep
from tests.unit.engine.test_evaluate import Scripted, data, metric


class RecordingProvider(TandemProvider):
    """Takes the weight step's training jobs and returns adapter ids, without training."""

    def __init__(self):  # no pool: nothing is launched or trained
        self.pool, self.jobs = SimpleNamespace(cfg=SimpleNamespace(name="recording")), []

    def train_adapters(self, datasets, train, *, lifecycle, adapter_root, prefix, storage):
        self.jobs.append({tag: read_rows(str(path)) for tag, path in datasets.items()})
        return {tag: FinetuneResult(f"base:{prefix}-{tag or 'all'}", str(adapter_root), {}) for tag in datasets}


def _program(engine, provider, demos=()):
    prog = dspy.Predict("question -> answer")
    prog.set_lm(dspy.LM("base", engine=engine, provider=provider, cache=False, num_retries=0))
    prog.demos = list(demos)
    return prog


@pytest.fixture(autouse=True)
def chat_adapter():
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        yield


DEMO = dspy.Example(question="q9", answer="a9")


def test_by_default_the_adapter_learns_vanilla_prompts_and_the_program_drops_its_demos(tmp_path):
    provider = RecordingProvider()
    student = _program(Scripted(), provider, demos=[DEMO])
    tuned = WeightStep(metric, LoraTrainConfig()).compile(student, trainset=data(3), step_dir=tmp_path, step_index=2)
    (job,) = provider.jobs
    assert all("q9" not in json.dumps(chat) and len(chat) == 3 for chat in job[""])  # system, user, assistant
    assert tuned.demos == [] and tuned.lm.model == "base:ft-02-all"
    assert student.demos == [DEMO]  # the input program is left as it was


def test_without_exclude_demos_the_adapter_learns_the_prompts_with_demos_and_keeps_them(tmp_path):
    provider = RecordingProvider()
    student = _program(Scripted(), provider, demos=[DEMO])
    tuned = WeightStep(metric, LoraTrainConfig(), exclude_demos=False).compile(student, trainset=data(3),
                                                                               step_dir=tmp_path)
    (job,) = provider.jobs
    assert all("q9" in json.dumps(chat) and len(chat) == 5 for chat in job[""])  # + the demo's user/assistant
    assert tuned.demos == [DEMO]


def test_a_teacher_supplies_the_traces_the_student_learns(tmp_path):
    provider = RecordingProvider()
    weak, strong = Scripted(garbage={"q0", "q1", "q2"}), Scripted()
    student, teacher = _program(weak, provider), _program(strong, RecordingProvider())
    WeightStep(metric, LoraTrainConfig()).compile(student, trainset=data(3), teacher=[teacher], step_dir=tmp_path)
    assert len(strong.prompts) == 3 and weak.prompts == []  # only the teacher ran
    (job,) = provider.jobs
    assert sorted(chat[-1]["content"].split()[5] for chat in job[""]) == ["a0", "a1", "a2"]  # "[[ ## answer ## ]] a0"


def test_a_teacher_with_other_predictors_is_refused(tmp_path):
    provider = RecordingProvider()
    other = dspy.ChainOfThought("question -> answer")
    other.set_lm(dspy.LM("base", engine=Scripted(), cache=False))
    with pytest.raises(ValueError, match="teacher's predictors .* are not the student's"):
        WeightStep(metric).compile(_program(Scripted(), provider), trainset=data(2), teacher=other, step_dir=tmp_path)


def test_better_together_hands_its_teacher_to_the_weight_step(tmp_path):
    provider = RecordingProvider()
    weak, strong = Scripted(garbage={f"q{i}" for i in range(6)}), Scripted()
    result = BetterTogether(metric, w=WeightStep(metric, LoraTrainConfig())).compile(
        _program(weak, provider), trainset=data(6), valset=data(2), teacher=_program(strong, RecordingProvider()),
        strategy="w")
    assert not result.flag_compilation_error_occurred, result.compilation_error
    assert len(provider.jobs[0][""]) == 6  # every teacher trace passed; the student alone had none


def test_a_teacher_lm_answers_with_labelled_demos_and_the_student_learns_its_own_prompt(tmp_path):
    provider = RecordingProvider()
    student = _program(Scripted(garbage={f"q{i}" for i in range(6)}), provider)  # the student passes nothing
    teacher_engine = Scripted()
    teacher_lm = dspy.LM("teacher", engine=teacher_engine, cache=False, num_retries=0)
    released = []
    step = WeightStep(metric, LoraTrainConfig(), teacher_lm=teacher_lm, teacher_demos=2,
                      after_teacher=lambda: released.append(len(teacher_engine.prompts)))
    tuned = step.compile(student, trainset=data(6), step_dir=tmp_path, step_index=1)
    assert len(teacher_engine.prompts) == 6 and released == [6]  # released once all its traces were in
    counts = []
    for request in teacher_engine.prompts:  # two labelled demos, less the example itself if drawn
        asked = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        shown = [m.text for m in request.messages[:-1] if m.role == "user"]
        counts.append(len(shown))
        assert not any(t.split("[[ ## question ## ]]")[-1].split()[0] == asked for t in shown)
    assert sorted(set(counts)) == [1, 2]
    (job,) = provider.jobs
    assert len(job[""]) == 6 and all(len(chat) == 3 for chat in job[""])  # the student's vanilla prompt
    assert tuned.lm.model == "base:ft-01-all"
    assert step.last_run["teacher_model"] == "teacher" and step.last_run["teacher_demos"] == 2


class Demonstrated(Scripted):
    """Answers the questions in ``knows`` alone, any other only with a demo in its prompt."""

    def __init__(self, knows):
        super().__init__()
        self.knows = set(knows)

    def complete(self, request):
        question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
        demos = sum(m.role == "user" for m in request.messages[:-1])
        self.garbage = set() if demos or question in self.knows else {question}
        return super().complete(request)


def test_a_self_taught_teacher_answers_with_its_own_passing_traces_as_demos(tmp_path):
    """teacher_bootstrap: the teacher runs alone first (it knows q0 and q1), those two traces become its demos,
    and with them it answers the rest; it never runs the examples its demos came from again (it would copy
    their answers), and every example it passed is a training row."""
    provider = RecordingProvider()
    student = _program(Scripted(garbage={f"q{i}" for i in range(6)}), provider)
    teacher_engine = Demonstrated(knows={"q0", "q1"})
    step = WeightStep(metric, LoraTrainConfig(), teacher_lm=dspy.LM("teacher", engine=teacher_engine, cache=False,
                                                                    num_retries=0),
                      teacher_demos=2, teacher_bootstrap=True)
    step.compile(student, trainset=data(6), step_dir=tmp_path)
    asked = [(r.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0],
              sum(m.role == "user" for m in r.messages[:-1])) for r in teacher_engine.prompts]
    assert sorted(asked[:6]) == [(f"q{i}", 0) for i in range(6)]  # alone first: passes q0 and q1
    assert sorted(asked[6:]) == [(f"q{i}", 2) for i in range(2, 6)]  # then with its two traces as demos
    (job,) = provider.jobs
    assert sorted(chat[-1]["content"].split()[5] for chat in job[""]) == [f"a{i}" for i in range(6)]
    assert step.last_run["teacher_bootstrap"] and step.last_run["teacher_first_pass"] == 2
    with pytest.raises(ValueError, match="teacher_bootstrap needs teacher_demos > 0"):
        WeightStep(metric, teacher_bootstrap=True)
