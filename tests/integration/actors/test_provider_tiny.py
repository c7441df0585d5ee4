"""The drop-in DSPy provider: stock ``dspy.BetterTogether`` + ``dspy.BootstrapFinetune`` on Tandem.

Only ``provider=`` differs from plain dspy code. Real Ray, Ray Train + peft and vLLM-CPU with the
tiny random model; an always-true metric and a lenient parser stand in for a model that can pass.
"""

import dspy
import pytest

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.provider import TandemProvider
from tests.integration.conftest import Lenient, lora_b_moved, numbers, tiny_train_config

pytestmark = pytest.mark.integration


def test_stock_bettertogether_fine_tunes_and_relaunches_through_the_provider(ray_session, tiny_model, tmp_path):
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=512, num_cpus=1,
                                                        max_lora_rank=8), num_replicas=1, name="provider"))
    provider = TandemProvider(pool, tiny_train_config(epochs=1), lifecycle="relaunch", adapter_root=tmp_path)
    program = dspy.Predict("question -> answer")
    program.set_lm(provider.lm(max_tokens=12, cache=False))
    metric = lambda example, prediction, trace=None: True  # noqa: E731
    optimizer = dspy.BetterTogether(
        metric=metric, w=dspy.BootstrapFinetune(metric=metric, train_kwargs={"num_train_epochs": 2}))
    try:
        with dspy.context(adapter=Lenient()):
            result = optimizer.compile(program, trainset=numbers(8), valset=numbers(2), strategy="w")
        assert not result.flag_compilation_error_occurred
        best = next(c["program"] for c in result.candidate_programs if c["strategy"] == "w")
        name = best.lm.model
        assert name.startswith("tiny-llama:ft-p01-")
        assert not pool.launched  # dspy kills the LMs at the end; 'relaunch' really stops the replicas
        assert lora_b_moved(provider.trained[name])
        assert (tmp_path / "job-01" / "train.parquet").is_file()

        best.lm.launch()  # back up, serving the trained adapter
        assert pool.launched and name in pool.adapters()
        with dspy.context(adapter=Lenient()):
            assert best(question="What is 1 + 1?").answer == "forty two"
        assert pool.stats()[0]["requests"] > 0
        base = best.lm.copy(model="not-served")
        with pytest.raises(ValueError, match="not served by pool 'provider'"):
            base.launch()
    finally:
        pool.kill()
