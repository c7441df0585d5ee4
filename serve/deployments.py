"""The two Serve deployments of a served run: the LM (vLLM + adapters) and the program (FastAPI ingress).

``LMServer`` wraps the pool's own ``actors.inference.replica.LMReplica`` (one vLLM engine, adapter map,
request validation, stats) so serving and optimizing share one engine wrapper; it loads the run's
adapters at start and answers ``generate(GenerateRequest)``. ``ProgramServer`` rebuilds the
winning program from the run dir (JSON, never a pickle), points each predictor at an LM whose
engine calls ``LMServer`` through a DeploymentHandle, and builds the FastAPI app of
``serve.api`` inside the replica (``__serve_build_asgi_app__``: the routes' models come from the
program's signature, known only once the run dir is read). Any ``dspy.Module`` is served:
``serve.runner.ProgramRunner`` runs a program with its own ``aforward`` on the event loop (the LM's
``HandleEngine`` awaits the handle) and a sync-only ``forward`` program in a bounded pool of worker
threads (``max_threads``; the LM's ``SyncHandleEngine`` blocks on ``.remote(...).result()``, which
Serve allows off the event loop while its router runs in a separate loop — the default; with
``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`` sync-only programs fail). A call whose LM replica dies
under it (``RayActorError``) is sent again, to a live replica, up to ``RESENDS`` times, then fails as
``PoolUnavailableError`` (503), as the optimizer's router does. The program deployment is ready
(``/healthz`` 200) once one LM replica is RUNNING in Serve's status (``lm_readiness``), and drains
(``drain``: new requests 503, those in flight finish) before Serve shuts down. Does not know HTTP
details.
"""

from __future__ import annotations

import asyncio
import logging
import os

import dspy
from dspy import lm15
from ray import serve
from ray.exceptions import RayActorError

from actors.inference import device
from actors.dspy_side.client import SUPPORTED_PARAMS, lm15_errors, to_generate_request, to_response
from actors.config import ReplicaConfig
from actors.errors import PoolUnavailableError, own_message
from actors.inference.replica import LMReplica
from actors.types import Completion, GenerateRequest
from engine.adapters.registry import make_adapter, stop_for
from serve.api import Gate, RequestTimedOut
from serve.runner import DEFAULT_MAX_THREADS, ProgramRunner

logger = logging.getLogger(__name__)
RESENDS = 3  # times a request whose LM replica died is sent again



@serve.deployment(name="lm", max_ongoing_requests=256, health_check_period_s=10)
class LMServer:
    """One vLLM engine serving the base model and the run's adapters."""

    async def __init__(self, cfg: ReplicaConfig, adapters: dict[str, str]):
        rank = serve.get_replica_context().rank.local_rank  # picks this replica's cores on the CPU path
        os.environ.update(device.engine_env(cfg, rank))  # read by vLLM when the engine starts
        self.replica = LMReplica(cfg, rank)
        for name, path in adapters.items():
            await self.replica.load_adapter(name, path)

    async def generate(self, request: GenerateRequest) -> Completion:
        return await self.replica.generate(request)

    async def check_health(self) -> None:
        await self.replica.health()

    def stats(self) -> dict:
        return self.replica.stats()

    def __del__(self):  # Serve calls it when the replica stops: take vLLM's engine process down too
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()


class HandleEngine:
    """DSPy custom engine (async) sending each call to the LM deployment; takes output constraints
    as the pool's engine does (JSON schemas, ``engine.adapters.constrained``'s regexes)."""

    supports_response_schema = True
    supported_params = SUPPORTED_PARAMS
    supports_structured_outputs = True

    def __init__(self, handle):
        self.handle = handle

    async def complete(self, request: lm15.Request) -> lm15.Response:
        with lm15_errors():
            generate = to_generate_request(request)
            for attempt in range(RESENDS + 1):
                try:
                    return to_response(await self.handle.generate.remote(generate))
                except RayActorError as exc:  # its LM replica died: Serve sends it to a live one
                    _lost(attempt, exc)

    async def aclose(self) -> None:
        """Nothing to close: Serve owns the LM replicas."""


class SyncHandleEngine(HandleEngine):
    """The same, for DSPy's sync path (worker threads only: ``.result()`` refuses an event loop)."""

    def close(self) -> None:
        """Nothing to close: Serve owns the LM replicas."""

    def complete(self, request: lm15.Request) -> lm15.Response:  # type: ignore[override]
        with lm15_errors():
            generate = to_generate_request(request)
            for attempt in range(RESENDS + 1):
                try:
                    return to_response(self.handle.generate.remote(generate).result())
                except RayActorError as exc:
                    _lost(attempt, exc)


def _lost(attempt: int, exc: Exception) -> None:
    """A call met a dying LM replica: send it again (greedy decoding: the same answer), or give up
    as ``PoolUnavailableError`` (503) after ``RESENDS`` resends, as the optimizer's router does."""
    if attempt >= RESENDS:
        raise PoolUnavailableError(f"the LM replicas died under this request {RESENDS + 1} times: "
                                   f"{type(exc).__name__}: {own_message(exc)}") from exc
    logger.warning("an LM replica died under a request (%s); sending it again", type(exc).__name__)


def lm_readiness(states: dict[str, int]) -> dict:
    """Whether the LM deployment can answer, from Serve's replica states of it.

    Args:
        states: replica count by state name, e.g. ``{"RUNNING": 1, "STARTING": 1}``.

    Returns:
        ``{"ready": one replica RUNNING or more, "lm_replicas_ready": RUNNING, "lm_replicas": all but
        STOPPING, "lm_replica_states": states}`` (the ``/healthz`` body's details), with ``"error"``
        when not ready.

    Example:
        >>> lm_readiness({"STARTING": 2})["error"]
        '0 of 2 LM replicas ready (replica states: STARTING 2)'
    """
    running = states.get("RUNNING", 0)
    wanted = sum(n for state, n in states.items() if state != "STOPPING")
    out = {"ready": running > 0, "lm_replicas_ready": running, "lm_replicas": wanted, "lm_replica_states": states}
    if not out["ready"]:
        listed = ", ".join(f"{state} {n}" for state, n in sorted(states.items())) or "none yet"
        out["error"] = f"{running} of {wanted} LM replicas ready (replica states: {listed})"
    return out


@serve.deployment(name="program", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class ProgramServer:
    """The winning program behind the HTTP API of ``serve.api``."""

    def __init__(self, lm, run_dir: str, step: str | None, token: str | None, max_body_bytes: int,
                 max_batch: int, max_threads: int = DEFAULT_MAX_THREADS, request_timeout_s: float = 300.0):
        from serve.winner import build_program, interface, load_winner

        self.lm = lm
        self.winner = load_winner(run_dir, step)
        self.program = build_program(self.winner)
        adapter = self.winner.adapter  # the run's: answers are written and read as during optimization
        for name, pred in self.program.named_predictors():
            pred.lm = dspy.LM(self.winner.models.get(name, self.winner.base_model), engine=SyncHandleEngine(lm),
                              async_engine=HandleEngine(lm), max_tokens=self.winner.max_tokens, temperature=0.0,
                              stop=stop_for(adapter), cache=False)
        self.inputs, self.outputs = interface(self.program)
        self.runner = ProgramRunner(self.program, make_adapter(adapter), [f.name for f in self.outputs],
                                    max_threads=max_threads)
        self.settings = (token, max_body_bytes, max_batch)
        self.gate = Gate()
        self.timeout_s = request_timeout_s

    async def ready(self) -> dict:
        """Whether the program can answer: an LM replica is RUNNING (Serve's status of the LM deployment)."""
        status = await asyncio.to_thread(serve.status)  # a controller call: off the event loop
        app = status.applications.get(self.lm.app_name)
        deployment = app.deployments.get(self.lm.deployment_name) if app else None
        states = {str(getattr(k, "value", k)): n for k, n in (deployment.replica_states if deployment else {}).items()}
        return lm_readiness(states)

    async def drain(self, grace_s: float) -> dict:
        """Refuse new HTTP requests (503 + Retry-After) and wait up to ``grace_s`` for those in flight
        (``serve.app.stop`` calls it before shutting Serve down, while the LM deployment still answers)."""
        return await self.gate.drain(grace_s)

    async def run_program(self, inputs: dict) -> tuple[dict, dict]:
        """The program's outputs and per-LM token usage for one input (async or worker-thread path).

        Raises:
            RequestTimedOut: no answer within the request timeout (504).
        """
        return await self._in_time(self.runner.run(inputs))

    async def chat(self, request: GenerateRequest) -> Completion:
        return await self._in_time(self.lm.generate.remote(request))

    async def _in_time(self, work):
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimedOut(f"no answer within {self.timeout_s:g} s") from None

    def program_info(self) -> dict:
        w = self.winner
        return {
            "program": w.program, "strategy": w.strategy, "adapter": w.adapter, "validation_score": w.score,
            "test_score": w.test["score"] if w.test else None, "test_examples": w.test["n"] if w.test else None,
            "base_model": w.base_model,
            "model": w.model, "models": w.models, "adapters": sorted(w.adapters), "program_version": w.version,
            "predictors": {name: {"instructions": pred.signature.instructions,
                                  "inputs": list(pred.signature.input_fields),
                                  "outputs": list(pred.signature.output_fields), "demos": len(pred.demos)}
                           for name, pred in self.program.named_predictors()},
        }

    def __serve_build_asgi_app__(self):
        from serve.api import build_api

        token, max_body_bytes, max_batch = self.settings
        return build_api(self.winner, self.inputs, self.outputs, self.program_info(), self.run_program, self.chat,
                         ready=self.ready, gate=self.gate, token=token, max_body_bytes=max_body_bytes,
                         max_batch=max_batch)
