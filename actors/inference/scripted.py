"""A scripted ``Engine`` for fast tests of routing, adapters and failure handling without vLLM.

Knows nothing about language: it "tokenizes" by whitespace and answers with a fixed reply
(optionally tagged with the adapter that served it) after a short sleep, so concurrency and
replica loss can be exercised in real Ray actors in milliseconds. Output constraints are
accepted; a ``choice`` constraint is honoured (the first choice), a ``regex`` one only when the
reply happens to match it, ``json``/``grammar`` ones not at all. Used by unit tests only;
real behaviour is tested on vLLM in ``tests/integration``.
"""

from __future__ import annotations

import asyncio

from actors.config import ReplicaConfig
from actors.types import Adapter, GenerateRequest


class ScriptedEngine:
    """Answers ``"<reply>"`` or ``"<reply>@<adapter>"`` ``n`` times."""

    max_model_len = 64

    def __init__(self, cfg: ReplicaConfig, model_path: str, reply: str = "ok", delay_s: float = 0.05):
        self.reply, self.delay_s = reply, delay_s
        self.loaded: dict[int, Adapter] = {}

    def encode(self, request: GenerateRequest) -> list[int]:
        text = request.prompt if request.prompt is not None else " ".join(m["content"] for m in request.messages)
        return list(range(len(text.split())))

    async def generate(self, prompt_ids, request, adapter, request_id):
        await asyncio.sleep(self.delay_s)
        text = self.reply if adapter is None else f"{self.reply}@{adapter.name}"
        if request.structured is not None and "choice" in request.structured:
            text = request.structured["choice"][0]
        return [text] * request.n, ["stop"] * request.n, request.n

    async def add_adapter(self, adapter: Adapter) -> None:
        self.loaded[adapter.int_id] = adapter

    async def remove_adapter(self, adapter: Adapter) -> None:
        self.loaded.pop(adapter.int_id, None)

    def shutdown(self) -> None:
        self.loaded.clear()


def scripted_factory(cfg: ReplicaConfig, model_path: str) -> ScriptedEngine:
    """Engine factory for ``ReplicaPool(..., engine_factory=scripted_factory)``."""
    return ScriptedEngine(cfg, model_path)
