"""A step whose pool dies for good fails, is not stored, and says why (real Ray, scripted engines)."""

import threading

import dspy
import pytest
import ray

from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
from actors.dspy_side.provider import pool_lm
from actors.inference.scripted import ScriptedEngine
from engine.better_together import BetterTogether
from engine.steps.prompt import PromptStep


class Lenient(dspy.ChatAdapter):
    """The scripted engine answers "ok": read it as the answer field."""

    def parse(self, signature, completion):
        return {name: completion for name in signature.output_fields}


def roomy_engine(cfg, model_path):
    """The scripted engine with room for DSPy's chat prompts (its default context is 64 words)."""
    engine = ScriptedEngine(cfg, model_path)
    engine.max_model_len = 4096
    return engine


def data(n):
    return [dspy.Example(question=f"q{i}", answer="ok").with_inputs("question") for i in range(n)]


@pytest.fixture
def pool(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    connect(num_cpus=2)
    cfg = PoolConfig(replica=ReplicaConfig(model=str(tmp_path / "model"), model_id="base", num_cpus=0.5),
                     num_replicas=2, name="faults", request_retries=1)
    pool = ReplicaPool(cfg, engine_factory=roomy_engine).launch()
    yield pool
    pool.kill()
    ray.shutdown()


def test_a_pool_killed_for_good_mid_step_fails_the_step_and_stores_nothing(pool, tmp_path):
    program = dspy.Predict("question -> answer")
    program.set_lm(pool_lm(pool, cache=False, num_retries=0))
    killed = threading.Event()

    def metric(example, prediction, trace=None):
        if trace is not None and not killed.is_set():  # the prompt step's bootstrap has begun
            killed.set()
            pool.kill()
        return prediction.answer == example.answer

    optimizer = BetterTogether(metric, p=PromptStep(metric, num_candidate_programs=1, num_threads=2))
    with dspy.context(adapter=Lenient()):
        result = optimizer.compile(program, trainset=data(16), valset=data(4), strategy="p",
                                   run_dir=str(tmp_path / "run"), max_errors=3)
    assert killed.is_set()
    assert result.flag_compilation_error_occurred and result.best_strategy == ""
    assert "TooManyErrors" in result.compilation_error and "max_errors=3" in result.compilation_error
    assert (tmp_path / "run" / "00_baseline" / "step.json").is_file()  # scored before the kill: 100 %
    assert result.candidate_programs[0].score == 100.0
    assert not (tmp_path / "run" / "01_p").exists()  # the failed step is not stored as done
