"""The run dir: its one typed reader and writer, used by run, report, table and serve.

Layout::

    RUN_DIR/run.json                 the run's fingerprint (program, model, strategy, settings)
    RUN_DIR/00_baseline/             program.json (dspy JSON, no LM), step.json (score, model ids, …)
    RUN_DIR/01_p/  02_w/  03_p/      the same, plus candidates / traces.parquet / ray_train/ / metrics
    RUN_DIR/NN_key/test.json         the step's program on the held-out test split (``engine.held_out``)
    RUN_DIR/adapters/<slug>-<hash>/  LoRA adapters (folder name: ``actors.dspy_side.finetune.adapter_dir_name``)
    RUN_DIR/best.json, program.json  the winner (written when the run ends)
    RUN_DIR/report.md, scores.png    written at the end

A step is built in ``NN_key.tmp/`` and renamed into place after its ``step.json`` is written:
a half-written step is never taken as done. Every JSON file is written whole or not at all and
fsynced (``engine.store.files``); a damaged one is an error naming the file and what to do, except
an optional ``test.json``, which is scored again. A step's own resumable state (GEPA's) lives in
``NN_key.state/`` until the step commits (``state_dir``). The run dir has one writer at a time
(``engine.store.lock``). A rerun whose fingerprint differs is refused with
the differing keys named. Paths inside the run dir are recorded relative to it, so a run dir
that was moved, copied or pulled from ``storage:`` resumes and serves; an absolute path of an
older run dir that no longer exists is looked up again under ``RUN_DIR/adapters/``.
Does not know DSPy beyond saving programs through ``program_io``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import dspy

from engine.store.files import DamagedFile, fsync_dir, read_json, write_json
from engine.store.program_io import ProgramFileError, load_program, save_program

logger = logging.getLogger(__name__)
RUN_JSON_FIX = "restore it (e.g. from storage:) or start over in a new run dir"

class RunDirError(ValueError):
    """The run dir is missing, unfinished, or its files do not fit together."""


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter a step's program uses: its model id and where it lies (absolute)."""

    name: str
    path: Path


@dataclass(frozen=True)
class StepRecord:
    """What a completed step left: its score, strategy prefix and the model id of each predictor."""

    index: int
    key: str
    strategy: str
    score: float | None
    models: dict[str, str]
    adapters: list[AdapterRef]
    extra: dict
    path: Path
    test: dict | None = None  # test.json: written after the run's last step, None until then

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class BestRecord:
    """The winner of a finished run (``best.json``)."""

    program: str
    program_args: dict
    base_model: str
    strategy: str
    score: float | None
    models: dict[str, str]  # predictor -> model id (base or adapter)
    adapters: dict[str, Path]  # adapter id -> absolute path
    failed_step: bool
    test_score: float | None = None  # the winner on the held-out test split (None: not scored)
    costs: dict | None = None  # what this invocation spent (``actors.dspy_side.usage.Costs``), test scoring included
    test_costs: dict | None = None  # of that, scoring the steps on the test split


class RunStore:
    """One run dir.

    Args:
        root: the run dir (created when ``fingerprint`` is given).
        fingerprint: JSON-able settings that must match for a resume; None opens a finished or
            running run dir for reading (it must hold ``run.json``).

    Raises:
        ValueError: the dir holds a run with another fingerprint.
        RunDirError: reading a dir that holds no run.

    Example:
        >>> store = RunStore("runs/iris-smollm2")  # doctest: +SKIP
        >>> [s.score for s in store.steps()], store.best().strategy  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, fingerprint: dict | None = None):
        self.root = Path(root).resolve()
        self.adapters = self.root / "adapters"
        marker = self.root / "run.json"
        if fingerprint is None:
            if not marker.is_file():
                raise RunDirError(f"{self.root} holds no run (no run.json)")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fingerprint = json.loads(json.dumps(fingerprint, default=str))  # tuples and lists compare as JSON
        if marker.exists():
            old = read_json(marker, RUN_JSON_FIX)
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if diff:
                raise ValueError(f"run dir {self.root} holds a run with other settings ({', '.join(diff)}); "
                                 "use a new run dir or the same settings to resume")
        else:
            write_json(marker, fingerprint)

    @staticmethod
    def name(index: int, key: str) -> str:
        return f"{index:02d}_{key or 'baseline'}"

    def settings(self) -> dict:
        """The run's fingerprint (``run.json``)."""
        return read_json(self.root / "run.json", RUN_JSON_FIX)

    # -- steps -------------------------------------------------------------------------------

    def completed(self, index: int, key: str) -> StepRecord | None:
        """The record of a completed step, or None (a leftover ``.tmp`` dir does not count)."""
        return self.step(self.name(index, key))

    def step(self, name: str) -> StepRecord | None:
        """The completed step called ``name`` (e.g. ``02_w``), or None."""
        path = self.root / name
        record = path / "step.json"
        if path.suffix == ".tmp" or not record.is_file():
            return None
        data = read_json(record, f"delete the folder {path} and rerun the same command: the step is done again")
        index, _, key = name.partition("_")
        return StepRecord(int(index), "" if key == "baseline" else key, data["strategy"], data["score"],
                          dict(data["models"]), [AdapterRef(a["name"], self._abs(a["path"]))
                                                 for a in data.get("adapters", [])],
                          data.get("extra", {}), path, _read_test(path / "test.json"))

    def steps(self) -> list[StepRecord]:
        """Every completed step, in order."""
        records = (self.step(p.name) for p in sorted(self.root.glob("[0-9][0-9]_*")))
        return [r for r in records if r is not None]

    def begin(self, index: int, key: str) -> Path:
        """A clean temp dir for the step's files."""
        tmp = self.root / (self.name(index, key) + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def state_dir(self, index: int, key: str) -> Path:
        """A dir for a step's own resumable state (e.g. GEPA's): unlike ``begin``'s, it survives a
        failed or killed attempt, so the next attempt resumes from it; ``commit`` moves it into the
        step's folder (``state/``)."""
        path = self.root / (self.name(index, key) + ".state")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, index: int, key: str, *, program: dspy.Module, strategy: str, score: float | None,
               adapters: list[AdapterRef], extra: dict | None = None) -> StepRecord:
        """Write program and record into the temp dir and rename it into place."""
        tmp = self.root / (self.name(index, key) + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        state = self.root / (self.name(index, key) + ".state")
        if state.is_dir():
            shutil.rmtree(tmp / "state", ignore_errors=True)
            state.rename(tmp / "state")
        save_program(program, tmp / "program.json")
        models = {name: pred.lm.model for name, pred in program.named_predictors() if pred.lm is not None}
        record = {"strategy": strategy, "score": score, "models": models,
                  "adapters": [{"name": a.name, "path": self._rel(a.path)} for a in adapters], "extra": extra or {}}
        write_json(tmp / "step.json", record)
        final = self.root / self.name(index, key)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(self.root)
        return self.completed(index, key)

    def write_test(self, name: str, result: dict) -> None:
        """Record step ``name``'s held-out test result (``test.json``, written whole or not at all)."""
        write_json(self.root / name / "test.json", result)

    def load(self, record: StepRecord, fresh: dspy.Module) -> dspy.Module:
        """The step's program: ``fresh`` (a new instance of the program) with the saved state.

        Raises:
            DamagedFile: the step's ``program.json`` cannot be read or does not fit the program; it names the
                file and the fix (do the step again).
        """
        try:
            return load_program(fresh, record.path / "program.json")
        except ProgramFileError as exc:
            file = record.path / "program.json"
            reason = str(exc).removeprefix(f"{file} ")[:60]  # short: the console shows a step's error in 300 chars
            raise DamagedFile(f"{file} is damaged ({reason}); delete the folder {record.path} and rerun the same "
                              "command: the step is done again") from exc

    # -- the winner --------------------------------------------------------------------------

    def write_best(self, best: BestRecord) -> None:
        """Write ``best.json`` (adapter paths relative to the run dir)."""
        data = {"program": best.program, "program_args": best.program_args, "base_model": best.base_model,
                "strategy": best.strategy, "score": best.score, "models": best.models,
                "adapters": {name: self._rel(path) for name, path in best.adapters.items()},
                "failed_step": best.failed_step, "test_score": best.test_score, "costs": best.costs,
                "test_costs": best.test_costs}
        write_json(self.root / "best.json", data)

    def best(self) -> BestRecord:
        """The winner of a finished run.

        Raises:
            RunDirError: no ``best.json`` (the run did not finish).
        """
        path = self.root / "best.json"
        if not path.is_file():
            raise RunDirError(f"{self.root} has no best.json: not a finished run")
        data = read_json(path, "rerun the same command: the winner is chosen and written again")
        return BestRecord(data["program"], dict(data.get("program_args", {})), data["base_model"],
                          data.get("strategy", ""), data.get("score"), dict(data["models"]),
                          {name: self._abs(p) for name, p in data.get("adapters", {}).items()},
                          bool(data.get("failed_step", False)), data.get("test_score"), data.get("costs"),
                          data.get("test_costs"))

    def adapter_paths(self) -> dict[str, Path]:
        """Every adapter any completed step used: id -> absolute path."""
        return {a.name: a.path for record in self.steps() for a in record.adapters}

    # -- paths -------------------------------------------------------------------------------

    def _rel(self, path: str | Path) -> str:
        """``path`` relative to the run dir when it lies inside it, else absolute."""
        path = Path(path).resolve()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def _abs(self, recorded: str) -> Path:
        path = Path(recorded)
        if not path.is_absolute():
            return self.root / path
        moved = self.adapters / path.name  # an older run dir, moved since: its adapters came along
        return moved if not path.exists() and moved.exists() else path


def _read_test(path: Path) -> dict | None:
    """A step's held-out result, or None when there is none or it is damaged (then it is scored again)."""
    if not path.is_file():
        return None
    try:
        return read_json(path, "it is scored again")
    except DamagedFile as exc:
        logger.warning("%s", exc)
        return None


def copy_steps(source: str | Path, target: str | Path, count: int) -> None:
    """Copy the completed steps 0..count-1 of run dir ``source`` and the adapters they use into
    ``target`` (not ``run.json``, the winner, or Ray Train's files): a run that continues them."""
    source_store = RunStore(source)
    target = Path(target).resolve()
    for record in source_store.steps():
        if record.index >= count:
            continue
        shutil.copytree(record.path, target / record.name, ignore=shutil.ignore_patterns("ray_train"),
                        dirs_exist_ok=True)
        for adapter in record.adapters:
            copied = target / "adapters" / adapter.path.name
            if adapter.path.is_relative_to(source_store.root) and not copied.exists():
                shutil.copytree(adapter.path, copied)
