"""MLflow tracking: mirror a finished (or stopped) run dir, or a table's cells, into MLflow.

Knows what MLflow should show of a run dir, read through ``RunStore``: the config as params (nested
keys such as ``lora.lr``); one parent run per run dir with one nested run per step (tags: step,
strategy, kind; metrics: valset and test score, the test's counts, wall seconds, every number in
``step.json``'s ``extra`` (LM calls or tokens when a step records them), a prompt step's candidate
scores, the weight step's loss / lr / grad norm per epoch as histories (step = epoch) and its
throughput; artifacts: step.json, test.json, program.json, the traces Parquet, the adapter it
trained); on the parent the report, scores.png, run.json, best.json, program.json, and the winner
as an MLflow model *from code* under ``program/`` (MLflow's DSPy flavor cloudpickles the program
and its settings, which Tandem never does: the model's code file rebuilds the program from its spec
and ``program.json`` through ``program_io``'s validating loader; ``load_program`` gives it back).

Idempotent: the parent run is found by a key of the run dir's absolute path and its ``run.json``;
a step already logged is skipped (one whose ``step.json`` or ``test.json`` changed since, or whose
logging was cut short, is logged anew), so tracking twice adds nothing and a resumed run adds only
its new steps. The store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<run dir's parent>/mlflow.db`` (artifacts beside it in ``mlartifacts/``). Only the
driver calls this (Ray workers never log). ``track_run_or_warn`` and ``track_table_or_warn`` turn
any failure into one warning naming the URI: tracking never fails a run. mlflow is imported
lazily. Does not run anything, and does not know what the steps did beyond their records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import urllib.request
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlparse

from actors.environ import environ
from engine.console import first_line
from engine.store.run_store import RunStore, StepRecord

if TYPE_CHECKING:
    import dspy

    from engine.config import RunConfig
    from engine.table.config import Cell, TableConfig

logger = logging.getLogger(__name__)

EXPERIMENT = "tandem"  # default experiment name ($MLFLOW_EXPERIMENT_NAME wins)
MODEL_PATH = "program"  # artifact path of the winner's MLflow model on the parent run
CONNECT_TIMEOUT_S = 5.0
_PARAM_MAX, _TAG_MAX, _BATCH = 6000, 8000, 100  # MLflow's value limits and items per log_batch
_MODEL_CODE = '''"""A Tandem run's winner as an MLflow model from code (engine.report.tracking): MLflow runs this file to
load it, nothing is unpickled; the program is rebuilt from its spec and program.json. Needs Tandem."""
import mlflow

from engine.report.tracking import program_model

mlflow.models.set_model(program_model())
'''


class TrackingError(RuntimeError):
    """The tracking server cannot be reached."""


@dataclass(frozen=True)
class TrackedRun:
    """Where a run dir (or a table) went: the MLflow parent run and its nested runs."""

    uri: str
    experiment: str
    experiment_id: str
    run_id: str
    children: dict[str, str]  # step dir name (or table cell) -> nested run id
    added: tuple[str, ...]  # nested runs this call created
    model_uri: str | None = None  # runs:/<run_id>/program: the winner (``load_program``)

    def where(self) -> str:
        """How to look at it: an ``mlflow ui`` command for a local store, else the run's URL."""
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return self.uri

    def describe(self) -> str:
        return (f"MLflow run {self.run_id} in experiment '{self.experiment}' at {self.uri} "
                f"({len(self.children)} nested, {len(self.added)} new); see it: {self.where()}")


def resolve_uri(run_dir: str | Path, tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run dir's parent>/mlflow.db``.

    Example:
        >>> resolve_uri("/tmp/runs/iris", "http://mlflow:5000")
        'http://mlflow:5000'
    """
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def track_run(run_dir: str | Path, cfg: RunConfig | None = None, *, tracking_uri: str | None = None,
              experiment: str | None = None) -> TrackedRun | None:
    """Log the run dir into MLflow (see the module docstring); None when it holds no run yet.

    Args:
        run_dir: a run dir (finished, or stopped: then what it holds is logged, status FAILED).
        cfg: the run's config, logged as params; default the settings in ``run.json``.
        tracking_uri: see ``resolve_uri``.
        experiment: default ``$MLFLOW_EXPERIMENT_NAME``, else ``tandem``.

    Raises:
        TrackingError: an HTTP tracking server cannot be reached (nothing was logged).
        mlflow.exceptions.MlflowException: the store refused something.

    Example:
        >>> tracked = track_run("runs/iris-smollm2")  # doctest: +SKIP
        >>> tracked.where()  # doctest: +SKIP
        'mlflow ui --backend-store-uri sqlite:////home/me/runs/mlflow.db'
    """
    if not Path(run_dir, "run.json").is_file():
        logger.debug("tracking: %s holds no run yet; nothing to log", run_dir)
        return None
    store = RunStore(run_dir)
    uri, name = resolve_uri(store.root, tracking_uri), experiment or os.getenv("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    settings = json.loads((store.root / "run.json").read_text())
    best = json.loads(_read(store.root / "best.json") or "null")
    with _session(uri) as client:
        exp_id = _experiment(client, name, uri)
        parent = _parent(client, exp_id, _digest(str(store.root), json.dumps(settings, sort_keys=True)),
                         store.root.name, _flatten(asdict(cfg) if cfg is not None else settings),
                         {"tandem.kind": "run", "tandem.run_dir": str(store.root),
                          **{f"tandem.{k}": settings.get(k, "") for k in ("program", "model", "strategy", "adapter")}},
                         start=(store.root / "run.json").stat().st_mtime)  # when the run began
        steps = store.steps()
        children, added = _sync(client, exp_id, parent.info.run_id, [
            (r.name, _digest(_read(r.path / "step.json"), _read(r.path / "test.json")),
             lambda digest, r=r: _log_step(client, exp_id, parent.info.run_id, r, digest)) for r in steps])
        digest = _digest(*children.values(), _read(store.root / "best.json"), _read(store.root / "report.md"))
        if parent.data.tags.get("tandem.digest") != digest:
            _log_parent(client, parent.info.run_id, store, steps, best)
            _log(client, parent.info.run_id, tags={"tandem.digest": digest})
        client.set_terminated(parent.info.run_id, "FINISHED" if best and not best.get("failed_step") else "FAILED")
    model = f"runs:/{parent.info.run_id}/{MODEL_PATH}" if best and (store.root / "program.json").is_file() else None
    return TrackedRun(uri, name, exp_id, parent.info.run_id, children, added, model)


def track_table(cfg: TableConfig, cells: list[Cell], *, tracking_uri: str | None = None,
                experiment: str | None = None) -> TrackedRun:
    """Log a table: a parent run (params: the run config as ``run.*``, strategies, seeds; metrics:
    each strategy's test score per seed as a history (step = seed) and its mean; artifacts: the
    table files) with one nested run per cell (test and valset score, wall seconds, the reason
    when it has no score). The cells' run dirs are not logged step by step (``tandem run`` does).

    Raises:
        TrackingError, mlflow.exceptions.MlflowException: as ``track_run``.
    """
    from engine.table.report import summarize, write_table

    root = Path(cfg.out_dir).resolve()
    uri, name = resolve_uri(root, tracking_uri), experiment or os.getenv("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    key = json.dumps([cfg.run.fingerprint(), cfg.strategies, cfg.seeds, cfg.test_size], sort_keys=True, default=str)
    params = _flatten({"run": asdict(cfg.run), "strategies": ",".join(cfg.strategies), "out_dir": str(root),
                       "seeds": ",".join(map(str, cfg.seeds)), "test_size": cfg.test_size})
    with _session(uri) as client:
        exp_id = _experiment(client, name, uri)
        parent = _parent(client, exp_id, _digest(str(root), key), root.name, params,
                         {"tandem.kind": "table", "tandem.out_dir": str(root)})
        children, added = _sync(client, exp_id, parent.info.run_id, [
            (f"seed-{c.seed} {c.strategy}", _digest(json.dumps(asdict(c), sort_keys=True, default=str)),
             lambda digest, c=c: _log_cell(client, exp_id, parent.info.run_id, c, digest)) for c in cells])
        digest = _digest(*children.values())
        if parent.data.tags.get("tandem.digest") != digest:
            _log(client, parent.info.run_id, [(f"test_score.{_slug(c.strategy)}", c.test_score, c.seed) for c in cells]
                 + [(f"mean_test_score.{_slug(row['strategy'])}", row["mean"], 0) for row in summarize(cells)])
            with tempfile.TemporaryDirectory(prefix="tandem-table-") as tmp:
                write_table(cells, tmp, f"{cfg.run.program} on {cfg.run.model} ({len(cfg.seeds)} seeds)",
                            {"run": asdict(cfg.run), "strategies": list(cfg.strategies), "seeds": list(cfg.seeds)})
                client.log_artifacts(parent.info.run_id, tmp, "table")
            _log(client, parent.info.run_id, tags={"tandem.digest": digest})
        client.set_terminated(parent.info.run_id, "FINISHED")
    return TrackedRun(uri, name, exp_id, parent.info.run_id, children, added)


def track_run_or_warn(cfg: RunConfig) -> TrackedRun | None:
    """``track_run`` of ``cfg.run_dir`` when ``cfg.tracking``; a failure is one warning, not an error."""
    if not cfg.tracking:
        return None
    return _or_warn(lambda: track_run(cfg.run_dir, cfg, tracking_uri=cfg.tracking_uri),
                    f"run dir {cfg.run_dir}", resolve_uri(cfg.run_dir, cfg.tracking_uri))


def track_table_or_warn(cfg: TableConfig, cells: list[Cell]) -> TrackedRun | None:
    """``track_table`` when ``cfg.run.tracking``; a failure is one warning, not an error."""
    if not cfg.run.tracking:
        return None
    return _or_warn(lambda: track_table(cfg, cells, tracking_uri=cfg.run.tracking_uri),
                    f"table {cfg.out_dir}", resolve_uri(cfg.out_dir, cfg.run.tracking_uri))


def load_program(model_uri: str, tracking_uri: str | None = None) -> dspy.Module:
    """The winner logged by ``track_run`` (``TrackedRun.model_uri``) as a dspy program, without an LM.

    Equivalent to ``mlflow.pyfunc.load_model(model_uri).unwrap_python_model().program``; the
    pyfunc's ``predict`` takes a list of dicts of input fields and runs the program on each with
    ``dspy.settings``' LM. Needs Tandem (and the run's program module) importable.

    Example:
        >>> program = load_program("runs:/0a1b.../program", "sqlite:///runs/mlflow.db")  # doctest: +SKIP
    """
    with _no_type_hint_notes():
        import mlflow.artifacts
        import mlflow.pyfunc

        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri)
        return mlflow.pyfunc.load_model(local).unwrap_python_model().program


def program_model():
    """The ``mlflow.pyfunc.PythonModel`` of a logged winner (what the model's code file sets)."""
    import mlflow.pyfunc

    class TandemProgram(mlflow.pyfunc.PythonModel):
        """A Tandem program rebuilt from its spec and ``program.json``; ``predict`` runs it."""

        program = None

        def load_context(self, context):
            from engine.store.program_io import load_program as load_state
            from programs.base import resolve

            spec = context.model_config
            fresh = resolve(spec["program"]).program(**spec.get("program_args", {}))
            self.program = load_state(fresh, context.artifacts["program"])

        def predict(self, context, model_input: list[dict[str, Any]], params=None) -> list[dict[str, Any]]:
            return [self.program(**row).toDict() for row in model_input]

    return TandemProgram()


# -- what is logged --------------------------------------------------------------------------


def _log_step(client, exp_id: str, parent_id: str, record: StepRecord, digest: str) -> str:
    """A step's nested run: tags, metrics (``_step_metrics``), its files and the adapter it trained."""
    ended = (record.path / "step.json").stat().st_mtime
    tags = {**{f"tandem.{k}": v for k, v in record.extra.items() if isinstance(v, (str, bool))},
            **{f"tandem.test_{k}": (record.test or {}).get(k) for k in ("field", "top")},
            **{f"tandem.model.{p}": m for p, m in record.models.items()},
            "mlflow.parentRunId": parent_id, "tandem.child": record.name, "tandem.digest": digest,
            "tandem.step": record.name, "tandem.strategy": record.strategy, "tandem.kind": record.key or "baseline"}
    start = ended - float(record.extra.get("wall_s") or 0)
    run_id = client.create_run(exp_id, int(start * 1000), _tags(tags), record.name).info.run_id
    _log(client, run_id, _step_metrics(record), timestamp=int(ended * 1000))
    for path in [record.path / f for f in ("step.json", "program.json", "test.json")] + sorted(
            record.path.glob("*.parquet")):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    trained = {t.get("adapter") for t in record.extra.get("trained", [])}
    trained.add(record.extra.get("grpo", {}).get("adapter"))  # a g step's last version
    for adapter in record.adapters:
        if adapter.name in trained and adapter.path.is_dir():
            client.log_artifacts(run_id, str(adapter.path), f"adapter/{adapter.path.name}")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _step_metrics(record: StepRecord) -> list[tuple[str, Any, int]]:
    """(name, value, step): the scores, every number in ``extra`` (dotted), the candidates' scores,
    training's numbers and its per-epoch histories (step = epoch), a GRPO step's per-update figures (step =
    update), the held-out counts."""
    extra, test = record.extra, record.test or {}
    out = [("valset_score", record.score, 0), ("test_score", test.get("score"), 0)]
    out += [(f"test.{k}", v, 0) for k, v in test.items() if k != "score"]
    grpo = extra.get("grpo") or {}
    out += [(k, v, 0) for k, v in _flatten({k: v for k, v in extra.items() if k not in ("trained", "grpo")}).items()]
    out += [(f"grpo.{k}", v, 0) for k, v in _flatten({k: v for k, v in grpo.items() if k != "history"}).items()]
    out += [(f"grpo.{k}", v, update) for update, m in enumerate(grpo.get("history") or [], 1) for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]  # per update: step = the update's number
    out += [("candidate_score", c.get("score"), i) for i, c in enumerate(extra.get("candidates") or [])]
    trained = extra.get("trained") or []
    for t in trained:
        prefix = "train" if len(trained) == 1 else f"train.{t.get('predictors')}"
        m = t.get("train_metrics") or {}
        histories = {k[: -len("_history")]: v for k, v in m.items() if k.endswith("_history") and isinstance(v, list)}
        out += [(f"{prefix}.{k}", v, 0) for k, v in m.items() if k not in histories and k != "epoch"]
        out += [(f"{prefix}.{k}", v, epoch) for k, values in histories.items() for epoch, v in enumerate(values, 1)]
    return out


def _log_parent(client, run_id: str, store: RunStore, steps: list[StepRecord], best: dict | None) -> None:
    """The run's files, its winner's scores and tags (the report as the run's note), the winner's model."""
    best, n, wall = best or {}, len(steps), sum(float(r.extra.get("wall_s") or 0) for r in steps)
    _log(client, run_id, [("best_valset_score", best.get("score"), n), ("best_test_score", best.get("test_score"), n),
                          ("steps", n, n), ("steps_wall_s", wall, n),
                          *((k, v, n) for k, v in _flatten({"costs": best.get("costs") or {},
                                                            "test_costs": best.get("test_costs") or {}}).items())],
         tags={"tandem.best_strategy": best.get("strategy"), "tandem.failed_step": best.get("failed_step"),
               "mlflow.note.content": _read(store.root / "report.md")})  # the note: the run page's description
    for name in ("run.json", "best.json", "program.json", "report.md", "scores.png"):
        if (store.root / name).is_file():
            client.log_artifact(run_id, str(store.root / name))
    if best and (store.root / "program.json").is_file():
        _log_model(client, run_id, store.root / "program.json", best)


def _log_model(client, run_id: str, program_json: Path, best: dict) -> None:
    """Save the winner as a pyfunc model from code (no pickle) and log it under ``program/``."""
    import dspy

    with tempfile.TemporaryDirectory(prefix="tandem-model-") as tmp, _no_type_hint_notes():
        import mlflow
        import mlflow.pyfunc

        code = Path(tmp, "tandem_program.py")
        code.write_text(_MODEL_CODE)
        mlflow.pyfunc.save_model(
            path=str(Path(tmp, MODEL_PATH)), python_model=str(code), artifacts={"program": str(program_json)},
            model_config={"program": best["program"], "program_args": best.get("program_args") or {}},
            pip_requirements=[f"mlflow-skinny=={mlflow.__version__}", f"dspy=={dspy.__version__}"])
        client.log_artifacts(run_id, str(Path(tmp, MODEL_PATH)), MODEL_PATH)


def _log_cell(client, exp_id: str, parent_id: str, cell: Cell, digest: str) -> str:
    name = f"seed-{cell.seed} {cell.strategy}"
    run_id = client.create_run(exp_id, tags=_tags({
        "mlflow.parentRunId": parent_id, "tandem.child": name, "tandem.digest": digest, "tandem.seed": cell.seed,
        "tandem.strategy": cell.strategy, "tandem.run_dir": cell.run_dir, "tandem.reason": cell.reason}),
        run_name=name).info.run_id
    _log(client, run_id, [("test_score", cell.test_score, 0), ("valset_score", cell.dev_score, 0),
                          ("wall_s", cell.wall_s, 0)] + [(f"test.{k}", v, 0) for k, v in (cell.held_out or {}).items()
                                                         if k != "score"])
    client.set_terminated(run_id, "FINISHED" if cell.reason is None else "FAILED")
    return run_id


# -- MLflow plumbing -------------------------------------------------------------------------


def _or_warn(track, what: str, uri: str) -> TrackedRun | None:
    try:
        tracked = track()
    except Exception as exc:  # tracking never fails a run: one named warning (the traceback at debug)
        logger.debug("tracking failure", exc_info=True)
        logger.warning("tracking: could not log %s to MLflow at %s: %s: %s (the result stands; "
                       "--no-tracking turns tracking off)", what, uri, type(exc).__name__, first_line(str(exc)))
        return None
    if tracked is not None:
        logger.info("tracking: %s", tracked.describe())
    return tracked


@contextmanager
def _session(uri: str) -> Iterator[Any]:
    """An ``MlflowClient`` for ``uri`` after a reachability check; MLflow's "View run at" lines
    (printed to stdout for HTTP stores) and progress bars are turned off meanwhile."""
    _check_reachable(uri)
    from mlflow.tracking import MlflowClient

    quiet = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with environ(quiet):
        yield MlflowClient(tracking_uri=uri)


@contextmanager
def _no_type_hint_notes() -> Iterator[None]:
    """MLflow's notes on ``Any`` in type hints (its own, on import, and ours: a program takes any
    inputs) are left out; every other warning passes on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "Any type hint" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _check_reachable(uri: str) -> None:
    """Fail fast on an HTTP server nobody answers at (MLflow itself retries for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    if urllib.request.getproxies().get(parsed.scheme) and not urllib.request.proxy_bypass(parsed.hostname or ""):
        return  # reached through a proxy: MLflow's own requests tell
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise TrackingError(f"cannot connect to {parsed.hostname}:{port} ({exc})") from exc


def _experiment(client, name: str, uri: str) -> str:
    """The experiment's id, created if new (for a sqlite store: artifacts in ``mlartifacts/`` beside it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    location = str(Path(db).resolve().parent / "mlartifacts") if db else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _parent(client, exp_id: str, key: str, name: str, params: dict, tags: dict, start: float | None = None):
    """The run tagged ``tandem.key`` = ``key``; created (with ``params``, started at ``start``) if none is."""
    found = client.search_runs([exp_id], filter_string=f"tags.`tandem.key` = '{key}'", max_results=1)
    if found:
        return found[0]
    run_id = client.create_run(exp_id, int(start * 1000) if start else None, _tags({**tags, "tandem.key": key}),
                               name).info.run_id
    _log(client, run_id, params=params)
    return client.get_run(run_id)


def _sync(client, exp_id: str, parent_id: str, wanted: list[tuple[str, str, Any]]) -> tuple[dict, tuple]:
    """The parent's nested runs, one per ``(name, digest, log)``: a run logged before with the same
    digest is kept; one that was interrupted (still RUNNING) or whose files changed since is deleted
    and ``log(digest)`` makes it anew. Returns name -> run id, and the names logged now."""
    old = {r.data.tags.get("tandem.child"): r for r in client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)}
    children, added = {}, []
    for name, digest, log in wanted:
        run = old.get(name)
        if run is not None and run.info.status != "RUNNING" and run.data.tags.get("tandem.digest") == digest:
            children[name] = run.info.run_id
            continue
        if run is not None:
            client.delete_run(run.info.run_id)
        children[name] = log(digest)
        added.append(name)
    return children, tuple(added)


def _log(client, run_id: str, metrics: list[tuple[str, Any, int]] = (), *, params: dict | None = None,
         tags: dict | None = None, timestamp: int | None = None) -> None:
    """``log_batch`` in MLflow's batch sizes; metrics that are not numbers (None, NaN) are left out."""
    from mlflow.entities import Metric, Param, RunTag

    stamp = timestamp or int(time.time() * 1000)
    items = [Metric(_metric_name(k), float(v), stamp, int(s)) for k, v, s in metrics if _number(v)]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])
    for kind, cls, values in (("params", Param, {k: str(v)[:_PARAM_MAX] for k, v in (params or {}).items()}),
                              ("tags", RunTag, _tags(tags or {}))):
        batch = [cls(k, v) for k, v in values.items()]
        for i in range(0, len(batch), _BATCH):
            client.log_batch(run_id, **{kind: batch[i:i + _BATCH]})


def _tags(tags: dict) -> dict[str, str]:
    return {k[:250]: str(v)[:_TAG_MAX] for k, v in tags.items() if v is not None}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and dataclasses as ``a.b`` keys; lists and tuples as JSON; an empty dict as ``{}``."""
    if is_dataclass(data) and not isinstance(data, type):
        data = asdict(data)
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, (list, tuple)):
        return {prefix: json.dumps(list(data), default=str)}
    return {prefix: "{}" if isinstance(data, dict) else data}


def _metric_name(name: str) -> str:
    """MLflow takes letters, digits, ``_ - . / `` and spaces in names; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)[:250]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _slug(strategy: str) -> str:
    return strategy.replace(" -> ", "-") or "baseline"


def _digest(*parts: str | None) -> str:
    return hashlib.sha256("\x00".join(p or "" for p in parts).encode()).hexdigest()[:32]


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
