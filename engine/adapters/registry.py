"""The DSPy adapters a run writes prompts and reads answers with, by name: one choice, used alike
by every step, by the training rows of the weight step, by the held-out scoring and by the server.

- ``chat``: DSPy's ChatAdapter (``[[ ## field ## ]]`` sections), no JSON fallback: an answer that
  does not parse is a wrong answer, scored 0.
- ``json``: DSPy's JSONAdapter; the pool decodes under its JSON schema (vLLM structured outputs),
  so the answer is valid JSON of the output fields.
- ``constrained``: ChatAdapter's layout enforced by a regex per call
  (``engine.adapters.constrained.ConstrainedChatAdapter``): every answer parses; ``Literal`` fields can
  only take their values.

Knows the names and the stop string each needs; does not know pools or programs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dspy

ADAPTERS = ("chat", "json", "constrained")
CHAT_STOP = ("[[ ## completed ## ]]",)  # ChatAdapter answers end here: stop instead of running to max_tokens


def make_adapter(name: str) -> dspy.Adapter:
    """A fresh adapter for ``name`` (one of ``ADAPTERS``).

    Raises:
        ValueError: an unknown name (the known ones are listed).
    """
    import dspy  # here: the CLI reads ADAPTERS without importing DSPy

    if name == "chat":
        return dspy.ChatAdapter(use_json_adapter_fallback=False)
    if name == "json":
        return dspy.JSONAdapter()
    if name == "constrained":
        from engine.adapters.constrained import ConstrainedChatAdapter

        return ConstrainedChatAdapter()
    raise ValueError(f"adapter must be one of {list(ADAPTERS)}, got {name!r}")


def check_fits(name: str, program: "dspy.Module", max_tokens: int) -> None:
    """Fail before anything starts when adapter ``name`` cannot answer ``program`` in ``max_tokens``
    (``constrained`` needs room for every output field's header and some text per free field).

    Raises:
        ValueError: names the predictor, the fixed characters and what to raise.
    """
    if name != "constrained":
        return
    from engine.adapters.constrained import check_room

    for pred_name, pred in program.named_predictors():
        try:
            check_room(pred.signature, max_tokens)
        except ValueError as exc:
            raise ValueError(f"adapter 'constrained', predictor {pred_name!r}: {exc} (or use --adapter chat)") from None


def stop_for(name: str) -> tuple[str, ...]:
    """The stop strings of the LM a run with adapter ``name`` calls (none where the answer's end
    is not ChatAdapter's marker, or where a grammar ends it)."""
    return CHAT_STOP if name == "chat" else ()
