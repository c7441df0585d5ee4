"""The served program's LM engines send a call again when its LM replica dies under it."""

import asyncio

import dspy
import pytest
from ray.exceptions import ActorDiedError

from actors.types import Completion
from serve.deployments import RESENDS, HandleEngine, SyncHandleEngine


class _Handle:
    """A DeploymentHandle whose replica dies under the first ``deaths`` calls."""

    def __init__(self, deaths: int):
        self.deaths, self.calls = deaths, 0
        self.generate = self

    def remote(self, request):
        self.calls += 1
        died = self.calls <= self.deaths
        answer = Completion(model=request.model, texts=("ok",), finish_reasons=("stop",), prompt_tokens=3,
                            completion_tokens=1)
        return _Response(died, answer)


class _Response:
    def __init__(self, died: bool, answer: Completion):
        self.died, self.answer = died, answer

    def result(self):
        if self.died:
            raise ActorDiedError()
        return self.answer

    def __await__(self):
        async def get():
            return self.result()
        return get().__await__()


def _lm(handle):
    return dspy.LM("m", engine=SyncHandleEngine(handle), async_engine=HandleEngine(handle), cache=False,
                   num_retries=0)


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_call_whose_replica_died_is_sent_again_and_answered(path):
    handle = _Handle(deaths=RESENDS)
    lm = _lm(handle)
    out = lm("hi") if path == "sync" else asyncio.run(lm.acall("hi"))
    assert out == ["ok"] and handle.calls == RESENDS + 1


@pytest.mark.parametrize("path", ["sync", "async"])
def test_replicas_dying_every_time_is_a_named_unavailability_not_an_internal_error(path):
    handle = _Handle(deaths=100)
    lm = _lm(handle)
    with pytest.raises(Exception) as caught:
        lm("hi") if path == "sync" else asyncio.run(lm.acall("hi"))
    assert handle.calls == RESENDS + 1
    chain, exc = [], caught.value
    while exc is not None:
        chain.append(type(exc).__name__)
        exc = exc.__cause__
    assert "PoolUnavailableError" in chain, chain  # serve.api answers it with 503
