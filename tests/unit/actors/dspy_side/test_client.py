"""DSPy client conversions and error mapping, without a pool."""

import pickle

import pytest
from dspy import lm15

from actors import errors
from actors.dspy_side import client
from actors.inference.router import Router
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
    assert resp.provider_data is None  # an engine that gave no token ids
    sampled = client.to_response(Completion("m", ("text",), ("stop",), 5, 2, 0, ((7, 8),)))
    assert sampled.provider_data == {client.TOKEN_IDS_KEY: [[7, 8]]}  # kept in the LM's history for a g step


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

    from actors.dspy_side.client import as_lm15_error
    from actors.errors import UnknownModelError

    remote = RayTaskError("generate", "Traceback (most recent call last):\n  \x1b[31mfile.py pid=12\x1b[0m",
                          UnknownModelError("model 'x' is not served")).as_instanceof_cause()
    converted = as_lm15_error(remote)
    assert isinstance(converted, lm15.UnsupportedModelError)
    assert "model 'x' is not served" in str(converted) and "Traceback" not in str(converted)


# -- output constraints ----------------------------------------------------------------------------

class _Recorder:
    """A dspy custom engine with the pool engine's capabilities; records requests, answers ``text``."""

    supports_response_schema = client.PoolEngine.supports_response_schema
    supported_params = client.PoolEngine.supported_params
    supports_structured_outputs = client.PoolEngine.supports_structured_outputs

    def __init__(self, text):
        self.text, self.requests = text, []

    def complete(self, request):
        self.requests.append(request)
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(self.text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))

    def close(self):
        pass


def test_jsonadapter_response_format_becomes_a_json_schema_constraint():
    import dspy

    engine = _Recorder('{"answer": "setosa", "petals": 2}')
    lm = dspy.LM("tiny", engine=engine, cache=False)
    sig = dspy.Signature("question -> answer: Literal['setosa', 'virginica'], petals: int")
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        assert dspy.Predict(sig)(question="q").answer == "setosa"
    structured = client.to_generate_request(engine.requests[-1]).structured
    schema = structured["json"]
    assert list(structured) == ["json"] and schema["type"] == "object"
    assert schema["properties"]["answer"]["enum"] == ["setosa", "virginica"]
    assert schema["properties"]["petals"]["type"] == "integer" and set(schema["required"]) == {"answer", "petals"}


def test_json_mode_becomes_any_json_object():
    req = client.to_generate_request(_request(response_format={"type": "json_object"}))
    assert req.structured == {"json": {"type": "object"}}
    assert client.to_generate_request(_request()).structured is None


def test_a_tandem_constraint_passes_through_metadata_or_extensions():
    import dspy

    engine = _Recorder("yes")
    lm = dspy.LM("tiny", engine=engine, cache=False)
    lm(messages=[{"role": "user", "content": "q"}], metadata={client.STRUCTURED_KEY: {"choice": ["yes", "no"]}})
    assert client.to_generate_request(engine.requests[-1]).structured == {"choice": ("yes", "no")}
    typed = _request(extensions={client.STRUCTURED_KEY: {"regex": "[0-9]+"}})
    assert client.to_generate_request(typed).structured == {"regex": "[0-9]+"}
    grammar = _request(extensions={"metadata": {client.STRUCTURED_KEY: {"grammar": 'root ::= "a"'}, "x": "y"}})
    assert client.to_generate_request(grammar).structured == {"grammar": 'root ::= "a"'}


@pytest.mark.parametrize("config, match", [
    ({"response_format": {"type": "json_object"}, "extensions": {client.STRUCTURED_KEY: {"regex": "a"}}},
     "response_format or tandem_structured"),
    ({"extensions": {client.STRUCTURED_KEY: {"regex": "a"}, "metadata": {client.STRUCTURED_KEY: {"regex": "b"}}}},
     "not both"),
    ({"extensions": {client.STRUCTURED_KEY: "a+"}}, "must be a dict"),
    ({"extensions": {client.STRUCTURED_KEY: {"regex": "a", "choice": ["a"]}}}, "exactly one of"),
])
def test_conflicting_or_malformed_constraints_are_request_errors(config, match):
    with pytest.raises(errors.LMRequestError, match=match):
        client.to_generate_request(_request(**config))


@pytest.mark.parametrize("structured, match", [
    ("a+", "must be a dict"),
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"ebnf": "root ::= x"}, "exactly one of"),
    ({"regex": ""}, "non-empty string"),
    ({"regex": "a\x00"}, "NUL"),
    ({"grammar": 3}, "non-empty string"),
    ({"choice": "yes"}, "non-empty list"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["yes", ""]}, "non-empty strings"),
    ({"json": "{}"}, "JSON schema dict"),
    ({"json": {"type": object}}, "not JSON-serializable"),
])
def test_generate_request_refuses_a_bad_constraint(structured, match):
    from actors.types import GenerateRequest

    with pytest.raises(errors.LMRequestError, match=match):
        GenerateRequest("m", prompt="x", structured=structured)


def test_generate_request_keeps_a_private_frozen_copy_of_its_constraint():
    from dataclasses import replace

    from actors.types import GenerateRequest

    choices, schema = ["a", "b"], {"type": "object", "properties": {"a": {"type": "integer"}}}
    by_choice = GenerateRequest("m", prompt="x", structured={"choice": choices})
    by_json = GenerateRequest("m", prompt="x", structured={"json": schema})
    choices.append("c")
    schema["properties"]["b"] = {}
    assert by_choice.structured == {"choice": ("a", "b")} and list(by_json.structured["json"]["properties"]) == ["a"]
    assert replace(by_choice, max_tokens=3).structured == by_choice.structured  # the replica's clamp keeps it
    assert pickle.loads(pickle.dumps(by_json)) == by_json  # travels to replicas as is
