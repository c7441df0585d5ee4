"""A pool of 2 vLLM-CPU replicas on the tiny random Llama: routing, adapters, faults, bad input."""

import json
import re
import threading
import time

import dspy
import psutil
import pytest
import ray

from actors import (AdapterError, ContextLengthError, GenerateRequest, LMRequestError, PoolConfig, ReplicaConfig,
                    ReplicaPool, UnknownModelError)
from actors.dspy_side.provider import pool_lm
from actors.inference.router import wait_healthy
from tests.integration.conftest import make_adapter

pytestmark = pytest.mark.integration
MODEL_ID = "tiny-llama"


@pytest.fixture(scope="module")
def pool(ray_session, tiny_model):
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=512, max_lora_rank=16),
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
    lm = pool_lm(pool, max_tokens=16, cache=False)
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
    via_dspy = pool_lm(pool, model=f"{MODEL_ID}:ft-01", max_tokens=12, cache=False)
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
    with pytest.raises(ContextLengthError, match="context length of tiny-llama is 512"):
        pool.router.submit(GenerateRequest(MODEL_ID, prompt="word " * 800))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        GenerateRequest(MODEL_ID, prompt="x", n=0)
    lm = pool_lm(pool, cache=False, num_retries=3)
    before = sum(s["requests"] for s in pool.stats())
    with pytest.raises(Exception, match="context length"):
        lm("word " * 800)
    assert sum(s["requests"] for s in pool.stats()) - before == 1  # a request error is not retried by DSPy
    assert pool.adapters() == []
    assert pool.router.submit(GenerateRequest(MODEL_ID, prompt="still serving", max_tokens=4)).completion_tokens > 0


def test_sampling_with_n_and_seed(pool):
    req = GenerateRequest(MODEL_ID, prompt="Once upon a time", n=3, temperature=1.0, seed=7, max_tokens=8)
    a, b = pool.router.submit(req), pool.router.submit(req)
    assert len(a.texts) == 3 and a.texts == b.texts  # same seed, same samples on any replica


# -- output constraints (vLLM structured outputs): a random model can only write what the constraint allows --

def _chat(prompt, **kw):
    return GenerateRequest(MODEL_ID, messages=({"role": "user", "content": prompt},), **kw)


def test_regex_constraint_holds_on_a_random_model_and_a_bad_one_is_refused(pool):
    rx = r"(?:yes|no), [0-9]{1,3}\.( [a-z]{1,8}){0,3}"
    out = pool.router.map([_chat(f"question {i}", max_tokens=32, structured={"regex": rx}) for i in range(8)])
    assert all(re.fullmatch(rx, c.text) and c.finish_reasons == ("stop",) for c in out), [c.text for c in out]
    free = pool.router.map([_chat(f"question {i}", max_tokens=32) for i in range(8)])
    assert not any(re.fullmatch(rx, c.text) for c in free)  # unconstrained, the random model writes anything
    with pytest.raises(LMRequestError, match="refused the output constraint regex='\\(yes'"):
        pool.router.submit(_chat("x", structured={"regex": "(yes"}))
    with pytest.raises(LMRequestError, match="refused the output constraint grammar"):
        pool.router.submit(_chat("x", structured={"grammar": "root ::= undefined_rule"}))
    assert pool.router.submit(_chat("still serving", max_tokens=4)).completion_tokens > 0


def test_choice_constraint_answers_one_of_the_choices(pool):
    choices = ["setosa", "versicolor", "virginica"]
    out = pool.router.map([_chat(f"flower {i}", max_tokens=16, temperature=1.0, seed=i, structured={"choice": choices})
                           for i in range(8)])
    assert all(c.text in choices for c in out), [c.text for c in out]


def test_constrained_chat_adapter_answers_are_the_layout_or_cut_at_max_tokens(pool):
    from engine.adapters.constrained import COMPLETED, ConstrainedChatAdapter

    # a ChatAdapter prompt here is ~240-270 tokens; the run's stop string, which the adapter drops
    lm = pool_lm(pool, max_tokens=160, cache=False, stop=("[[ ## completed ## ]]",))
    classes = ("setosa", "versicolor", "virginica")
    classify = dspy.Predict("question -> answer: Literal['setosa', 'versicolor', 'virginica']")
    explain = dspy.ChainOfThought("question -> answer: Literal['setosa', 'versicolor', 'virginica']")
    questions = [f"Petals {i / 2:.1f} cm long: which iris?" for i in range(8)]
    reasoned, cut = [], []
    with dspy.context(lm=lm, adapter=ConstrainedChatAdapter()):
        answers = [classify(question=q).answer for q in questions]
        for q in questions:
            try:
                reasoned.append(explain(question=q))
            except dspy.utils.exceptions.AdapterParseError as exc:  # free text is left to max_tokens
                cut.append(exc)
    assert all(a in classes for a in answers), answers  # nothing free: every answer is a class
    assert all(p.answer in classes and p.reasoning.strip() for p in reasoned)
    assert all("cut at max_tokens" in str(exc) for exc in cut)
    outputs = [(h["outputs"][0], h["usage"]) for h in lm.history]
    assert len(outputs) == 16
    for text, usage in outputs:  # the whole layout, or a completion that ran out of tokens
        assert text.rstrip().endswith(COMPLETED) or usage.get("completion_tokens", usage.get("output_tokens")) == 160, \
            (text, usage)
    print(f"\na random model under the constraint: {len(reasoned)} of 8 ChainOfThought answers closed their "
          f"reasoning within 160 tokens; the last completion:\n{outputs[-1][0]}")
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        with pytest.raises(dspy.utils.exceptions.AdapterParseError):  # unconstrained, the same model: no parse
            classify(question=questions[0])


def test_constrained_free_text_costs_about_what_chat_costs_per_token(pool):
    """A program of three free-text fields under ``constrained`` vs ``chat``, same prompts, same pool:
    wall time per completion token, as a ratio measured here (not a time). A counted bound per field
    made each decode step pay for the grammar (~1.7 ms per token per request at 21 characters a field,
    hundreds of ms at a few hundred: benchmarks/constrained_cost.py)."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.adapters import make_adapter, stop_for

    texts = [f"Report {i}: the river rose {i} cm overnight and the old bridge was closed." for i in range(16)]
    program = dspy.Predict("text -> summary, keywords, title")

    def per_token(adapter: str) -> float:
        lm = pool_lm(pool, max_tokens=150, cache=False, stop=stop_for(adapter))

        def one(text):
            with dspy.context(lm=lm, adapter=make_adapter(adapter)):
                try:
                    program(text=text)
                except dspy.utils.exceptions.AdapterParseError:  # a random model's text: parsed or not, it ran
                    pass

        one(texts[0])  # warm: the grammar compiled and cached
        before = sum(s["completion_tokens"] for s in pool.stats())
        started = time.perf_counter()
        with ThreadPoolExecutor(len(texts)) as ex:
            list(ex.map(one, texts))
        wall = time.perf_counter() - started
        return wall / (sum(s["completion_tokens"] for s in pool.stats()) - before)

    chat, constrained = min(per_token("chat") for _ in range(2)), min(per_token("constrained") for _ in range(2))
    print(f"\nper completion token: chat {chat * 1000:.2f} ms, constrained {constrained * 1000:.2f} ms "
          f"(ratio {constrained / chat:.2f})")
    assert constrained / chat < 2.0


def test_json_schema_response_format_via_jsonadapter_gives_parseable_json(pool):
    lm = pool_lm(pool, max_tokens=160, cache=False)
    # bounded values: a random model writes digits or string characters until max_tokens
    predict = dspy.Predict("question -> answer: Literal['yes', 'no'], sure: bool")
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        preds = [predict(question=f"Is {i} even?") for i in range(4)]
    assert all(p.answer in ("yes", "no") and isinstance(p.sure, bool) for p in preds)
    for text in (h["outputs"][0] for h in lm.history):  # the text itself is JSON, on one line, json.dumps's way
        assert set(json.loads(text)) == {"answer", "sure"} and text == json.dumps(json.loads(text))


def _engine_pids(pid):
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_each_replica_runs_its_model_in_one_engine_process_bound_to_its_own_core(pool):
    """vLLM-CPU would start a worker process below the EngineCore; Tandem runs the model in the
    EngineCore process (one start fewer) and keeps vLLM's binding: replica i's model on core i."""
    affinity = []
    for rank in sorted(pool._replicas):
        below = [p for p in psutil.Process(wait_healthy(pool._replicas[rank][0])["pid"]).children(recursive=True)
                 if "resource_tracker" not in " ".join(p.cmdline())]  # multiprocessing's own helper
        assert len(below) == 1 and "EngineCore" in " ".join(below[0].cmdline()), [p.cmdline() for p in below]
        affinity.append(below[0].cpu_affinity())  # its main thread: the one that runs the model
    assert affinity == [[0], [1]]
    assert len(_greedy(pool, MODEL_ID, PROMPTS)) == len(PROMPTS)


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



def test_evaluator_actors_score_and_trace_as_the_driver_does(pool):
    """Issue 19: the Iris program on 24 test examples, run by the driver's threads and by 2
    evaluator actors on the same replicas: the same answers, scores, traces and LM calls."""
    from actors.dspy_side import usage
    from actors.dspy_side.evaluator import EvaluatorConfig
    from engine.steps.bootstrap import bootstrap
    from engine.adapters.constrained import ConstrainedChatAdapter
    from engine.evaluate import evaluators_of, run_all
    from programs.base import resolve

    spec = resolve("iris")
    examples = spec.splits(0).test[:24]
    # Iris's signature without the chain of thought: a random model's free-text reasoning runs to max_tokens
    # (a parse failure, no prediction), while a Literal answer always parses under the constraint
    program = dspy.Predict(spec.program().predict.signature.delete("reasoning"))
    program.set_lm(pool_lm(pool, max_tokens=120, cache=False))

    def both():
        with usage.metered() as meter:
            runs = run_all([(program, ex) for ex in examples], spec.metric, num_threads=8)
            traces = bootstrap(program, examples[:8], lambda ex, pred, trace=None: True, num_threads=8).traces
        return ([(r.score, r.error, dict(r.prediction)) for r in runs], [t.calls for t in traces],
                meter.costs().lm_calls, meter.costs().completion_tokens)

    with dspy.context(adapter=ConstrainedChatAdapter()):
        here = both()
        with evaluators_of(EvaluatorConfig(count=2, threads=8, num_cpus=0)) as evaluators:
            assert evaluators is not None
            there = both()
    assert there == here
    assert here[2] == 32 and len(here[1]) == 8 and all(e is None for _, e, _ in here[0])
