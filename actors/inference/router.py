"""``Router``: send each request to the least-loaded live replica of a pool; re-send on replica loss.

Knows: the pool's current replicas (read from the pool's state actor, so a router pickled into
another Ray worker finds the replicas of a relaunched pool too), in-flight counts per replica in
this process, and what to do when a replica dies mid-request (its process crashed or was killed,
or it exited because its engine died): mark it down, send the request to another one, and watch
the dead one come back (Ray restarts it; ``max_restarts``). A request with no answer within
``timeout_s`` is cancelled on its replica and handled the same way; every re-send counts against
``retries``, and when they run out ``PoolUnavailableError`` names the last cause (the timeout
included). When every replica is down the router waits for one to answer ``health()`` (up to
``timeout_s``) before sending, since Ray fails calls to a restarting actor after ~2 s rather than
holding them. Errors that the request itself causes (``LMRequestError``) are raised at once and
never retried; so is a lost replica once the process is stopping (``actors.runtime.stopping``: the
pool is being killed on purpose). Does not start or kill replicas (``actors.inference.pool``) and does not know DSPy
(``actors.dspy_side.client``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.errors import EngineAbortedError, PoolUnavailableError
from actors.runtime import stopping
from actors.types import Completion, GenerateRequest

logger = logging.getLogger(__name__)

# ActorDiedError, ActorUnavailableError (restarting), and TimeoutError (no answer in time,
# or a down replica that did not come back in time)
_REPLICA_LOST = (RayActorError, TimeoutError)
_REFRESH_S = 5.0
_COME_BACK_S = 300.0  # how long a lost replica is watched for its restart (a vLLM engine starts in ~30 s)
DEFAULT_TIMEOUT_S = 600.0


def state_actor_name(pool_name: str) -> str:
    """The name of a pool's state actor."""
    return f"tandem-pool:{pool_name}"


def wait_healthy(handle: ray.actor.ActorHandle, timeout_s: float = 900.0) -> dict:
    """Wait until a (possibly restarting) replica answers ``health()``; return its record.

    Raises:
        ray.exceptions.ActorDiedError: the replica is dead for good (no restarts left).
        TimeoutError: it did not come back within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(handle.health.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ActorUnavailableError:  # restarting: the call raced the restart; ask again
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica not healthy after {timeout_s:.0f}s")
            time.sleep(0.5)


async def await_healthy(handle: ray.actor.ActorHandle, timeout_s: float = 900.0) -> dict:
    """``wait_healthy`` for an event loop (no thread held while a replica restarts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncio.wait_for(handle.health.remote(), max(1.0, deadline - time.monotonic()))
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica not healthy after {timeout_s:.0f}s")
            await asyncio.sleep(0.5)


class Router:
    """Routes ``GenerateRequest``s over a pool's replicas.

    Args:
        pool_name: the pool to route to (its state actor is looked up by name).
        namespace: the Ray namespace the pool lives in; default the current one.
        retries: times a request is re-sent after its replica died or did not answer in time.
        timeout_s: seconds one attempt may take before it is cancelled and re-sent elsewhere.

    Example:
        >>> router = Router("default")  # doctest: +SKIP
        >>> router.submit(GenerateRequest("tiny-llama", prompt="Hi", max_tokens=4)).text  # doctest: +SKIP
    """

    def __init__(self, pool_name: str, namespace: str | None = None, retries: int = 3,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.pool_name = pool_name
        self.namespace = namespace or ray.get_runtime_context().namespace
        self.retries = retries
        self.timeout_s = timeout_s
        self._init_local()

    def _init_local(self) -> None:
        self._lock = threading.Lock()
        self._closed = threading.Event()  # set by close(): lost replicas are no longer watched
        self._version = None
        self._replicas: list[tuple[int, ray.actor.ActorHandle]] = []
        self._checked = 0.0
        self._inflight: dict[int, int] = {}
        self._down: set[int] = set()
        self._turn = itertools.count()

    def __getstate__(self) -> dict:
        return {"pool_name": self.pool_name, "namespace": self.namespace, "retries": self.retries,
                "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"timeout_s": DEFAULT_TIMEOUT_S, **state})
        self._init_local()

    # -- replica set -------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Re-read the replica set from the pool's state actor (at most every few seconds)."""
        if not force and time.monotonic() - self._checked < _REFRESH_S:
            return
        try:
            state = ray.get_actor(state_actor_name(self.pool_name), namespace=self.namespace)
        except ValueError:
            raise PoolUnavailableError(f"pool {self.pool_name!r} is not running (killed, or never launched)")
        try:
            version, replicas = ray.get(state.replicas.remote())
        except RayActorError:  # killed between the lookup and the call
            raise PoolUnavailableError(f"pool {self.pool_name!r} is not running (killed)") from None
        with self._lock:
            self._checked = time.monotonic()
            if version != self._version:
                self._version, self._replicas = version, list(replicas)
                self._inflight = {rank: self._inflight.get(rank, 0) for rank, _ in replicas}
                self._down &= set(self._inflight)

    def _pick(self, exclude: set[int]) -> tuple[int, ray.actor.ActorHandle, bool]:
        """The least-loaded replica not in ``exclude`` (live ones first), and whether it is down."""
        self.refresh()
        with self._lock:
            if not self._replicas:
                raise PoolUnavailableError(f"pool {self.pool_name!r} has no replicas")
            candidates = [r for r in self._replicas if r[0] not in exclude and r[0] not in self._down]
            # All marked down: use any of them; the caller waits for it to come back first.
            candidates = candidates or [r for r in self._replicas if r[0] not in exclude] or self._replicas
            turn = next(self._turn)
            n = len(candidates)
            rank, handle = min((candidates[(turn + i) % n] for i in range(n)),
                               key=lambda r: self._inflight.get(r[0], 0))
            self._inflight[rank] = self._inflight.get(rank, 0) + 1
            return rank, handle, rank in self._down

    def _release(self, rank: int) -> None:
        with self._lock:
            if rank in self._inflight:
                self._inflight[rank] -= 1

    def _lost(self, rank: int, handle: ray.actor.ActorHandle, exc: BaseException) -> None:
        if stopping():  # SIGTERM / Ctrl-C: the pool is being killed on purpose, so no re-send and no warning
            raise PoolUnavailableError(f"pool {self.pool_name!r} is stopping (its replica {rank} went with it)") from exc
        logger.warning("replica %d of pool %s lost mid-request (%s: %s); re-sending elsewhere",
                       rank, self.pool_name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        with self._lock:
            if rank in self._down:
                return
            self._down.add(rank)
        try:  # the pool may have been relaunched: pick up its new replicas now
            self.refresh(force=True)
        except PoolUnavailableError:
            pass
        threading.Thread(target=self._watch, args=(rank, handle), daemon=True).start()

    def close(self) -> None:
        """Stop watching lost replicas (the pool was killed); requests still raise as before."""
        self._closed.set()

    def _watch(self, rank: int, handle: ray.actor.ActorHandle, timeout_s: float = _COME_BACK_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._closed.is_set() or not ray.is_initialized():  # the pool or this Ray session is gone
                return
            try:
                wait_healthy(handle, timeout_s=5.0)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    logger.warning("replica %d of pool %s did not come back in %.0fs", rank, self.pool_name,
                                   timeout_s)
                    return
            except RayActorError as exc:  # the call met the old process on its way out, or it is gone for good
                if time.monotonic() > deadline:
                    logger.warning("replica %d of pool %s did not come back: %s", rank, self.pool_name, exc)
                    return  # it stays out of rotation
                time.sleep(1.0)
            except Exception as exc:
                logger.warning("replica %d of pool %s did not come back: %s", rank, self.pool_name, exc)
                return
        logger.info("replica %d of pool %s is back", rank, self.pool_name)
        with self._lock:
            self._down.discard(rank)

    def _exhausted(self, request: GenerateRequest, tried: set[int], last: BaseException) -> PoolUnavailableError:
        return PoolUnavailableError(
            f"request for {request.model!r} failed on replicas {sorted(tried)} of pool "
            f"{self.pool_name!r} after {self.retries} re-sends: {type(last).__name__}: {last}")

    def _timed_out(self, rank: int, ref: ray.ObjectRef) -> TimeoutError:
        try:  # free the replica's engine from a request nobody waits for any more
            ray.cancel(ref)
        except Exception as exc:
            logger.debug("cancelling a timed-out request failed: %s", exc)
        return TimeoutError(f"replica {rank} gave no answer within the request timeout of "
                            f"{self.timeout_s:g}s (PoolConfig.request_timeout_s)")

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> Completion:
        """Answer one request, blocking this thread (safe to call from many threads).

        Raises:
            LMRequestError: the request itself is wrong (never re-sent).
            PoolUnavailableError: every attempt met a lost replica or timed out.
        """
        tried: set[int] = set()
        for _ in range(self.retries + 1):
            rank, handle, down = self._pick(tried)
            try:
                if down:  # every replica is down: wait for this one to be back
                    wait_healthy(handle, self.timeout_s)
                ref = handle.generate.remote(request)
                try:
                    return ray.get(ref, timeout=self.timeout_s)
                except GetTimeoutError:
                    raise self._timed_out(rank, ref) from None
            except _REPLICA_LOST as exc:
                tried.add(rank)
                self._lost(rank, handle, exc)
                last = exc
            except EngineAbortedError as exc:  # the replica lives; its engine gave no answer: ask another
                tried.add(rank)
                last = exc
            finally:
                self._release(rank)
        raise self._exhausted(request, tried, last)

    async def asubmit(self, request: GenerateRequest) -> Completion:
        """Answer one request without blocking the event loop (raises as ``submit``)."""
        tried: set[int] = set()
        for _ in range(self.retries + 1):
            rank, handle, down = await asyncio.to_thread(self._pick, tried)
            try:
                if down:
                    await await_healthy(handle, self.timeout_s)
                ref = handle.generate.remote(request)
                try:
                    return await asyncio.wait_for(ref, self.timeout_s)
                except asyncio.TimeoutError:
                    raise self._timed_out(rank, ref) from None
            except _REPLICA_LOST as exc:
                tried.add(rank)
                self._lost(rank, handle, exc)
                last = exc
            except EngineAbortedError as exc:  # the replica lives; its engine gave no answer: ask another
                tried.add(rank)
                last = exc
            finally:
                self._release(rank)
        raise self._exhausted(request, tried, last)

    def map(self, requests: list[GenerateRequest]) -> list[Completion]:
        """Answer many requests concurrently, in order (a convenience over ``asubmit``)."""

        async def run() -> list[Completion]:
            return list(await asyncio.gather(*(self.asubmit(r) for r in requests)))

        return asyncio.run(run())
