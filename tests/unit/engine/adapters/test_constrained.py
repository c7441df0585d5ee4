"""ConstrainedChatAdapter: the regex of ChatAdapter's layout, what parses, what reaches the pool (no Ray, no vLLM)."""

import enum
import re
from typing import Literal, Optional

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from actors.dspy_side import client
from engine.adapters.constrained import (ConstrainedChatAdapter, field_budget, fixed_chars, free_text, output_regex,
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
    assert output_regex(IRIS, 100) == (
        r"\[\[ ## reasoning ## \]\]\n(?:[^\[ \t\n\r]|\[[^\[])(?:[^\[]|\[[^\[]){0,99}"
        r"\n\n\[\[ ## answer ## \]\]\n(?:setosa|versicolor|virginica)"
        r"\n\n\[\[ ## completed ## \]\]\n?")
    rx = output_regex(IRIS, 100)
    assert re.fullmatch(rx, _completion(reasoning="Petals are short.\n\nSo: setosa.", answer="setosa"))
    assert not re.fullmatch(rx, _completion(reasoning="Short petals.", answer="rose"))  # not a class
    assert not re.fullmatch(rx, _completion(reasoning="x" * 101, answer="setosa"))  # over the bound
    assert not re.fullmatch(rx, _completion(reasoning="  starts blank", answer="setosa"))


def test_two_str_fields_are_free_text_that_cannot_open_a_header():
    rx = output_regex(TwoStr, 50)
    assert rx == (r"\[\[ ## draft ## \]\]\n" + free_text(50) + r"\n\n\[\[ ## answer ## \]\]\n" + free_text(50)
                  + r"\n\n\[\[ ## completed ## \]\]\n?")
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
    assert re.fullmatch(output_regex(signature, 200), completion)
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


def test_budget_fits_the_completion_in_max_tokens():
    per_field = field_budget(TwoStr, 300)
    assert fixed_chars(TwoStr) + 2 * per_field <= 300 < fixed_chars(TwoStr) + 2 * (per_field + 1)
    longest = _completion(draft="d" * per_field, answer="a" * per_field)
    assert re.fullmatch(output_regex(TwoStr, per_field), longest) and len(longest.rstrip()) <= 300
    assert field_budget(IRIS, 512) == 512 - fixed_chars(IRIS)  # one free field takes all the room
    assert field_budget(dspy.Signature("q -> a: bool"), 64) is None  # nothing free: no bound needed
    with pytest.raises(ValueError, match="raise max_tokens"):
        field_budget(TwoStr, 60)


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
    assert re.fullmatch(ConstrainedChatAdapter().constraint(signature, 512)["regex"], target["content"])


def test_the_regex_is_one_xgrammar_compiles_and_agrees_with_python_re():
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    rx = output_regex(IRIS, 40)
    grammar = xgr.Grammar.from_regex(rx)
    samples = [_completion(reasoning="Short [petals].", answer="setosa"),
               _completion(reasoning="Short [[petals]].", answer="setosa"),
               _completion(reasoning="x" * 41, answer="virginica"),
               _completion(reasoning="ok", answer="rose"),
               _completion(reasoning="ok", answer="versicolor").rstrip()]
    assert [_is_grammar_accept_string(grammar, s) for s in samples] == \
        [bool(re.fullmatch(rx, s)) for s in samples] == [True, False, False, False, True]


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
    assert sent.structured == {"regex": output_regex(IRIS, field_budget(IRIS, 300))}
    assert sent.stop == () and sent.max_tokens == 300


def test_an_lm_that_cannot_decode_under_a_regex_is_refused():
    lm = dspy.LM("other", engine=_Unconstrained("x"), cache=False)
    with dspy.context(lm=lm, adapter=ConstrainedChatAdapter()), pytest.raises(ValueError, match="pool_lm"):
        dspy.Predict(TwoStr)(question="q")


def test_max_field_chars_overrides_the_budget():
    assert ConstrainedChatAdapter(max_field_chars=7).constraint(TwoStr, 4096)["regex"] == output_regex(TwoStr, 7)
    with pytest.raises(ValueError):
        ConstrainedChatAdapter(max_field_chars=0)
