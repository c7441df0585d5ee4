"""The DSPy side of the pool: a ``dspy.LM`` whose calls go to the replicas.

Uses dspy 3.4.1's custom-engine path (``dspy.LM(model, engine=..., async_engine=...)``), so
DSPy keeps owning its cache, retries, ``n`` and history; each engine call is one attempt that
turns a ``dspy.lm15.Request`` into a ``GenerateRequest`` for the router and the ``Completion``
back into a ``dspy.lm15.Response``. Model ids address the base model or an adapter
(``smollm2-135m-instruct`` / ``smollm2-135m-instruct:ft-01``); DSPy's cache key includes the
model id, so a new adapter version never gets the old answers. Errors the request causes map
to lm15's ``InvalidRequestError`` family (not retried); a pool that lost its replicas maps to
``ServerError`` (retried by DSPy). The engines pickle as the pool's name, so a program using
them can be shipped to Ray workers; they save as JSON through ``dump_state``/``load_state``.

Output constraints: a ``response_format`` (what ``dspy.JSONAdapter`` sets: a JSON schema, or
JSON mode) becomes ``structured={"json": schema}``; a Tandem adapter passes any other constraint
(``regex``/``choice``/``grammar``/``json``) as ``lm(..., metadata={STRUCTURED_KEY: {...}})``
(``metadata`` is the one free-form option dspy's chat-request normalization carries, into
``Config.extensions``), or, on a typed ``lm15.Request``, as ``Config.extensions[STRUCTURED_KEY]``.
The engines declare ``supports_response_schema`` and ``supported_params`` (so JSONAdapter sends
its schema) and ``supports_structured_outputs`` (what ``engine.adapters.constrained`` checks).
Does not start or stop replicas.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")  # no model-metadata fetch at import

import dspy  # noqa: E402
from dspy import lm15  # noqa: E402

from actors import errors  # noqa: E402
from actors.inference.router import Router  # noqa: E402
from actors.types import Completion, GenerateRequest  # noqa: E402

DEFAULT_MAX_TOKENS = 512
_FINISH = {"stop": "stop", "length": "length"}
STRUCTURED_KEY = "tandem_structured"  # a constraint's key in Config.extensions or in its "metadata"
TOKEN_IDS_KEY = "tandem_token_ids"  # the response's provider_data: each text's sampled token ids
SUPPORTED_PARAMS = frozenset({"temperature", "max_tokens", "top_p", "stop", "seed", "response_format", "metadata"})


def structured_of(config: lm15.Config) -> dict | None:
    """The output constraint a request's config asks for, in ``GenerateRequest.structured``'s shape.

    Raises:
        LMRequestError: a ``response_format`` and a Tandem constraint both given, or a constraint
            that is not a dict.
    """
    extensions = config.extensions or {}
    metadata = extensions.get("metadata")
    ours = extensions.get(STRUCTURED_KEY)
    if isinstance(metadata, dict) and STRUCTURED_KEY in metadata:
        if ours is not None:
            raise errors.LMRequestError(f"give {STRUCTURED_KEY} once (in extensions or in metadata), not both")
        ours = metadata[STRUCTURED_KEY]
    fmt = config.response_format
    if fmt is not None and ours is not None:
        raise errors.LMRequestError(f"give one output constraint: response_format or {STRUCTURED_KEY}, not both")
    if ours is not None:
        if not isinstance(ours, dict):
            raise errors.LMRequestError(f"{STRUCTURED_KEY} must be a dict like {{'regex': '...'}}, got {ours!r}")
        return dict(ours)
    if fmt is None:
        return None
    if fmt.get("type") == "json_schema":
        return {"json": dict(fmt["schema"])}
    return {"json": {"type": "object"}}  # json_object: any JSON object


def to_generate_request(request: lm15.Request) -> GenerateRequest:
    """A dspy.lm15 chat request as the pool's request type, its output constraint included.

    Raises:
        LMRequestError: a malformed or doubly given constraint (see ``structured_of``).
    """
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    cfg = request.config
    return GenerateRequest(
        model=request.model, messages=tuple(messages),
        temperature=0.0 if cfg.temperature is None else cfg.temperature,
        top_p=1.0 if cfg.top_p is None else cfg.top_p,
        max_tokens=cfg.max_tokens or DEFAULT_MAX_TOKENS, stop=tuple(cfg.stop), seed=cfg.seed,
        structured=structured_of(cfg),
    )


def to_response(completion: Completion) -> lm15.Response:
    """The pool's completion as a dspy.lm15 response (the sampled token ids, when the engine gave them, in
    ``provider_data[TOKEN_IDS_KEY]``: the LM's history keeps them for a GRPO step)."""
    return lm15.Response(
        id=None, model=completion.model, message=lm15.Message.assistant(completion.text),
        finish_reason=_FINISH.get(completion.finish_reasons[0], "error"),
        usage=lm15.Usage(input_tokens=completion.prompt_tokens, output_tokens=completion.completion_tokens),
        provider_data={TOKEN_IDS_KEY: [list(t) for t in completion.token_ids]} if completion.token_ids else None,
    )


def as_lm15_error(exc: Exception) -> Exception:
    message = errors.own_message(exc)
    if isinstance(exc, errors.ContextLengthError):
        return lm15.ContextLengthError(message, provider="tandem")
    if isinstance(exc, errors.UnknownModelError):
        return lm15.UnsupportedModelError(message, provider="tandem")
    if isinstance(exc, errors.LMRequestError):
        return lm15.InvalidRequestError(message, provider="tandem")
    if isinstance(exc, errors.PoolUnavailableError):
        return lm15.ServerError(message, provider="tandem")
    return exc


@contextlib.contextmanager
def lm15_errors():
    """Re-raise the pool's request and availability errors as lm15's (what DSPy retries or not)."""
    try:
        yield
    except (errors.LMRequestError, errors.PoolUnavailableError) as exc:
        raise as_lm15_error(exc) from exc


class PoolEngine:
    """Sync DSPy engine: ``complete(Request) -> Response`` through the pool's router."""

    supports_response_schema = True  # JSONAdapter sends its schema as response_format
    supported_params = SUPPORTED_PARAMS
    supports_structured_outputs = True  # regex/choice/grammar through STRUCTURED_KEY

    def __init__(self, router: Router):
        self.router = router

    def complete(self, request: lm15.Request) -> lm15.Response:
        with lm15_errors():
            return to_response(self.router.submit(to_generate_request(request)))

    def close(self) -> None:
        """Nothing to close: the pool owns the replicas."""

    def dump_state(self) -> dict:
        return {"pool": self.router.pool_name, "namespace": self.router.namespace}

    @classmethod
    def load_state(cls, state: dict) -> "PoolEngine":
        return cls(Router(state["pool"], state.get("namespace")))

    def __deepcopy__(self, memo) -> "PoolEngine":
        return self


class AsyncPoolEngine(PoolEngine):
    """Async DSPy engine: ``await complete(Request)`` without blocking the event loop."""

    async def complete(self, request: lm15.Request) -> lm15.Response:  # type: ignore[override]
        with lm15_errors():
            return to_response(await self.router.asubmit(to_generate_request(request)))

    async def aclose(self) -> None:
        """Nothing to close: the pool owns the replicas."""


def router_lm(router: Router, model: str, **kwargs) -> dspy.LM:
    """A ``dspy.LM`` whose calls go to ``router``'s replicas (no provider unless ``provider=`` is given:
    ``actors.dspy_side.provider.pool_lm`` is the one that gives a pool's LM its provider).

    Args:
        router: the pool's router (``pool.router``, or ``Router(pool_name)``).
        model: the base model id or an adapter name.
        **kwargs: more ``dspy.LM`` arguments (``temperature``, ``max_tokens``, ``cache``,
            ``num_retries``, ``provider`` …).

    Returns:
        A ``dspy.LM`` whose calls run on the pool's replicas (greedy, ``DEFAULT_MAX_TOKENS`` unless set).

    Example:
        >>> lm = router_lm(Router("run"), "tiny-llama")  # doctest: +SKIP
        >>> dspy.Predict("question -> answer", lm=lm)(question="2 + 2?")  # doctest: +SKIP
    """
    kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    kwargs.setdefault("temperature", 0.0)
    return dspy.LM(model, engine=PoolEngine(router), async_engine=AsyncPoolEngine(router), **kwargs)
