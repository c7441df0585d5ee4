"""A replica whose engine hangs fails its health check (Serve then replaces it); a busy one that makes
progress does not. In-process, with scripted engines."""

import asyncio

import pytest

from actors.config import ReplicaConfig
from actors.errors import EngineDeadError
from actors.inference.replica import LMReplica
from actors.inference.scripted import ScriptedEngine
from actors.types import GenerateRequest
from tests.unit.actors.inference import faulty_engines as faulty


def _replica(tmp_path, factory, hung_after_s):
    (tmp_path / "config.json").write_text("{}")
    return LMReplica(ReplicaConfig(model=str(tmp_path), model_id="base", hung_after_s=hung_after_s), 0,
                     engine_factory=factory)


def test_a_hung_engine_fails_the_health_check(tmp_path):
    async def scenario():
        replica = _replica(tmp_path, faulty.slow_factory, 0.3)
        await replica.health()  # idle: healthy, however long since the last request
        stuck = asyncio.create_task(replica.generate(GenerateRequest("base", prompt="x")))
        await asyncio.sleep(0.6)
        with pytest.raises(EngineDeadError, match=r"hung: 1 request\(s\) in flight and none finished for"):
            await replica.health()
        stuck.cancel()

    asyncio.run(scenario())


def test_a_busy_engine_that_finishes_requests_stays_healthy(tmp_path):
    async def scenario():
        replica = _replica(tmp_path, lambda cfg, path: ScriptedEngine(cfg, path, delay_s=0.1), 0.3)
        for _ in range(8):  # 0.8 s of back-to-back work, longer than hung_after_s
            work = asyncio.create_task(replica.generate(GenerateRequest("base", prompt="x")))
            await asyncio.sleep(0.05)
            await replica.health()
            await work

    asyncio.run(scenario())
