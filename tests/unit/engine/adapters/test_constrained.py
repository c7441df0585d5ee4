"""ConstrainedChatAdapter: the regex of ChatAdapter's layout, what parses, what reaches the pool (no Ray, no vLLM)."""

import enum
import re
from typing import Literal, Optional

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from actors.dspy_side import client
from engine.adapters.constrained import (FREE_TEXT, ConstrainedChatAdapter, check_room, fixed_chars, output_regex,
                                         value_pattern)
from programs.iris import LABELS, IrisSignature
from tests.unit.actors.dspy_side.test_client import _Recorder

IRIS = dspy.ChainOfThought(IrisSignature.with_updated_fields("answer", type_=Literal[LABELS])).predict.signature
STOP = ("[[ ## completed ## ]]",)


class TwoStr(dspy.Signature):
    """Answer with a short draft, then the answer."""

    question: str = dspy.InputField()
    draft: str = dspy.OutputField()
    answer: str = dspy.OutputField()


def _completion(**values) -> str:
    body = "\n\n".join(f"[[ ## {k} ## ]]\n{v}" for k, v in values.items())
    return body + "\n\n[[ ## completed ## ]]\n"


def test_iris_regex_is_free_reasoning_then_one_of_the_classes():
    assert list(IRIS.output_fields) == ["reasoning", "answer"]
    assert output_regex(IRIS) == (
        r"\[\[ ## reasoning ## \]\]\n(?:[^\[ \t\n\r]|\[[^\[])(?:[^\[]|\[[^\[])*"
        r"\n\n\[\[ ## answer ## \]\]\n(?:setosa|versicolor|virginica)"
        r"\n\n\[\[ ## completed ## \]\]\n?")
    rx = output_regex(IRIS)
    assert re.fullmatch(rx, _completion(reasoning="Petals are short.\n\nSo: setosa.", answer="setosa"))
    assert not re.fullmatch(rx, _completion(reasoning="Short petals.", answer="rose"))  # not a class
    assert re.fullmatch(rx, _completion(reasoning="x" * 2000, answer="setosa"))  # no bound: max_tokens is the bound
    assert not re.fullmatch(rx, _completion(reasoning="  starts blank", answer="setosa"))


def test_two_str_fields_are_free_text_that_cannot_open_a_header():
    rx = output_regex(TwoStr)
    assert rx == (r"\[\[ ## draft ## \]\]\n" + FREE_TEXT + r"\n\n\[\[ ## answer ## \]\]\n" + FREE_TEXT
                  + r"\n\n\[\[ ## completed ## \]\]\n?")
    assert "{" not in FREE_TEXT  # no counted repetition: its per-token cost in xgrammar grows with the count
    assert re.fullmatch(rx, _completion(draft="a [list] of [1, 2]", answer="42"))
    assert not re.fullmatch(rx, _completion(draft="see [[ ## answer ## ]]", answer="42"))
    assert not re.fullmatch(rx, _completion(draft="d", answer=""))  # a value is never blank
    assert not re.fullmatch(rx, "[[ ## draft ## ]]\nd\n\n[[ ## answer ## ]]\n42")  # no end marker


@pytest.mark.parametrize("signature, values", [
    (IRIS, {"reasoning": "Petal length 1.4 cm is small.", "answer": "setosa"}),
    (TwoStr, {"draft": "Two plus two.\nIt is four.", "answer": "4"}),
])
def test_a_completion_in_the_regex_parses_into_its_fields(signature, values):
    completion = _completion(**values)
    assert re.fullmatch(output_regex(signature), completion)
    assert dspy.ChatAdapter().parse(signature, completion) == values
    assert ConstrainedChatAdapter().parse(signature, completion) == values


def test_a_completion_cut_before_the_end_marker_is_reported_not_parsed():
    cut = "[[ ## draft ## ]]\nTwo plus two.\n\n[[ ## answer ## ]]\nfo"  # max_tokens ran out in the answer
    assert dspy.ChatAdapter().parse(TwoStr, cut)["answer"] == "fo"  # plain ChatAdapter takes the prefix
    with pytest.raises(AdapterParseError, match="cut at max_tokens"):
        ConstrainedChatAdapter().parse(TwoStr, cut)


class Color(enum.Enum):
    RED = "red"
    DARK_BLUE = "dark blue"


@pytest.mark.parametrize("annotation, good, bad", [
    (bool, ["True", "False"], ["true", "yes"]),
    (int, ["0", "-12", "2024"], ["1.5", "007", ""]),
    (float, ["0.5", "-3", "1e-07", "12.25"], ["1.", ".5", "nan"]),
    (Color, ["red", "dark blue"], ["RED", "blue"]),
    (Literal["a.b", "c+d"], ["a.b", "c+d"], ["axb", "c"]),
    (Optional[int], ["3", "None"], ["none"]),
])
def test_typed_fields_take_only_what_chatadapter_writes_and_parses(annotation, good, bad):
    pattern = value_pattern(annotation)
    assert pattern.max_chars is not None
    sig = dspy.Signature({"q": (str, dspy.InputField()), "out": (annotation, dspy.OutputField())})
    for text in good:
        assert re.fullmatch(pattern.regex, text) and len(text) <= pattern.max_chars
        parsed = dspy.ChatAdapter().parse(sig, _completion(out=text))["out"]  # parses
        written = dspy.adapters.utils.format_field_value(sig.output_fields["out"], parsed)
        assert re.fullmatch(pattern.regex, written)  # and a training row of that value fits the pattern
    for text in bad:
        assert not re.fullmatch(pattern.regex, text)


def test_other_types_are_free_text():
    assert value_pattern(str).max_chars is None and value_pattern(list[str]).max_chars is None
    assert value_pattern(Optional[str]).max_chars is None


def test_max_tokens_must_hold_the_fixed_text_and_a_character_per_free_field():
    check_room(TwoStr, fixed_chars(TwoStr) + 2)
    with pytest.raises(ValueError, match="raise max_tokens"):
        check_room(TwoStr, fixed_chars(TwoStr) + 1)
    check_room(dspy.Signature("q -> a: bool"), fixed_chars(dspy.Signature("q -> a: bool")))  # nothing free


def test_the_regex_is_the_same_at_every_max_tokens_so_the_grammar_is_compiled_once():
    sent = []
    for max_tokens in (150, 512, 4096):
        engine = _Recorder(_completion(draft="d", answer="a"))
        lm = dspy.LM("tiny", engine=engine, cache=False, max_tokens=max_tokens)
        with dspy.context(lm=lm, adapter=ConstrainedChatAdapter()):
            dspy.Predict(TwoStr)(question="q")
        sent += [client.to_generate_request(r).structured for r in engine.requests]
    assert sent == [{"regex": output_regex(TwoStr)}] * 3


@pytest.mark.parametrize("signature, outputs", [
    (IRIS, {"reasoning": "Small petals.", "answer": "setosa"}),
    (TwoStr, {"draft": "Two and two.", "answer": "4"}),
])
def test_finetune_rows_are_in_the_layout_the_adapter_serves(signature, outputs):
    inputs = {k: 1.0 for k in signature.input_fields} if signature is IRIS else {"question": "2 + 2?"}
    constrained = ConstrainedChatAdapter().format_finetune_data(signature, [], inputs, outputs)
    assert constrained == dspy.ChatAdapter().format_finetune_data(signature, [], inputs, outputs)
    target = constrained["messages"][-1]
    assert target["role"] == "assistant" and target["content"] == _completion(**outputs)
    assert re.fullmatch(ConstrainedChatAdapter().constraint(signature)["regex"], target["content"])


def test_the_regex_is_one_xgrammar_compiles_and_agrees_with_python_re():
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    rx = output_regex(IRIS)
    grammar = xgr.Grammar.from_regex(rx)
    samples = [_completion(reasoning="Short [petals].", answer="setosa"),
               _completion(reasoning="Short [[petals]].", answer="setosa"),
               _completion(reasoning="x" * 600, answer="virginica"),
               _completion(reasoning="ok", answer="rose"),
               _completion(reasoning="ok", answer="versicolor").rstrip(),
               _completion(reasoning="ok", answer="versicolor").rstrip()[:-3]]  # cut before the end marker
    assert [_is_grammar_accept_string(grammar, s) for s in samples] == \
        [bool(re.fullmatch(rx, s)) for s in samples] == [True, False, True, False, True, False]


class _Unconstrained(_Recorder):
    """An engine that cannot decode under a regex (a hosted API's, say)."""

    supports_structured_outputs = False


def test_each_call_sends_its_regex_to_the_pool_and_drops_stop_strings():
    engine = _Recorder(_completion(reasoning="Tiny petals.", answer="setosa"))
    lm = dspy.LM("tiny", engine=engine, cache=False, max_tokens=300, stop=STOP)
    with dspy.context(lm=lm, adapter=ConstrainedChatAdapter()):
        pred = dspy.Predict(IRIS)(petal_length=1.4, petal_width=0.2, sepal_length=5.1, sepal_width=3.5)
    assert (pred.reasoning, pred.answer) == ("Tiny petals.", "setosa")
    (request,) = engine.requests
    assert request.config.stop == ()  # the grammar ends the completion after the marker
    sent = client.to_generate_request(request)
    assert sent.structured == {"regex": output_regex(IRIS)}
    assert sent.stop == () and sent.max_tokens == 300


def test_an_lm_that_cannot_decode_under_a_regex_is_refused():
    lm = dspy.LM("other", engine=_Unconstrained("x"), cache=False)
    with dspy.context(lm=lm, adapter=ConstrainedChatAdapter()), pytest.raises(ValueError, match="pool_lm"):
        dspy.Predict(TwoStr)(question="q")

