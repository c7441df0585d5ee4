"""A pool of 2 vLLM-CPU replicas on the tiny random Llama: routing, adapters, faults, bad input."""

import threading

import dspy
import psutil
import pytest
import ray

from actors import (AdapterError, ContextLengthError, GenerateRequest, PoolConfig, ReplicaConfig, ReplicaPool,
                    UnknownModelError)
from actors.router import wait_healthy
from tests.integration.conftest import make_adapter

pytestmark = pytest.mark.integration
MODEL_ID = "tiny-llama"


@pytest.fixture(scope="module")
def pool(ray_session, tiny_model):
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=256, max_lora_rank=16),
                     num_replicas=2, name="tiny")
    pool = ReplicaPool(cfg).launch()
    yield pool
    pool.kill()


class Verbatim(dspy.ChatAdapter):
    """Reads the whole completion as each output field."""

    def parse(self, signature, completion):
        return {name: completion.strip() for name in signature.output_fields}


def _greedy(pool, model, prompts, max_tokens=12):
    reqs = [GenerateRequest(model, messages=({"role": "user", "content": p},), max_tokens=max_tokens)
            for p in prompts]
    return [c.text for c in pool.router.map(reqs)]


PROMPTS = ["The capital of France is", "One, two, three,", "def fib(n):", "Iris setosa has petals"]


def test_predict_round_trip_through_the_pool(pool):
    lm = pool.lm(max_tokens=16, cache=False)
    lm("Hello")  # a plain call returns the text
    assert lm.history[-1]["usage"]["prompt_tokens"] > 0
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=lm, adapter=Verbatim()):  # a random model never writes DSPy's field markers
        answer = predict(question="What is 2 + 2?").answer
    assert any("What is 2 + 2?" in str(h["messages"]) for h in lm.history)
    assert answer == lm.history[-1]["outputs"][0].strip()  # the replica's completion came back as the field


def test_concurrent_requests_use_both_replicas(pool):
    before = {s["rank"]: s["requests"] for s in pool.stats()}
    reqs = [GenerateRequest(MODEL_ID, prompt=f"count {i}", max_tokens=8) for i in range(48)]
    out = pool.router.map(reqs)
    assert len(out) == 48 and all(c.completion_tokens > 0 for c in out)
    served = {s["rank"]: s["requests"] - before[s["rank"]] for s in pool.stats()}
    assert sum(served.values()) == 48 and min(served.values()) >= 12


def test_adapter_hot_load_changes_outputs_and_unload_restores(pool, tiny_model, tmp_path):
    base = _greedy(pool, MODEL_ID, PROMPTS)
    assert _greedy(pool, MODEL_ID, PROMPTS) == base  # greedy decoding is repeatable
    path = make_adapter(tiny_model, tmp_path / "a1")
    pool.load_adapter(f"{MODEL_ID}:ft-01", path)
    tuned = _greedy(pool, f"{MODEL_ID}:ft-01", PROMPTS)
    assert tuned != base
    assert _greedy(pool, MODEL_ID, PROMPTS) == base  # the base id still serves the base weights
    via_dspy = pool.lm(model=f"{MODEL_ID}:ft-01", max_tokens=12, cache=False)
    request = dspy.lm15.Request(model=via_dspy.model, messages=(dspy.lm15.Message.user(PROMPTS[0]),),
                                config=dspy.lm15.Config(max_tokens=12, temperature=0))  # a Request ignores lm kwargs
    assert via_dspy(request).text == tuned[0]
    pool.unload_adapter(f"{MODEL_ID}:ft-01")
    with pytest.raises(UnknownModelError):
        pool.router.submit(GenerateRequest(f"{MODEL_ID}:ft-01", prompt="x"))
    assert _greedy(pool, MODEL_ID, PROMPTS) == base


def test_bad_input_fails_clearly_and_pool_keeps_serving(pool, tiny_model, tmp_path):
    with pytest.raises(UnknownModelError, match="'other-model' is not served"):
        pool.router.submit(GenerateRequest("other-model", prompt="x"))
    with pytest.raises(AdapterError, match="rank 32, above this pool's max_lora_rank=16"):
        pool.load_adapter("too-big", make_adapter(tiny_model, tmp_path / "big", rank=32))
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        pool.load_adapter("missing", str(tmp_path / "does-not-exist"))
    with pytest.raises(ContextLengthError, match="context length of tiny-llama is 256"):
        pool.router.submit(GenerateRequest(MODEL_ID, prompt="word " * 400))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        GenerateRequest(MODEL_ID, prompt="x", n=0)
    lm = pool.lm(cache=False, num_retries=3)
    before = sum(s["requests"] for s in pool.stats())
    with pytest.raises(Exception, match="context length"):
        lm("word " * 400)
    assert sum(s["requests"] for s in pool.stats()) - before == 1  # a request error is not retried by DSPy
    assert pool.adapters() == []
    assert pool.router.submit(GenerateRequest(MODEL_ID, prompt="still serving", max_tokens=4)).completion_tokens > 0


def test_sampling_with_n_and_seed(pool):
    req = GenerateRequest(MODEL_ID, prompt="Once upon a time", n=3, temperature=1.0, seed=7, max_tokens=8)
    a, b = pool.router.submit(req), pool.router.submit(req)
    assert len(a.texts) == 3 and a.texts == b.texts  # same seed, same samples on any replica


def _engine_pids(pid):
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_replica_killed_during_batch_answers_all_64(pool):
    victim = pool._replicas[1][0]
    old = wait_healthy(victim)
    orphans = _engine_pids(old["pid"])
    assert orphans  # vLLM's EngineCore runs in a child process
    killed = {}

    def kill_when_busy():  # kill the replica while it has requests in flight
        while ray.get(victim.stats.remote())["inflight"] == 0:
            pass
        killed["inflight"] = ray.get(victim.stats.remote())["inflight"]
        ray.kill(victim, no_restart=False)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    reqs = [GenerateRequest(MODEL_ID, prompt=f"request {i}", max_tokens=24) for i in range(64)]
    out = pool.router.map(reqs)
    killer.join()
    assert killed["inflight"] > 0
    assert len(out) == 64 and all(c.completion_tokens > 0 for c in out)
    new = wait_healthy(victim)  # Ray restarted the replica and it rebuilt its engine
    assert new["pid"] != old["pid"]
    psutil.wait_procs([psutil.Process(p) for p in orphans if psutil.pid_exists(p)], timeout=30)
    assert not [p for p in orphans if psutil.pid_exists(p)], "the killed replica's engine process was orphaned"
