"""Scripted engines that fail on purpose, for the pool's fault tests (imported by Ray workers too).

Knows three faults: an engine that cannot start on rank 1, an engine that dies (every later call
raises ``EngineDeadError``, as vLLM's does once its EngineCore process is gone), and an engine
that never answers on rank 0. A replica's rank is read from its actor name
(``tandem:<pool>:<generation>:<rank>``), since an engine factory is not told the rank.
"""

from __future__ import annotations

import asyncio

from actors.errors import EngineDeadError
from actors.inference.scripted import ScriptedEngine

DIE = "die"  # this prompt kills the engine and fails the request, like a crashed EngineCore
DIE_QUIETLY = "die quietly"  # kills the engine but answers: only the replica's engine check sees it
SLOW_S = 30.0


def _rank() -> int:
    import ray

    return int(ray.get_runtime_context().get_actor_name().rsplit(":", 1)[1])


class DyingEngine(ScriptedEngine):
    """Answers like ``ScriptedEngine`` until a request with prompt ``DIE``/``DIE_QUIETLY`` kills it."""

    def __init__(self, cfg, model_path):
        super().__init__(cfg, model_path, delay_s=0.2)
        self.dead = False

    async def generate(self, prompt_ids, request, adapter, request_id):
        if request.prompt in (DIE, DIE_QUIETLY):
            self.dead = True
            if request.prompt == DIE:
                raise EngineDeadError("scripted engine died")
            return ["dying"], ["stop"], 1
        if self.dead:
            raise EngineDeadError("scripted engine is dead")
        out = await super().generate(prompt_ids, request, adapter, request_id)
        if self.dead:  # died while this request was in flight
            raise EngineDeadError("scripted engine died mid-request")
        return out

    def shutdown(self) -> None:  # like vLLM's: calls still in flight fail as on a dead engine
        super().shutdown()
        self.dead = True


def dying_factory(cfg, model_path) -> DyingEngine:
    return DyingEngine(cfg, model_path)


def fails_on_rank1_factory(cfg, model_path) -> ScriptedEngine:
    if _rank() == 1:
        raise RuntimeError("scripted engine cannot start on rank 1")
    return ScriptedEngine(cfg, model_path)


class SlowEngine(ScriptedEngine):
    """Takes ``SLOW_S`` seconds on every request: a hung engine, as far as a caller can tell."""

    async def generate(self, prompt_ids, request, adapter, request_id):
        await asyncio.sleep(SLOW_S)
        return await super().generate(prompt_ids, request, adapter, request_id)


def slow_on_rank0_factory(cfg, model_path) -> ScriptedEngine:
    return (SlowEngine if _rank() == 0 else ScriptedEngine)(cfg, model_path)


def slow_factory(cfg, model_path) -> ScriptedEngine:
    return SlowEngine(cfg, model_path)


class AbortingOnRank0Engine(ScriptedEngine):
    """Rank 0's engine ends every request with vLLM's finish reason ``abort`` and some text; others answer."""

    async def generate(self, prompt_ids, request, adapter, request_id):
        if _rank() == 0:
            await asyncio.sleep(self.delay_s)
            return ["[[ ## answer ## ]]\nhalf an ans"] * request.n, ["abort"] * request.n, 3
        return await super().generate(prompt_ids, request, adapter, request_id)


def aborting_on_rank0_factory(cfg, model_path) -> AbortingOnRank0Engine:
    return AbortingOnRank0Engine(cfg, model_path)
