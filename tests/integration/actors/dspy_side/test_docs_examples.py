"""The three examples of dspy 3.4.1's ``BetterTogether`` docs, run as written on a Tandem pool.

Each is the docs' code with ``lm`` a ``TandemProvider`` LM (the only change a user makes), plus what stock
dspy itself needs beyond the docs' text: GEPA's ``reflection_lm`` (dspy asserts one; here the pool's LM),
``auto=None, num_candidates=3`` for the second example (as written, dspy 3.4.1's MIPROv2 refuses
``num_trials`` with its default ``auto="light"``: the docs' example fails on any provider) and a trainset /
valset (40 for the second: MIPROv2's default minibatch is 35); the LM is also dspy's default LM (MIPROv2's
prompt model). Sized for a 2,048-token context (MIPROv2's proposal prompts need it; the embedded
SmolLM2's): the docs' MIPROv2 ``max_bootstrapped_demos: 8`` becomes 2. Real Ray, vLLM-CPU, Ray Train + peft; the lenient parser and
a metric that passes the even answers stand in for a model that can answer (half the runs fail, so GEPA
reflects and MIPROv2 and BootstrapFinetune keep only passing traces). Checked: every step ran (no
``flag_compilation_error_occurred``), each strategy's candidate is there, the fine-tuned program is served
by a Tandem adapter on the live replica, and the optimizers' calls went to the pool.
"""

import dspy
import pytest

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.dspy_side.provider import TandemProvider
from tests.integration.conftest import Lenient, numbers, tiny_train_config

pytestmark = pytest.mark.integration


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """Passes the examples whose answer is even (GEPA's five arguments; dspy's other optimizers pass three)."""
    return float(int(gold.answer) % 2 == 0)


@pytest.fixture(scope="module")
def lm(ray_session, tiny_model, tmp_path_factory):
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=2048, num_cpus=1,
                                                        max_lora_rank=8), num_replicas=1, name="docs-examples"))
    provider = TandemProvider(pool, tiny_train_config(epochs=1), lifecycle="hotswap",
                              adapter_root=tmp_path_factory.mktemp("docs-adapters"))
    pool.launch()
    try:
        yield provider.lm(max_tokens=12, cache=False)
    finally:
        pool.kill()


@pytest.fixture(autouse=True)
def _lenient(lm):
    with dspy.context(adapter=Lenient(), lm=lm):
        yield


def _student(lm):
    student = dspy.Predict("question -> answer")
    student.set_lm(lm)
    return student


def _requests(lm) -> int:
    return sum(s["requests"] for s in lm.provider.pool.stats())


def test_gepa_then_bootstrap_finetune(lm):
    from dspy.teleprompt import GEPA, BootstrapFinetune

    before = _requests(lm)
    optimizer = dspy.BetterTogether(
        metric=metric,
        p=GEPA(metric=metric, auto="medium", reflection_lm=lm),
        w=BootstrapFinetune(metric=metric),
    )
    compiled = optimizer.compile(_student(lm), trainset=numbers(8), valset=numbers(4), strategy="p -> w")
    assert not compiled.flag_compilation_error_occurred
    assert {c["strategy"] for c in compiled.candidate_programs} >= {"p", "p -> w"}
    tuned = next(c["program"] for c in compiled.candidate_programs if c["strategy"] == "p -> w")
    assert tuned.lm.model.startswith("tiny-llama:ft-")  # the adapter Tandem trained and hot-loaded
    assert tuned(question="What is 2 + 1?").answer == "forty two"  # served by the live replica
    assert _requests(lm) - before > 100  # GEPA's budget ran on the pool


def test_miprov2_then_bootstrap_finetune_with_compile_args(lm):
    from dspy.teleprompt import MIPROv2, BootstrapFinetune

    optimizer = dspy.BetterTogether(
        metric=metric,
        p=MIPROv2(metric=metric, auto=None, num_candidates=3),  # docs: MIPROv2(metric=metric) (see above)
        w=BootstrapFinetune(metric=metric),
    )
    compiled = optimizer.compile(
        _student(lm), trainset=numbers(8), valset=numbers(40), strategy="p -> w",  # MIPROv2's minibatch is 35
        optimizer_compile_args={"p": {"num_trials": 10, "max_bootstrapped_demos": 2}},  # docs: 8 (2,048 tokens)
    )
    assert not compiled.flag_compilation_error_occurred
    tuned = next(c["program"] for c in compiled.candidate_programs if c["strategy"] == "p -> w")
    assert tuned.lm.model.startswith("tiny-llama:ft-")


def test_miprov2_gepa_miprov2_chain(lm):
    from dspy.teleprompt import GEPA, MIPROv2

    optimizer = dspy.BetterTogether(
        metric=metric,
        mipro=MIPROv2(metric=metric, auto="light"),
        gepa=GEPA(metric=metric, auto="light", reflection_lm=lm),
    )
    compiled = optimizer.compile(_student(lm), trainset=numbers(4), valset=numbers(4),  # stock MIPROv2 bootstraps
                                 strategy="mipro -> gepa -> mipro")                 # one example at a time
    assert not compiled.flag_compilation_error_occurred
    assert {c["strategy"] for c in compiled.candidate_programs} == {"", "mipro", "mipro -> gepa",
                                                                    "mipro -> gepa -> mipro"}
