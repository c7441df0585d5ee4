"""The HTTP API's contract with scripted program/LM coroutines (no Ray): routes, schemas, status codes."""

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from actors import errors
from actors.dspy_side.client import lm15_errors
from actors.types import Completion
from programs import iris
from serve.api import build_api
from serve.winner import Winner, interface

GOOD = {"petal_length": 1.4, "petal_width": 0.2, "sepal_length": 5.1, "sepal_width": 3.5}


def _ray_error(cause: Exception) -> Exception:
    """The exception a DeploymentHandle raises for ``cause`` raised in a replica (ANSI-coloured remote traceback)."""
    from ray.exceptions import RayTaskError

    tb = ("Traceback (most recent call last):\n  File \"/work/main/actors/replica.py\", line 88, in generate\n"
          f"    raise {type(cause).__name__}(msg)\n\x1b[31m{type(cause).__name__}: {cause}\x1b[0m")
    return RayTaskError("LMServer.generate", tb, cause, proctitle="ray::ServeReplica:tandem:lm", pid=4242,
                        ip="10.0.0.7", actor_repr="<LMServer>", actor_id="a1b2c3").as_instanceof_cause()


def _winner():
    return Winner(Path("/tmp/run"), "iris", "smollm2-135m-instruct", "p -> w", 80.0,
                  {"predict": "smollm2-135m-instruct:ft-02-abc"}, {}, {}, 200, 2048, "v1", Path("/tmp/run/program.json"))


async def _run(inputs):
    if inputs["petal_length"] == 99:
        raise errors.ContextLengthError("prompt is 3000 tokens; the context length is 2048")
    if inputs["petal_length"] == 98:
        from dspy.utils.exceptions import AdapterParseError

        raise AdapterParseError("ChatAdapter", iris.IrisSignature, "garbage")
    if inputs["petal_length"] == 97:
        raise RuntimeError("replica crashed")
    if inputs["petal_length"] == 96:  # what SyncHandleEngine raises for a remote ContextLengthError
        with lm15_errors():
            raise _ray_error(errors.ContextLengthError("prompt is 3000 tokens; the context length is 2048"))
    if inputs["petal_length"] == 95:
        raise _ray_error(RuntimeError("engine died\nsecond line with /secret/path"))
    if inputs["petal_length"] == 94:  # replica loss, as HandleEngine gives up on it: the text names a host and pid
        raise errors.PoolUnavailableError("ActorDiedError: the actor died, ip=10.0.0.7 pid=4242")
    if inputs["petal_length"] == 93:
        from serve.api import RequestTimedOut

        raise RequestTimedOut("no answer within 300 s")
    await asyncio.sleep(0)
    return ({"reasoning": "small petals", "answer": "setosa" if inputs["petal_length"] < 2 else "virginica"},
            {"m": {"prompt_tokens": 10, "completion_tokens": 3}})


async def _chat(request):
    if request.model == "nope":
        raise errors.UnknownModelError("model 'nope' is not served by this pool")
    if request.model == "ray-nope":
        raise _ray_error(errors.UnknownModelError("model 'ray-nope' is not served by this pool"))
    return Completion(request.model, ("hello",) * request.n, ("stop",) * request.n, 7, 2 * request.n, 0)


@pytest.fixture
def client():
    inputs, outputs = interface(iris.Program())
    app = build_api(_winner(), inputs, outputs, {"strategy": "p -> w"}, _run, _chat, token="s3cret",
                    max_body_bytes=2000, max_batch=3)
    return TestClient(app, headers={"Authorization": "Bearer s3cret"})


def test_predict_one_and_batch(client):
    r = client.post("/v1/predict", json=GOOD)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["outputs"] == {"reasoning": "small petals", "answer": "setosa"}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert body["model"] == "smollm2-135m-instruct:ft-02-abc" and body["program_version"] == "v1"
    r = client.post("/v1/predict", json=[GOOD, {**GOOD, "petal_length": 5.0}])
    assert r.status_code == 200
    assert [x["outputs"]["answer"] for x in r.json()["results"]] == ["setosa", "virginica"]
    assert r.json()["usage"]["total_tokens"] == 26


@pytest.mark.parametrize("body, where", [
    ({k: v for k, v in GOOD.items() if k != "sepal_width"}, "sepal_width"),  # missing field
    ({**GOOD, "colour": "blue"}, "colour"),  # extra field
    ({**GOOD, "petal_width": "wide"}, "petal_width"),  # wrong type
    ([], "at least 1"),  # empty list
    ([GOOD] * 4, "at most 3"),  # batch over the limit
])
def test_bad_inputs_are_422_naming_the_problem(client, body, where):
    r = client.post("/v1/predict", json=body)
    assert r.status_code == 422 and where in r.text


def test_failures_map_to_status_codes_with_a_request_id(client):
    cases = {99: 400, 98: 502, 97: 500}
    for length, status in cases.items():
        r = client.post("/v1/predict", json={**GOOD, "petal_length": length}, headers={"x-request-id": f"rid-{length}"})
        assert r.status_code == status, r.text
        assert r.json()["request_id"] == f"rid-{length}" and r.json()["error"]
    assert client.get("/healthz").status_code == 200  # still serving


def test_oversize_body_is_413(client):
    r = client.post("/v1/predict", content=b'{"x": "' + b"a" * 3000 + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than 2000 bytes" in r.json()["error"]


def test_token_is_required_everywhere_but_healthz():
    inputs, outputs = interface(iris.Program())
    app = build_api(_winner(), inputs, outputs, {}, _run, _chat, token="s3cret")
    anon = TestClient(app)
    assert anon.get("/healthz").status_code == 200
    for method, path in [("get", "/v1/program"), ("post", "/v1/predict"), ("get", "/docs"), ("get", "/openapi.json")]:
        assert getattr(anon, method)(path).status_code == 401, path
    wrong = TestClient(app, headers={"Authorization": "Bearer nope"})
    assert wrong.get("/v1/program").status_code == 401


def test_program_route_and_openapi_carry_the_signature(client):
    info = client.get("/v1/program").json()
    assert info["strategy"] == "p -> w"
    assert set(info["input_schema"]["required"]) == set(GOOD)
    assert info["input_schema"]["properties"]["petal_length"]["type"] == "number"
    assert "answer" in info["output_schema"]["properties"]
    spec = client.get("/openapi.json").json()
    assert "PredictInput" in spec["components"]["schemas"]


def test_chat_completions_is_openai_shaped(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "smollm2-135m-instruct:ft-02-abc"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert client.post("/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]}).status_code == 404
    assert client.post("/v1/chat/completions", json={"messages": [], "stream": True}).status_code == 422


def _assert_clean(r, status: int, rid: str, kind: str, message: str) -> None:
    body = r.json()
    assert r.status_code == status, r.text
    assert body == {"error": message, "type": kind, "request_id": rid}
    for leak in ("Traceback", "\x1b[", "pid=", "10.0.0.7", "actor_id", "/work/main", "RayTaskError"):
        assert leak not in r.text, leak


def test_ray_task_errors_answer_with_the_causes_message_and_type(client):
    assert "\x1b[" in str(_ray_error(errors.UnknownModelError("x")))  # what used to reach the body
    r = client.post("/v1/chat/completions", headers={"x-request-id": "rid-404"},
                    json={"model": "ray-nope", "messages": [{"role": "user", "content": "hi"}]})
    _assert_clean(r, 404, "rid-404", "UnknownModelError", "model 'ray-nope' is not served by this pool")
    r = client.post("/v1/predict", json={**GOOD, "petal_length": 96}, headers={"x-request-id": "rid-400"})
    _assert_clean(r, 400, "rid-400", "ContextLengthError", "prompt is 3000 tokens; the context length is 2048")


def test_server_side_failures_say_what_happened_and_the_request_id_only(client, caplog):
    r = client.post("/v1/predict", json={**GOOD, "petal_length": 95}, headers={"x-request-id": "rid-500"})
    _assert_clean(r, 500, "rid-500", "InternalError",
                  "internal error while answering (request id rid-500; the server log has the details)")
    assert "secret" not in r.text and "engine died" not in r.text
    logged = [rec.getMessage() for rec in caplog.records if "rid-500" in rec.getMessage()]
    assert logged and "second line with /secret/path" in logged[0] and "\x1b[" not in logged[0]
    r = client.post("/v1/predict", json={**GOOD, "petal_length": 94}, headers={"x-request-id": "rid-503"})
    _assert_clean(r, 503, "rid-503", "Unavailable",
                  "no LM replica could answer; retry later (request id rid-503; the server log has the details)")
    assert r.headers["retry-after"] and "4242" not in r.text
    r = client.post("/v1/predict", json={**GOOD, "petal_length": 93}, headers={"x-request-id": "rid-504"})
    _assert_clean(r, 504, "rid-504", "Timeout",
                  "no answer within the server's request timeout (request id rid-504; the server log has the details)")


def test_long_messages_are_cut():
    from serve.api import MAX_MESSAGE, _status

    status, message = _status(_ray_error(errors.ContextLengthError("x" * 5000)))
    assert status == 400 and len(message) == MAX_MESSAGE and message.endswith("...")


def _app(ready=None, gate=None, run=_run):
    inputs, outputs = interface(iris.Program())
    return build_api(_winner(), inputs, outputs, {}, run, _chat, ready=ready, gate=gate)


def test_healthz_is_503_naming_the_lm_replicas_until_the_program_can_answer():
    from serve.deployments import lm_readiness

    states = {"STARTING": 2}

    async def ready():
        return lm_readiness(states)

    client = TestClient(_app(ready))
    r = client.get("/healthz")
    assert r.status_code == 503 and r.headers["retry-after"]
    body = r.json()
    assert body["status"] == "starting" and body["lm_replicas_ready"] == 0 and body["lm_replicas"] == 2
    assert body["error"] == "0 of 2 LM replicas ready (replica states: STARTING 2)"
    states.update(RUNNING=1, STARTING=1)  # one replica up (the other still loading): the program can answer
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["lm_replicas_ready"] == 1


def test_healthz_is_503_when_the_readiness_check_itself_fails():
    async def ready():
        raise ConnectionError("controller unreachable")

    r = TestClient(_app(ready)).get("/healthz")
    assert r.status_code == 503
    assert r.json()["error"] == "readiness check failed: ConnectionError: controller unreachable"


def test_lm_readiness_counts_running_replicas_of_those_not_stopping():
    from serve.deployments import lm_readiness

    assert lm_readiness({})["ready"] is False and lm_readiness({})["error"].startswith("0 of 0")
    after_kill = lm_readiness({"RUNNING": 1, "STARTING": 1, "STOPPING": 1})
    assert after_kill["ready"] and (after_kill["lm_replicas_ready"], after_kill["lm_replicas"]) == (1, 2)


def test_draining_refuses_new_requests_with_503_while_the_one_in_flight_finishes():
    """The stop sequence of ``serve.app.stop``: drain (503 + Retry-After for new requests, /healthz
    503 "stopping"), the request already in flight answered 200, drain returns once it is done."""
    import httpx

    from serve.api import Gate

    async def scenario():
        entered, release = asyncio.Event(), asyncio.Event()

        async def held(inputs):  # the request in flight: answers once released
            entered.set()
            await release.wait()
            return await _run(inputs)

        gate = Gate()
        transport = httpx.ASGITransport(app=_app(gate=gate, run=held))
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as http:
            in_flight = asyncio.create_task(http.post("/v1/predict", json=GOOD))
            await entered.wait()
            assert (await http.get("/healthz")).json()["in_flight"] == 1
            drain = asyncio.create_task(gate.drain(grace_s=600))
            await asyncio.sleep(0)  # drain has begun: it waits for the request in flight
            assert gate.draining and not drain.done()
            late = await http.post("/v1/predict", json=GOOD, headers={"x-request-id": "rid-late"})
            health = await http.get("/healthz")
            release.set()
            return await in_flight, late, health, await drain

    first, late, health, drained = asyncio.run(scenario())
    assert first.status_code == 200 and first.json()["outputs"]["answer"] == "setosa", first.text
    assert late.status_code == 503 and late.headers["retry-after"] == "5", late.text
    assert late.json()["type"] == "ServerStopping" and late.json()["request_id"] == "rid-late"
    assert health.status_code == 503 and health.json()["status"] == "stopping"
    assert drained == {"in_flight_at_drain": 1, "left": 0}
