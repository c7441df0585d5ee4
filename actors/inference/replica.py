"""``LMReplica``: one Ray actor holding one inference engine (vLLM's async engine by default).

Knows: building its engine lazily on the first call (so a Ray restart of the actor rebuilds it
and reloads the pool's adapters), validating requests and adapters with errors that name the
problem, the model-id → adapter map (one name and int id per adapter version, never reused),
and per-replica statistics. Many calls run at once on the actor's event loop; the engine batches
them. Does not know routing, other replicas, or DSPy.

A dead engine ends the replica's process: when the engine raises ``EngineDeadError`` (a call
reached vLLM after its EngineCore process died), or its optional ``dead`` attribute turns true
(checked every second and by ``health()``), the replica shuts down what is left of the engine,
kills its own child processes and calls ``os._exit(1)`` without answering. Ray sees a worker that
died (not ``exit_actor()``'s intended exit), restarts the actor (``max_restarts``), and the new
process builds a new engine and reloads the pool's adapters; every call in flight, the one that
met the dead engine included, fails in its caller as ``RayActorError``, which the router treats
as a lost replica and re-sends. Outside a Ray actor (a plain object in a test) the replica drops
the engine and raises ``EngineDeadError`` instead; the next call builds a new engine.

The class is plain Python; ``actors.inference.pool`` wraps it with ``ray.remote``. Tests inject a scripted
engine with ``engine_factory`` instead of patching.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Callable, NoReturn

from actors.inference import adapter_files
from actors.config import ReplicaConfig
from actors.inference.watchdog import kill_children
from actors.errors import AdapterError, ContextLengthError, EngineAbortedError, EngineDeadError, UnknownModelError
from actors.types import Adapter, Completion, Engine, GenerateRequest

ABORTED = ("abort", "error")  # vLLM finish reasons that mean "no answer"
logger = logging.getLogger(__name__)

EngineFactory = Callable[[ReplicaConfig, str], Engine]
ENGINE_CHECK_S = 1.0  # how often a replica looks at its engine's ``dead`` flag


def vllm_factory(cfg: ReplicaConfig, model_path: str) -> Engine:
    """The default engine: vLLM's AsyncLLM."""
    from actors.inference.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, model_path)


class LMReplica:
    """One engine behind an async Ray actor.

    Args:
        cfg: the replica config.
        rank: the replica's index in its pool (picks its CPU cores on the CPU path).
        state_name: name of the pool's state actor, whose adapters are reloaded after a restart.
        engine_factory: builds the engine from (cfg, local model path); default vLLM.

    Example:
        >>> replica = ray.remote(LMReplica).remote(ReplicaConfig(model="tiny-llama"), 0)  # doctest: +SKIP
        >>> ray.get(replica.generate.remote(GenerateRequest("tiny-llama", prompt="Hi")))  # doctest: +SKIP
    """

    def __init__(self, cfg: ReplicaConfig, rank: int, state_name: tuple[str, str] | None = None,
                 engine_factory: EngineFactory | None = None):
        self.cfg, self.rank = cfg, rank
        self._state_name = state_name
        self._factory = engine_factory or vllm_factory
        self._engine: Engine | None = None
        self._retired: Engine | None = None  # the engine ``shutdown()`` stopped on purpose
        self._engine_check: asyncio.Task | None = None
        self._start_lock = asyncio.Lock()
        self._adapters: dict[str, Adapter] = {}
        self._next_adapter_id = 1
        self._started = time.time()
        self._inflight = 0
        self._progress_at = time.monotonic()  # the last time a request finished, or work began after none was in flight
        self._counts = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._latencies: deque[float] = deque(maxlen=10_000)

    async def _ensure_engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        async with self._start_lock:
            if self._engine is None:
                from actors import models

                started = time.perf_counter()
                self._engine = self._factory(self.cfg, models.resolve(self.cfg.model))
                logger.info("replica %d: engine for %s up in %.1fs", self.rank, self.cfg.model,
                            time.perf_counter() - started)
                if hasattr(self._engine, "dead"):
                    self._engine_check = asyncio.get_running_loop().create_task(self._check_engine(self._engine))
                for adapter in await self._pool_adapters():
                    await self._add(adapter.name, adapter.path, adapter.files)
        return self._engine

    async def _check_engine(self, engine: Engine) -> None:
        """Notice an engine that died between calls (no request has to meet it first)."""
        while self._engine is engine:
            if engine.dead:
                try:
                    self._engine_lost(engine, "found dead by the replica's engine check")
                except EngineDeadError:  # not in a Ray actor: the engine was dropped; stop checking
                    return
            await asyncio.sleep(ENGINE_CHECK_S)

    def _engine_lost(self, engine: Engine, why: str) -> NoReturn:
        """The engine is gone for good: end this process so Ray restarts the replica (see module doc)."""
        if engine is self._retired:  # shut down on purpose (the pool is stopping this replica): no restart
            raise EngineDeadError(f"replica {self.rank}: the engine was shut down")
        in_actor = _in_ray_actor()
        logger.error("replica %d (pid %d): engine dead (%s); %s", self.rank, os.getpid(), why,
                     "exiting so that Ray restarts this replica" if in_actor else "dropping it")
        if self._engine is engine:  # not yet dropped by another call that met the dead engine
            self._engine = None
            _shutdown_quietly(engine)
        if in_actor:
            kill_children()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(1)  # not exit_actor(): Ray restarts only an actor whose process died
        raise EngineDeadError(f"replica {self.rank}: the engine died ({why})")

    async def _pool_adapters(self) -> list[Adapter]:
        if self._state_name is None:
            return []
        import ray

        name, namespace = self._state_name
        try:
            state = ray.get_actor(name, namespace=namespace)
        except ValueError:  # the pool is gone (killed while this replica restarted)
            return []
        return await state.adapters.remote()

    async def health(self) -> dict:
        """Build the engine if needed; return who and where this replica is.

        Raises:
            EngineDeadError: outside a Ray actor, when the engine is dead (inside one, the
                process exits and the caller gets ``RayActorError``).
        """
        engine = await self._ensure_engine()
        if getattr(engine, "dead", False):
            self._engine_lost(engine, "found dead by health()")
        stalled = time.monotonic() - self._progress_at
        if self._inflight and stalled > self.cfg.hung_after_s:  # e.g. an EngineCore stopped (SIGSTOP, a wedged kernel)
            self._engine_lost(engine, f"hung: {self._inflight} request(s) in flight and none finished for "
                                      f"{stalled:.0f} s (hung_after_s={self.cfg.hung_after_s:g})")
        return {"rank": self.rank, "pid": os.getpid(), "model": self.cfg.base_id,
                "adapters": sorted(self._adapters), "max_model_len": engine.max_model_len,
                "inflight": self._inflight}

    def stats(self) -> dict:
        """Requests, errors, tokens in/out, in-flight count and latency percentiles (seconds)."""
        lat = sorted(self._latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {"rank": self.rank, **self._counts, "inflight": self._inflight,
                "uptime_s": time.time() - self._started,
                "latency_p50_s": pct(0.50), "latency_p90_s": pct(0.90), "latency_p99_s": pct(0.99)}

    async def generate(self, request: GenerateRequest) -> Completion:
        """Run one request; the engine batches it with every other request in flight.

        Raises:
            UnknownModelError: ``request.model`` is neither the base id nor a loaded adapter.
            ContextLengthError: the prompt alone fills the context.
        """
        engine = await self._ensure_engine()
        self._counts["requests"] += 1
        if not self._inflight:
            self._progress_at = time.monotonic()
        self._inflight += 1
        started = time.perf_counter()
        try:
            adapter = self._adapter_for(request.model)
            ids = engine.encode(request)
            room = engine.max_model_len - len(ids)
            if room < 1:
                raise ContextLengthError(
                    f"prompt is {len(ids)} tokens; the context length of {self.cfg.base_id} "
                    f"is {engine.max_model_len} (prompt + completion). Shorten the prompt or raise max_model_len.")
            if request.max_tokens > room:  # answer as far as the context allows; finish_reason says 'length'
                from dataclasses import replace

                request = replace(request, max_tokens=room)
            try:
                texts, finishes, out_tokens, *sampled = await engine.generate(ids, request, adapter,
                                                                              uuid.uuid4().hex)
            except EngineDeadError as exc:
                self._engine_lost(engine, f"generate: {exc}")
            aborted = [f for f in finishes if f in ABORTED]
            if aborted:  # an engine abort is not an answer, however much text it left
                raise EngineAbortedError(f"replica {self.rank}'s engine ended the request with finish reason "
                                         f"{aborted[0]!r}")
        except BaseException:
            self._counts["errors"] += 1
            raise
        finally:
            self._inflight -= 1
            self._progress_at = time.monotonic()
        self._latencies.append(time.perf_counter() - started)
        self._counts["prompt_tokens"] += len(ids)
        self._counts["completion_tokens"] += out_tokens
        return Completion(request.model, tuple(texts), tuple(finishes), len(ids), out_tokens, self.rank,
                          tuple(tuple(t) for t in sampled[0]) if sampled else ())

    def _adapter_for(self, model: str) -> Adapter | None:
        if model == self.cfg.base_id:
            return None
        if model in self._adapters:
            return self._adapters[model]
        served = [self.cfg.base_id, *sorted(self._adapters)]
        raise UnknownModelError(f"model {model!r} is not served by this pool; served ids: {served}")

    async def load_adapter(self, name: str, path: str, files: dict[str, bytes] | None = None) -> Adapter:
        """Load a peft LoRA adapter under ``name``; loading the same name and path again is a no-op.

        Args:
            name: the model id it is served under.
            path: its dir; with ``files`` only where it came from (the files are written here, on this
                node, and loaded from there: ``actors.inference.adapter_files``).
            files: the adapter's files (``adapter_files.pack``), or None to read ``path`` itself.

        Raises:
            AdapterError: LoRA disabled, path missing or not a peft adapter, rank above
                ``max_lora_rank``, or the name already serves another path.
        """
        await self._ensure_engine()
        return await self._add(name, path, files)

    async def _add(self, name: str, path: str, files=None) -> Adapter:
        if files is not None:
            import ray

            if isinstance(files, ray.ObjectRef):  # the pool's record, after a restart
                files = await files
            path = str(adapter_files.materialize(files, path))
        path = str(Path(path).resolve())
        known = self._adapters.get(name)
        if known is not None:
            if known.path != path:
                raise AdapterError(f"adapter name {name!r} already serves {known.path}; "
                                   "give every adapter version its own name")
            return known
        _check_adapter(self.cfg, name, path)
        adapter = Adapter(name, path, self._next_adapter_id)
        self._next_adapter_id += 1
        engine = self._engine
        try:
            await engine.add_adapter(adapter)
        except EngineDeadError as exc:
            self._engine_lost(engine, f"loading adapter {name!r}: {exc}")
        except Exception as exc:
            raise AdapterError(f"engine refused adapter {name!r} at {path}: {exc}") from exc
        self._adapters[name] = adapter
        return adapter

    async def unload_adapter(self, name: str) -> bool:
        """Unload an adapter; returns False if it was not loaded."""
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            return False
        engine = await self._ensure_engine()
        try:
            await engine.remove_adapter(adapter)
        except EngineDeadError as exc:
            self._engine_lost(engine, f"unloading adapter {name!r}: {exc}")
        return True

    def shutdown(self) -> None:
        """Stop the engine (and its processes); the actor can then be killed."""
        engine, self._engine = self._engine, None  # first: the engine check stops watching it
        if engine is not None:
            self._retired = engine  # calls still in flight on it fail; they must not restart the replica
            engine.shutdown()


def _in_ray_actor() -> bool:
    """Whether this code runs inside a Ray actor (where exiting the process means a restart)."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _shutdown_quietly(engine: Engine, timeout_s: float = 10.0) -> None:
    """Shut a dead engine down, waiting at most ``timeout_s``: the process is about to exit anyway."""

    def stop() -> None:
        try:
            engine.shutdown()
        except Exception as exc:
            logger.warning("shutting down the dead engine failed: %s", exc)

    thread = threading.Thread(target=stop, daemon=True, name="dead-engine-shutdown")
    thread.start()
    thread.join(timeout_s)


def _check_adapter(cfg: ReplicaConfig, name: str, path: str) -> None:
    if not cfg.enable_lora:
        raise AdapterError(f"cannot load adapter {name!r}: this pool was launched with enable_lora=False")
    if not name or name == cfg.base_id:
        raise AdapterError(f"adapter name {name!r} is empty or equals the base model id")
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise AdapterError(f"adapter {name!r}: {path} is not a peft adapter dir (no adapter_config.json)")
    if not any((Path(path) / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_model.safetensors")
    try:
        rank = int(json.loads(config.read_text())["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {name!r}: unreadable rank in {config}: {exc}") from exc
    if rank > cfg.max_lora_rank:
        raise AdapterError(f"adapter {name!r} has rank {rank}, above this pool's max_lora_rank="
                           f"{cfg.max_lora_rank}; relaunch with a larger max_lora_rank")


__all__ = ["LMReplica", "vllm_factory"]
