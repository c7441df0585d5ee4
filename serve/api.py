"""The HTTP API of a served program, as a plain FastAPI app (no Ray: tests can drive it directly).

Routes: ``POST /v1/predict`` (one input object, or a non-empty list of them), ``GET /v1/program``
(signatures as JSON Schema, strategy, validation score, versions), ``POST /v1/chat/completions``
(OpenAI-compatible, non-streaming, on the fine-tuned LM), ``GET /healthz`` (readiness: 200 only once
the caller's ``ready`` check says the program can answer — its LM replicas are up —, else 503 with a
JSON body naming what is not ready), and FastAPI's ``/docs`` + ``/openapi.json`` with
request/response models built from the program's signature. A ``Gate`` counts the requests in
flight and, once draining (the server is stopping), answers every new request 503 with
``Retry-After`` while those in flight finish.
Knows: the request and response models, the status codes (422 bad fields/types/empty list, 413
body over the limit, 401 missing/wrong bearer token on every route but ``/healthz``, 400 an input
the LM cannot take, 404 an unknown model id, 502 an answer that does not parse, 503 no LM replica,
500 anything else). Error bodies are ``{"error", "type", "request_id"}`` (the id Serve puts in
``x-request-id``): the message and type of the root cause, found through ``__cause__`` and the
``.cause`` of Ray's task errors (duck-typed), without ANSI codes, cut to ``MAX_MESSAGE`` characters
and never a traceback; a 500 says only "internal error while answering" with the root cause's type
and first line, the full detail going to the log with the request id. Does not import Ray, Serve or
vLLM: the caller passes ``run_program``, ``chat`` and ``ready`` coroutines. (No ``from __future__ import
annotations`` here: FastAPI reads the routes' annotations, which name models built at run time.)
"""

import asyncio
import hmac
import logging
import re
import time
import traceback
import uuid
from typing import Annotated, Any, Awaitable, Callable, Iterator, Literal, Union

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from actors import errors
from actors.types import Completion, GenerateRequest
from serve.winner import Field, Winner

logger = logging.getLogger(__name__)

MAX_MESSAGE = 500  # characters of an error message in a response body
RETRY_AFTER_S = 5  # Retry-After of a 503 while the server starts or stops
SERVER_SIDE = {  # status -> (type, message) of a failure on the server's side: bodies carry no internals
    500: ("InternalError", "internal error while answering"),
    503: ("Unavailable", "no LM replica could answer; retry later"),
    504: ("Timeout", "no answer within the server's request timeout"),
}


class RequestTimedOut(Exception):
    """The program did not answer within the server's request timeout (504)."""
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_TRACEBACK = "Traceback (most recent call last)"

RunProgram = Callable[[dict], Awaitable[tuple[dict, dict]]]  # inputs -> (outputs, usage)
Chat = Callable[[GenerateRequest], Awaitable[Completion]]
Ready = Callable[[], Awaitable[dict]]  # -> {"ready": bool, ...details for the /healthz body}


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(pydantic.BaseModel):
    """The OpenAI chat-completions fields Tandem honours (others are refused, not ignored)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    model: str | None = None
    messages: Annotated[list[ChatMessage], pydantic.Field(min_length=1)]
    max_tokens: Annotated[int, pydantic.Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, pydantic.Field(ge=1)] | None = None
    temperature: Annotated[float, pydantic.Field(ge=0, le=2)] = 0.0
    top_p: Annotated[float, pydantic.Field(gt=0, le=1)] = 1.0
    n: Annotated[int, pydantic.Field(ge=1, le=16)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: Literal[False] = False
    user: str | None = None


def build_api(winner: Winner, inputs: list[Field], outputs: list[Field], program_info: dict,
              run_program: RunProgram, chat: Chat, *, ready: Ready | None = None, gate: "Gate | None" = None,
              token: str | None = None, max_body_bytes: int = 1_000_000, max_batch: int = 64) -> FastAPI:
    """The FastAPI app for one winning program (see the module docstring).

    Args:
        winner: the run's winner (ids, versions, score).
        inputs, outputs: the program's fields (``serve.winner.interface``).
        program_info: JSON for ``GET /v1/program`` besides the schemas (predictors, instructions…).
        run_program: runs the program on one input dict; returns (outputs, token usage).
        chat: sends one request to the LM (base model or adapter id).
        ready: says whether the program can answer now (``{"ready": bool, ...}``, the rest goes
            into the ``/healthz`` body); None = always ready.
        gate: counts requests in flight and refuses new ones while draining; None = a fresh one.
        token: bearer token required on every route but ``/healthz``; None = open.
        max_body_bytes: larger request bodies get 413.
        max_batch: most inputs in one ``/v1/predict`` list.
    """
    Input = _model("PredictInput", inputs, forbid_extra=True)  # noqa: N806 - a class
    Output = _model("PredictOutput", outputs, forbid_extra=False)  # noqa: N806
    Batch = Annotated[list[Input], pydantic.Field(min_length=1, max_length=max_batch)]  # noqa: N806

    class Usage(pydantic.BaseModel):
        prompt_tokens: int = 0
        completion_tokens: int = 0
        total_tokens: int = 0

    class Prediction(pydantic.BaseModel):
        outputs: Output
        usage: Usage
        model: str
        program_version: str

    class BatchPrediction(pydantic.BaseModel):
        results: list[Prediction]
        usage: Usage
        model: str
        program_version: str

    app = FastAPI(title=f"Tandem: {winner.program}", version=winner.version,
                  description=f"The winning program of run `{winner.run_dir.name}` (strategy "
                              f"`{winner.strategy or 'baseline'}`, validation score {winner.score}"
                              + (f", held-out test score {winner.test['score']} on {winner.test['n']} examples"
                                 if winner.test else "") + ").")

    async def one(item) -> Prediction:
        out, usage = await run_program(item.model_dump())
        return Prediction(outputs=Output(**out), usage=Usage(**_tokens(usage)), model=winner.model,
                          program_version=winner.version)

    @app.post("/v1/predict", response_model=Union[Prediction, BatchPrediction])
    async def predict(body: Union[Input, Batch], request: Request):  # type: ignore[valid-type]
        """Run the program on one input object, or on each object of a list (answers in order)."""
        try:
            if not isinstance(body, list):
                return await one(body)
            results = await asyncio.gather(*(one(item) for item in body))
        except Exception as exc:
            return error_response(request, exc)
        total = {k: sum(getattr(r.usage, k) for r in results) for k in Usage.model_fields}
        return BatchPrediction(results=results, usage=Usage(**total), model=winner.model,
                               program_version=winner.version)

    @app.get("/v1/program")
    async def program() -> dict:
        """The program: input/output JSON Schemas, strategy, validation score, model and versions."""
        return {**program_info, "input_schema": Input.model_json_schema(),
                "output_schema": Output.model_json_schema()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        """OpenAI-compatible chat completion on the run's LM (default: the fine-tuned adapter)."""
        model = body.model or winner.model
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            completion = await chat(GenerateRequest(
                model=model, messages=tuple(m.model_dump() for m in body.messages),
                max_tokens=body.max_completion_tokens or body.max_tokens or winner.max_tokens,
                temperature=body.temperature, top_p=body.top_p, n=body.n, stop=stop, seed=body.seed))
        except Exception as exc:
            return error_response(request, exc)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}
                        for i, (text, finish) in enumerate(zip(completion.texts, completion.finish_reasons))],
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                      "total_tokens": completion.prompt_tokens + completion.completion_tokens},
        }

    gate = gate or Gate()

    @app.get("/healthz")
    async def healthz():
        """Readiness, without a token: 200 once the program can answer (its LM replicas are up),
        503 while they start (the body says how many are ready of how many) or while stopping."""
        base = {"model": winner.model, "program_version": winner.version, "in_flight": gate.in_flight}
        if gate.draining:
            return JSONResponse({**base, "status": "stopping", "error": "the server is stopping"}, 503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            state = dict(await ready()) if ready is not None else {"ready": True}
        except Exception as exc:  # the readiness check itself failed: not ready, and say why
            state = {"ready": False,
                     "error": f"readiness check failed: {type(exc).__name__}: {_message(exc, first_line=True)}"}
        if not state.pop("ready"):
            state.setdefault("error", "the program cannot answer yet")
            return JSONResponse({**base, "status": "starting", **state}, 503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return {**base, "status": "ok", **state}

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if token:
        app.add_middleware(BearerToken, token=token, open_paths=("/healthz",))
    app.add_middleware(GateMiddleware, gate=gate, open_paths=("/healthz",))  # outermost: counts everything
    return app


class Gate:
    """Requests in flight, and draining: once ``drain`` is called new requests get 503 + Retry-After
    while those in flight finish (at most ``grace_s``). One per served app (the ingress replica's)."""

    def __init__(self):
        self.in_flight, self.draining = 0, False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> bool:
        """Count a new request in; False (refuse it) once draining."""
        if self.draining:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, grace_s: float) -> dict:
        """Refuse new requests from now on; wait until none is in flight, or ``grace_s`` seconds.

        Returns:
            ``{"in_flight_at_drain": n, "left": m}`` (``m`` > 0: the grace ran out with m unfinished).

        Example:
            >>> await gate.drain(15.0)  # doctest: +SKIP
            {'in_flight_at_drain': 2, 'left': 0}
        """
        self.draining = True
        at_drain = self.in_flight
        logger.info("draining: %d request(s) in flight, new ones get 503 (grace %.0f s)", at_drain, grace_s)
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except asyncio.TimeoutError:
            logger.warning("drain grace of %.0f s ran out with %d request(s) in flight", grace_s, self.in_flight)
        return {"in_flight_at_drain": at_drain, "left": self.in_flight}


class GateMiddleware:
    """ASGI middleware: counts each HTTP request but ``open_paths`` through the ``Gate``; 503 + Retry-After
    (``{"error", "type": "ServerStopping", "request_id"}``) once it drains."""

    def __init__(self, app, gate: Gate, open_paths: tuple[str, ...] = ()):
        self.app, self.gate, self.open_paths = app, gate, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        if not self.gate.enter():
            rid = dict(scope["headers"]).get(b"x-request-id", b"").decode() or uuid.uuid4().hex
            return await JSONResponse(
                {"error": "the server is stopping and takes no new requests; retry shortly (another replica "
                          "or its restart)", "type": "ServerStopping", "request_id": rid},
                503, headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The JSON error for a failure while answering (no traceback), logged with the request id.

    Args:
        request: the request that failed (its ``x-request-id`` names the error).
        exc: what the program or the LM raised, possibly a Ray task error wrapping the cause.

    Returns:
        ``{"error": message, "type": root cause's class name, "request_id": id}`` with the status; a
        server-side failure (500, 503, 504) says only what happened and the request id — no exception
        text (a Ray error names hosts, pids, paths), which goes to the server log under that id.

    Example:
        >>> error_response(request, errors.UnknownModelError("model 'x' is not served"))  # doctest: +SKIP
    """
    status, message = _status(exc)
    root = _root(exc)
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex
    if status < 500:
        logger.warning("request %s %s -> %d: %s: %s", rid, request.url.path, status, type(root).__name__, message)
    else:
        detail = _ANSI.sub("", "".join(traceback.format_exception(exc)))
        logger.error("request %s %s -> %d: %s", rid, request.url.path, status, detail)
    if status in SERVER_SIDE:
        kind, text = SERVER_SIDE[status]
        return JSONResponse({"error": f"{text} (request id {rid}; the server log has the details)", "type": kind,
                             "request_id": rid}, status,
                            headers={"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None)
    return JSONResponse({"error": message, "type": type(root).__name__, "request_id": rid}, status)


def _model(name: str, fields: list[Field], *, forbid_extra: bool) -> type[pydantic.BaseModel]:
    """A pydantic model with one required field per signature field (its type and description)."""
    spec: dict[str, Any] = {}
    for f in fields:
        annotation = f.annotation if isinstance(f.annotation, type) or hasattr(f.annotation, "__origin__") else Any
        desc = f.desc if f.desc and not f.desc.startswith("${") else None
        spec[f.name] = (annotation, pydantic.Field(..., description=desc))
    config = pydantic.ConfigDict(extra="forbid" if forbid_extra else "ignore", strict=False)
    return pydantic.create_model(name, __config__=config, **spec)


def _tokens(usage: dict) -> dict:
    """dspy's per-LM usage (``{model: {prompt_tokens, completion_tokens, ...}}``) summed over LMs."""
    prompt = sum(int(u.get("prompt_tokens") or 0) for u in usage.values())
    completion = sum(int(u.get("completion_tokens") or 0) for u in usage.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes, outermost first: a Ray task error's ``.cause``, else ``__cause__``/``__context__``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        wrapped = current.__dict__.get("cause")  # RayTaskError (and its dual classes) keep the original here
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__ or current.__context__


def _root(exc: BaseException) -> BaseException:
    return list(_chain(exc))[-1]


def _message(exc: BaseException, *, first_line: bool = False) -> str:
    """``exc``'s own message, safe for a response body: no ANSI codes, no traceback, at most MAX_MESSAGE chars."""
    text = _ANSI.sub("", errors.own_message(exc)).split(_TRACEBACK)[0].strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _status(exc: BaseException) -> tuple[int, str]:
    """HTTP status and response message for a failure while answering (the deepest matching cause's)."""
    from dspy.utils.exceptions import AdapterParseError

    kinds: list[tuple[type[BaseException], int, str]] = [
        (errors.UnknownModelError, 404, ""), (errors.LMRequestError, 400, ""),
        (errors.PoolUnavailableError, 503, "no LM replica could answer: "), (RequestTimedOut, 504, ""),
        (AdapterParseError, 502, "the model's answer did not parse into the program's output fields: "),
    ]
    chain = list(_chain(exc))
    for kind, status, prefix in kinds:
        matches = [e for e in chain if isinstance(e, kind)]
        if matches:
            return status, prefix + _message(matches[-1])
    root, line = chain[-1], _message(chain[-1], first_line=True)
    return 500, f"internal error while answering: {type(root).__name__}" + (f": {line}" if line else "")


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed in chunks)."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyLimit._TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except BodyLimit._TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        rid = dict(scope["headers"]).get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        await JSONResponse({"error": f"request body is larger than {self.max_bytes} bytes",
                            "type": "PayloadTooLarge", "request_id": rid}, 413)(scope, receive, send)


class BearerToken:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every path but ``open_paths`` (401 otherwise)."""

    def __init__(self, app, token: str, open_paths: tuple[str, ...] = ()):
        self.app, self.token, self.open_paths = app, token.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token):
            return await self.app(scope, receive, send)
        rid = dict(scope["headers"]).get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        await JSONResponse({"error": "missing or wrong bearer token", "type": "Unauthorized", "request_id": rid},
                           401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
