"""Fault matrix (issue 17 §1): a real ``tandem run`` with one process killed at a chosen moment.

Each row runs the CLI (``python -m engine run``) as a subprocess: the tiny random Llama on 2
vLLM-CPU replicas, ``p -> w`` (relaunch; one CPU Ray Train worker), and the stranger's program of
``tests/integration/engine/test_user_program.py`` (any completion reads as "forty two"; the metric
passes the even-numbered questions whatever the model says, so the weight step has rows). Each
invocation gets a fresh DSPy cache (every LM call reaches a replica) and its own
``TANDEM_TEST_MARK``: its replicas (``ray::LMReplica``), engines (``VLLM::EngineCore``) and Ray Train
workers are found by mark and title and killed exactly. Rows: ``ROWS``, each ``row_*`` says what
it does; ``baseline`` (undisturbed) always runs first. Beyond kills (issue 30): two runs on one
``ray start --head`` cluster and two on one run dir, each run-dir file truncated in a copy of the
finished baseline, a ``storage:`` push killed halfway and resumed on another run dir, and, on
``tandem serve`` of the baseline, 1,000 concurrent clients and a SIGSTOPped vLLM EngineCore.

Goal: every row completes with scores identical to the undisturbed run, or fails loudly with the
cause in its last console line and a resumable run dir (the rerun completes, identical scores);
never a silent wrong score, never an orphan. "leftovers": what of an invocation is alive ``--grace``
s after it exited — carrying its mark, or seen in its process tree (Ray's dashboard and agents do
not carry the mark; a SIGKILLed driver's orphans leave the tree) — counted before this script kills it.

Knows and does not: here a score does not depend on what the model writes, only on which examples
were answered without an error (an error scores 0), so a score unlike the undisturbed run's means
errors were scored; error counts (``step.json`` ``extra.errors``, ``test.json``) are compared too.
It cannot tell a better model from a worse one; the baseline is run once. Triggers watch the run
dir (the prompt step runs from ``00_baseline/`` stored to ``01_p/`` stored, about 1 s here) or
process titles (a replica in ``generate``, a ``RayTrainWorker``), then wait ``--delay`` s;
whether the step still ran at the fault is recorded (``in_step``).

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/faults.py [--faults replica_kill,engine_kill]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from engine.store.remote import kept  # noqa: E402  (what storage copies)
from tests.integration.engine.test_user_program import USER_PROGRAM  # noqa: E402  (the stranger's program)
from tests.integration.ports import free_port  # noqa: E402
from tests.integration.processes import marked, marked_env, new_mark  # noqa: E402

REPLICAS, MAX_RESTARTS = 2, 3  # max_restarts: actors.config.ReplicaConfig's default
FLAGS = ["--program", "faultprog", "--model", "tiny-llama", "--strategy", "p -> w", "--replicas", str(REPLICAS),
         "--train-size", "8", "--val-size", "4", "--test-size", "4", "--max-tokens", "8", "--adapter", "chat",
         "--threads", "8", "--prompt-num-candidate-programs", "1", "--lora-rank", "8", "--lora-alpha", "16",
         "--lora-epochs", "1", "--lora-lr", "1e-3", "--lora-cpus-per-worker", "1", "--lora-max-seq-len", "256",
         "--no-tracking"]
ROWS = ["replica_kill", "engine_kill", "replicas_gone", "train_worker_kill", "driver_kill", "sigterm_run",
        "sigterm_serve", "two_runs_one_cluster", "two_runs_one_dir", "truncated_files", "push_killed", "http_flood",
        "engine_sigstop"]
SERVE_FLAGS = ["--allow-program", "faultprog"]  # the stranger's program is not a built-in one


@dataclass
class Bench:
    """What every row shares: the temp home, limits, and the undisturbed run's scores."""

    home: Path
    timeout_s: float
    delay_s: float
    grace_s: float
    baseline: dict | None = None
    baseline_dir: Path | None = None
    started: list = field(default_factory=list)  # every Invocation, for the cleanup after a crash


@dataclass
class Row:
    """One fault: what was done, when, what the run(s) did, and how the scores compare."""

    fault: str
    when: str
    exit_codes: list = field(default_factory=list)
    outcome: str = ""
    scores: str = ""
    leftovers: list = field(default_factory=list)  # per invocation: '<pid> <cmdline>' still alive
    wall_s: float = 0.0
    killed: list = field(default_factory=list)  # '<pid> <cmdline>' of every process this row killed
    in_step: bool | None = None  # the step was still running when the fault hit
    stored: list = field(default_factory=list)  # completed steps in the run dir after the faulted invocation
    resumed: int | None = None  # steps the rerun reported as "done in an earlier run"
    final: dict = field(default_factory=dict)  # the last invocation's scores
    extra: dict = field(default_factory=dict)


class Invocation:
    """One ``python -m engine ARGS`` subprocess (or ``command``) with its own mark, console written to a file."""

    def __init__(self, bench: Bench, args: list[str], label: str, command: list[str] | None = None,
                 **env_extra: str):
        self.mark = new_mark()
        bench.started.append(self)
        self.console = bench.home / f"{len(bench.started):02d}-{label}.out"
        env = marked_env(self.mark, PYTHONPATH=f"{bench.home}{os.pathsep}{REPO}", HF_HUB_OFFLINE="1",
                         MLFLOW_DISABLE_TELEMETRY="true", DSPY_CACHEDIR=tempfile.mkdtemp(dir=bench.home), **env_extra)
        env.pop("RAY_ADDRESS", None)  # every run names its Ray: its own local one, or --address
        with open(self.console, "w") as out:
            self.proc = subprocess.Popen([*(command or [sys.executable, "-m", "engine"]), *args], cwd=bench.home,
                                         env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.started, self.timeout_s = time.monotonic(), bench.timeout_s
        self.seen: dict[int, float] = {}  # pid -> start time of every process seen below the invocation
        threading.Thread(target=self._track, daemon=True).start()

    def _track(self) -> None:
        """Remember its process tree until it exits (see the module's docstring: leftovers)."""
        while True:
            try:
                root = psutil.Process(self.proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
            if self.proc.poll() is not None:
                return
            time.sleep(0.5)

    def survivors(self) -> dict[int, tuple[psutil.Process, bool]]:
        """pid -> (process, carries the mark) of what is alive of the invocation."""
        alive = {p.pid: (p, True) for p in marked(self.mark)}
        for pid, created in list(self.seen.items()):
            try:
                p = psutil.Process(pid)
                if pid not in alive and p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = (p, False)
            except psutil.Error:
                continue
        return alive

    def cleanup(self) -> None:
        """SIGKILL whatever is left of the invocation."""
        for p, _ in self.survivors().values():
            kill(p)

    def finish(self) -> int | str:
        """The exit code; a run past its timeout is SIGKILLed and reported as 'timeout'."""
        try:
            return self.proc.wait(timeout=max(1.0, self.timeout_s - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "timeout"

    def last_line(self) -> str:
        return ([""] + [ln.strip() for ln in self.console.read_text(errors="replace").splitlines() if ln.strip()])[-1]


def start_run(bench: Bench, run_dir: Path, label: str, *more: str) -> Invocation:
    """``tandem run`` with this benchmark's flags (and ``more``) into ``run_dir`` (the same command again
    resumes it)."""
    return Invocation(bench, ["run", *FLAGS, "--run-dir", str(run_dir), *more], label)


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()).strip()[:120] or proc.name()}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def title(proc: psutil.Process) -> str:
    """The first command-line word, as Ray and vLLM set it (``ray::LMReplica.generate``, ``VLLM::EngineCore``)."""
    try:
        return (proc.cmdline() or [""])[0]
    except psutil.Error:
        return ""


def find(mark: str, text: str) -> list[psutil.Process]:
    """The live processes carrying ``mark`` whose title contains ``text``."""
    return [proc for proc in marked(mark) if text in title(proc)]


def signal_driver_only(inv: Invocation, sig: int) -> list[str]:
    """Send ``sig`` to the invocation's own process only; ['<pid> <cmdline>'] if it was there."""
    try:
        return [k for k in [kill(psutil.Process(inv.proc.pid), sig)] if k]
    except psutil.NoSuchProcess:
        return []


def kill(proc: psutil.Process, sig: int = signal.SIGKILL) -> str | None:
    """Send ``sig``; the process as it was described just before, or None if it was already gone."""
    text = describe(proc)
    try:
        return proc.send_signal(sig) or text
    except psutil.NoSuchProcess:
        return None


def wait_until(check, inv: Invocation, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``check()`` until true (True), or the invocation exits or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and inv.proc.poll() is None:
        if check():
            return True
        time.sleep(poll_s)
    return False


def ended(bench: Bench, inv: Invocation) -> tuple[int | str, list[str]]:
    """Wait for the invocation; its exit code and what of it is alive ``grace_s`` later; then kill that."""
    code, deadline = inv.finish(), time.monotonic() + bench.grace_s
    while (alive := inv.survivors()) and time.monotonic() < deadline:
        time.sleep(1)
    inv.cleanup()
    return code, [describe(p) + ("" if mark else " [no mark]") for p, mark in alive.values()]


def read(path: Path) -> dict:
    """A run-dir JSON file, ``{}`` when absent, ``{"damaged": True}`` when it cannot be read."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {"damaged": True}


def scores(run_dir: Path) -> dict:
    """Every completed step's valset and test score and error counts, and best.json's winner (a damaged
    file reads as ``"damaged"``)."""
    steps = {}
    for path in sorted(run_dir.glob("[0-9][0-9]_*")):
        if path.suffix == ".tmp" or not (path / "step.json").is_file():
            continue
        record, test = read(path / "step.json"), read(path / "test.json")
        if record.get("damaged"):
            steps[path.name] = {"val": "damaged", "val_errors": None, "test": test.get("score"),
                                "test_errors": test.get("errors"), "models": None}
            continue
        steps[path.name] = {"val": record["score"], "val_errors": (record["extra"].get("errors") or {}).get("count"),
                            "test": "damaged" if test.get("damaged") else test.get("score"),
                            "test_errors": test.get("errors"), "models": record["models"]}
    best = read(run_dir / "best.json")
    return {"steps": steps, "best": {k: "damaged" if best.get("damaged") else best.get(k)
                                     for k in ("strategy", "score", "test_score", "failed_step")}}


def compare(got: dict, want: dict | None) -> str:
    """'identical', or what differs from the undisturbed run (step by step, then the winner); a model id
    that differs (the adapter's id names a digest of its weights) is noted apart, it is not a score."""
    if want is None:
        return "n/a (no baseline)"
    diffs, notes = [f"{name} missing" for name in want["steps"] if name not in got["steps"]], []
    for name in sorted(want["steps"].keys() & got["steps"].keys()):
        mine, ref = got["steps"][name], want["steps"][name]
        diffs += [f"{name} {k} {mine[k]}≠{ref[k]}" for k in ref if k != "models" and mine[k] != ref[k]]
        notes += [f"{name} models {mine['models']}≠{ref['models']}"] if mine["models"] != ref["models"] else []
    diffs += [f"{name} extra" for name in got["steps"] if name not in want["steps"]]
    diffs += [f"best.{k} {got['best'][k]}≠{v}" for k, v in want["best"].items() if got["best"][k] != v]
    return ("identical" if not diffs else "DIFFERENT: " + "; ".join(diffs)) + "".join(f" (note: {n})" for n in notes)


def outcome(code: int | str, inv: Invocation) -> str:
    if code in (0, -signal.SIGKILL):
        return "completed" if code == 0 else "killed (SIGKILL by this script)"
    kind = {130: "stopped", 143: "stopped", 1: "failed loudly", 2: "failed loudly"}.get(code, f"exit {code}")
    return f"{kind}: {inv.last_line()}"


def settle(bench: Bench, row: Row, inv: Invocation, run_dir: Path, started: float) -> Row:
    """Wait for ``inv``; fill exit code, outcome, leftovers, scores against the baseline, wall."""
    code, left = ended(bench, inv)
    row.exit_codes.append(code)
    row.outcome = "; rerun: ".join(filter(None, [row.outcome, outcome(code, inv)]))
    row.leftovers.append(left)
    row.final = scores(run_dir)
    row.scores = compare(row.final, bench.baseline)
    row.wall_s = round(time.monotonic() - started, 1)
    return row


def rerun(bench: Bench, row: Row, run_dir: Path, started: float) -> Row:
    """Rerun the same command on the same run dir (a resume) and settle the row on it."""
    row.extra["first_scores"], row.stored = row.final, sorted(scores(run_dir)["steps"])
    inv = start_run(bench, run_dir, f"{row.fault}-rerun")
    row = settle(bench, row, inv, run_dir, started)
    row.resumed = inv.console.read_text(errors="replace").count("done in an earlier run")
    return row


def row_baseline(bench: Bench) -> Row:
    run_dir, started = bench.home / "baseline", time.monotonic()
    row = settle(bench, Row("baseline", "undisturbed"), start_run(bench, run_dir, "baseline"), run_dir, started)
    bench.baseline, bench.baseline_dir = row.final, run_dir
    row.scores = "(the reference)"
    return row


def busy_replica(bench: Bench, inv: Invocation, run_dir: Path) -> list[psutil.Process]:
    """In the prompt step (about a second here): a replica while it runs ``generate`` (its title), or []."""
    if not wait_until(lambda: (run_dir / "00_baseline").exists(), inv, bench.timeout_s):
        return []
    while inv.proc.poll() is None and not (run_dir / "01_p").exists():
        if busy := find(inv.mark, "LMReplica.generate"):
            time.sleep(bench.delay_s)
            return busy[:1]
        time.sleep(0.02)
    return []


def kill_busy(bench: Bench, fault: str, what: str, victims) -> Row:
    """SIGKILL ``victims(replica)`` of a replica busy in the prompt step; the run goes on."""
    run_dir, started = bench.home / fault, time.monotonic()
    row = Row(fault, f"prompt step, a replica in generate + {bench.delay_s:g} s: SIGKILL {what}")
    inv = start_run(bench, run_dir, fault)
    try:
        targets = [v for replica in busy_replica(bench, inv, run_dir) for v in victims(replica)][:1]
    except psutil.Error:
        targets = []
    row.in_step = not (run_dir / "01_p").exists()
    row.killed = [k for k in map(kill, targets) if k]
    return settle(bench, row, inv, run_dir, started)


def row_replica_kill(bench: Bench) -> Row:
    """SIGKILL a replica actor's process while it answers; Ray restarts it, the router re-sends."""
    return kill_busy(bench, "replica_kill", "it", lambda replica: [replica])


def row_engine_kill(bench: Bench) -> Row:
    """SIGKILL a busy replica's vLLM EngineCore; the replica exits, Ray restarts it, the router re-sends."""
    return kill_busy(bench, "engine_kill", "its EngineCore", lambda replica: [
        c for c in replica.children(recursive=True) if "EngineCore" in title(c)])


def row_replicas_gone(bench: Bench) -> Row:
    """Every replica process SIGKILLed as it appears, until each replica is out of restarts; rerun."""
    run_dir, started = bench.home / "replicas_gone", time.monotonic()
    budget = REPLICAS * (MAX_RESTARTS + 1)
    row = Row("replicas_gone", f"00_baseline stored: SIGKILL every LMReplica process as it appears, {budget} kills")
    inv = start_run(bench, run_dir, "replicas_gone")
    if wait_until(lambda: (run_dir / "00_baseline").exists(), inv, bench.timeout_s):
        row.in_step = not (run_dir / "01_p").exists()
        deadline = time.monotonic() + bench.timeout_s
        done: set[int] = set()
        while inv.proc.poll() is None and len(row.killed) < budget and time.monotonic() < deadline:
            for proc in [p for p in find(inv.mark, "LMReplica") if p.pid not in done][: budget - len(row.killed)]:
                done.add(proc.pid)
                if (text := kill(proc)) is not None:
                    row.killed.append(text)
            time.sleep(0.2)
    return rerun(bench, settle(bench, row, inv, run_dir, started), run_dir, started)


def row_train_worker_kill(bench: Bench) -> Row:
    """SIGKILL the Ray Train worker ``delay_s`` after it appears (at 0 s: while it sets up, before the fit;
    its log lines reach the run's log only after a fit of this size, too late for a trigger); Ray Train
    starts the training run again (``--lora-max-failures`` 1)."""
    run_dir, started = bench.home / "train_worker_kill", time.monotonic()
    row = Row("train_worker_kill", f"RayTrainWorker appears + {bench.delay_s:g} s: SIGKILL it")
    inv = start_run(bench, run_dir, "train_worker_kill")
    if wait_until(lambda: bool(find(inv.mark, "RayTrainWorker")), inv, bench.timeout_s, poll_s=0.2):
        time.sleep(bench.delay_s)
        row.in_step = not (run_dir / "02_w").exists()
        row.killed = [k for k in map(kill, find(inv.mark, "RayTrainWorker")[:1]) if k]
    return settle(bench, row, inv, run_dir, started)


def signal_driver(bench: Bench, row: Row, step: str, sig: int, trigger) -> Row:
    """Send ``sig`` to the driver only once ``trigger(inv, run_dir)`` (in ``step``); then rerun (a resume)."""
    run_dir, started = bench.home / row.fault, time.monotonic()
    inv = start_run(bench, run_dir, row.fault)
    if trigger(inv, run_dir):
        time.sleep(bench.delay_s)
        row.in_step = not (run_dir / step).exists()  # not stored yet (01_p.tmp appears only at its commit)
        row.killed = signal_driver_only(inv, sig)
    return rerun(bench, settle(bench, row, inv, run_dir, started), run_dir, started)


def row_driver_kill(bench: Bench) -> Row:
    """SIGKILL only the driver while its weight step trains: its orphans are the leftovers; the rerun resumes."""
    row = Row("driver_kill", f"02_w.tmp and a RayTrainWorker + {bench.delay_s:g} s: SIGKILL the driver only")
    return signal_driver(bench, row, "02_w", signal.SIGKILL, lambda inv, run_dir: wait_until(
        lambda: (run_dir / "02_w.tmp").exists() and bool(find(inv.mark, "RayTrainWorker")), inv, bench.timeout_s))


def row_sigterm_run(bench: Bench) -> Row:
    """SIGTERM the driver in the prompt step: expected exit 143, nothing left; the rerun resumes."""
    row = Row("sigterm_run", f"prompt step, a replica in generate + {bench.delay_s:g} s: SIGTERM the driver")
    return signal_driver(bench, row, "01_p", signal.SIGTERM,
                         lambda inv, run_dir: bool(busy_replica(bench, inv, run_dir)))


def answering(url: str) -> bool:
    """Ready = answers (/healthz is liveness: 200 while the LM deployment still starts)."""
    import httpx
    try:
        return httpx.post(f"{url}/v1/predict", json={"question": "What is 1 + 1?"}, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def start_serve(bench: Bench, label: str, *flags: str) -> tuple[Invocation, str, bool]:
    """``tandem serve`` on the undisturbed run dir; (invocation, its URL, whether it answered in time)."""
    url = f"http://127.0.0.1:{(port := free_port())}"
    inv = Invocation(bench, ["serve", str(bench.baseline_dir), "--port", str(port), *SERVE_FLAGS, *flags], label)
    return inv, url, wait_until(lambda: answering(url), inv, bench.timeout_s, poll_s=2)


def no_baseline(bench: Bench, row: Row) -> Row | None:
    """The row, skipped, when there is no finished undisturbed run dir to serve or copy; else None."""
    if bench.baseline_dir is None or not (bench.baseline_dir / "best.json").is_file():
        return replace(row, outcome="skipped: no finished baseline run dir")
    return None


def end_serve(bench: Bench, row: Row, inv: Invocation) -> None:
    """Wait for the server's exit; its code, outcome and leftovers into ``row``."""
    code, left = ended(bench, inv)
    row.exit_codes, row.leftovers, row.outcome = [code], [left], outcome(code, inv)


def row_sigterm_serve(bench: Bench, clients: int = 4, load_s: float = 5.0) -> Row:
    """``tandem serve`` on the undisturbed run dir under HTTP load, then SIGTERM: exit 143, nothing left."""
    import httpx
    row = Row("sigterm_serve", f"answers; {clients} clients x {load_s:g} s of /v1/predict; SIGTERM the server",
              scores="n/a")
    if skipped := no_baseline(bench, row):
        return skipped
    started = time.monotonic()
    inv, url, ready = start_serve(bench, "sigterm_serve")
    statuses, phase, stop, lock = {}, ["before"], threading.Event(), threading.Lock()  # '<phase>:<status>' -> n

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                sent = phase[0]  # counted by when the request was sent
                try:
                    status = str(http.post("/v1/predict", json={"question": f"What is {k} + 1?"}).status_code)
                except Exception as exc:  # a transport failure is counted, the load goes on
                    status = type(exc).__name__
                    time.sleep(0.2)
                with lock:
                    statuses[f"sent {sent}:{status}"] = statuses.get(f"sent {sent}:{status}", 0) + 1

    if ready:
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        time.sleep(load_s)
        phase[0] = "after SIGTERM"
        row.killed = signal_driver_only(inv, signal.SIGTERM)
        inv.finish()
        stop.set()
        for t in threads:
            t.join(timeout=35)
    end_serve(bench, row, inv)
    row.extra["statuses"], row.wall_s = statuses, round(time.monotonic() - started, 1)
    return row


async def _load(url: str, clients: int, seconds: float, phase: list[str], stats: dict, timeout_s: float) -> None:
    """``clients`` concurrent clients posting /v1/predict for ``seconds``; counts '<phase>:<status>' (the phase
    when sent) in ``stats['statuses']``, the slowest answer per status in ``stats['slowest_s']``. A 503
    client waits 0.5 s before its next request (a flood, not a busy loop on these 2 cores)."""
    import httpx
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        async def client(k: int) -> None:
            while time.monotonic() < deadline:
                sent, t0 = phase[0], time.monotonic()
                try:
                    r = await http.post("/v1/predict", json={"question": f"What is {k} + 1?"})
                    status = str(r.status_code) + (" no Retry-After" if r.status_code == 503
                                                   and "retry-after" not in r.headers else "")
                except Exception as exc:  # a transport failure is counted, the load goes on
                    status = type(exc).__name__
                key = f"sent {sent}:{status}"
                stats["statuses"][key] = stats["statuses"].get(key, 0) + 1
                stats["slowest_s"][key] = round(max(stats["slowest_s"].get(key, 0.0), time.monotonic() - t0), 2)
                if status != "200":
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(client(k) for k in range(clients)))


def load_in_background(url: str, clients: int, seconds: float, phase: list[str], timeout_s: float = 600):
    """Start ``_load`` in a thread; (thread, stats) — join the thread, then read the stats."""
    stats: dict = {"statuses": {}, "slowest_s": {}}
    thread = threading.Thread(target=lambda: asyncio.run(_load(url, clients, seconds, phase, stats, timeout_s)),
                              daemon=True)
    thread.start()
    return thread, stats


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rss_gb(inv: Invocation) -> float:
    """Resident memory of everything the invocation runs (its processes carrying its mark), GB."""
    total = 0
    for p, _ in inv.survivors().values():
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return round(total / 1e9, 2)


def row_http_flood(bench: Bench, clients: int = 1000, load_s: float = 30.0) -> Row:
    """1,000 concurrent clients on ``tandem serve`` (its defaults: 64 in flight, 256 queued): the rest get
    503 + Retry-After, none a 500, memory stays flat, it still answers after; then SIGTERM."""
    row = Row("http_flood", f"answers; {clients} concurrent clients x {load_s:g} s of /v1/predict, then SIGTERM",
              scores="n/a")
    if skipped := no_baseline(bench, row):
        return skipped
    started = time.monotonic()
    inv, url, ready = start_serve(bench, "http_flood")
    if ready:
        memory = {"before": rss_gb(inv)}
        thread, stats = load_in_background(url, clients, load_s, ["flood"])
        peak = memory["before"]
        while thread.is_alive():
            peak = max(peak, rss_gb(inv))
            thread.join(timeout=1.0)
        memory["peak"] = peak
        time.sleep(10)
        memory["10 s after"] = rss_gb(inv)
        row.extra.update(stats, memory_gb=memory, answers_after=answering(url))
        row.killed = signal_driver_only(inv, signal.SIGTERM)
    end_serve(bench, row, inv)
    if ready:
        counts = row.extra["statuses"]
        row.outcome += (f"; {sum(counts.values())} requests: " + ", ".join(f"{k.split(':', 1)[1]} x{n}"
                        for k, n in sorted(counts.items())) + f"; RSS GB {row.extra['memory_gb']}; "
                        f"answers after: {row.extra['answers_after']}")
    row.wall_s = round(time.monotonic() - started, 1)
    return row


def row_engine_sigstop(bench: Bench, clients: int = 4, timeout_s: float = 20.0, load_s: float = 120.0) -> Row:
    """SIGSTOP the served LM replica's vLLM EngineCore under load (``--request-timeout-s`` 20, so its health
    check fails after 20 s without progress): requests time out as 504, never hang; Serve replaces the
    replica; answers come back; the stopped engine is gone; then SIGTERM."""
    row = Row("engine_sigstop", f"answers; {clients} clients; SIGSTOP the LM's EngineCore; --request-timeout-s "
              f"{timeout_s:g}; {load_s:g} s of load", scores="n/a")
    if skipped := no_baseline(bench, row):
        return skipped
    started = time.monotonic()
    inv, url, ready = start_serve(bench, "engine_sigstop", "--request-timeout-s", f"{timeout_s:g}")
    engines = find(inv.mark, "EngineCore") if ready else []
    if engines:
        phase = ["before"]
        thread, stats = load_in_background(url, clients, load_s, phase, timeout_s=timeout_s * 3)
        time.sleep(5)
        victim, stopped_at = engines[0], time.monotonic()
        row.killed = [k for k in [kill(victim, signal.SIGSTOP)] if k]
        phase[0] = "after SIGSTOP"

        def replaced() -> bool:
            return any(p.pid != victim.pid for p in find(inv.mark, "EngineCore"))

        if wait_until(replaced, inv, load_s):
            row.extra["new_engine_after_s"] = round(time.monotonic() - stopped_at, 1)
        thread.join()
        row.extra.update(stats, stopped_engine_alive=alive(victim), answers_after=answering(url))
        row.killed += signal_driver_only(inv, signal.SIGTERM)
    end_serve(bench, row, inv)
    if engines:
        counts, slowest = row.extra["statuses"], row.extra["slowest_s"]
        row.outcome += ("; " + ", ".join(f"{k} x{n} (slowest {slowest[k]} s)" for k, n in sorted(counts.items()))
                        + f"; a new EngineCore {row.extra.get('new_engine_after_s', 'never')} s after the stop; "
                        f"stopped engine alive at the end: {row.extra['stopped_engine_alive']}; "
                        f"answers after: {row.extra['answers_after']}")
    row.wall_s = round(time.monotonic() - started, 1)
    return row


def settle_many(bench: Bench, row: Row, invs: list[tuple[Invocation, Path]], started: float) -> Row:
    """``settle`` for runs that went at once: every exit code, outcome, leftovers and score comparison."""
    outcomes, compared, finals = [], [], {}
    for inv, run_dir in invs:
        code, left = ended(bench, inv)
        row.exit_codes.append(code)
        row.leftovers.append(left)
        outcomes.append(f"{run_dir.name}: {outcome(code, inv)}")
        finals[run_dir.name] = scores(run_dir)
        compared.append(f"{run_dir.name}: {compare(finals[run_dir.name], bench.baseline)}")
    row.outcome, row.scores, row.final = "; ".join(outcomes), "; ".join(compared), finals
    row.wall_s = round(time.monotonic() - started, 1)
    return row


def row_two_runs_one_cluster(bench: Bench, cpus: int = 6) -> Row:
    """``ray start --head``, then two runs on it 3 s apart (``--address``, two run dirs): both complete with
    the undisturbed scores, each with its own pool; nothing of theirs is left on the cluster."""
    started, ray = time.monotonic(), str(Path(sys.executable).parent / "ray")
    row = Row("two_runs_one_cluster", f"`ray start --head --num-cpus {cpus}`; two `tandem run --address` 3 s apart")
    port, temp = free_port(), tempfile.mkdtemp(prefix="rayf")  # short: Ray's socket paths have a length limit
    (Path(temp) / "token").write_text(secrets.token_hex(32))  # Ray 2.60: `ray start` turns token auth on
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(Path(temp) / "token")}  # as the README says
    head = Invocation(bench, ["start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                              f"--num-cpus={cpus}",
                              f"--dashboard-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"],
                      "ray-head", command=[ray], RAY_process_group_cleanup_enabled="1", **auth)
    address = f"127.0.0.1:{port}"
    try:
        up = wait_until(lambda: "--block" in head.console.read_text(errors="replace"), head, 120, poll_s=1)
        if not up:
            return replace(row, outcome=f"BENCHMARK ERROR: the head did not come up: {head.last_line()}")
        invs = []
        for k in (1, 2):
            run_dir = bench.home / f"shared-{k}"
            invs.append((Invocation(bench, ["run", *FLAGS, "--run-dir", str(run_dir), "--address", address],
                                    f"shared-{k}", **auth), run_dir))
            time.sleep(3)
        row.killed = ["(none: two runs at once)"]
        row = settle_many(bench, row, invs, started)
        on_cluster = [describe(p) for p in marked(head.mark)
                      if any(t in title(p) for t in ("LMReplica", "EngineCore", "RayTrainWorker", "PoolState"))]
        row.extra["run_processes_left_on_cluster"] = on_cluster
        row.outcome += f"; the runs' processes left on the cluster: {len(on_cluster)}"
        pools = {}
        for inv, run_dir in invs:
            text = inv.console.read_text(errors="replace")
            pools[run_dir.name] = sorted(set(re.findall(r"run-shared-\d-[0-9a-f]{8}", text)))
        row.extra["pools"] = pools
    finally:
        head.proc.send_signal(signal.SIGTERM)
        ended(bench, head)
        shutil.rmtree(temp, ignore_errors=True)
    return row


def row_two_runs_one_dir(bench: Bench) -> Row:
    """A second ``tandem run`` on a run dir another run holds: refused at once, naming the holder, nothing
    written; the first completes with the undisturbed scores."""
    run_dir, started = bench.home / "one_dir", time.monotonic()
    row = Row("two_runs_one_dir", "run.lock taken by the first run: start the same command on the same dir")
    first = start_run(bench, run_dir, "one_dir-first")
    invs = [(first, run_dir)]
    if wait_until(lambda: (run_dir / "run.lock").exists(), first, bench.timeout_s, poll_s=0.05):
        invs.append((start_run(bench, run_dir, "one_dir-second"), run_dir))
        row.killed = ["(none: a second writer)"]
    for inv, _ in invs[::-1]:  # the second first: it should be refused at once
        inv.finish()
    return settle_many(bench, row, invs, started)


def truncate(path: Path) -> None:
    """Cut ``path`` to half its bytes, as a crash mid-write on a filesystem without rename would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


TRUNCATED = ["run.json", "01_p/step.json", "01_p/test.json", "01_p/program.json", "best.json"]


def row_truncated_files(bench: Bench) -> list[Row]:
    """A copy of the finished undisturbed run dir with one file cut to half its bytes, then the same command
    (a resume): a record is refused naming the file and what to do, an optional file is scored again."""
    rows = []
    for rel in TRUNCATED:
        row = Row(f"truncated {rel}", f"finished run dir copied, {rel} cut to half its bytes; the same command")
        if skipped := no_baseline(bench, row):
            rows.append(skipped)
            continue
        run_dir, started = bench.home / f"truncated-{rel.replace('/', '-')}", time.monotonic()
        shutil.copytree(bench.baseline_dir, run_dir)
        truncate(run_dir / rel)
        row.killed = [f"(truncated {rel})"]
        rows.append(settle(bench, row, start_run(bench, run_dir, run_dir.name), run_dir, started))
    return rows


def row_push_killed(bench: Bench) -> Row:
    """``--storage DIR``: SIGKILL the driver as soon as its push has put a first file there, then the same
    command on another run dir with the same storage (another machine): it must not take the half-pushed
    copy for a run, and completes with the undisturbed scores; the storage then holds the whole run."""
    run_dir, remote, started = bench.home / "push_a", bench.home / "remote", time.monotonic()
    row = Row("push_killed", "--storage DIR: first file at DIR: SIGKILL the driver; rerun on another dir")
    inv = start_run(bench, run_dir, "push_killed", "--storage", str(remote))

    def pushed() -> list[str]:  # what the push copied (Ray Train writes its checkpoints under the storage too)
        files = [PurePosixPath(p.relative_to(remote).as_posix()) for p in remote.rglob("*") if p.is_file()]
        return [str(rel) for rel in files if kept(rel)] if remote.exists() else []

    scored = wait_until(lambda: len(list(run_dir.glob("*/test.json"))) >= 3, inv, bench.timeout_s, poll_s=0.2)
    if scored and wait_until(lambda: bool(pushed()), inv, bench.timeout_s, poll_s=0.0):  # the push follows
        row.killed = signal_driver_only(inv, signal.SIGKILL)
        row.in_step = True
    row = settle(bench, row, inv, run_dir, started)
    at_kill = pushed()
    row.extra["remote_after_kill"] = {"files": len(at_kill), "run.json": "run.json" in at_kill}
    elsewhere = bench.home / "push_b"
    row.extra["first_scores"] = row.final
    row = settle(bench, row, start_run(bench, elsewhere, "push_killed-elsewhere", "--storage", str(remote)),
                 elsewhere, started)
    whole = sorted(pushed())
    row.extra["remote_at_end"] = {"files": len(whole), "run.json": "run.json" in whole,
                                  "best.json": "best.json" in whole}
    row.outcome += (f"; storage after the kill: {len(at_kill)} file(s), run.json "
                    f"{'there' if 'run.json' in at_kill else 'absent'}"
                    f"; at the end: {len(whole)} files, run.json and best.json "
                    f"{'there' if {'run.json', 'best.json'} <= set(whole) else 'MISSING'}")
    return row


def table(rows: list[Row]) -> str:
    lines = ["| fault | when | outcome | exit | scores vs undisturbed | leftovers | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        when = r.when + ("" if r.in_step is None else f" (in step: {'yes' if r.in_step else 'no'})")
        when += " — NOTHING KILLED (trigger missed)" if r.fault != "baseline" and not r.killed else ""
        resume = "" if r.resumed is None else f" (stored {', '.join(r.stored) or 'none'}; rerun skipped {r.resumed})"
        lines.append(f"| {r.fault} | {when} | {r.outcome.replace('|', '/') + resume} | "
                     f"{', '.join(map(str, r.exit_codes))} | {r.scores} | "
                     f"{' / '.join(str(len(x)) for x in r.leftovers) or '-'} | {r.wall_s:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds between a trigger and the fault")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds before an exited run's processes count")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one invocation may take")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with run dirs and consoles")
    ap.add_argument("--out", default="benchmarks/out/faults.json")
    args = ap.parse_args(argv)
    if unknown := set(args.faults.split(",")) - set(ROWS) - {"baseline"}:
        ap.error(f"unknown faults {sorted(unknown)}; choose among {ROWS}")
    return args


def run_rows(bench: Bench, names: list[str]) -> list[Row]:
    rows = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        started = time.monotonic()
        try:
            got = globals()[f"row_{name}"](bench)
        except Exception as exc:  # a broken row is reported, the next one runs
            got = Row(name, "", outcome=f"BENCHMARK ERROR: {type(exc).__name__}: {exc}", scores="n/a",
                      wall_s=round(time.monotonic() - started, 1))
            got.leftovers = [[describe(p) for inv in bench.started for p, _ in inv.survivors().values()]]
            for inv in bench.started:
                inv.cleanup()
        for row in got if isinstance(got, list) else [got]:
            print(f"[{time.strftime('%H:%M:%S')}] {row.fault}: {row.outcome} | {row.scores} | "
                  f"leftovers {[len(x) for x in row.leftovers]} | killed {row.killed}", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="tandem-faults-"))
    (home / "faultprog.py").write_text(textwrap.dedent(USER_PROGRAM))
    bench = Bench(home, args.timeout, args.delay, args.grace)
    names = ["baseline", *(n for n in ROWS if n in args.faults.split(","))]
    print(f"run dirs and consoles under {home}", flush=True)
    try:
        rows = run_rows(bench, names)
    finally:
        for inv in bench.started:  # Ctrl-C or a crash: nothing this script started outlives it
            inv.cleanup()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    print("\n" + table(rows))
    result = {"benchmark": "faults", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(),
              "cpus": os.cpu_count(), "flags": FLAGS, "args": vars(args), "home": str(home) if args.keep else None,
              "baseline": bench.baseline, "rows": [asdict(r) for r in rows]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
