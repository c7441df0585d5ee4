"""The vLLM implementation of the replica's ``Engine`` protocol, on vLLM's async engine.

Knows how to build ``AsyncLLM`` from a ``ReplicaConfig`` (dtype, LoRA limits, executor and the
opaque ``engine_kwargs``; on CPU under the environment that runs the model in the EngineCore
process, ``actors.inference.device.inproc_worker_env``), turn a ``GenerateRequest`` into prompt token ids with the model's chat
template and into ``SamplingParams`` (a request's ``structured`` constraint becomes vLLM's
``StructuredOutputsParams``; the backend is the engine's ``structured_outputs_config``, by default
``STRUCTURED_OUTPUTS``: xgrammar, compact JSON; or a plain dict in ``engine_kwargs`` such as
``{"backend": "auto"}``; a constraint vLLM refuses is raised as ``LMRequestError``, the engine
keeps serving), and load/unload LoRA adapters with a prefix-cache reset so no block computed under
other weights is reused. Concurrent ``generate`` calls are batched continuously by vLLM. Engine
death: vLLM's ``EngineDeadError`` (its EngineCore process is gone, and every later call fails) is
re-raised as ``actors.errors.EngineDeadError`` and ``dead`` says so without a call, so the replica
can exit and be restarted by Ray; before the engine is built, ``TANDEM_ENGINE_WATCHDOG=1`` is set
(unless already set) so that the EngineCore process exits when the replica's process dies
(``actors.inference.watchdog``). Does not know Ray, routing, or request statistics
(``actors.inference.replica`` does). vLLM is imported lazily, inside the replica process.
"""

from __future__ import annotations

import contextlib
import logging
import os

from actors.inference import device
from actors.config import ReplicaConfig
from actors.environ import environ
from actors.errors import EngineDeadError, LMRequestError
from actors.types import Adapter, GenerateRequest

logger = logging.getLogger(__name__)

# xgrammar (vLLM's first choice, and what runs on CPU); no whitespace between JSON tokens, as a
# small model under a JSON schema can otherwise write whitespace until max_tokens (any_whitespace
# is an engine setting, not a request one, and only xgrammar/guidance take it).
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
# Seconds a stopping engine's EngineCore gets to exit before its process tree is killed. vLLM's
# default is 5 s, and on CPU its EngineCore always used all of it (its worker takes ~3 s to exit
# gracefully, then the core lingers): every pool kill waited 5 s. Requests are aborted first
# (mode=abort), so nothing in flight is lost by cutting it short.
STOP_GRACE_S = 1.0


class VLLMEngine:
    """An ``AsyncLLM`` with the few calls a replica needs."""

    def __init__(self, cfg: ReplicaConfig, model_path: str):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(
            model=model_path,
            served_model_name=cfg.base_id,
            dtype=device.dtype(cfg),
            max_model_len=cfg.max_model_len,
            seed=cfg.seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend=device.executor_backend(cfg),
            enable_lora=cfg.enable_lora,
            disable_log_stats=True,
            # torch.compile warm-up costs minutes on CPU; LoRA engines skip it anyway.
            enforce_eager=not device.is_gpu(cfg),
        )
        if cfg.enable_lora:
            kwargs.update(max_lora_rank=cfg.max_lora_rank, max_loras=cfg.max_loras)
        kwargs.update(cfg.engine_kwargs)
        from vllm.config import StructuredOutputsConfig

        structured = kwargs.get("structured_outputs_config", STRUCTURED_OUTPUTS)
        if isinstance(structured, dict):  # a run config's JSON: vLLM wants the object
            kwargs["structured_outputs_config"] = StructuredOutputsConfig(**structured)
        from actors.inference.watchdog import WATCHDOG_ENV

        os.environ.setdefault(WATCHDOG_ENV, "1")  # inherited by the EngineCore process vLLM spawns
        with environ(device.inproc_worker_env(cfg)):
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = self._llm.model_config.max_model_len

    @property
    def dead(self) -> bool:
        """True once the engine cannot serve again (its EngineCore process died or its output loop failed)."""
        return bool(self._llm.errored)

    def encode(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            return list(self._tokenizer.apply_chat_template(
                list(request.messages), tokenize=True, add_generation_prompt=True, return_dict=False))
        return list(self._tokenizer.encode(request.prompt))

    async def generate(self, prompt_ids, request, adapter, request_id):
        from vllm import SamplingParams, TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        with _refused_constraints(request):
            params = SamplingParams(
                n=request.n, temperature=request.temperature, top_p=request.top_p,
                max_tokens=request.max_tokens, stop=list(request.stop) or None, seed=request.seed,
                output_kind=RequestOutputKind.FINAL_ONLY, structured_outputs=_structured_outputs(request),
            )
        lora = LoRARequest(adapter.name, adapter.int_id, adapter.path) if adapter else None
        final = None
        with _dead_engine_errors(), _refused_constraints(request):
            async for out in self._llm.generate(
                    TokensPrompt(prompt_token_ids=prompt_ids), params, request_id, lora_request=lora):
                final = out
        outputs = sorted(final.outputs, key=lambda o: o.index)
        return ([o.text for o in outputs], [o.finish_reason or "stop" for o in outputs],
                sum(len(o.token_ids) for o in outputs), [list(o.token_ids) for o in outputs])

    async def add_adapter(self, adapter: Adapter) -> None:
        from vllm.lora.request import LoRARequest

        with _dead_engine_errors():
            await self._llm.add_lora(LoRARequest(adapter.name, adapter.int_id, adapter.path))
            await self._llm.reset_prefix_cache()

    async def remove_adapter(self, adapter: Adapter) -> None:
        with _dead_engine_errors():
            await self._llm.remove_lora(adapter.int_id)
            await self._llm.reset_prefix_cache()

    def shutdown(self) -> None:
        self._llm.shutdown(timeout=STOP_GRACE_S)


def _structured_outputs(request: GenerateRequest):
    """The request's constraint as vLLM's ``StructuredOutputsParams`` (None without one)."""
    if request.structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    (kind, value), = request.structured.items()
    return StructuredOutputsParams(**{kind: list(value) if kind == "choice" else value})


@contextlib.contextmanager
def _refused_constraints(request: GenerateRequest):
    """vLLM's refusal of a request's constraint (it does not compile, or uses an unsupported
    feature) as ``LMRequestError``: the request is wrong, the engine is fine."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineGenerateError

    try:
        yield
    except VLLMClientError as exc:
        if request.structured is None:
            raise
        raise LMRequestError(f"vLLM refused the output constraint {_describe(request.structured)}: {exc}") from exc
    except EngineGenerateError as exc:  # a ValueError in vLLM's input processing, wrapped
        if request.structured is None or not isinstance(exc.__cause__, ValueError):
            raise
        raise LMRequestError(
            f"vLLM refused the output constraint {_describe(request.structured)}: {exc.__cause__}") from exc


def _describe(structured: dict) -> str:
    (kind, value), = structured.items()
    text = repr(value)
    return f"{kind}={text[:120] + '...' if len(text) > 120 else text}"


@contextlib.contextmanager
def _dead_engine_errors():
    """vLLM's EngineDeadError as Tandem's (the replica reacts to it without importing vLLM)."""
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

    try:
        yield
    except VLLMEngineDeadError as exc:
        raise EngineDeadError(f"vLLM engine is dead: {exc}") from exc
