"""The drop-in DSPy provider: stock ``dspy.BetterTogether`` + ``dspy.BootstrapFinetune`` on Tandem.

Only ``provider=`` differs from plain dspy code. Real Ray, Ray Train + peft and vLLM-CPU with the
tiny random model; an always-true metric and a lenient parser stand in for a model that can pass.
The ``relaunch`` lifecycle through the provider (dspy kills the LMs at the end, ``launch()`` serves
the adapter again) is the README's provider snippet, run as written by ``tests/integration/test_readme.py``.
"""

import dspy
import pytest

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.dspy_side.provider import TandemProvider
from tests.integration.conftest import Lenient, TwoHops, lora_b_moved, numbers, tiny_train_config

pytestmark = pytest.mark.integration


def test_stock_p_then_w_on_a_two_predictor_program_hot_swaps_through_the_provider(ray_session, tiny_model, tmp_path):
    import json

    import pyarrow.parquet as pq

    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=512, num_cpus=1,
                                                        max_lora_rank=8), num_replicas=1, name="provider-hot"))
    provider = TandemProvider(pool, tiny_train_config(epochs=1), lifecycle="hotswap", adapter_root=tmp_path)
    lm = provider.lm(max_tokens=12, cache=False)
    program = TwoHops()
    program.set_lm(lm)
    metric = lambda example, prediction, trace=None: True  # noqa: E731
    try:
        pool.launch()
        pids = {h["pid"] for h in pool.health()}
        with dspy.context(adapter=Lenient(), lm=lm):  # stock BFRS bootstraps with settings.lm
            result = dspy.BetterTogether(metric=metric).compile(program, trainset=numbers(8), valset=numbers(2),
                                                                strategy="p -> w")
        assert not result.flag_compilation_error_occurred
        best = next(c["program"] for c in result.candidate_programs if c["strategy"] == "p -> w")
        (name,) = {pred.lm.model for pred in best.predictors()}  # both predictors on the one new adapter
        assert name.startswith("tiny-llama:ft-p01-") and pool.launched
        assert {h["pid"] for h in pool.health()} == pids  # hotswap: trained beside the live replica, no restart
        rows = [json.loads(m) for m in pq.read_table(tmp_path / "job-01" / "train.parquet").column("messages").to_pylist()]
        systems = {r[0]["content"] for r in rows}
        assert any("`draft`" in s and "`answer`" not in s for s in systems)  # the draft module's calls
        assert any("`answer`" in s for s in systems)  # and the answer module's
        assert lora_b_moved(provider.trained[name])
        with dspy.context(adapter=Lenient()):
            assert best(question="What is 3 + 1?").answer == "forty two"
        assert pool.stats()[0]["requests"] > 0
        with pytest.raises(ValueError, match="not served by pool 'provider-hot'"):
            best.predictors()[0].lm.copy(model="not-served").launch()
    finally:
        pool.kill()
