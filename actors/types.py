"""Typed requests and results that travel between the DSPy client, the router and replicas.

Knows the shape and validity rules of one generation request (chat or completion), including
an optional output constraint (``structured``: a JSON schema, a regex, a list of choices or an
EBNF grammar that every completion must follow), and of its result; a bad value is refused here,
in the caller's process, before anything is sent. Whether a well-formed constraint compiles is
the engine's call (vLLM refuses it with an ``LMRequestError`` naming the problem). Does not know
vLLM, Ray or DSPy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.errors import LMRequestError

FINISH_REASONS = ("stop", "length", "abort", "error")
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GenerateRequest:
    """One request: chat ``messages`` or a raw ``prompt``, for the model id ``model``.

    ``model`` is the pool's base model id or a loaded adapter's name
    (``smollm2-135m-instruct`` / ``smollm2-135m-instruct:ft-01``). ``structured`` constrains
    every completion (vLLM's structured outputs): exactly one of ``{"json": <JSON schema dict>}``,
    ``{"regex": <pattern>}``, ``{"choice": [<str>, ...]}`` or ``{"grammar": <EBNF>}``; it is kept
    as a private copy (``choice`` as a tuple). A completion cut by ``max_tokens`` is a prefix of a
    match only; its finish reason says ``length``.
    """

    model: str
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_p: float = 1.0
    structured: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise LMRequestError("give exactly one of messages= (chat) or prompt= (completion)")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
            if not self.messages:
                raise LMRequestError("messages is empty")
            for m in self.messages:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise LMRequestError(f"each message needs string 'role' and 'content', got {m!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise LMRequestError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise LMRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.n > 1 and self.temperature == 0:
            raise LMRequestError(f"n={self.n} needs temperature > 0 (greedy decoding gives one answer)")
        if not 0 <= self.temperature <= 2:
            raise LMRequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LMRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.structured is not None:
            object.__setattr__(self, "structured", check_structured(self.structured))


def check_structured(structured: Any) -> dict[str, Any]:
    """A valid output constraint, copied: one kind of ``STRUCTURED_KINDS`` with a value of its type.

    Raises:
        LMRequestError: not a mapping, not exactly one known kind, or a value of the wrong type.
    """
    if not isinstance(structured, dict):
        raise LMRequestError(f"structured must be a dict like {{'regex': '...'}}, got {type(structured).__name__}")
    unknown = sorted(set(structured) - set(STRUCTURED_KINDS))
    if unknown or len(structured) != 1:
        raise LMRequestError(f"structured needs exactly one of {list(STRUCTURED_KINDS)}, got {sorted(structured)}")
    (kind, value), = structured.items()
    if kind == "json":
        if not isinstance(value, dict):
            raise LMRequestError(f"structured['json'] must be a JSON schema dict, got {type(value).__name__}")
        try:
            value = json.loads(json.dumps(value))  # a private, JSON-only copy
        except (TypeError, ValueError) as exc:
            raise LMRequestError(f"structured['json'] is not JSON-serializable: {exc}") from exc
    elif kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value.strip():
            raise LMRequestError(f"structured[{kind!r}] must be a non-empty string, got {value!r}")
        if "\x00" in value:
            raise LMRequestError(f"structured[{kind!r}] must not contain a NUL character")
    else:  # choice
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise LMRequestError(f"structured['choice'] must be a non-empty list of strings, got {value!r}")
        if not all(isinstance(c, str) and c for c in value):
            raise LMRequestError(f"structured['choice'] must hold non-empty strings, got {value!r}")
        value = tuple(value)
    return {kind: value}


@dataclass(frozen=True)
class Completion:
    """The answer to one request: ``n`` texts with their finish reasons and token counts, and each text's
    sampled token ids when the engine gave them (``()`` otherwise)."""

    model: str
    texts: tuple[str, ...]
    finish_reasons: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    replica: int = -1
    token_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def text(self) -> str:
        """The first (for n = 1, the only) text."""
        return self.texts[0]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter version served under ``name`` (unique per version) from ``path``."""

    name: str
    path: str
    int_id: int = field(default=0, compare=False)
    files: Any = field(default=None, compare=False, repr=False)  # ObjectRef of ``adapter_files.pack(path)``


class Engine(Protocol):
    """What a replica needs from an inference engine (vLLM's AsyncLLM, or a scripted one)."""

    max_model_len: int

    def encode(self, request: GenerateRequest) -> list[int]:
        """Prompt token ids: the chat template applied to messages, or the raw prompt tokenized."""

    async def generate(
        self, prompt_ids: list[int], request: GenerateRequest, adapter: Adapter | None, request_id: str
    ) -> tuple[list[str], list[str], int] | tuple[list[str], list[str], int, list[list[int]]]:
        """Texts, finish reasons and the total number of completion tokens; optionally, fourth, each text's
        sampled token ids (vLLM's engine gives them: a GRPO learner trains on exactly those tokens)."""

    async def add_adapter(self, adapter: Adapter) -> None:
        """Load an adapter; later requests may name it."""

    async def remove_adapter(self, adapter: Adapter) -> None:
        """Unload an adapter."""

    def shutdown(self) -> None:
        """Stop the engine and free its memory and processes."""
