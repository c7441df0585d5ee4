"""Errors a replica or the pool raises for bad requests, with the problem named.

These are raised inside Ray actors; Ray re-raises them in the caller as a subclass of the same
type, so ``except UnknownModelError`` works across the actor boundary. The DSPy client maps them
onto dspy.lm15's error types (not retried) and replica loss onto ``ServerError`` (retried).
``EngineDeadError`` normally never reaches a caller: a replica whose engine died exits its
process so that Ray restarts it, and the caller sees the replica as lost (``RayActorError``).
``own_message`` reads the message of an error that crossed the actor boundary without Ray's
remote traceback (used by the DSPy client and the HTTP API).
"""


class LMRequestError(ValueError):
    """The request itself is wrong; sending it again will not help."""


class UnknownModelError(LMRequestError):
    """The request names a model id that is neither the base model nor a loaded adapter."""


class ContextLengthError(LMRequestError):
    """The prompt does not fit the replica's context length."""


class AdapterError(LMRequestError):
    """A LoRA adapter cannot be loaded: missing files, rank too large, name reused."""


class PoolUnavailableError(RuntimeError):
    """No live replica could answer (all dead, the pool was killed, or no answer in time)."""


class EngineAbortedError(RuntimeError):
    """The engine ended a request without an answer (vLLM's finish reason ``abort`` or ``error``): the
    text so far is not an answer. The router sends the request to another replica."""


class EngineDeadError(RuntimeError):
    """The replica's inference engine is gone for good (vLLM's ``EngineDeadError``: its EngineCore
    process died); only a new engine in a new replica process can serve again."""


def own_exception(exc: BaseException) -> BaseException:
    """The exception a Ray task error wraps (its ``.cause``, duck-typed: no Ray import), all the way in;
    ``exc`` itself when it wraps none."""
    seen: set[int] = set()
    while isinstance(exc.__dict__.get("cause"), BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__dict__["cause"]
    return exc


def own_message(exc: BaseException) -> str:
    """``exc``'s own message: a Ray task error's ``str`` is the whole remote traceback, so the message
    of the exception it wraps is taken instead (``own_exception``)."""
    return str(own_exception(exc))
