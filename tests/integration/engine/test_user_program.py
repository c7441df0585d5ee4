"""A stranger's run, end to end through the CLI: their own program, a hub model id, their signals.

The program is written here, outside ``programs/``: two predictors, only ``forward()``. The model
is the tiny random Llama laid out as the hub id ``acme/tiny-chat`` in a temporary HF cache, read
offline (``HF_HUB_OFFLINE=1``). ``tandem run --strategy "p -> w"``, stopped by SIGTERM in its
weight step (exit 143, nothing left running) and rerun, must train an adapter that lives under the
run dir (flat folder, relative path), from the rows of both predictors of the traces that pass the
metric; the run dir, pulled from ``--storage`` into an empty dir elsewhere, resumes
with nothing recomputed and is served by ``tandem serve`` (every route answers; the token from
``$TANDEM_SERVE_TOKEN``; ``/healthz`` 503 while its LM loads) until SIGTERM, which drains it (the
request in flight answered 200, a new one 503 + Retry-After) and exits 143 leaving no process
behind; ``--once`` and ``serve run`` with the shipped ``serve/serve_config.yaml`` deploy it too;
Ctrl-C (SIGINT) in the prompt step of a run on a relative checkpoint path exits 130 leaving nothing.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.integration.ports import free_port
from tests.integration.processes import kill_marked, left_behind, marked_env, new_mark

pytestmark = pytest.mark.integration

HUB_ID = "acme/tiny-chat"
USER_PROGRAM = '''
import dspy


class Lenient(dspy.ChatAdapter):
    """The random tiny model never writes the field markers: read any completion as "forty two"."""

    def parse(self, signature, completion):
        return {name: "forty two" for name in signature.output_fields}


class TwoStep(dspy.Module):
    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        with dspy.context(adapter=Lenient()):
            draft = self.draft(question=question).draft
            return self.answer(question=question, draft=draft)


def Program():
    return TwoStep()


def load_splits(seed=0):
    rows = [dspy.Example(question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question")
            for i in range(40)]
    return rows[:16], rows[16:28], rows[28:]


def metric(example, prediction, trace=None):
    return int(example.question.split()[2]) % 2 == 0  # half the examples pass, whatever the model says
'''
FLAGS = ["--program", "userprog", "--model", HUB_ID, "--strategy", "p -> w", "--replicas", "1",
         "--train-size", "8", "--val-size", "4", "--max-tokens", "8", "--adapter", "chat", "--threads", "8",
         "--prompt-num-candidate-programs", "1", "--lora-rank", "8", "--lora-alpha", "16", "--lora-epochs", "1",
         "--lora-lr", "1e-3", "--lora-cpus-per-worker", "1", "--lora-max-seq-len", "256"]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model):
    import ray

    if ray.is_initialized():  # each CLI run starts its own local Ray: free the session's cores
        ray.shutdown()
    home = tmp_path_factory.mktemp("stranger")
    (home / "userprog.py").write_text(textwrap.dedent(USER_PROGRAM))
    snapshot = home / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return home


def _start(home: Path, argv: list[str], mark: str | None = None, **env: str) -> subprocess.Popen:
    """``argv`` run in ``home`` with the user's module on the path and the offline HF cache."""
    env = marked_env(mark or new_mark(), PYTHONPATH=f"{home}{os.pathsep}{Path.cwd()}", HF_HOME=str(home / "hf"),
                     HF_HUB_OFFLINE="1", **env)
    return subprocess.Popen(argv, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default in the child, as in a terminal: a test session started in the background
    (``cmd &``) ignores SIGINT and its children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _tandem(home: Path, args: list[str], mark: str | None = None, **env: str) -> subprocess.Popen:
    return _start(home, [sys.executable, "-m", "engine", *args], mark, **env)


@pytest.fixture(scope="module")
def first_run(home):
    """The stranger's first run: stopped by SIGTERM in its weight step (exit 143, nothing left
    running, the prompt step kept, no half-written weight step), then rerun to the end."""
    run_dir = home / "runs" / "first"
    mark = new_mark()
    proc = _tandem(home, ["run", *FLAGS, "--run-dir", "runs/first"], mark)
    deadline = time.monotonic() + 600
    while not (run_dir / "02_w.tmp").exists():  # the weight step has begun
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "the weight step did not start"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stopped, _ = proc.communicate(timeout=180)
    again = _tandem(home, ["run", *FLAGS, "--run-dir", "runs/first"])
    out, _ = again.communicate(timeout=900)
    return FirstRun(run_dir, out, again.returncode, stopped, proc.returncode, left_behind(mark))


@dataclass(frozen=True)
class FirstRun:
    run_dir: Path
    out: str  # what the rerun printed
    returncode: int
    stopped_out: str  # what the run stopped by SIGTERM printed
    stopped_returncode: int
    stopped_left: list  # processes of the stopped run still alive after it exited


def test_sigterm_in_the_weight_step_stops_cleanly_and_the_run_resumes(first_run):
    assert first_run.stopped_returncode == 143, first_run.stopped_out[-4000:]
    assert "stopped (stopped by SIGTERM)" in first_run.stopped_out
    assert first_run.stopped_left == []
    assert first_run.returncode == 0, first_run.out[-4000:]
    assert "01_p (p): done in an earlier run" in first_run.out
    (adapter,) = json.loads((first_run.run_dir / "02_w" / "step.json").read_text())["adapters"]
    assert [p.name for p in (first_run.run_dir / "adapters").iterdir()] == [Path(adapter["path"]).name]


def test_own_program_and_hub_id_train_an_adapter_under_the_run_dir(first_run):
    assert first_run.returncode == 0, first_run.out[-4000:]
    run_dir, out = first_run.run_dir, first_run.out
    w = json.loads((run_dir / "02_w" / "step.json").read_text())
    (adapter,) = w["adapters"]
    assert adapter["name"].startswith(f"{HUB_ID}:ft-02-")
    assert adapter["path"].startswith("adapters/") and "/" not in adapter["path"].removeprefix("adapters/")
    assert (run_dir / adapter["path"] / "adapter_model.safetensors").is_file()
    assert set(w["models"].values()) == {adapter["name"]}  # both predictors use the tuned LM
    rows = pq.read_table(run_dir / "02_w" / "traces.parquet").to_pylist()
    assert {r["predictor"] for r in rows} == {"draft", "answer"}
    assert rows and all(json.loads(r["messages"])[-1]["content"] for r in rows)
    passing = {r["example_index"] for r in rows}
    assert 0 < len(passing) < 8  # only the traces that passed the metric
    # the user's 12 test examples, held out: each step scored on them, the one-answer program named
    tests = [json.loads((run_dir / name / "test.json").read_text()) for name in ("00_baseline", "01_p", "02_w")]
    assert all(t["n"] == 12 and t["top"] == "forty two" and t["gold_distinct"] == 12 for t in tests)
    report = (run_dir / "report.md").read_text()
    assert "answers 'forty two' to 12 of 12 test inputs while the labels vary" in report
    assert "the valset has 4 examples (under 30)" in report
    assert "forty two' 12/12" in out and "test score % (n=12)" in out


def test_moved_run_dir_resumes_with_nothing_recomputed_and_serves_until_sigterm(first_run, home):
    """The run dir reaches a new machine through `--storage`: pulled into an empty dir elsewhere."""
    run_dir = first_run.run_dir
    store = home / "store"
    shutil.copytree(run_dir, store)  # as a run with `--storage` leaves it
    stored = {p.name: (p / "step.json").read_text() for p in store.glob("0*_*")}
    moved = home / "elsewhere" / "run"
    proc = _tandem(home, ["run", *FLAGS, "--run-dir", str(moved), "--storage", str(store)])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    pulled = re.search(r"storage: \d+ file\(s\) of .* brought .* up to date", out)
    assert pulled and out.count("done in an earlier run") == 3, out[-4000:]
    assert {p.name: (p / "step.json").read_text() for p in moved.glob("0*_*")} == stored

    hidden = run_dir.rename(run_dir.with_name("first-hidden"))  # what is served comes from the moved copy only
    port = free_port()
    mark = new_mark()
    # a grace far beyond the in-flight request's few seconds: the drain must not depend on this machine's speed
    server = _tandem(home, ["serve", str(moved), "--port", str(port), "--drain-grace-s", "180",
                            "--allow-program", "userprog"], mark,
                     TANDEM_SERVE_TOKEN="s3cret")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": "Bearer s3cret"}) as http:
            starting = [body for status, body in _wait_healthy(server, http) if status == 503]
            assert starting, "/healthz never said 503 while the LM replica was loading"  # ~20 s of vLLM start
            assert starting[0]["status"] == "starting" and starting[0]["lm_replicas_ready"] == 0, starting[0]
            assert "LM replicas ready" in starting[0]["error"], starting[0]
            assert httpx.get(f"http://127.0.0.1:{port}/v1/program").status_code == 401  # the token from the env
            info = http.get("/v1/program").json()
            assert info["strategy"] == json.loads((moved / "best.json").read_text())["strategy"]  # the winner
            assert set(info["predictors"]) == {"draft", "answer"}
            one = http.post("/v1/predict", json={"question": "What is 2 + 1?"})
            assert one.status_code == 200 and one.json()["outputs"]["answer"] == "forty two", one.text
            batch = http.post("/v1/predict", json=[{"question": "What is 4 + 1?"}, {"question": "What is 6 + 1?"}])
            assert batch.status_code == 200 and len(batch.json()["results"]) == 2, batch.text
            chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 4})
            assert chat.status_code == 200 and chat.json()["model"] == info["model"], chat.text
            first, late, stopping = _sigterm_with_a_request_in_flight(server, http)
    finally:
        server.send_signal(signal.SIGTERM)  # ignored if it is stopping already
        out, _ = server.communicate(timeout=300)
        hidden.rename(run_dir)
    assert server.returncode == 143, out[-4000:]
    assert left_behind(mark) == []
    assert first.status_code == 200 and len(first.json()["choices"]) == 8, first.text  # in flight at SIGTERM
    assert stopping["status"] == "stopping", stopping
    assert late.status_code == 503 and late.headers["retry-after"], late.text  # not 404 (route deleted) nor 500
    assert late.json()["type"] == "ServerStopping" and late.json()["request_id"], late.text
    log = (moved / "logs" / "serve.log").read_text()
    assert "drained tandem-run: 1 request(s) were in flight, 0 left unfinished" in log, log[-3000:]  # the app: the dir's


def _sigterm_with_a_request_in_flight(server: subprocess.Popen, http: httpx.Client, timeout_s: float = 120):
    """SIGTERM the server while a long chat completion (8 x 300 tokens, ~3-20 s by machine: longer than the server
    takes from the signal to the drain, far shorter than the grace the test gives) is in flight, then send one more request while it
    drains: (the in-flight response, the late response, /healthz's body while stopping)."""
    long_chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300, "n": 8, "temperature": 1.0}
    deadline = time.monotonic() + timeout_s
    with ThreadPoolExecutor(1) as threads:
        held = threads.submit(http.post, "/v1/chat/completions", json=long_chat)
        while http.get("/healthz").json()["in_flight"] < 1:  # the server has the request
            assert not held.done() and time.monotonic() < deadline, "the long request never was in flight"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        while True:  # until the drain has begun
            try:
                health = http.get("/healthz")
            except httpx.TransportError as exc:
                raise AssertionError(f"the server went away before draining ({exc!r}); the request in flight "
                                     f"{'had ended' if held.done() else 'had not ended'}") from exc
            if health.status_code != 200:
                break
            assert not held.done() and time.monotonic() < deadline, "the request ended before the drain began"
            time.sleep(0.05)
        late = http.post("/v1/predict", json={"question": "What is 9 + 1?"})
        return held.result(), late, health.json()


def _with_model(model: str) -> list[str]:
    return [model if prev == "--model" else flag for prev, flag in zip(["", *FLAGS], FLAGS)]


def _wait_healthy(server: subprocess.Popen, http: httpx.Client, timeout_s: float = 300) -> list[tuple[int, dict]]:
    """Poll /healthz until 200; every (status, body) it answered on the way."""
    deadline, seen = time.monotonic() + timeout_s, []
    while True:
        assert server.poll() is None, server.stdout.read()[-4000:]
        try:
            r = http.get("/healthz")
            is_json = r.headers.get("content-type", "").startswith("application/json")
            seen.append((r.status_code, r.json() if is_json else {}))
            if r.status_code == 200:
                return seen
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(1)


def test_serve_once_deploys_and_stops(first_run, home):
    mark = new_mark()
    refused = _tandem(home, ["serve", str(first_run.run_dir), "--port", str(free_port()), "--once"], mark)
    out, _ = refused.communicate(timeout=600)  # the stranger's module is imported and run only once allowed
    assert refused.returncode == 1 and "allow it with --allow-program userprog" in out.strip().splitlines()[-1], out
    proc = _tandem(home, ["serve", str(first_run.run_dir), "--port", str(free_port()), "--once",
                          "--allow-program", "userprog"], mark)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "serving " in out, out[-4000:]
    assert left_behind(mark) == []


def test_the_shipped_serve_config_serves_the_run_with_serve_run(first_run, home):
    """`serve run serve/serve_config.yaml` as its comments say: the shipped file with the run dir and port set."""
    import yaml

    run_dir = first_run.run_dir
    config = yaml.safe_load((Path.cwd() / "serve" / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(run_dir=str(run_dir), lm_max_replicas=1, allow_programs=["userprog"])
    (home / "serve_config.yaml").write_text(yaml.safe_dump(config))
    mark = new_mark()
    server = _start(home, [str(Path(sys.executable).parent / "serve"), "run", str(home / "serve_config.yaml")], mark)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            _wait_healthy(server, http)
            r = http.post("/v1/predict", json={"question": "What is 8 + 1?"})
            assert r.status_code == 200 and r.json()["outputs"]["answer"] == "forty two", r.text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            kill_marked(mark)  # not left running for the rest of the session
            raise
    assert left_behind(mark) == []


def test_sigint_in_the_prompt_step_stops_cleanly(home):
    """The model here is a relative checkpoint path (`ckpt/tiny-chat`), which the replicas, started
    in other working dirs, must still find."""
    shutil.copytree(next((home / "hf" / "hub").glob("models--*/snapshots/*")), home / "ckpt" / "tiny-chat")
    run_dir = home / "runs" / "interrupted"
    mark = new_mark()
    proc = _tandem(home, ["run", *_with_model("ckpt/tiny-chat"), "--run-dir", str(run_dir)], mark)
    deadline = time.monotonic() + 600
    while not (run_dir / "00_baseline" / "step.json").exists():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "the baseline was not stored"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-4000:]
    assert left_behind(mark) == [], out[-6000:]
    assert not (run_dir / "02_w").exists() and not (run_dir / "best.json").exists()  # stopped, not finished
    assert f"(full log: {run_dir / 'logs' / 'tandem.log'})" in out  # the last line says where everything is
    log = (run_dir / "logs" / "tandem.log").read_text()
    assert log.count("Started a local Ray") == 1, log[-6000:]  # no thread started another Ray after the stop
