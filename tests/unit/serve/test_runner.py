"""The program runner (no Ray): sync-only programs answer from bounded worker threads, aforward ones on the loop."""

import asyncio
import re
import threading
import time

import dspy
import pytest
from dspy import lm15

from serve.runner import ProgramRunner, runs_async

ADAPTER = dspy.ChatAdapter(use_json_adapter_fallback=False)


class ScriptedLM:
    """A ChatAdapter-speaking engine: drafts from the question, answers from the draft; counts concurrency."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s, self.lock = delay_s, threading.Lock()
        self.running = self.most = 0
        self.threads: set[str] = set()

    def reply(self, request: lm15.Request) -> lm15.Response:
        text = request.messages[-1].text
        inputs = dict(re.findall(r"\[\[ ## (\w+) ## \]\]\n(.*?)\n\n", text))
        field = re.search(r"starting with the field `\[\[ ## (\w+) ## \]\]`", text).group(1)
        value = f"draft of {inputs['question']}" if field == "draft" else f"answer from {inputs['draft']}"
        return lm15.Response(id=None, model=request.model, finish_reason="stop",
                             message=lm15.Message.assistant(f"[[ ## {field} ## ]]\n{value}\n\n[[ ## completed ## ]]"),
                             usage=lm15.Usage(input_tokens=5, output_tokens=2))

    def complete(self, request: lm15.Request) -> lm15.Response:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.delay_s)
            return self.reply(request)
        finally:
            with self.lock:
                self.running -= 1

    def close(self) -> None:
        pass


class AsyncScriptedLM(ScriptedLM):
    async def complete(self, request: lm15.Request) -> lm15.Response:  # type: ignore[override]
        self.threads.add(threading.current_thread().name)
        await asyncio.sleep(0)
        return self.reply(request)

    async def aclose(self) -> None:
        pass


class TwoStep(dspy.Module):
    """Sync only: two predictors called in ``forward`` (no ``aforward``)."""

    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.final = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        draft = self.draft(question=question).draft
        return self.final(question=question, draft=draft)


class AsyncTwoStep(TwoStep):
    async def aforward(self, question):
        draft = (await self.draft.acall(question=question)).draft
        return await self.final.acall(question=question, draft=draft)


class OverridesForwardOnly(dspy.ChainOfThought):
    def forward(self, **kwargs):
        return super().forward(**kwargs)


def _program(cls, delay_s: float = 0.0):
    sync, aio = ScriptedLM(delay_s), AsyncScriptedLM()
    program = cls()
    program.set_lm(dspy.LM("scripted", engine=sync, async_engine=aio, cache=False))
    return program, sync, aio


def test_dispatch_follows_where_aforward_is_defined():
    assert not runs_async(TwoStep())
    assert runs_async(AsyncTwoStep())
    assert runs_async(dspy.ChainOfThought("question -> answer"))
    assert runs_async(dspy.Predict("question -> answer"))
    assert not runs_async(OverridesForwardOnly("question -> answer"))  # the inherited aforward would skip it


def test_a_sync_forward_program_answers_from_a_worker_thread_with_usage():
    program, sync, aio = _program(TwoStep)
    runner = ProgramRunner(program, ADAPTER, ["answer"])
    assert not runner.is_async
    outputs, usage = asyncio.run(runner.run({"question": "why?"}))
    runner.close()
    assert outputs == {"answer": "answer from draft of why?"}
    assert usage["scripted"]["prompt_tokens"] == 10 and usage["scripted"]["completion_tokens"] == 4
    assert sync.threads and all(t.startswith("tandem-program") for t in sync.threads) and not aio.threads


class RecordingAdapter(dspy.ChatAdapter):
    """Notes the thread of every prompt it formats."""

    def __init__(self):
        super().__init__(use_json_adapter_fallback=False)
        self.threads: list[str] = []

    def format(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return super().format(*args, **kwargs)


def test_the_runners_adapter_applies_inside_the_worker_thread():
    program, _, _ = _program(TwoStep)
    adapter = RecordingAdapter()
    runner = ProgramRunner(program, adapter, ["answer"])
    asyncio.run(runner.run({"question": "x"}))
    runner.close()
    assert len(adapter.threads) == 2 and all(t.startswith("tandem-program") for t in adapter.threads)


def test_sync_programs_run_at_most_max_threads_at_once():
    program, sync, _ = _program(TwoStep, delay_s=0.05)
    runner = ProgramRunner(program, ADAPTER, ["answer"], max_threads=3)

    async def many():
        return await asyncio.gather(*(runner.run({"question": f"q{i}"}) for i in range(10)))

    results = asyncio.run(many())
    runner.close()
    assert [out["answer"] for out, _ in results] == [f"answer from draft of q{i}" for i in range(10)]
    assert sync.most == 3


def test_an_aforward_program_runs_on_the_async_path():
    program, sync, aio = _program(AsyncTwoStep)
    runner = ProgramRunner(program, ADAPTER, ["answer"])
    assert runner.is_async
    outputs, usage = asyncio.run(runner.run({"question": "how?"}))
    assert outputs == {"answer": "answer from draft of how?"} and usage["scripted"]["completion_tokens"] == 4
    assert aio.threads == {threading.current_thread().name} and not sync.threads


def test_max_threads_must_be_positive():
    with pytest.raises(ValueError, match="max_threads"):
        ProgramRunner(TwoStep(), ADAPTER, ["answer"], max_threads=0)
