"""Driver scaling: program runs/s one Tandem driver sustains as the number of LM replicas grows.

Every LM call of a Tandem run goes through one driver process: DSPy formats the prompt, a
thread waits on the pool's router, DSPy parses the answer, the metric runs. This benchmark runs
real DSPy programs (Iris chain of thought; HotPotQA multi-hop with a stub retriever) through the
real path (``engine.evaluate.run_grid``, what ``evaluate_many`` calls, inside
``dspy.context(adapter=...)``, ``pool_lm(pool, cache=False)``, ``actors.ReplicaPool`` of real Ray
actors) against *simulated* replicas, at 1 … 64 replicas, and reports runs/s, scaling
efficiency, driver CPU per run, replica utilisation and call latency. Prints a table, writes JSON.

The simulated engine (``SimulatedEngine``, the ``actors.types.Engine`` interface of
``actors.inference.scripted.ScriptedEngine``) models a continuously batching GPU engine as processor
sharing with a latency floor and a throughput ceiling: with ``b`` sequences in flight each
advances ``min(1 / step_s, tok_s / b)`` tokens per second, an answer is ``answer_tokens`` tokens,
and at most ``max_seqs`` sequences run at once (the rest queue, ``asyncio.Semaphore``). Defaults
(an 8B model, bf16, one H100, as issue 19 quotes vLLM's published figures; not re-measured here):
``step_s`` 0.025 (a 200-token answer takes 5 s unloaded), ``tok_s`` 2,500 output tokens/s per
replica (= 12.5 LM calls/s), ``max_seqs`` 256; a replica saturates at ``tok_s * step_s`` ≈ 63
sequences in flight. Prefill, prompt length and KV-cache limits are not modelled. The engine
writes ChatAdapter's layout (``[[ ## field ## ]]``) for the output fields the prompt asks for,
so both the ``chat`` and the ``constrained`` adapters parse it (Iris answers by a petal rule,
HotPotQA with the first name in the question; the scores only show that the answers parse).

``--time-scale s`` multiplies every simulated duration by ``s``: a replica then serves
``12.5 / s`` calls/s of wall time. The in-flight calls a replica needs (Little's law) do not
change, but the wall rate the driver must sustain does, so ``N`` replicas at ``s`` load the driver
like ``N / s`` real-speed replicas. Rates are reported in wall time (what the driver really
did); latencies in wall and simulated seconds. Runs in one process on one machine: the replica
actors share its CPUs with the driver (the machine's busy share is reported). Does not measure
vLLM, GPUs or the network.

    flock /tmp/tandem-heavy.lock python benchmarks/driver_scale.py --programs iris,hotpotqa --replicas 1,4,16,32 --evaluators 0,4
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class LatencyModel:
    """A continuously batching engine: latency floor ``answer_tokens * step_s``, ceiling ``tok_s``."""

    step_s: float = 0.025
    tok_s: float = 2500.0
    max_seqs: int = 256
    answer_tokens: int = 200
    time_scale: float = 1.0

    def rate(self, batch: int) -> float:
        """Tokens per simulated second of each of ``batch`` running sequences."""
        return min(1.0 / self.step_s, self.tok_s / max(1, batch))

    @property
    def calls_per_s(self) -> float:
        """LM calls per simulated second of one saturated replica."""
        return self.tok_s / self.answer_tokens

    @property
    def saturating_batch(self) -> float:
        """Sequences in flight from which a replica runs at ``tok_s``."""
        return self.tok_s * self.step_s


class SimulatedEngine:
    """An ``Engine`` whose ``generate`` takes as long as ``LatencyModel`` says (virtual-time sharing)."""

    def __init__(self, cfg: Any, model_path: str, model: LatencyModel):
        self.model = model
        self.max_model_len = cfg.max_model_len
        self.loaded: dict[int, Any] = {}
        self._slots: asyncio.Semaphore | None = None
        self._heap: list[tuple[float, int, asyncio.Future]] = []  # (finish in virtual tokens, seq, done)
        self._virtual = 0.0  # tokens every running sequence has decoded since the engine started
        self._last: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count()

    def encode(self, request: Any) -> list[int]:
        text = request.prompt if request.prompt is not None else "".join(m["content"] for m in request.messages)
        return [0] * (len(text) // 4)  # ~4 characters a token

    async def generate(self, prompt_ids, request, adapter, request_id):
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.model.max_seqs)
        tokens = min(self.model.answer_tokens, request.max_tokens)
        async with self._slots:  # beyond max_seqs, requests wait for a free sequence slot
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            self._advance(loop.time())
            heapq.heappush(self._heap, (self._virtual + tokens, next(self._ids), done))
            self._reschedule(loop)
            await done
        text = reply(request.messages or ({"role": "user", "content": request.prompt},))
        return [text] * request.n, ["stop"] * request.n, tokens * request.n

    def _advance(self, now: float) -> None:
        if self._last is not None and self._heap:
            self._virtual += (now - self._last) / self.model.time_scale * self.model.rate(len(self._heap))
        self._last = now

    def _reschedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._heap:
            left = max(0.0, self._heap[0][0] - self._virtual)
            wait = left / self.model.rate(len(self._heap)) * self.model.time_scale
            self._timer = loop.call_later(wait, self._finish, loop)

    def _finish(self, loop: asyncio.AbstractEventLoop) -> None:
        self._advance(loop.time())
        while self._heap and self._heap[0][0] <= self._virtual + 1e-6:
            _, _, done = heapq.heappop(self._heap)
            if not done.done():  # a cancelled request's future is already done
                done.set_result(None)
        self._reschedule(loop)

    async def add_adapter(self, adapter: Any) -> None:
        self.loaded[adapter.int_id] = adapter

    async def remove_adapter(self, adapter: Any) -> None:
        self.loaded.pop(adapter.int_id, None)

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.loaded.clear()


@dataclass(frozen=True)
class SimulatedFactory:
    """``engine_factory`` for ``ReplicaPool``: every replica gets a ``SimulatedEngine`` of ``model``."""

    model: LatencyModel

    def __call__(self, cfg: Any, model_path: str) -> SimulatedEngine:
        return SimulatedEngine(cfg, model_path, self.model)


_ASKED = re.compile(r"`\[\[ ## (\w+) ## \]\]`")
_IRIS = re.compile(r"\[\[ ## (petal_length|petal_width) ## \]\]\n([-0-9.]+)")
_FIRST = re.compile(r"\[\[ ## question ## \]\]\n[^\n]*? first, (.+?) or ")


def reply(messages) -> str:
    """ChatAdapter's layout for the output fields the last message asks for (short free text)."""
    text = messages[-1]["content"]
    asked = text.rpartition("Respond with the corresponding output fields")[2]
    fields = [f for f in dict.fromkeys(_ASKED.findall(asked)) if f != "completed"] or ["answer"]
    found = dict(_IRIS.findall(text))
    first = _FIRST.search(text)
    if found:
        length, width = float(found.get("petal_length", 0)), float(found.get("petal_width", 0))
        answer = "setosa" if length < 2.5 else "versicolor" if width < 1.75 and length < 4.95 else "virginica"
    else:
        answer = first.group(1) if first else "unknown"
    values = {"reasoning": "Reasoning from the given fields step by step.", "answer": answer,
              "search_query": f"{answer} founding date"}
    body = "\n\n".join(f"[[ ## {f} ## ]]\n{values.get(f, 'n/a')}" for f in fields)
    return body + "\n\n[[ ## completed ## ]]"


# -- workloads (driver side) ------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """A program factory, a synthetic valset, its metric and the LM calls one run makes."""

    name: str
    make: Callable[[], Any]
    examples: list
    metric: Callable
    calls_per_run: int


_NAMES = ("Arthur's Magazine", "First for Women", "The Strand", "Harper's Bazaar", "Punch", "Vogue",
          "The Spectator", "National Geographic", "Scientific American", "The Atlantic")
_PASSAGES = tuple(f"{n} | {n} is a periodical first published in {1840 + 7 * i}; it ran monthly issues for "
                  f"many decades and was edited in London and New York." for i, n in enumerate(_NAMES))


class StubRetriever:
    """``(query, k) -> passages``: fixed passages in rotation, so the second hop adds new ones."""

    def __init__(self) -> None:
        self._calls = itertools.count()

    def __call__(self, query: str, k: int) -> list[str]:
        start = next(self._calls) * k
        return [_PASSAGES[(start + i) % len(_PASSAGES)] for i in range(k)]


def workload(name: str, n: int) -> Workload:
    """``n`` synthetic examples of program ``name`` (``iris`` or ``hotpotqa``)."""
    import dspy

    from programs.base import resolve

    if name == "iris":
        spec = resolve("iris")
        split = spec.splits(0)
        base = split.train + split.dev + split.test
        examples = []
        for i in range(n):
            ex = base[i % len(base)]
            jitter = 0.01 * (i // len(base) % 5)  # distinct prompts; flowers stay near their class
            inputs = {k: round(v + jitter, 2) for k, v in ex.inputs().items()}
            examples.append(dspy.Example(**inputs, answer=ex.answer).with_inputs(*inputs))
        return Workload(name, spec.program, examples, spec.metric, 1)
    if name == "hotpotqa":
        from programs import hotpotqa

        retriever = StubRetriever()
        pairs = list(itertools.permutations(_NAMES, 2))
        examples = [dspy.Example(question=f"Which was published first, {a} or {b} (case {i})?", answer=a)
                    .with_inputs("question") for i, (a, b) in ((i, pairs[i % len(pairs)]) for i in range(n))]
        return Workload(name, lambda: hotpotqa.Program(retriever=retriever), examples, hotpotqa.metric, 3)
    raise ValueError(f"unknown program {name!r}: use iris or hotpotqa")


# -- measurement --------------------------------------------------------------------------------

@dataclass
class Row:
    """One (program, replicas) measurement; rates in wall time, latencies in wall seconds."""

    program: str
    replicas: int
    threads: int
    runs: int
    wall_s: float
    runs_per_s: float
    calls_per_s: float
    capacity_runs_per_s: float
    thread_bound_runs_per_s: float
    score: float
    parse_failures: int
    errors: int
    driver_cpu_ms_per_run: float
    driver_cpu_ms_per_call: float
    driver_cores: float
    replica_cpu_ms_per_call: float
    machine_busy: float
    token_utilisation: float
    min_replica_utilisation: float
    call_p50_s: float | None
    call_p99_s: float | None
    model_latency_s: float
    evaluators: int = 0
    evaluator_cpu_ms_per_run: float = 0.0
    efficiency: float | None = None


def timed_lm(pool: Any, latencies: list[float], **kwargs: Any) -> Any:
    """``pool_lm(pool, **kwargs)`` (``actors.dspy_side.client.router_lm``'s body) whose sync engine also appends each
    call's wall latency, as the driver sees it, to ``latencies`` (a DSPy callback would time it too,
    but turns on DSPy's per-module callback machinery, which costs the driver ~1 ms per HotPotQA run)."""
    import dspy

    from actors.dspy_side.client import AsyncPoolEngine, PoolEngine
    from actors.dspy_side.provider import TandemProvider

    class TimedPoolEngine(PoolEngine):
        def complete(self, request):
            started = time.perf_counter()
            try:
                return super().complete(request)
            finally:
                latencies.append(time.perf_counter() - started)

    kwargs.setdefault("temperature", 0.0)
    return dspy.LM(pool.model_id, engine=TimedPoolEngine(pool.router), async_engine=AsyncPoolEngine(pool.router),
                   provider=TandemProvider.of(pool), **kwargs)


def _cpu_of(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _percentile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def measure(pool: Any, work: Workload, model: LatencyModel, adapter: str, threads: int, evaluators: Any = None) -> Row:
    """Run ``work`` once on ``pool`` with ``threads`` driver threads, or on ``evaluators`` (an
    ``actors.dspy_side.evaluator.EvaluatorPool``: then ``threads`` is their threads in all); its ``Row``."""
    import dspy
    import ray

    from engine.adapters.registry import make_adapter, stop_for
    from engine.evaluate import evaluators as on, percent, run_grid

    program, latencies = work.make(), []  # latencies: the driver's calls only (an evaluator's stay there)
    program.set_lm(timed_lm(pool, latencies, max_tokens=model.answer_tokens, stop=stop_for(adapter), cache=False,
                            num_retries=0))
    pids, before = [h["pid"] for h in pool.health()], pool.stats()
    evaluator_pids = ray.get([a.pid.remote() for a in evaluators._actors]) if evaluators else []
    cpu0, replica0, busy0, wall0 = time.process_time(), _cpu_of(pids), _busy(), time.perf_counter()
    evaluator0 = _cpu_of(evaluator_pids)
    with dspy.context(adapter=make_adapter(adapter)), on(evaluators):
        runs = run_grid([program], work.examples, work.metric, num_threads=threads, desc="")[0]
    wall = time.perf_counter() - wall0
    cpu, replica, busy = time.process_time() - cpu0, _cpu_of(pids) - replica0, _busy() - busy0
    evaluator_cpu = _cpu_of(evaluator_pids) - evaluator0
    after = pool.stats()
    calls = sum(a["requests"] - b["requests"] for a, b in zip(after, before))
    tokens = [a["completion_tokens"] - b["completion_tokens"] for a, b in zip(after, before)]
    capacity_tokens, n, replicas = wall * model.tok_s / model.time_scale, len(runs), len(after)
    latency = model.answer_tokens * model.step_s * model.time_scale
    return Row(
        program=work.name, replicas=replicas, threads=threads, runs=n, wall_s=wall, runs_per_s=n / wall,
        calls_per_s=calls / wall,
        capacity_runs_per_s=replicas * model.calls_per_s / model.time_scale / work.calls_per_run,
        thread_bound_runs_per_s=threads / (latency * work.calls_per_run),
        score=percent(runs), parse_failures=sum(r.parse_failure for r in runs),
        errors=sum(r.error is not None and not r.parse_failure for r in runs),
        driver_cpu_ms_per_run=1e3 * cpu / n, driver_cpu_ms_per_call=1e3 * cpu / max(1, calls),
        driver_cores=cpu / wall, replica_cpu_ms_per_call=1e3 * replica / max(1, calls),
        machine_busy=busy / (wall * (os.cpu_count() or 1)),
        token_utilisation=sum(tokens) / (capacity_tokens * replicas),
        min_replica_utilisation=min(tokens) / capacity_tokens,
        call_p50_s=_percentile(latencies, 0.5), call_p99_s=_percentile(latencies, 0.99),
        model_latency_s=latency, evaluators=len(evaluator_pids), evaluator_cpu_ms_per_run=1e3 * evaluator_cpu / n)


def threads_for(replicas: int, model: LatencyModel, max_threads: int) -> int:
    """Driver threads that keep ``replicas`` saturated (Little's law), at most ``max_threads``."""
    return max(1, min(max_threads, replicas * math.ceil(model.saturating_batch)))


def examples_for(threads: int, calls_per_run: int, model: LatencyModel, seconds: float) -> int:
    """Enough runs for every thread to run for about ``seconds`` of wall time (at least one run each)."""
    run_s = calls_per_run * model.answer_tokens * model.step_s * model.time_scale
    return threads * max(1, round(seconds / run_s))


def run_all_configs(args: argparse.Namespace, model: LatencyModel, model_dir: str, n_evaluators: int) -> list[Row]:
    """One pool, grown to each replica count in turn; every program measured at each count, in the
    driver's threads (``n_evaluators`` 0) or on that many evaluator actors."""
    from actors import PoolConfig, ReplicaConfig, ReplicaPool

    counts = sorted({int(x) for x in args.replicas.split(",")})
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    calls_per_run = {name: workload(name, 1).calls_per_run for name in programs}
    cfg = PoolConfig(replica=ReplicaConfig(model=model_dir, model_id="sim-8b", num_cpus=args.replica_cpus,
                                           max_model_len=8192, enable_lora=False, max_restarts=0),
                     num_replicas=counts[0], name="driver-scale", start_timeout_s=600)
    rows = []
    evaluators = None
    if n_evaluators:
        from actors.dspy_side.evaluator import EvaluatorConfig, EvaluatorPool

        per = args.evaluator_threads or math.ceil(threads_for(counts[-1], model, 10**6) / n_evaluators)
        evaluators = EvaluatorPool(EvaluatorConfig(count=n_evaluators, threads=per, num_cpus=args.replica_cpus))
        evaluators.start()
    with ReplicaPool(cfg, engine_factory=SimulatedFactory(model)) as pool:
        for replicas in counts:
            started = time.perf_counter()
            if pool.launched:
                pool.scale(replicas)
            else:
                pool.launch()
            print(f"{replicas} replica(s) up ({time.perf_counter() - started:.1f}s)", flush=True)
            for name in programs:
                if evaluators:  # in flight: what saturates the replicas, spread over the evaluators
                    threads = threads_for(replicas, model, n_evaluators * evaluators.cfg.threads)
                else:
                    threads = args.threads or threads_for(replicas, model, args.max_threads)
                n = args.examples or examples_for(threads, calls_per_run[name], model, args.seconds)
                row = measure(pool, workload(name, n), model, args.adapter, threads, evaluators)
                rows.append(row)
                print(f"  {name}: {row.runs} runs in {row.wall_s:.1f}s = {row.runs_per_s:.1f} runs/s, {threads} "
                      f"threads, driver CPU {row.driver_cpu_ms_per_run:.1f} ms/run, evaluators "
                      f"{row.evaluator_cpu_ms_per_run:.1f} ms/run", flush=True)
    if evaluators:
        evaluators.stop()
    return rows


def add_efficiency(rows: list[Row]) -> None:
    """Efficiency = runs/s over replicas x the same program's (and evaluators') runs/s per replica at the fewest replicas."""
    for row in rows:
        base = min((r for r in rows if (r.program, r.evaluators) == (row.program, row.evaluators)),
                   key=lambda r: r.replicas)
        row.efficiency = row.runs_per_s / (row.replicas * base.runs_per_s / base.replicas)


def table(rows: list[Row], model: LatencyModel) -> str:
    """The markdown table: rates in wall time (runs/s sim = x time_scale), call latency in simulated s."""
    s = model.time_scale
    head = ("| program | replicas | evaluators | threads | runs | wall s | runs/s | runs/s sim | capacity runs/s | "
            "thread bound | efficiency | driver CPU ms/run | evaluator CPU ms/run | ms/call | driver cores | "
            "replica CPU ms/call | machine busy | "
            "token util (min) | call p50 / p99 s sim | score % | parse fail / errors |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p50 = f"{r.call_p50_s / s:.2f}" if r.call_p50_s is not None else "-"
        p99 = f"{r.call_p99_s / s:.2f}" if r.call_p99_s is not None else "-"
        lines.append(
            f"| {r.program} | {r.replicas} | {r.evaluators} | {r.threads} | {r.runs} | {r.wall_s:.1f} | "
            f"{r.runs_per_s:.1f} | {r.runs_per_s * s:.1f} | {r.capacity_runs_per_s:.1f} | {r.thread_bound_runs_per_s:.1f} | "
            f"{r.efficiency:.2f} | {r.driver_cpu_ms_per_run:.2f} | {r.evaluator_cpu_ms_per_run:.2f} | "
            f"{r.driver_cpu_ms_per_call:.2f} | "
            f"{r.driver_cores:.2f} | {r.replica_cpu_ms_per_call:.2f} | {100 * r.machine_busy:.0f}% | "
            f"{100 * r.token_utilisation:.0f}% ({100 * r.min_replica_utilisation:.0f}%) | {p50} / {p99} | "
            f"{r.score:.1f} | {r.parse_failures} / {r.errors} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", default="iris,hotpotqa", help="comma list of iris, hotpotqa")
    ap.add_argument("--replicas", default="1,4,16,32,64", help="comma list of replica counts")
    ap.add_argument("--examples", type=int, default=0, help="runs per config; 0: enough for --seconds")
    ap.add_argument("--seconds", type=float, default=12.0, help="target wall seconds per config (with --examples 0)")
    ap.add_argument("--threads", type=int, default=0, help="driver threads; 0: replicas x saturating batch")
    ap.add_argument("--max-threads", type=int, default=512, help="cap of the automatic thread count")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiplies every simulated duration")
    ap.add_argument("--step-s", type=float, default=0.025, help="decode step, seconds (unloaded latency/token)")
    ap.add_argument("--tok-s", type=float, default=2500.0, help="output tokens/s of one saturated replica")
    ap.add_argument("--max-seqs", type=int, default=256, help="sequences a replica runs at once")
    ap.add_argument("--answer-tokens", type=int, default=200, help="tokens per answer (and max_tokens)")
    ap.add_argument("--evaluators", default="0",
                    help="comma list: run the programs in the driver's threads (0) and/or on N evaluator actors")
    ap.add_argument("--evaluator-threads", type=int, default=0,
                    help="threads per evaluator; 0: the most replicas' saturating calls / evaluators")
    ap.add_argument("--adapter", default="constrained", help="chat or constrained (Tandem's default)")
    ap.add_argument("--replica-cpus", type=float, default=0.01, help="Ray CPUs reserved per replica actor")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1,4 replicas, time scale 0.2, 3 s")
    ap.add_argument("--out", default="benchmarks/out/driver_scale.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.replicas, args.time_scale, args.seconds = "1,4", 0.2, 3.0
    if args.adapter not in ("chat", "constrained"):
        ap.error("--adapter must be chat or constrained (the simulated engine writes ChatAdapter's layout)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray

    from actors import connect

    model = LatencyModel(args.step_s, args.tok_s, args.max_seqs, args.answer_tokens, args.time_scale)
    model_dir = tempfile.mkdtemp(prefix="driver-scale-model-")
    (Path(model_dir) / "config.json").write_text("{}")  # a local "checkpoint" that nothing loads
    most = max(int(x) for x in args.replicas.split(","))
    connect(num_cpus=max(2, math.ceil(most * args.replica_cpus)))
    try:
        rows = [row for n in sorted({int(x) for x in args.evaluators.split(",")})
                for row in run_all_configs(args, model, model_dir, n)]
    finally:
        ray.shutdown()
        shutil.rmtree(model_dir, ignore_errors=True)
    add_efficiency(rows)
    print(f"\nmodel: step {model.step_s * 1e3:.0f} ms, {model.tok_s:.0f} tok/s per replica "
          f"({model.calls_per_s:.1f} calls/s), {model.answer_tokens} tokens/answer, max_seqs {model.max_seqs}, "
          f"time scale {model.time_scale} (unloaded call {model.answer_tokens * model.step_s:.1f} s sim); "
          f"adapter {args.adapter}; {os.cpu_count()} CPUs\n")
    print(table(rows, model))
    result = {"benchmark": "driver_scale", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "cpus": os.cpu_count(), "args": vars(args), "model": asdict(model), "rows": [asdict(r) for r in rows]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
