"""MIPROStep with a scripted LM: MIPROv2 runs with the program's LM as task and prompt model, its
proposal reaches the program's prompt, its demo sets come from one concurrent bootstrap and its
instructions are proposed at once, arguments are checked before any call, optuna is there."""

import re
import threading
import time

import dspy
import pytest
from dspy import lm15

from engine.steps.mipro import MIPROStep
from tests.unit.engine.test_better_together import data, metric

MAGIC = "SOLVE"


class ProposalEngine:
    """The task (``question -> answer``) is right only under an instruction holding ``MAGIC``; any other
    signature (MIPROv2's proposer) gets ``MAGIC`` text in every output field it asks for."""

    def __init__(self, delay_s: float = 0.0):
        self.task_calls, self.other_calls, self._lock = 0, 0, threading.Lock()
        self.delay_s, self.in_flight, self.most = delay_s, {"task": 0, "other": 0}, {"task": 0, "other": 0}
        self.task_calls_before_proposals = None

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        system = request.system or ""
        outputs = re.findall(r"^\d+\. `(\w+)`", system.split("Your output fields are:")[-1].split("All interactions")[0],
                             flags=re.M)
        kind = "task" if outputs == ["answer"] and "`question`" in system else "other"
        with self._lock:
            if kind == "other" and self.task_calls_before_proposals is None:
                self.task_calls_before_proposals = self.task_calls  # step 1 (bootstrap) is over
            self.in_flight[kind] += 1
            self.most[kind] = max(self.most[kind], self.in_flight[kind])
        time.sleep(self.delay_s)  # a call takes a while: calls made one at a time never overlap
        with self._lock:
            self.in_flight[kind] -= 1
            if outputs == ["answer"] and "`question`" in system:
                self.task_calls += 1
                question = request.messages[-1].text.split("[[ ## question ## ]]")[-1].split()[0]
                answer = question.replace("q", "a") if MAGIC in system else "wrong"
                out = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
            else:
                self.other_calls += 1
                out = "\n\n".join(f"[[ ## {name} ## ]]\n{MAGIC} it by replacing the q of the question by a."
                                  for name in outputs) + "\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(out),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


def test_mipro_proposes_with_the_programs_lm_and_its_instruction_wins():
    engine = ProposalEngine()
    program = dspy.Predict("question -> answer")
    program.set_lm(dspy.LM("scripted", engine=engine, cache=False))
    step = MIPROStep(metric, auto=None, num_candidates=2, num_threads=4, max_bootstrapped_demos=1,
                     max_labeled_demos=1)
    tuned = step.compile(program, trainset=data(8), valset=data(6, 100), num_trials=3, minibatch=False,
                         program_aware_proposer=False, data_aware_proposer=False)
    assert engine.other_calls >= 1  # the prompt model was the program's LM (no settings.lm here)
    assert MAGIC in tuned.signature.instructions and tuned(question="q9").answer == "a9"


def test_mipro_arguments_are_checked_before_any_call():
    with pytest.raises(ValueError, match="MIPROv2 does not take"):
        MIPROStep(metric, bogus=1)


def test_demo_sets_come_from_one_concurrent_bootstrap_and_instructions_are_proposed_at_once():
    """dspy bootstraps each demo set with its own BootstrapFewShot, one example at a time, and proposes one
    instruction at a time (measured: ~4.5 + ~5 min on the embedded model with the pool mostly idle)."""
    engine = ProposalEngine(delay_s=0.05)
    program = dspy.Predict("question -> answer")
    program.set_lm(dspy.LM("scripted", engine=engine, cache=False))
    step = MIPROStep(metric, auto=None, num_candidates=4, num_threads=8, max_bootstrapped_demos=2,
                     max_labeled_demos=2)
    trainset = data(8)
    step.compile(program, trainset=trainset, valset=data(6, 100), num_trials=1, minibatch=False,
                 program_aware_proposer=False, data_aware_proposer=False)
    assert engine.most["other"] >= 3  # 4 proposals asked at once (dspy: 1 in flight)
    assert engine.task_calls_before_proposals == len(trainset)  # one pass for all sets (dspy: one per set, 16)
    assert engine.most["task"] >= 4  # and concurrent


def test_the_dataset_summary_is_written_while_step_1_bootstraps():
    """dspy writes it (a chain of prompt-model calls) only after the bootstrap, before any proposal."""
    engine = ProposalEngine(delay_s=0.05)
    program = dspy.Predict("question -> answer")
    program.set_lm(dspy.LM("scripted", engine=engine, cache=False))
    step = MIPROStep(metric, auto=None, num_candidates=2, num_threads=2, max_bootstrapped_demos=1,
                     max_labeled_demos=1)
    tuned = step.compile(program, trainset=data(8), valset=data(6, 100), num_trials=2, minibatch=False,
                         program_aware_proposer=False)
    assert engine.task_calls_before_proposals < 8  # the summary's first call came before the bootstrap's last
    assert MAGIC in tuned.signature.instructions


@pytest.mark.parametrize("at_once", [1, 3])
def test_trials_run_n_at_a_time_and_the_best_full_score_is_kept(at_once):
    """Each trial evaluates the 6-example valset on 2 threads: one trial at a time never has more than 2 task
    calls in flight; 3 at a time overlap. The winner is the best of every trial's score (no overwrite)."""
    engine = ProposalEngine(delay_s=0.05)
    program = dspy.Predict("question -> answer")
    program.set_lm(dspy.LM("scripted", engine=engine, cache=False))
    step = MIPROStep(metric, auto=None, num_candidates=3, num_threads=2, max_bootstrapped_demos=0,
                     max_labeled_demos=0, trials_at_once=at_once)
    tuned = step.compile(program, trainset=data(6), valset=data(6, 100), num_trials=6, minibatch=False,
                         program_aware_proposer=False, data_aware_proposer=False)
    during_trials = engine.most["task"]
    assert (during_trials > 2) == (at_once > 1)
    scores = [c["score"] for c in tuned.candidate_programs]
    assert tuned.score == max(scores) and len(scores) == 7  # the default program and 6 trials
    assert MAGIC in tuned.signature.instructions


def test_trials_at_once_with_minibatches_is_refused_before_any_call():
    engine = ProposalEngine()
    program = dspy.Predict("question -> answer")
    program.set_lm(dspy.LM("scripted", engine=engine, cache=False))
    with pytest.raises(ValueError, match="full-valset trials only.*minibatch: false"):
        MIPROStep(metric, auto=None, num_candidates=2, trials_at_once=2).compile(
            program, trainset=data(8), valset=data(6, 100), num_trials=3)
    with pytest.raises(ValueError, match="full-valset trials only"):
        MIPROStep(metric, auto="light", trials_at_once=2).compile(program, trainset=data(8), valset=data(60, 100))
    assert engine.task_calls == engine.other_calls == 0
    with pytest.raises(ValueError, match="trials_at_once must be >= 1"):
        MIPROStep(metric, trials_at_once=0)


class Rambling(ProposalEngine):
    """The prompt model never finishes its layout (a small model cut at max_tokens)."""

    def complete(self, request):
        response = super().complete(request)
        if "[[ ## answer ## ]]" in response.text:
            return response
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant("Here is an idea: first"),
                             finish_reason="length", usage=response.usage)


def test_an_unparsed_proposal_keeps_the_programs_instruction_and_says_so(caplog):
    """Stock MIPROv2 fails the whole run on one such answer (seen on the embedded model at max_tokens 150)."""
    program = dspy.Predict("question -> answer")
    program.set_lm(dspy.LM("scripted", engine=Rambling(), cache=False, max_tokens=150))
    original = program.signature.instructions
    with caplog.at_level("WARNING", logger="engine.steps.mipro"):
        tuned = MIPROStep(metric, auto=None, num_candidates=2, num_threads=4, max_bootstrapped_demos=1,
                          max_labeled_demos=1).compile(program, trainset=data(8), valset=data(6, 100), num_trials=2,
                                                       minibatch=False, program_aware_proposer=False,
                                                       data_aware_proposer=False)
    assert tuned.signature.instructions == original
    assert any("instruction proposals did not parse" in r.getMessage() for r in caplog.records)
