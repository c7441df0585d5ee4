"""MLflow tracking against real MLflow stores — a sqlite file and an ``mlflow server`` started here on
127.0.0.1 — read back through ``MlflowClient``: the run, one nested run per step, params, metrics
(the weight step's loss per epoch as a history), artifacts, the winner as a model that loads back
without a pickle; tracking twice adds nothing, a resumed run adds its new steps; an unreachable
server is one warning. Run dirs are written with the project's own writers; nothing leaves tmp."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import dspy
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.report import tracking
from engine.cli import _run_config, build_parser
from engine.config import RunConfig
from engine.store.program_io import program_state, save_program
from engine.report.run_report import write_report
from engine.store.run_store import AdapterRef, BestRecord, RunStore
from engine.table.config import Cell, TableConfig
from programs.base import Splits
from tests.integration.ports import free_port

PROGRAM = f"{__name__}:Tiny"  # the spec the logged model rebuilds the program from


class Tiny:
    """A two-predictor program module (``resolve(PROGRAM)``)."""

    class Program(dspy.Module):
        def __init__(self):
            super().__init__()
            self.classify = dspy.Predict("features -> species")
            self.explain = dspy.Predict("features, species -> reason")

        def forward(self, features):
            species = self.classify(features=features).species
            return dspy.Prediction(species=species, reason=self.explain(features=features, species=species).reason)

    @staticmethod
    def load_splits(seed=0):
        return Splits([], [], [])

    @staticmethod
    def metric(example, prediction, trace=None):
        return example.species == prediction.species


@pytest.fixture(scope="module", autouse=True)
def _mlflow_env():
    """No test reads the user's MLflow settings or writes outside its tmp dirs (no telemetry id)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


@pytest.fixture(scope="module")
def template_db(tmp_path_factory, _mlflow_env):
    """An empty sqlite store with MLflow's tables (creating them takes seconds: done once, then copied)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def runs(tmp_path, template_db):
    """``tmp/runs`` holding a fresh ``mlflow.db``: the default store of a run dir under it."""
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copy(template_db, root / "mlflow.db")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, template_db):
    """A real ``mlflow server`` (the venv's executable) on a free 127.0.0.1 port; its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(template_db, root / "server.db")
    port = free_port()
    log = open(root / "server.log", "wb")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}): {(root / 'server.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group it was started in
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _test_result(score: float) -> dict:
    return {"score": score, "n": 10, "parse_failures": 1, "errors": 0, "field": "species", "answered": 9,
            "distinct": 2, "top": "setosa", "top_count": 6, "gold_distinct": 3, "gold_top_count": 4}


def make_run(run_dir: Path, steps: int = 3, finish: bool = True) -> tuple[RunConfig, dspy.Module]:
    """A run dir of ``p -> w`` with its first ``steps`` steps (baseline, p, w), as Tandem writes it;
    ``finish``: the winner (``p``), best.json and the report too. Returns the config and the winner."""
    cfg = RunConfig(program=PROGRAM, run_dir=str(run_dir), strategy="p -> w", lora=replace(RunConfig().lora, lr=1e-3))
    store = RunStore(cfg.run_dir, cfg.fingerprint())
    baseline, tuned = Tiny.Program(), Tiny.Program()
    tuned.classify.demos = [dspy.Example(features="5.1, 3.5, 1.4, 0.2", species="setosa")]
    tuned.classify.signature = tuned.classify.signature.with_instructions("Name the iris species.")
    if not store.completed(0, ""):
        store.commit(0, "", program=baseline, strategy="", score=20.0, adapters=[],
                     extra={"wall_s": 1.5, "errors": {"count": 0, "runs": 10, "first": []}})
        store.write_test("00_baseline", _test_result(10.0))
    if steps >= 2 and not store.completed(1, "p"):
        store.commit(1, "p", program=tuned, strategy="p", score=40.0, adapters=[], extra={
            "wall_s": 3.0, "candidates": [{"seed": "-3", "score": 20.0}, {"seed": "-2", "score": 40.0}]})
        store.write_test("01_p", _test_result(35.0))
    if steps >= 3 and not store.completed(2, "w"):
        adapter = store.adapters / "tiny-ft-02-abc"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 32}))
        (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        step_dir = store.begin(2, "w")
        pq.write_table(pa.table({"messages": ["[]"] * 4}), step_dir / "traces.parquet")
        store.commit(2, "w", program=baseline, strategy="p -> w", score=30.0,
                     adapters=[AdapterRef("tiny:ft-02", adapter)], extra={
                         "wall_s": 9.0, "rows": 4, "passing_traces": 4, "attempted": 10, "lifecycle": "relaunch",
                         "exclude_demos": True, "trained": [{"predictors": "*", "adapter": "tiny:ft-02",
                                                             "adapter_path": str(adapter), "train_metrics": {
                             "epoch": 2, "loss": 0.5, "tokens_per_s": 200.0, "optimizer_steps": 4,
                             "loss_history": [1.5, 0.5], "lr_history": [1e-3, 1e-4]}}]})
        store.write_test("02_w", _test_result(30.0))
    if finish:
        save_program(tuned, store.root / "program.json")
        store.write_best(BestRecord(PROGRAM, {}, cfg.model, "p", 40.0, {}, {}, False, 35.0))
        write_report(store.root, "tiny", "p", False, valset_size=10)
    return cfg, tuned


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _children(client, tracked) -> dict:
    runs = client.search_runs([tracked.experiment_id], f"tags.`mlflow.parentRunId` = '{tracked.run_id}'")
    return {r.info.run_name: r for r in runs}


def _artifacts(client, run_id, path=None) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


def _check_logged(tracked, run_dir: Path) -> None:
    """What a finished ``make_run`` dir must look like in MLflow, read back through the client."""
    client = _client(tracked.uri)
    parent = client.get_run(tracked.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_dir.name
    params = parent.data.params
    assert (params["lora.lr"], params["strategy"], params["program"]) == ("0.001", "p -> w", PROGRAM)
    assert json.loads(params["lora.target_modules"]) == list(RunConfig().lora.target_modules)
    assert params["tracking"] == "True" and params["program_args"] == "{}"
    assert parent.data.tags["tandem.run_dir"] == str(run_dir.resolve())
    assert parent.data.tags["tandem.best_strategy"] == "p" and "| 01_p |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["best_valset_score"] == 40.0 and parent.data.metrics["best_test_score"] == 35.0
    assert _artifacts(client, tracked.run_id) == {"run.json", "best.json", "program.json", "report.md", "scores.png",
                                                  "program"}
    steps = _children(client, tracked)
    assert set(steps) == set(tracked.children) == {"00_baseline", "01_p", "02_w"}
    assert [steps[n].data.tags["tandem.kind"] for n in sorted(steps)] == ["baseline", "p", "w"]
    assert [steps[n].data.tags["tandem.strategy"] for n in sorted(steps)] == ["", "p", "p -> w"]
    p, w = steps["01_p"].data.metrics, steps["02_w"].data.metrics
    assert (p["valset_score"], p["test_score"], p["test.n"], p["test.parse_failures"], p["wall_s"]) == \
        (40.0, 35.0, 10, 1, 3.0)
    assert [m.value for m in client.get_metric_history(steps["01_p"].info.run_id, "candidate_score")] == [20.0, 40.0]
    assert (w["valset_score"], w["test_score"], w["wall_s"], w["rows"], w["train.tokens_per_s"]) == \
        (30.0, 30.0, 9.0, 4, 200.0)
    loss = client.get_metric_history(steps["02_w"].info.run_id, "train.loss")
    assert sorted((m.step, m.value) for m in loss) == [(1, 1.5), (2, 0.5)]  # per epoch
    assert steps["02_w"].data.tags["tandem.lifecycle"] == "relaunch"
    w_id = steps["02_w"].info.run_id
    assert _artifacts(client, w_id) == {"step.json", "test.json", "program.json", "traces.parquet", "adapter"}
    assert _artifacts(client, w_id, "adapter/tiny-ft-02-abc") == {"adapter_config.json", "adapter_model.safetensors"}
    assert "adapter" not in _artifacts(client, steps["01_p"].info.run_id)  # only the step that trained it


def test_a_run_dir_goes_to_the_sqlite_store_beside_it_with_a_nested_run_per_step(runs):
    make_run(runs / "tiny")
    tracked = tracking.track_run(runs / "tiny", RunConfig(program=PROGRAM, run_dir=str(runs / "tiny"),
                                                          strategy="p -> w"))
    assert tracked.uri == f"sqlite:///{runs.resolve()}/mlflow.db"  # the default: the run dir's parent
    assert tracked.where() == f"mlflow ui --backend-store-uri {tracked.uri}"
    assert tracked.added == ("00_baseline", "01_p", "02_w")
    _check_logged(tracked, runs / "tiny")
    assert (runs / "mlartifacts").is_dir() and not Path("mlruns").exists()  # artifacts beside the store


def test_a_run_dir_goes_to_a_tracking_server(tmp_path, server):
    cfg, _ = make_run(tmp_path / "tiny")
    tracked = tracking.track_run(cfg.run_dir, cfg, tracking_uri=server)
    assert tracked.uri == server and tracked.where().startswith(f"{server}/#/experiments/")
    _check_logged(tracked, tmp_path / "tiny")
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_twice_adds_nothing_and_a_resumed_run_adds_its_new_steps(runs):
    cfg, _ = make_run(runs / "tiny", steps=2, finish=False)  # stopped after p: what exists is logged
    first = tracking.track_run(cfg.run_dir, cfg)
    client = _client(first.uri)
    assert first.added == ("00_baseline", "01_p") and first.model_uri is None
    assert client.get_run(first.run_id).info.status == "FAILED"
    again = tracking.track_run(cfg.run_dir, cfg)
    assert (again.run_id, again.added, again.children) == (first.run_id, (), first.children)
    make_run(runs / "tiny")  # resumed: the w step, the winner, the report
    resumed = tracking.track_run(cfg.run_dir, cfg)
    assert resumed.run_id == first.run_id and resumed.added == ("02_w",)
    assert {k: v for k, v in resumed.children.items() if k != "02_w"} == first.children
    _check_logged(resumed, runs / "tiny")
    tracking.track_run(cfg.run_dir, cfg)
    all_runs = client.search_runs([first.experiment_id])
    assert len(all_runs) == 4  # one parent, three steps
    w_id = resumed.children["02_w"]
    assert len(client.get_metric_history(w_id, "train.loss")) == 2  # not logged twice
    assert len(client.get_metric_history(first.run_id, "best_valset_score")) == 1


@pytest.mark.filterwarnings("ignore:.*Any type hint:UserWarning")  # MLflow's note on predict(list[dict[str, Any]])
def test_the_winner_loads_back_without_a_pickle_and_predicts(runs):
    _, winner = make_run(runs / "tiny")
    tracked = tracking.track_run(runs / "tiny")  # no config: params from run.json
    client = _client(tracked.uri)
    files = [a.path for a in client.list_artifacts(tracked.run_id, "program")]
    assert not any(f.endswith((".pkl", ".pickle", ".cloudpickle")) for f in files), files
    loaded = tracking.load_program(tracked.model_uri, tracked.uri)
    assert program_state(loaded) == program_state(winner)
    for (name, mine), (_, theirs) in zip(loaded.named_predictors(), winner.named_predictors()):
        assert [dict(d) for d in mine.demos] == [d.toDict() for d in theirs.demos], name
        assert mine.signature.instructions == theirs.signature.instructions, name
    assert loaded.classify.signature.instructions == "Name the iris species."
    import mlflow.pyfunc

    from mlflow.artifacts import download_artifacts

    model = mlflow.pyfunc.load_model(download_artifacts(artifact_uri=tracked.model_uri, tracking_uri=tracked.uri))
    with dspy.context(lm=dspy.utils.DummyLM([{"species": "setosa"}, {"reason": "short petals"}])):
        assert model.predict([{"features": "5.0, 3.4, 1.5, 0.2"}]) == [{"species": "setosa", "reason": "short petals"}]


def test_an_unreachable_server_is_one_warning_naming_it_and_not_an_error(tmp_path, caplog):
    cfg, _ = make_run(tmp_path / "tiny")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(tracking.TrackingError, match="cannot connect"):
        tracking.track_run(cfg.run_dir, cfg, tracking_uri=uri)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        started = time.monotonic()
        assert tracking.track_run_or_warn(replace(cfg, tracking_uri=uri)) is None
    assert time.monotonic() - started < 10  # no minutes of MLflow retries
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "engine.report.tracking", caplog.text
    text = warnings[0].getMessage()
    assert uri in text and "TrackingError" in text and "refused" in text and "--no-tracking" in text
    assert tracking.track_run_or_warn(replace(cfg, tracking=False, tracking_uri=uri)) is None
    assert not (tmp_path / "mlflow.db").exists()


def test_a_table_is_a_parent_run_with_a_nested_run_per_cell(runs):
    cfg = TableConfig(run=RunConfig(program=PROGRAM), strategies=("vanilla", "p", "p -> w"), seeds=(0, 1),
                      out_dir=str(runs / "table"))
    cells = [Cell(s, seed, score, 50.0, None, str(runs / "table" / f"seed-{seed}" / s), 2.0)
             for s, seed, score in [("vanilla", 0, 10.0), ("vanilla", 1, 20.0), ("p", 0, 30.0), ("p", 1, 50.0)]]
    cells += [Cell("p -> w", 0, None, None, "no passing traces", str(runs / "table"), 0.0),
              Cell("p -> w", 1, 60.0, 55.0, None, str(runs / "table"), 5.0)]
    tracked = tracking.track_table(cfg, cells)
    client = _client(tracked.uri)
    parent = client.get_run(tracked.run_id)
    assert tracked.uri == f"sqlite:///{runs.resolve()}/mlflow.db"
    assert (parent.data.params["strategies"], parent.data.params["seeds"]) == ("vanilla,p,p -> w", "0,1")
    assert parent.data.params["run.lora.lr"] == str(RunConfig().lora.lr)
    assert parent.data.metrics["mean_test_score.p"] == 40.0 and parent.data.metrics["mean_test_score.p-w"] == 60.0
    history = client.get_metric_history(tracked.run_id, "test_score.p")
    assert sorted((m.step, m.value) for m in history) == [(0, 30.0), (1, 50.0)]  # step = seed
    assert {"table.md", "table.json"} <= _artifacts(client, tracked.run_id, "table")
    cells_logged = _children(client, tracked)
    assert len(cells_logged) == 6 and cells_logged["seed-1 p -> w"].data.metrics["test_score"] == 60.0
    failed = cells_logged["seed-0 p -> w"]
    assert failed.info.status == "FAILED" and failed.data.tags["tandem.reason"] == "no passing traces"
    again = tracking.track_table(cfg, cells)
    assert again.run_id == tracked.run_id and again.added == ()


def test_tracking_settings_are_flags_and_not_part_of_the_fingerprint(monkeypatch):
    parse = lambda *argv: _run_config(build_parser().parse_args(list(argv)))  # noqa: E731
    assert (parse("run").tracking, parse("run").tracking_uri) == (True, None)
    cfg = parse("run", "--no-tracking", "--tracking-uri", "http://mlflow:5000")
    assert (cfg.tracking, cfg.tracking_uri) == (False, "http://mlflow:5000")
    assert parse("table", "--tracking-uri", "sqlite:///x.db").tracking_uri == "sqlite:///x.db"
    assert cfg.fingerprint() == RunConfig().fingerprint()  # a run resumes with tracking changed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_uri("runs/x") == "http://env:5000"
    assert tracking.resolve_uri("runs/x", "http://flag:5000") == "http://flag:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_uri("runs/x") == f"sqlite:///{Path('runs').resolve()}/mlflow.db"
