"""Serve a real run dir over real HTTP: Ray Serve on CPU, vLLM-CPU, the run's LoRA adapter.

The run dir is the session's SmolLM2-135M Iris run (``p -> w -> p``, shared with the run tests); of
its steps on the fine-tuned LM (``02_w``, ``03_p``) the one with the best valset score is served,
whatever won, so the LM deployment runs the LoRA adapter and some answers parse. Every route is
called with an HTTP client (and the OpenAI SDK); answers are checked against the same program
and LM called in process on a separate pool (greedy decoding: identical outputs).
"""

from concurrent.futures import ThreadPoolExecutor

import dspy
import httpx
import pytest

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.dspy_side.provider import pool_lm
from engine.adapters.registry import make_adapter, stop_for
from engine.store.run_store import RunStore
from programs import iris
from serve.app import ServeConfig, start, stop
from serve.winner import build_program, load_winner
from tests.integration.ports import free_port

pytestmark = pytest.mark.integration

TOKEN = "test-token"


@pytest.fixture(scope="module")
def run_dir(iris_smollm2_run):
    """The session's SmolLM2 run (p -> w -> p on Iris), shared with the run tests."""
    assert iris_smollm2_run.returncode == 0, iris_smollm2_run.out[-3000:]
    return iris_smollm2_run.run_dir


@pytest.fixture(scope="module")
def step(run_dir):
    """The best step on the fine-tuned LM (ties: the earlier)."""
    tuned = [r for r in RunStore(run_dir).steps() if r.adapters]
    assert [r.name for r in tuned] == ["02_w", "03_p"]
    return max(tuned, key=lambda r: (r.score, -r.index)).name


@pytest.fixture(scope="module")
def server(ray_session, run_dir, step):
    cfg = ServeConfig(run_dir=str(run_dir), step=step, port=free_port(), token=TOKEN)
    start(cfg)
    yield cfg
    stop(cfg)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def local(server, run_dir, step):
    """The served program and LM in process, on a pool of its own (the server holds the other core)."""
    winner = load_winner(run_dir, step)
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model=winner.base_model, max_model_len=winner.max_model_len,
                                                        num_cpus=1, max_lora_rank=winner.max_lora_rank),
                                  num_replicas=1, name="serve-check"))
    pool.launch()
    for name, path in winner.adapters.items():
        pool.load_adapter(name, path)
    program = build_program(winner)
    program.set_lm(pool_lm(pool, winner.model, max_tokens=winner.max_tokens, stop=stop_for(winner.adapter), cache=False))
    yield winner, program, pool
    pool.kill()


def _in_process(program, inputs, adapter):
    with dspy.context(adapter=make_adapter(adapter)):
        try:
            prediction = program(**inputs)
        except Exception as exc:  # a parse failure in process must be a 502 over HTTP
            return type(exc).__name__
    return {"reasoning": prediction.reasoning, "answer": prediction.answer}


def test_the_fine_tuned_step_is_served_with_its_adapter(http, run_dir, step):
    winner = load_winner(run_dir, step)
    assert winner.strategy in ("p -> w", "p -> w -> p") and winner.model.startswith("smollm2-135m-instruct:ft-02-")
    assert list(winner.adapters) == [winner.model]
    info = http.get("/v1/program").json()
    assert info["model"] == winner.model and info["program_version"] == winner.version
    assert info["validation_score"] == winner.score and info["strategy"] == winner.strategy
    assert info["test_score"] == winner.test["score"] and info["test_examples"] == 12
    assert set(info["input_schema"]["required"]) == {"petal_length", "petal_width", "sepal_length", "sepal_width"}
    assert "answer" in info["output_schema"]["properties"]


def test_predict_matches_the_program_in_process(http, local):
    """Calls go out concurrently, in process and over HTTP (the engines batch them, as in production)."""
    winner, program, _ = local
    examples = iris.load_splits(0).test[:8]
    inputs = [ex.inputs().toDict() for ex in examples]
    with ThreadPoolExecutor(2 * len(inputs)) as threads:  # both engines busy at once
        local_calls = [threads.submit(_in_process, program, x, winner.adapter) for x in inputs]
        http_calls = [threads.submit(http.post, "/v1/predict", json=x) for x in inputs]
        expected, responses = [f.result() for f in local_calls], [f.result() for f in http_calls]
    parsed = [i for i, e in enumerate(expected) if not isinstance(e, str)]
    assert parsed, f"no answer of the served program parsed, in process either: {expected}"
    for i, r in enumerate(responses):
        if i not in parsed:  # the model's answer did not parse, in process too
            assert r.status_code == 502 and r.json()["request_id"], r.text
            continue
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["outputs"] == expected[i]
        assert body["model"] == winner.model and body["program_version"] == winner.version
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    batch = http.post("/v1/predict", json=[inputs[i] for i in parsed])
    assert batch.status_code == 200, batch.text
    assert [r["outputs"] for r in batch.json()["results"]] == [expected[i] for i in parsed]
    assert batch.json()["usage"]["completion_tokens"] > 0


def test_chat_completions_work_with_the_openai_sdk(server, local):
    import openai

    winner, _, pool = local
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN)
    messages = [{"role": "user", "content": "Name a flower."}]
    answer = client.chat.completions.create(model=winner.model, messages=messages, max_tokens=16, temperature=0)
    expected = pool_lm(pool, winner.model, max_tokens=16, cache=False)(messages=messages)[0]
    assert answer.choices[0].message.content == expected
    assert answer.usage.completion_tokens > 0 and answer.model == winner.model


def test_token_bad_inputs_and_health(server, http):
    anon = httpx.Client(base_url=server.url, timeout=60)
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/v1/program").status_code == 401
    assert anon.get("/v1/program", headers={"Authorization": "Bearer wrong"}).status_code == 401
    good = iris.load_splits(0).test[0].inputs().toDict()
    cases = [({k: v for k, v in good.items() if k != "petal_width"}, 422), ({**good, "extra": 1}, 422),
             ({**good, "petal_width": "wide"}, 422), ([], 422)]
    for body, status in cases:
        assert http.post("/v1/predict", json=body).status_code == status, body
    assert http.post("/v1/predict", content=b"x" * 2_000_000,
                     headers={"content-type": "application/json"}).status_code == 413
    r = http.post("/v1/chat/completions", json={"model": "not-served", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["request_id"]
    assert http.get("/healthz").json()["status"] == "ok"
    assert http.get("/docs").status_code == 200
