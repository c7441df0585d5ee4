"""``ConstrainedChatAdapter``: DSPy's ChatAdapter whose every completion parses.

Knows the exact layout ``dspy.ChatAdapter`` writes and reads for a signature's output fields::

    [[ ## reasoning ## ]]\\n<value>\\n\\n[[ ## answer ## ]]\\n<value>\\n\\n[[ ## completed ## ]]\\n

and turns it into one regex per call that the pool decodes under (vLLM's structured outputs,
sent as ``actors.dspy_side.client.STRUCTURED_KEY``), so a small or even random model can only write that
layout. Each output field's value pattern follows its annotation: ``Literal[...]`` and ``Enum``
fields become an alternation of their values (a classifier can only answer a class), ``bool``
``True|False``, ``int``/``float`` numerals, ``Optional[X]`` X or ``None``; ``str`` (and every
other type, which is then written and parsed as ChatAdapter does, unchecked) becomes free text
that starts with a visible character and never contains ``[[`` (so it cannot open a header).

Length: free text is unbounded in the grammar (``FREE_TEXT``, a starred element) and its length is
left to the call's ``max_tokens``. A counted bound (``{0,N}``, what this adapter sent before) makes
xgrammar's per-token mask work grow with N — measured with SmolLM2's tokenizer (``benchmarks/
constrained_cost.py``): 12-14 ms per token at N ~ 100, 690-870 ms at N ~ 450, while the starred form
costs 0.004-0.007 ms at any ``max_tokens`` — and vLLM computes the mask for every structured request
at every decode step. The model closes a field whenever it writes the next header; the regex depends
on the signature only, so vLLM's grammar cache compiles it once per signature and reuses it for every
call and budget. A completion cut at ``max_tokens`` before ``[[ ## completed ## ]]`` is reported by
``parse`` as an ``AdapterParseError`` (it names max_tokens), never parsed from a prefix. ``check_room``
refuses a ``max_tokens`` that cannot hold the fixed text and one character per free field. Stop
strings are dropped from the calls this adapter makes (the grammar ends the completion; a
``[[ ## completed ## ]]`` stop string would cut the marker ``parse`` checks). There is no JSONAdapter
fallback: a completion that does not parse is an error.

Fine-tuning rows: ``format_finetune_data`` is ChatAdapter's, unchanged; its assistant message is
the layout above, so a row whose values fit the value patterns (no ``[[`` in free text, a class
for a ``Literal`` field) matches the regex the adapter serves with.

Does not know vLLM or Ray; needs an LM whose engine declares ``supports_structured_outputs``
(a Tandem pool's ``pool_lm``) and refuses others with a ``ValueError``.
"""

from __future__ import annotations

import enum
import re
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import dspy
from dspy.utils.exceptions import AdapterParseError

from actors.dspy_side.client import STRUCTURED_KEY

COMPLETED = "[[ ## completed ## ]]"
_META = set(r"\.^$|?*+()[]{}")
# A free-text element: one character other than "[", or "[" followed by one that is not "[".
_FREE = r"(?:[^\[]|\[[^\[])"
_FREE_FIRST = r"(?:[^\[ \t\n\r]|\[[^\[])"  # the first one is visible (the value is not blank)
FREE_TEXT = f"{_FREE_FIRST}{_FREE}*"  # a free-text value: never blank, never "[[", unbounded (see above)
_INT = r"-?(?:0|[1-9][0-9]{0,18})"
_FLOAT = r"-?(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,16})?(?:e[-+]?[0-9]{1,3})?"


def escape(text: str) -> str:
    """``text`` as a regex matching it literally, in the subset xgrammar and Python's ``re`` share."""
    return "".join("\\n" if c == "\n" else "\\t" if c == "\t" else "\\r" if c == "\r"
                   else "\\" + c if c in _META else c for c in text)


@dataclass(frozen=True)
class ValuePattern:
    """The regex of one output field's value and the most characters it can take (None: free text)."""

    regex: str
    max_chars: int | None


def value_pattern(annotation: Any) -> ValuePattern:
    """The value pattern of an output field annotated ``annotation`` (free text: ``max_chars`` None)."""
    if annotation is bool:
        return ValuePattern("(?:True|False)", 5)
    if annotation is int:
        return ValuePattern(_INT, 20)
    if annotation is float:
        return ValuePattern(_FLOAT, 40)
    if isinstance(annotation, enum.EnumMeta):
        return _alternation([m.value for m in annotation])
    origin = get_origin(annotation)
    if origin is Literal:
        return _alternation(get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)) and args[0] is not str:
            inner = value_pattern(args[0])
            if inner.max_chars is not None:
                return ValuePattern(f"(?:{inner.regex}|None)", max(inner.max_chars, 4))
    return ValuePattern("", None)


def _alternation(values) -> ValuePattern:
    texts = [str(v) for v in values]  # how ChatAdapter writes them (format_field_value)
    return ValuePattern("(?:" + "|".join(escape(t) for t in texts) + ")", max(len(t) for t in texts))


def _header(name: str) -> str:
    return f"[[ ## {name} ## ]]\n"


def fixed_chars(signature: type[dspy.Signature]) -> int:
    """Characters of a completion outside its free-text values (headers, separators, bounded values)."""
    fields = signature.output_fields
    total = sum(len(_header(name)) + (value_pattern(f.annotation).max_chars or 0) for name, f in fields.items())
    return total + 2 * len(fields) + len(COMPLETED) + 1


def check_room(signature: type[dspy.Signature], max_tokens: int) -> None:
    """Check that ``max_tokens`` can hold a completion of ``signature``: its fixed text and at least one
    character per free-text field (one token writes at least one character).

    Raises:
        ValueError: ``max_tokens`` leaves no room for one character per free-text field.
    """
    free = [n for n, f in signature.output_fields.items() if value_pattern(f.annotation).max_chars is None]
    if max_tokens - fixed_chars(signature) < len(free):
        raise ValueError(f"max_tokens={max_tokens} leaves no room for the free-text fields {free} of "
                         f"{signature.__name__} ({fixed_chars(signature)} characters are fixed); raise max_tokens")


def output_regex(signature: type[dspy.Signature]) -> str:
    r"""The regex of a ChatAdapter completion for ``signature``'s output fields, in order.

    Args:
        signature: the (processed) signature whose output fields the completion holds.

    Example:
        >>> print(output_regex(dspy.Signature("question -> answer: bool")))
        \[\[ ## answer ## \]\]\n(?:True|False)\n\n\[\[ ## completed ## \]\]\n?
    """
    parts = []
    for name, field in signature.output_fields.items():
        pattern = value_pattern(field.annotation)
        parts.append(escape(_header(name)) + (pattern.regex if pattern.max_chars is not None else FREE_TEXT))
    parts.append(escape(COMPLETED))
    return escape("\n\n").join(parts) + "\\n?"


class ConstrainedChatAdapter(dspy.ChatAdapter):
    """ChatAdapter that decodes every call under the regex of its signature's output layout.

    Args:
        callbacks: as for ``dspy.ChatAdapter``.

    Example:
        >>> lm = pool_lm(pool, max_tokens=256)  # doctest: +SKIP
        >>> with dspy.context(lm=lm, adapter=ConstrainedChatAdapter()):  # doctest: +SKIP
        ...     dspy.Predict("question -> answer: bool")(question="Is 2 > 1?").answer
        True
    """

    def __init__(self, callbacks=None):
        super().__init__(callbacks=callbacks, use_json_adapter_fallback=False)

    def constraint(self, signature: type[dspy.Signature]) -> dict[str, str]:
        """The constraint sent with every call for ``signature``, whatever its ``max_tokens``: ``{"regex": ...}``."""
        return {"regex": output_regex(signature)}

    def _call_preprocess(self, lm, lm_kwargs: dict[str, Any], signature, inputs):
        signature = super()._call_preprocess(lm, lm_kwargs, signature, inputs)
        if not getattr(getattr(lm, "engine", None), "supports_structured_outputs", False):
            raise ValueError(f"ConstrainedChatAdapter needs an LM that decodes under a regex (a Tandem pool's "
                             f"pool_lm); {getattr(lm, 'model', lm)!r} does not declare supports_structured_outputs")
        lm_settings = getattr(lm, "kwargs", {}) or {}
        metadata = dict(lm_kwargs.get("metadata") or lm_settings.get("metadata") or {})
        metadata[STRUCTURED_KEY] = self.constraint(signature)
        lm_kwargs["metadata"] = metadata
        lm_kwargs["stop"] = None  # the grammar ends the completion, after the marker parse checks
        return signature

    def parse(self, signature: type[dspy.Signature], completion: str) -> dict[str, Any]:
        """ChatAdapter's parse, after checking that the completion is the whole layout.

        Raises:
            AdapterParseError: the completion does not end with ``[[ ## completed ## ]]`` in the
                layout (it was cut at ``max_tokens``, or it was not decoded under the constraint).
        """
        if re.fullmatch(output_regex(signature), completion.rstrip()) is None:
            raise AdapterParseError(
                adapter_name=type(self).__name__, signature=signature, lm_response=completion,
                message=f"the completion is not the constrained layout ending in {COMPLETED} (cut at max_tokens? "
                        "raise max_tokens, or ask for shorter free text in the signature's instructions)")
        return super().parse(signature, completion)


__all__ = ["COMPLETED", "FREE_TEXT", "ConstrainedChatAdapter", "ValuePattern", "check_room", "escape", "fixed_chars",
           "output_regex", "value_pattern"]
