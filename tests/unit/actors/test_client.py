"""DSPy client conversions and error mapping, without a pool."""

import pickle

import pytest
from dspy import lm15

from actors import client, errors
from actors.router import Router
from actors.types import Completion


def _request(**config):
    return lm15.Request(model="base:ft-01", system="Be brief.",
                        messages=(lm15.Message.user("Hi"),), config=lm15.Config(**config))


def test_request_becomes_chat_messages_with_sampling_params():
    req = client.to_generate_request(_request(temperature=0.5, max_tokens=7, stop=("\n",), seed=3))
    assert req.model == "base:ft-01"
    assert req.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert (req.temperature, req.max_tokens, req.stop, req.seed) == (0.5, 7, ("\n",), 3)


def test_unset_sampling_params_get_greedy_defaults():
    req = client.to_generate_request(_request())
    assert req.temperature == 0.0 and req.max_tokens == client.DEFAULT_MAX_TOKENS


def test_completion_becomes_response():
    resp = client.to_response(Completion("m", ("text",), ("length",), 5, 2))
    assert resp.text == "text" and resp.finish_reason == "length"
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (5, 2)


@pytest.mark.parametrize("ours, theirs", [
    (errors.ContextLengthError("long"), lm15.ContextLengthError),
    (errors.UnknownModelError("who"), lm15.UnsupportedModelError),
    (errors.AdapterError("rank"), lm15.InvalidRequestError),
    (errors.PoolUnavailableError("gone"), lm15.ServerError),
])
def test_errors_map_to_lm15_so_dspy_retries_only_server_errors(ours, theirs):
    mapped = client.as_lm15_error(ours)
    assert isinstance(mapped, theirs) and str(ours) in str(mapped)


def test_engine_pickles_and_saves_as_pool_name():
    engine = client.PoolEngine(Router("p1", namespace="ns", retries=2))
    clone = pickle.loads(pickle.dumps(engine))
    assert (clone.router.pool_name, clone.router.namespace, clone.router.retries) == ("p1", "ns", 2)
    assert engine.dump_state() == {"pool": "p1", "namespace": "ns"}
    assert client.PoolEngine.load_state(engine.dump_state()).router.pool_name == "p1"
    import copy
    assert copy.deepcopy(engine) is engine


def test_errors_from_a_replica_keep_their_own_message_not_the_remote_traceback():
    from ray.exceptions import RayTaskError

    from actors.client import as_lm15_error
    from actors.errors import UnknownModelError

    remote = RayTaskError("generate", "Traceback (most recent call last):\n  \x1b[31mfile.py pid=12\x1b[0m",
                          UnknownModelError("model 'x' is not served")).as_instanceof_cause()
    converted = as_lm15_error(remote)
    assert isinstance(converted, lm15.UnsupportedModelError)
    assert "model 'x' is not served" in str(converted) and "Traceback" not in str(converted)
